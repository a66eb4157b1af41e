"""gather_rows_backward (csrc/ops/gather_rows_backward.cpp): the gathered layers' weight gradient."""

import pytest
import torch

from fastdream.fast import _ops


@pytest.mark.parametrize("threads", [1, 2])
def test_gather_rows_backward_equals_index_add_with_repeated_rows(threads):
    from fastdream.model.nets import gather_rows_backward

    torch.manual_seed(0)
    g = torch.randn(301, 37)  # 37 columns: not a multiple of the 16-float thread blocks
    rows = torch.randint(0, 11, (301, 5))  # many repeats, also within one row of `rows`
    want, want_bf16 = torch.zeros(11, 37), torch.zeros(11, 37)
    for s in range(5):
        want.index_add_(0, rows[:, s], g)
        want_bf16.index_add_(0, rows[:, s], g.bfloat16().float())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = gather_rows_backward(g.bfloat16(), rows, 11)  # bf16 gradients (autocast) are summed in fp32
        exact = gather_rows_backward(g, rows, 11)
    finally:
        torch.set_num_threads(before)
    assert out.dtype == torch.float32 and out.shape == (11, 37)
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want_bf16, rtol=1e-5, atol=1e-5)


def test_gather_rows_backward_rejects_bad_input_before_touching_memory():
    import numpy as np


    g, rows = np.ones((4, 3), np.float32), np.zeros((4, 2), np.int64)
    with pytest.raises(TypeError, match="float64, expected float32"):
        _ops.gather_rows_backward(g.astype(np.float64), rows, 5)
    with pytest.raises(TypeError, match="int32, expected int64"):
        _ops.gather_rows_backward(g, rows.astype(np.int32), 5)
    with pytest.raises(ValueError, match=r"g \(4, 3\) and rows \(3, 2\)"):
        _ops.gather_rows_backward(g, rows[:3], 5)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.gather_rows_backward(np.ones((3, 4), np.float32).T, rows, 5)
    bad = rows.copy()
    bad[2, 1] = 5
    with pytest.raises(IndexError, match=r"row index 5 outside \[0, 5\)"):
        _ops.gather_rows_backward(g, bad, 5)
    bad[2, 1] = -1
    with pytest.raises(IndexError, match="row index -1"):
        _ops.gather_rows_backward(g, bad, 5)
    with pytest.raises(ValueError, match="num_rows must be >= 1"):
        _ops.gather_rows_backward(g, rows, 0)
    assert _ops.gather_rows_backward(g, rows, 1).sum() == 24.0  # every g row twice into row 0
