"""norm_silu_cat and take_rows (csrc/ops/take_rows.cpp): the block GRU's input parts written in place."""

import pytest
import torch
from tolerances import BF16_RTOL

from fastdream.fast import _ops, ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_silu_cat_writes_each_part_as_its_own_op_and_falls_back_with_gradients(dtype):
    """The GRU-input op: ``[norm_silu(x) | gathered stoch layer | action rows]`` written in place equals the three
    ops' own results bit for bit, and the composed torch ops (used with gradients) within a rounding."""
    from fastdream.model.nets import Norm, norm_silu_cat, onehot_table

    torch.manual_seed(0)
    n, s, k, c = 97, 6, 5, 48
    norm, table_norm = Norm(c), Norm(c)
    for ln in (norm.ln, table_norm.ln):
        torch.nn.init.normal_(ln.weight, 1.0, 0.5)
        torch.nn.init.normal_(ln.bias, 0.0, 0.5)
    x = (torch.randn(n, c) * 3).to(dtype)
    weight = torch.randn(c, s * k, requires_grad=True)
    index, rows = torch.randint(0, k, (n, s)), torch.randint(0, 3, (n,))
    rows_table = torch.randn(3, 32).to(dtype)
    with torch.no_grad():
        table = onehot_table(weight, s * k).to(dtype)
        got = norm_silu_cat(x, norm, table, index, k, table_norm, rows_table, rows)
        f = lambda t: t.detach().float()  # noqa: E731
        parts = [ops.norm_silu(x, f(norm.ln.weight), f(norm.ln.bias), 1e-3, 1, None, None),
                 ops.gather_norm_silu(None, table, index, f(table_norm.ln.weight), f(table_norm.ln.bias), 1e-3, k),
                 rows_table[rows]]
    assert got.shape == (n, 2 * c + 32) and got.dtype == dtype
    assert torch.equal(got, torch.cat(parts, -1))
    composed = norm_silu_cat(x, norm, onehot_table(weight, s * k).to(dtype), index, k, table_norm, rows_table, rows)
    assert composed.requires_grad  # the gradient path: torch ops
    tol = 1e-5 if dtype == torch.float32 else 2 * BF16_RTOL
    torch.testing.assert_close(composed.detach().float(), got.float(), rtol=tol, atol=tol)
    composed[:, c: 2 * c].float().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_in_place_outputs_and_take_rows_refuse_bad_input():
    import numpy as np


    x, w, b = np.ones((4, 16), np.float32), np.ones(16, np.float32), np.zeros(16, np.float32)
    table = np.arange(48, dtype=np.float32).reshape(3, 16)
    with pytest.raises(ValueError, match=r"out \(4, 8\) must be \[4, 16\]"):
        _ops.norm_silu(x, w, b, 1e-3, out=np.empty((4, 8), np.float32))
    with pytest.raises(ValueError, match="columns must be contiguous"):
        _ops.norm_silu(x, w, b, 1e-3, out=np.empty((4, 32), np.float32)[:, ::2])
    with pytest.raises(TypeError, match="out dtype float64"):
        _ops.norm_silu(x, w, b, 1e-3, out=np.empty((4, 16)))
    read_only = np.empty((4, 16), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _ops.gather_norm_silu(None, table, np.zeros((4, 2), np.int64), w, b, 1e-3, out=read_only)
    with pytest.raises(ValueError, match="out is for groups = 1"):
        _ops.norm_silu(x, w, b, 1e-3, groups=2, out=np.empty((4, 16), np.float32))
    out = np.full((4, 20), -1.0, np.float32)
    with pytest.raises(IndexError, match=r"index 3 outside \[0, 3\)"):
        _ops.take_rows(table, np.array([0, 1, 3, 2]), out[:, :16])
    assert (out == -1).all()  # checked before any row was copied
    _ops.take_rows(table, np.array([2, 0, 1, 2]), out[:, 2:18], False, 2)
    np.testing.assert_array_equal(out[:, 2:18], table[[2, 0, 1, 2]])
    assert (out[:, :2] == -1).all() and (out[:, 18:] == -1).all()
