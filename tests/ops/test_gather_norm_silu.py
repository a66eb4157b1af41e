"""gather_norm_silu (csrc/ops/gather_norm_silu.cpp, nets.onehot_norm_silu): a one-hot layer's gather-sum, its
dense part and LayerNorm+SiLU in one pass."""

import pytest
import torch
import torch.nn.functional as F

from fastdream.fast import _ops
from fastdream.model.nets import onehot_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dense", "groups", "classes", "out"),
                         [(4099, 256, 32, 32, 256), (37, 0, 5, 7, 96), (33, 12, 3, 4, 272), (5, 6, 3, 4, 40),
                          (43, 20, 9, 6, 416)])
def test_onehot_norm_silu_equals_the_gather_then_layer_norm_and_silu(dtype, rows, dense, groups, classes, out):
    """The fused C++ gather + LayerNorm + SiLU (no gradient) against float64 maths on the same (bf16-rounded)
    operands: 256 columns sum in registers, 96 and 272 end in 16-lane remainders, 40 is the scalar path, 416 takes
    the bf16 dot path's 256-, 128- and 32-column blocks in one row with an odd latent count (9: the paired sums'
    tail); ``dense = 0`` is a layer on the one-hot stoch alone (the RSSM's stoch input)."""
    from fastdream.model.nets import Norm, onehot_norm_silu

    torch.manual_seed(0)
    norm = Norm(out)
    torch.nn.init.normal_(norm.ln.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.ln.bias, 0.0, 0.5)
    index = torch.randint(0, classes, (rows, groups))
    x = torch.cat([torch.randn(rows, dense), F.one_hot(index, classes).float().flatten(-2)], -1)
    w = torch.randn(out, dense + groups * classes)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = onehot_norm_silu(x[:, :dense] if dense else x, w, norm, index, classes)
    assert got.dtype == dtype and got.shape == (rows, out)
    # The operands the kernel reads, as it reads them: the table rows rounded to the dtype, and the dense part's
    # matmul output as torch's matmul left it (bf16 under autocast, rounded from an fp32 sum whose order is the
    # CPU's matmul kernel's: recomputing it in float64 differs by a bf16 spacing of ~16, 0.0625, on some CPUs).
    wq = w.to(dtype).double()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        dense_out = F.linear(x[:, :dense], w[:, :dense]) if dense else torch.zeros(rows, out)
    pre = dense_out.double() + x[:, dense:].double() @ wq[:, dense:].T  # the S gathered rows, summed exactly
    want = F.silu(F.layer_norm(pre, (out,), norm.ln.weight.double(), norm.ln.bias.double(), 1e-3))
    # fp32: the kernel's S + 1 fp32 adds and its norm (~1e-6 of values up to ~8); bf16: one bf16 spacing of the
    # output (its rounding, 2^-9, plus the exp polynomial's 7.5e-5 and vrcp14's 6e-5 before it).
    tol = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=1e-4 if dtype == torch.float32 else 2**-8)
    # The composed ops (embedding_bag, add, norm_silu) the same way: against float64 maths of their own sum.
    from fastdream.model.nets import norm_silu

    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        summed = onehot_linear(x[:, :dense] if dense else x, w, index, classes)
        composed = norm_silu(summed, norm)
    want = F.silu(F.layer_norm(summed.double(), (out,), norm.ln.weight.double(), norm.ln.bias.double(), 1e-3))
    torch.testing.assert_close(composed.double(), want, rtol=tol, atol=1e-4 if dtype == torch.float32 else 2**-8)


def test_gather_norm_silu_refuses_bad_input_before_reading_out_of_bounds():
    import numpy as np


    table, w, b = np.ones((8, 16), np.float32), np.ones(16, np.float32), np.zeros(16, np.float32)
    rows, dense = np.zeros((5, 2), np.int64), np.ones((5, 16), np.float32)
    assert _ops.gather_norm_silu(dense, table, rows, w, b, 1e-3, False, 2).shape == (5, 16)
    bad = rows.copy()
    bad[4, 1] = 8
    with pytest.raises(IndexError, match=r"row index 8 outside \[0, 8\) of table \(8, 16\)"):
        _ops.gather_norm_silu(dense, table, bad, w, b, 1e-3, False, 2)
    bad[4, 1] = -1
    with pytest.raises(IndexError, match="row index -1"):
        _ops.gather_norm_silu(None, table, bad, w, b, 1e-3, False, 1)
    with pytest.raises(TypeError, match="rows dtype int32, expected int64"):
        _ops.gather_norm_silu(dense, table, rows.astype(np.int32), w, b, 1e-3)
    with pytest.raises(ValueError, match=r"dense \(4, 16\) must be a C-contiguous \[5, 16\]"):
        _ops.gather_norm_silu(dense[:4], table, rows, w, b, 1e-3)
    with pytest.raises(TypeError, match="table dtype float64, expected float32"):
        _ops.gather_norm_silu(dense, table.astype(np.float64), rows, w, b, 1e-3)
    with pytest.raises(TypeError, match="dense dtype float32, expected 16-bit words"):
        _ops.gather_norm_silu(dense, table.astype(np.int16), rows, w, b, 1e-3, True)
    with pytest.raises(ValueError, match=r"weight \(15,\) must be a contiguous \[16\]"):
        _ops.gather_norm_silu(dense, table, rows, w[:15], b, 1e-3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        _ops.gather_norm_silu(dense, table, rows, w, b, -1.0)
    # classes = K: rows hold classes and latent s reads table row s·K + class (R = S·K), as the rollout passes draws.
    rng = np.random.default_rng(0)
    table = rng.standard_normal((8, 16)).astype(np.float32)
    classes = rng.integers(0, 4, (5, 2))
    by_class = _ops.gather_norm_silu(dense, table, classes, w, b, 1e-3, False, 2, 4)
    np.testing.assert_array_equal(by_class, _ops.gather_norm_silu(dense, table, classes + [0, 4], w, b, 1e-3, False, 2))
    classes[2, 0] = 4  # a valid row index, not a valid class
    with pytest.raises(IndexError, match=r"class index 4 outside \[0, 4\)"):
        _ops.gather_norm_silu(dense, table, classes, w, b, 1e-3, False, 2, 4)
    with pytest.raises(ValueError, match=r"classes 3 must be 0 .* R = S \* K"):
        _ops.gather_norm_silu(dense, table, classes, w, b, 1e-3, False, 2, 3)
