import math

import pytest
import torch

from fastdream.model.maths import (
    categorical_kl,
    straight_through_sample,
    symexp,
    symlog,
    twohot_bins,
    twohot_decode_logp,
    twohot_encode,
    twohot_loss,
    twohot_nll,
    unimix_logits,
)
from fastdream.model.nets import MLP, BlockLinear, onehot_linear, twohot_decode


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


def test_onehot_linear_equals_the_matmul_in_values_and_weight_gradient():
    torch.manual_seed(0)
    deter, groups, classes, out = 5, 3, 4, 7
    index = torch.randint(0, classes, (2, 6, groups))
    hot = torch.nn.functional.one_hot(index, classes).float().flatten(-2)
    x = torch.cat([torch.randn(2, 6, deter), hot], -1)  # [2, 6, 5 + 12]
    w = torch.randn(out, deter + groups * classes, requires_grad=True)
    dense = torch.nn.functional.linear(x, w)
    fast = onehot_linear(x, w, index, classes)
    assert fast.shape == (2, 6, out)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    g = torch.randn(2, 6, out)
    torch.testing.assert_close(torch.autograd.grad(fast, w, g)[0], torch.autograd.grad(dense, w, g)[0],
                               rtol=1e-5, atol=1e-5)
    # Only the stoch part: start = 0 (the RSSM's stoch input layer).
    torch.testing.assert_close(onehot_linear(hot, w[:, deter:], index, classes), hot @ w[:, deter:].T,
                               rtol=1e-5, atol=1e-5)
    # An input that needs its gradient (straight-through) takes the matmul, so it still gets one.
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(onehot_linear(xg, w, index, classes).sum(), xg)
    torch.testing.assert_close(gx, w.detach().sum(0).expand_as(x))


def test_mlp_onehot_path_matches_dense_path():
    torch.manual_seed(0)
    mlp = MLP(5 + 8, 16, 2, 3)
    index = torch.randint(0, 4, (9, 2))
    x = torch.cat([torch.randn(9, 5), torch.nn.functional.one_hot(index, 4).float().flatten(-2)], -1)
    torch.testing.assert_close(mlp(x, (index, 4)), mlp(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient: the first layer, its norm and SiLU are one gather_norm_silu
        torch.testing.assert_close(mlp(x, (index, 4)), mlp(x), rtol=1e-5, atol=1e-5)


def test_rssm_dynhid_first_equals_block_linear_on_expanded_group_inputs():
    from fastdream.model.rssm import RSSM

    torch.manual_seed(0)
    rssm = RSSM(action_dim=3, embed_dim=5, deter=24, hidden=10, stoch=4, classes=4, blocks=4)
    deter, x = torch.randn(7, 24, requires_grad=True), torch.randn(7, 30, requires_grad=True)
    groups = torch.cat([deter.reshape(7, 4, 6), x.unsqueeze(1).expand(7, 4, 30)], -1).flatten(-2)  # [7, 4 * 36]
    ref = rssm.dynhid[0](groups)
    out = rssm.dynhid_first(deter, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    params = (deter, x, rssm.dynhid[0].weight, rssm.dynhid[0].bias)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_twohot_loss_is_the_cross_entropy_against_the_twohot_target():
    bins = twohot_bins()
    torch.manual_seed(0)
    logits = torch.randn(6, 255, requires_grad=True)
    target = torch.tensor([0.0, 1.0, -3.5, 250.0, 1e12, -1e12])  # in range, symlog-mid-bin, clipped both ends
    dense = -(twohot_encode(symlog(target), bins) * logits.log_softmax(-1)).sum(-1)
    loss = twohot_loss(logits, target, bins)
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-5)
    # Hand value: zero logits put 1/255 on every bin, so the loss is ln 255 whatever the target.
    torch.testing.assert_close(twohot_loss(torch.zeros(2, 255), torch.tensor([0.3, -7.0]), bins),
                               torch.full((2,), math.log(255.0)))
    g = torch.randn(6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits, g)[0], torch.autograd.grad(dense, logits, g)[0],
                               rtol=1e-5, atol=1e-6)


def test_twohot_from_shared_log_probs_equals_the_logit_forms():
    """The critic shares one log_softmax between its value and two losses: the log-prob forms must equal
    ``twohot_decode``/``twohot_loss`` on the logits, and the summed losses' gradient too."""
    bins = twohot_bins()
    torch.manual_seed(1)
    logits = (3 * torch.randn(5, 255)).requires_grad_(True)
    a, b = torch.tensor([0.5, -2.0, 40.0, 0.0, -1e9]), torch.tensor([1.0, 7.0, -3.0, 2.5, 0.1])
    logp = logits.log_softmax(-1)
    shared = twohot_nll(logp, a, bins) + twohot_nll(logp, b, bins)
    apart = twohot_loss(logits, a, bins) + twohot_loss(logits, b, bins)
    torch.testing.assert_close(shared, apart)
    torch.testing.assert_close(torch.autograd.grad(shared.sum(), logits)[0],
                               torch.autograd.grad(apart.sum(), logits)[0])
    torch.testing.assert_close(twohot_decode_logp(logp, bins), twohot_decode(logits, bins))
    # Hand value: all mass on bin 200 decodes to exactly symexp(bins[200]).
    peak = torch.full((1, 255), -1e4)
    peak[0, 200] = 0.0
    torch.testing.assert_close(twohot_decode_logp(peak.log_softmax(-1), bins), symexp(bins[200:201]))


def test_twohot_decode_stays_fp32_under_bf16_autocast():
    bins = twohot_bins()
    logits = torch.full((3, 255), -50.0)
    logits[:, 200] = 50.0  # all mass on one bin: the value is exactly symexp(bins[200])
    with torch.autocast("cpu", torch.bfloat16):
        value = twohot_decode(logits, bins)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, symexp(bins[200]).expand(3), rtol=1e-5, atol=1e-4)


def test_rssm_observe_equals_the_plain_per_step_loop_in_values_and_gradients():
    """observe hoists the action input, the embedding's projection and the weight slices out of the
    recurrence; it must equal a loop of core + full posterior MLP per step, resets included."""
    from fastdream.model.maths import unimix_logits
    from fastdream.model.rssm import RSSM

    torch.manual_seed(0)
    B, T, E, A = 3, 6, 7, 2
    rssm = RSSM(action_dim=A, embed_dim=E, deter=24, hidden=10, stoch=4, classes=5, blocks=4)
    embed = torch.randn(B, T, E, requires_grad=True)
    action = 3 * torch.randn(B, T, A)  # |a| > 1 exercises the scaling
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[1, 3] = True
    torch.manual_seed(1)
    out = rssm.observe(embed, action, is_first)
    torch.manual_seed(1)
    deter, stoch = rssm.initial(B)
    deters, stochs, posts = [], [], []
    for t in range(T):
        keep = (~is_first[:, t]).float()
        deter = rssm.core(deter * keep[:, None], stoch * keep[:, None, None], action[:, t] * keep[:, None])
        raw = rssm.post_net(torch.cat([deter, embed[:, t]], -1)).reshape(B, 4, 5)
        post = unimix_logits(raw, rssm.unimix)
        stoch = straight_through_sample(post, torch.rand(B, 4))
        deters.append(deter), stochs.append(stoch), posts.append(post)
    ref = {"deter": torch.stack(deters, 1), "stoch": torch.stack(stochs, 1), "post": torch.stack(posts, 1)}
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["stoch"].detach().argmax(-1), ref["stoch"].detach().argmax(-1))
    params = [embed, *rssm.parameters()]
    weights = {k: torch.randn_like(v) for k, v in ref.items()}

    def grads(d):
        loss = sum((d[k] * w).sum() for k, w in weights.items())
        return torch.autograd.grad(loss, params, allow_unused=True)

    for a, b in zip(grads(out), grads(ref), strict=True):
        if b is None:  # the prior net is not on this path
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rssm_observe_compiled_step_equals_eager_in_values_and_gradients():
    """The compile engines run the posterior steps as compiled graphs of ``obs_chunk`` steps (the rest one
    by one): given the same draws they must give the eager sequence's states and parameter gradients (resets
    inside a chunk and fed noise included)."""
    from fastdream.model.rssm import RSSM

    torch.manual_seed(0)
    B, T, E, A = 3, 5, 7, 2
    rssm = RSSM(action_dim=A, embed_dim=E, deter=24, hidden=10, stoch=4, classes=5, blocks=4)
    embed = torch.randn(B, T, E, requires_grad=True)
    action = 3 * torch.randn(B, T, A)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[2, 2] = True
    noise = torch.rand(B, T, 4)
    rssm.obs_chunk = 2  # T = 5: two 2-step graphs, then one single step
    eager = rssm.observe(embed, action, is_first, noise=noise)
    comp = rssm.observe(embed, action, is_first, noise=noise, compiled=True)
    for k in ("deter", "stoch", "post", "prior"):
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5)
    assert torch.equal(comp["stoch"].detach().argmax(-1), eager["stoch"].detach().argmax(-1))
    params = [embed, *rssm.parameters()]
    weights = {k: torch.randn_like(v) for k, v in eager.items()}

    def grads(d):
        return torch.autograd.grad(sum((d[k] * w).sum() for k, w in weights.items()), params, allow_unused=True)

    for a, b in zip(grads(comp), grads(eager), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_world_model_compiled_loss_equals_eager_with_pixels_and_vector():
    """The world-model loss with compiled posterior steps, image encoder and image loss equals the eager
    loss for the same draws, in every loss term (image and vector) and every parameter gradient."""
    from fastdream.model.world_model import WorldModel

    torch.manual_seed(0)
    B, T = 2, 3
    wm = WorldModel(vector_dim=3, image=True, action_dim=2, deter=16, hidden=8, stoch=4, classes=4, blocks=4,
                    units=16, cnn_mult=2)
    batch = {"vector": torch.randn(B, T, 3), "image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8),
             "action": torch.randn(B, T, 2), "reward": torch.randn(B, T),
             "is_first": torch.tensor([[True, False, False], [True, False, True]]),
             "is_terminal": torch.tensor([[False, False, True], [False, False, False]])}
    noise = torch.rand(B, T, 4)  # the same posterior draws for both paths
    results = []
    for compiled in (False, True):
        loss, metrics, _ = wm.loss(batch, compiled=compiled, noise=noise)
        grads = torch.autograd.grad(loss, list(wm.parameters()), allow_unused=True)
        results.append((loss, metrics, grads))
    (l0, m0, g0), (l1, m1, g1) = results
    assert "wm/rec_image" in m0 and float(m0["wm/rec_image"]) > 0
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-4, atol=1e-4)
    for (name, _), a, b in zip(wm.named_parameters(), g1, g0, strict=True):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_stack_fuses_norm_silu_without_changing_modules_or_state_dict_keys():
    from fastdream.model.nets import Norm, Stack

    torch.manual_seed(0)
    mods = [torch.nn.Linear(6, 32, bias=False), Norm(32), torch.nn.SiLU(), torch.nn.Linear(32, 32), Norm(32)]
    stack, plain = Stack(*mods), torch.nn.Sequential(*mods)
    assert list(stack.state_dict()) == list(plain.state_dict())
    assert isinstance(stack[1:], Stack) and len(stack[1:]) == 4
    x = torch.randn(40, 6)
    with torch.no_grad():  # the C++ norm_silu for modules 1-2, torch's LayerNorm alone for the last Norm
        torch.testing.assert_close(stack(x), plain(x), rtol=1e-5, atol=1e-5)
