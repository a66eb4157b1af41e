"""norm_silu (csrc/ops/norm_silu.cpp): LayerNorm+SiLU, plain or in the block matmul's layout, with addends."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import BF16_RTOL

from fastdream.fast import _ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4099, 256), (37, 96), (5, 7, 40)])
def test_norm_silu_equals_layer_norm_then_silu(dtype, shape):
    """The C++ LayerNorm+SiLU (no gradient) against torch's fp32 maths: 256 and 96 columns take the 16-lane
    path, 40 the scalar one; rows carry a mean and scale of their own, weights and biases are not trivial."""
    from fastdream.model.nets import Norm, norm_silu

    torch.manual_seed(0)
    norm = Norm(shape[-1])
    torch.nn.init.normal_(norm.ln.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.ln.bias, 0.0, 0.5)
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 8 + torch.randn(*shape[:-1], 1) * 3).to(dtype)
    want = F.silu(F.layer_norm(x.float(), shape[-1:], norm.ln.weight, norm.ln.bias, 1e-3)).detach()
    with torch.no_grad():
        got = norm_silu(x, norm)
    assert got.dtype == dtype and got.shape == shape
    # Outputs reach ~±10: atol covers float32's summation order in the mean and variance (outputs near 0).
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # within a bfloat16 rounding of the fp32 result; the exact rounding in all but a few
        torch.testing.assert_close(got.float(), want, rtol=BF16_RTOL, atol=2e-5)
        assert float((got != want.to(dtype)).float().mean()) < 0.01
    # With a gradient to pass on it is torch's own maths, and the gradient flows.
    y = norm_silu(x.float(), norm)
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "groups", "cg"), [(4099, 8, 32), (37, 4, 24), (5, 3, 7)])
def test_norm_silu_groups_writes_the_block_matmul_layout(dtype, rows, groups, cg):
    """``groups``: the same values laid out ``[G, M, C/G]``, for the 16-lane (256 and 96 columns) and
    scalar (21) paths; with a gradient the torch maths give the same layout."""
    from fastdream.model.nets import Norm, norm_silu

    torch.manual_seed(0)
    norm = Norm(groups * cg)
    torch.nn.init.normal_(norm.ln.bias, 0.0, 0.5)
    x = (torch.randn(rows, groups * cg) * 3).to(dtype)
    with torch.no_grad():
        flat = norm_silu(x, norm)
        grouped = norm_silu(x, norm, groups)
    assert grouped.shape == (groups, rows, cg) and grouped.is_contiguous() and grouped.dtype == dtype
    assert torch.equal(grouped, flat.reshape(rows, groups, cg).transpose(0, 1))
    y = norm_silu(x.float(), norm, groups)
    assert y.requires_grad and y.shape == (groups, rows, cg) and y.is_contiguous()
    torch.testing.assert_close(y.detach(), flat.float().reshape(rows, groups, cg).transpose(0, 1),
                               rtol=BF16_RTOL, atol=1e-5)
    # A block matmul's output as its bmm leaves it ([G, M, C/G]) and a bias, summed in by the kernel: the same as
    # the sum in float64 (the kernel sums in fp32, so bf16 results may differ by one rounding).
    add = (torch.randn(groups, rows, cg) * 2).to(dtype)
    add_bias = torch.randn(groups * cg)
    with torch.no_grad():
        summed = norm_silu(x, norm, groups, add, add_bias)
    pre = x.double() + add.double().transpose(0, 1).reshape(rows, -1) + add_bias.double()
    want = F.silu(F.layer_norm(pre, (groups * cg,), norm.ln.weight.double(), norm.ln.bias.double(), 1e-3))
    want = want.reshape(rows, groups, cg).transpose(0, 1)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(summed.double(), want, rtol=tol, atol=tol)
    g = norm_silu(x.float(), norm, groups, add.float(), add_bias)  # with a gradient: torch's maths, same values
    torch.testing.assert_close(g.detach().double(), want, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)


def test_norm_silu_refuses_bad_input():
    import numpy as np


    x, w, b = np.ones((8, 16), np.float32), np.ones(16, np.float32), np.zeros(16, np.float32)
    assert _ops.norm_silu(x, w, b, 1e-3).shape == (8, 16)
    with pytest.raises(TypeError, match="x dtype float64, expected float32"):
        _ops.norm_silu(x.astype(np.float64), w, b, 1e-3)
    with pytest.raises(TypeError, match="expected 16-bit words"):
        _ops.norm_silu(x, w, b, 1e-3, True)
    with pytest.raises(ValueError, match=r"weight \(15,\) must be a contiguous \[16\]"):
        _ops.norm_silu(x, w[:15], b, 1e-3)
    with pytest.raises(TypeError, match="bias dtype float64"):
        _ops.norm_silu(x, w, b.astype(np.float64), 1e-3)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.norm_silu(np.ones((16, 8), np.float32).T, w, b, 1e-3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        _ops.norm_silu(x, w, b, 0.0)
    with pytest.raises(ValueError, match="groups 3 must be >= 1 and divide C = 16"):
        _ops.norm_silu(x, w, b, 1e-3, False, 1, 3)
    with pytest.raises(ValueError, match=r"add \(2, 7, 8\) must be a C-contiguous \[G, 8, C/G\] with C = 16"):
        _ops.norm_silu(x, w, b, 1e-3, False, 1, 1, np.ones((2, 7, 8), np.float32))
    with pytest.raises(ValueError, match=r"add_bias \(15,\) must be a contiguous \[16\]"):
        _ops.norm_silu(x, w, b, 1e-3, False, 1, 1, None, np.ones(15, np.float32))
    added = _ops.norm_silu(x, w, b, 1e-3, False, 1, 2, np.zeros((4, 8, 4), np.float32), np.zeros(16, np.float32))
    assert added.shape == (2, 8, 8)
