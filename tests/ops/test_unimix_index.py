"""unimix_index (csrc/ops/unimix_index.cpp): the prior and action draws, unimix softmax and inverse CDF in one
pass."""

import pytest
import torch

from fastdream.fast import _ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "classes", "unimix"), [(4099, 32, 0.01), (37, 5, 0.01), (50, 48, 0.0), (20, 1, 0.01)])
def test_unimix_index_equals_the_cumsum_draw(dtype, rows, classes, unimix):
    """The C++ draw against ``inverse_cdf_index(unimix_probs(·))``: 4099 rows end in a partial 16-row tile,
    K = 5 and 1 take the scalar transposition, K = 48 three shuffled 16 x 16 blocks; logits span ±40."""
    from fastdream.model.maths import inverse_cdf_index, unimix_probs
    from fastdream.model.nets import unimix_index

    torch.manual_seed(0)
    logits = (torch.randn(rows, classes) * 12).clamp(-40, 40).to(dtype)
    noise = torch.rand(rows)
    want = inverse_cdf_index(unimix_probs(logits.float(), unimix), noise)
    got = unimix_index(logits, noise, unimix)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    # Only a draw within float rounding of a CDF step may land on the neighbouring class.
    cdf = unimix_probs(logits.float(), unimix).cumsum(-1)
    near_step = (cdf - noise[:, None]).abs().min(-1).values < 1e-5
    assert bool(((got == want) | near_step).all())
    assert int((got != want).sum()) <= 1
    assert int(got.min()) >= 0 and int(got.max()) <= classes - 1
    # Rows shaped [..., K] keep their leading shape; u = 0 takes class 0, u just below 1 the last class
    # that has any probability.
    edge_noise = torch.tensor([[0.0, 0.0, 0.0], [1 - 1e-7] * 3])
    edge = unimix_index(logits[:6].reshape(2, 3, classes), edge_noise, unimix)
    last = inverse_cdf_index(unimix_probs(logits[3:6].float(), unimix), edge_noise[1])
    assert edge.shape == (2, 3) and edge[0].eq(0).all() and edge[1].eq(last).all()
    if unimix > 0:
        assert edge[1].eq(classes - 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "latents", "classes"), [(257, 32, 32), (9, 3, 5)])
def test_unimix_index_adds_a_bias_row_per_latent(dtype, n, latents, classes):
    """``bias [S·K]``: row (n, s) draws from logits + bias row s, as if a head's addmm had added it (K = 32
    takes the transposed tiles, K = 5 the scalar path; 257·32 rows end in a partial tile)."""
    from fastdream.model.maths import inverse_cdf_index, unimix_probs
    from fastdream.model.nets import unimix_index

    torch.manual_seed(0)
    logits = (torch.randn(n, latents, classes) * 4).to(dtype)
    bias = torch.randn(latents * classes) * 4
    noise = torch.rand(n, latents)
    full = logits.float() + bias.reshape(latents, classes)
    want = inverse_cdf_index(unimix_probs(full, 0.01), noise)
    got = unimix_index(logits, noise, 0.01, bias)
    near_step = (unimix_probs(full, 0.01).cumsum(-1) - noise[..., None]).abs().min(-1).values < 1e-5
    assert got.shape == (n, latents) and bool(((got == want) | near_step).all())
    assert float((got != unimix_index(logits, noise, 0.01)).float().mean()) > 0.2  # the bias matters

    with pytest.raises(ValueError, match=r"bias \(7,\) must be a contiguous \[P \* K\]"):
        _ops.unimix_index(logits.float().reshape(-1, classes).numpy(), noise.reshape(-1).numpy(), 0.01, False, 1,
                          torch.zeros(7).numpy())


def test_unimix_index_threads_split_rows_and_bad_input_is_refused():
    import numpy as np


    rng = np.random.default_rng(0)
    logits, noise = rng.standard_normal((1000, 32), dtype=np.float32), rng.random(1000, dtype=np.float32)
    one = _ops.unimix_index(logits, noise, 0.01, False, 1)
    assert np.array_equal(one, _ops.unimix_index(logits, noise, 0.01, False, 2))
    with pytest.raises(TypeError, match="float64, expected float32"):
        _ops.unimix_index(logits.astype(np.float64), noise, 0.01)
    with pytest.raises(TypeError, match="float32, expected 16-bit words"):
        _ops.unimix_index(logits, noise, 0.01, True)
    with pytest.raises(TypeError, match="noise dtype float64"):
        _ops.unimix_index(logits, noise.astype(np.float64), 0.01)
    with pytest.raises(ValueError, match=r"logits \(1000, 32\) and noise \(999,\)"):
        _ops.unimix_index(logits, noise[:999], 0.01)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.unimix_index(np.ascontiguousarray(logits[:32, :32]).T, noise[:32], 0.01)
    with pytest.raises(ValueError, match="unimix must be in"):
        _ops.unimix_index(logits, noise, 1.0)
