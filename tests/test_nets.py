import math

import pytest
import torch

from fastdream.nets import (
    BlockLinear,
    categorical_kl,
    straight_through_sample,
    symexp,
    symlog,
    twohot_bins,
    twohot_decode,
    twohot_encode,
    unimix_logits,
)


def test_symlog_symexp_hand_values_and_inverse():
    x = torch.tensor([-10.0, -1.0, 0.0, 1.0, math.e - 1, 1000.0])
    expected = torch.tensor([-math.log(11), -math.log(2), 0.0, math.log(2), 1.0, math.log(1001)])
    torch.testing.assert_close(symlog(x), expected)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-5, atol=1e-5)


def test_twohot_encode_hand_values():
    bins = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    enc = twohot_encode(torch.tensor([0.25, -2.0, 1.0, 5.0, -1.5]), bins)
    torch.testing.assert_close(enc[0], torch.tensor([0.0, 0.0, 0.75, 0.25, 0.0]))
    torch.testing.assert_close(enc[1], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(enc[2], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(enc[3], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))  # clipped to the top bin
    torch.testing.assert_close(enc[4], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))


def test_twohot_round_trip_over_dreamer_bins():
    bins = twohot_bins()
    assert len(bins) == 255 and bins[0] == -20 and bins[-1] == 20
    y = torch.tensor([-1234.5, -3.0, -0.01, 0.0, 0.7, 1.0, 475.0, 1e5])
    enc = twohot_encode(symlog(y), bins)
    torch.testing.assert_close(enc.sum(-1), torch.ones(len(y)))
    # Decoding logits log(enc) gives back y (expected value of the two-hot in symlog space).
    dec = twohot_decode(enc.clamp(min=1e-30).log(), bins)
    torch.testing.assert_close(dec, y, rtol=1e-4, atol=1e-4)


def test_unimix_probabilities():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    p = unimix_logits(logits, 0.01).exp()
    soft = torch.softmax(logits, -1)
    torch.testing.assert_close(p, 0.99 * soft + 0.01 / 4)
    assert p.min() >= 0.01 / 4 - 1e-7
    torch.testing.assert_close(p.sum(-1), torch.ones(1))


def test_categorical_kl_hand_value():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.9, 0.1]).log()
    kl = categorical_kl(p[None, None], q[None, None])  # one latent, two classes
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    torch.testing.assert_close(kl, torch.tensor([expected]))
    # Summed over latents: two identical latents give twice the KL.
    kl2 = categorical_kl(torch.stack([p, p])[None], torch.stack([q, q])[None])
    torch.testing.assert_close(kl2, torch.tensor([2 * expected]))


def test_straight_through_sample_frequencies_and_gradient():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, math.log(3.0)]).requires_grad_()  # probabilities 0.25, 0.75
    samples = straight_through_sample(logits.expand(40_000, 2))
    assert ((samples == 0) | (samples == 1)).all() or torch.allclose(samples.detach().sum(-1), torch.ones(40_000))
    freq = samples.detach().mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.75]), atol=0.01, rtol=0)
    # Straight-through: d sample / d logits is the softmax Jacobian.
    samples[:, 1].sum().backward()
    torch.testing.assert_close(logits.grad, 40_000 * torch.tensor([-0.1875, 0.1875]), rtol=1e-4, atol=1e-2)
    # Fixed noise makes the draw reproducible: u < 0.25 picks class 0.
    s = straight_through_sample(torch.tensor([[0.0, math.log(3.0)]] * 2), noise=torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_block_linear_equals_block_diagonal_matrix():
    torch.manual_seed(0)
    layer = BlockLinear(12, 6, groups=3)
    x = torch.randn(5, 12)
    dense = torch.block_diag(*layer.weight.detach())  # [12, 6]
    torch.testing.assert_close(layer(x), x @ dense + layer.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by groups"):
        BlockLinear(10, 6, groups=3)
