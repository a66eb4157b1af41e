"""twohot_decode (csrc/ops/twohot_decode.cpp): the two-hot expectation and symexp."""

import pytest
import torch

from fastdream.fast import _ops
from fastdream.model.maths import symlog, twohot_bins


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "bins"), [(4099, 255), (33, 16), (7, 5)])
def test_twohot_decode_kernel_equals_the_softmax_expectation(dtype, rows, bins):
    """The C++ decode (no gradient) against the expectation in float64: 255 bins end in a padded 15-column
    block, 16 fill one exactly, 5 are all padding; logits span ±30 so whole rows sit on one or two bins."""
    from fastdream.model.nets import twohot_decode

    torch.manual_seed(0)
    grid = twohot_bins(bins)
    logits = (torch.randn(rows, bins) * torch.rand(rows, 1) * 10).clamp(-30, 30).to(dtype)
    expect = (logits.double().softmax(-1) * grid.double()).sum(-1)  # in symlog space
    with torch.no_grad():
        got = twohot_decode(logits, grid)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    torch.testing.assert_close(symlog(got.double()), expect, rtol=0, atol=5e-5)
    assert float(expect.abs().max()) > 10  # the test reaches far bins, where symexp is steep
    # Leading axes stay; with a gradient to pass on it is torch's softmax, and the gradient flows.
    w = logits[:6].float().reshape(2, 3, bins).requires_grad_()
    out = twohot_decode(w, grid)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    torch.testing.assert_close(symlog(out.detach().double()).flatten(), expect[:6], rtol=0, atol=5e-5)
    # A head's bias left out of its matmul: added per column by the kernel, as by the torch maths.
    bias = torch.randn(bins) * 3
    expect_b = ((logits.double() + bias.double()).softmax(-1) * grid.double()).sum(-1)
    with torch.no_grad():
        got_b = twohot_decode(logits, grid, bias)
    torch.testing.assert_close(symlog(got_b.double()), expect_b, rtol=0, atol=5e-5)
    assert float((expect_b - expect).abs().max()) > 1  # the bias moves the expectation
    torch.testing.assert_close(symlog(twohot_decode(logits.float(), grid, bias.requires_grad_()).detach().double()),
                               expect_b, rtol=0, atol=5e-5)


def test_twohot_decode_kernel_refuses_bad_input():
    import numpy as np


    logits, bins = np.zeros((4, 255), np.float32), np.linspace(-20, 20, 255, dtype=np.float32)
    assert np.allclose(_ops.twohot_decode(logits, bins), 0.0, atol=1e-5)  # uniform over symmetric bins
    with pytest.raises(TypeError, match="logits dtype float64, expected float32"):
        _ops.twohot_decode(logits.astype(np.float64), bins)
    with pytest.raises(ValueError, match=r"bins \(254,\) must be a contiguous \[255\]"):
        _ops.twohot_decode(logits, bins[:254])
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.twohot_decode(np.zeros((255, 4), np.float32).T, bins)
    with pytest.raises(ValueError, match=r"bias \(7,\) must be a contiguous \[255\]"):
        _ops.twohot_decode(logits, bins, bias=np.zeros(7, np.float32))
    with pytest.raises(TypeError, match="bias dtype float64"):
        _ops.twohot_decode(logits, bins, bias=np.zeros(255))
