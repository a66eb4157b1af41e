"""gru_gate (csrc/ops/gru_gate.cpp, nets.gru_gate_grouped): the block-GRU update on the block matmul's output."""

import pytest
import torch

from fastdream.fast import _ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("groups", "rows", "dg"), [(8, 4099, 32), (4, 37, 24), (3, 5, 7)])
def test_gru_gate_grouped_equals_the_reference_gate(dtype, groups, rows, dg):
    """The C++ block-GRU update on the block matmul's own output ``[G, N, 3 D/G]`` against
    ``gru_gate_reference`` of the transposed gates plus bias: D/G = 24 and 7 end in scalar columns."""
    from fastdream.kernels.reference import gru_gate_reference
    from fastdream.model.nets import gru_gate_grouped

    torch.manual_seed(0)
    y = (torch.randn(groups, rows, 3 * dg) * 4).to(dtype)
    bias, deter = torch.randn(3 * groups * dg), torch.randn(rows, groups * dg) * 2
    want = gru_gate_reference(y.float().transpose(0, 1).reshape(rows, -1) + bias, deter, groups)
    got = gru_gate_grouped(y, bias, deter)
    assert got.dtype == torch.float32 and got.shape == (rows, groups * dg)
    # fp32 inputs: a float32-accurate exp; bf16 inputs: the degree-4 exp (~4e-5).
    tol = 2e-6 if dtype == torch.float32 else 2e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # A gradient to pass on takes the reference maths.
    w = y.float().requires_grad_()
    out = gru_gate_grouped(w, bias, deter)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)


def test_gru_gate_refuses_bad_input():
    import numpy as np

    y, bias, deter = np.ones((2, 8, 6), np.float32), np.zeros(12, np.float32), np.zeros((8, 4), np.float32)
    assert _ops.gru_gate(y, bias, deter).shape == (8, 4)
    with pytest.raises(ValueError, match=r"y \(2, 8, 6\) and deter \(8, 5\) must be \[G, N, 3 D/G\] and \[N, D\]"):
        _ops.gru_gate(y, bias, np.zeros((8, 5), np.float32))
    with pytest.raises(ValueError, match=r"y \(2, 8, 5\)"):
        _ops.gru_gate(np.ones((2, 8, 5), np.float32), bias, deter)
    with pytest.raises(TypeError, match="deter dtype float64"):
        _ops.gru_gate(y, bias, deter.astype(np.float64))
    with pytest.raises(ValueError, match=r"bias \(11,\)"):
        _ops.gru_gate(y, bias[:11], deter)
    with pytest.raises(ValueError, match="C-contiguous"):
        _ops.gru_gate(np.ones((2, 6, 8), np.float32).transpose(0, 2, 1), bias, deter)


@pytest.mark.parametrize(("groups", "dg"), [(8, 32), (4, 7)])
def test_gru_gate_copies_are_the_new_deter_rounded_in_both_layouts(groups, dg):
    """``copies=True``: the kernel also writes the new deter rounded to bf16, ``[N, D]`` and ``[G, N, D/G]``, the
    same values as casting its float32 result (16-lane path at D/G = 32, scalar tail at 7); with a gradient the
    torch maths give the same three tensors."""
    import numpy as np

    from fastdream.model.nets import gru_gate_grouped

    torch.manual_seed(0)
    n = 37
    y = (torch.randn(groups, n, 3 * dg) * 2).bfloat16()
    bias, deter = torch.randn(3 * groups * dg) * 0.3, torch.randn(n, groups * dg)
    with torch.no_grad():
        plain = gru_gate_grouped(y, bias, deter)
        out, rows, grouped = gru_gate_grouped(y, bias, deter, copies=True)
    assert torch.equal(out, plain) and rows.dtype == grouped.dtype == torch.bfloat16
    assert torch.equal(rows, out.bfloat16()) and grouped.is_contiguous()
    assert torch.equal(grouped, rows.reshape(n, groups, dg).transpose(0, 1))
    ref = gru_gate_grouped(y.float().requires_grad_(), bias, deter, copies=True)
    torch.testing.assert_close(ref[0].detach(), out, rtol=1e-4, atol=1e-4)
    assert ref[2].shape == (groups, n, dg) and ref[1].shape == (n, groups * dg)
    with pytest.raises(ValueError, match="copies=True needs bfloat16 y"):
        _ops.gru_gate(y.float().numpy(), bias.numpy(), deter.numpy(), False, 1, True)
    assert isinstance(_ops.gru_gate(y.float().numpy(), bias.numpy(), deter.numpy(), False, 1), np.ndarray)


def test_gate_and_draw_write_into_a_stacked_sequence():
    """``rows_out``/``out``: the gate's bf16 rows and the draw's classes land in the given step of a sequence, equal
    to the returned-array results, the other steps untouched; an array the kernel could only write a copy of is
    refused."""
    import numpy as np

    from fastdream.model.nets import gru_gate_grouped, unimix_index

    torch.manual_seed(0)
    g, n, dg, s, k = 4, 37, 16, 5, 8
    y = (torch.randn(g, n, 3 * dg) * 2).bfloat16()
    bias, deter = torch.randn(3 * g * dg) * 0.3, torch.randn(n, g * dg)
    logits, noise = torch.randn(n, s, k).bfloat16(), torch.rand(n, s)
    seq = torch.full((3, n, g * dg), 7.0, dtype=torch.bfloat16)
    classes = torch.full((3, n, s), -1, dtype=torch.int64)
    with torch.no_grad():
        out, rows, grouped = gru_gate_grouped(y, bias, deter, copies=True)
        got = gru_gate_grouped(y, bias, deter, True, seq[1])
        drawn = unimix_index(logits, noise, 0.01)
        into = unimix_index(logits, noise, 0.01, out=classes[2])
    assert got[1].data_ptr() == seq[1].data_ptr() and torch.equal(seq[1], rows)
    assert torch.equal(got[0], out) and torch.equal(got[2], grouped)
    assert (seq[0] == 7).all() and (seq[2] == 7).all()
    assert into.data_ptr() == classes[2].data_ptr() and torch.equal(classes[2], drawn)
    assert (classes[:2] == -1).all() and len(drawn.unique()) == k
    with pytest.raises(ValueError, match="rows_out must be a contiguous"):
        gru_gate_grouped(y, bias, deter, True, seq[:, 0])
    with pytest.raises(ValueError, match="out must be a contiguous int64"):
        unimix_index(logits, noise, 0.01, out=classes[2].int())
    words = logits.reshape(-1, k).view(torch.int16).numpy()
    with pytest.raises(TypeError, match="out dtype int32, expected int64"):
        _ops.unimix_index(words, noise.reshape(-1).numpy(), 0.01, True, out=np.zeros(n * s, np.int32))
    with pytest.raises(TypeError, match="rows_out dtype uint16"):
        _ops.gru_gate(y.view(torch.int16).numpy(), bias.numpy(), deter.numpy(), True, 1, True,
                      np.zeros((n, g * dg), np.uint16))
