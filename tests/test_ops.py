"""The C++ kernels of fastdream.fast._ops (through their nets call sites and directly): values against torch's
maths in float64 or fp32 on every code path the CPU has, and bad input refused before memory is read.

Every test here runs once per path: the portable one on every CPU (forced where AVX512_BF16 exists) and the
AVX512_BF16 one where the CPU has it. Tolerances come from the precision of operands and outputs (a bf16 output
is within one bf16 spacing, 2^-8 of its value, of the exact maths of the operands it read), never from one CPU's
rounding: the bf16 operands a kernel reads (e.g. a matmul's bf16 output, whose fp32 accumulation order differs
between oneDNN's kernels for AVX-512, AMX and AVX2) are taken as they are, not recomputed.
"""

import pytest
import torch
import torch.nn.functional as F

from fastdream.fast import _ops, ops
from fastdream.model.maths import symlog, twohot_bins
from fastdream.model.nets import onehot_linear

PATHS = ["portable", "avx512_bf16"] if _ops.avx512_bf16_supported else ["portable"]


@pytest.fixture(params=PATHS, autouse=True)
def code_path(request):
    """Runs the test on one of the kernels' code paths (``fastdream.fast.ops.set_avx512_bf16``)."""
    before = ops.set_avx512_bf16(request.param == "avx512_bf16")
    yield request.param
    ops.set_avx512_bf16(before)


# A bfloat16 kernel output against fp32 maths: half a bfloat16 spacing (2^-8 relative at the bottom of a binade)
# plus the kernels' own error before rounding (SiLU's exp 7.5e-5, vrcp14ps 6e-5).
BF16_RTOL = 2**-8 + 2e-4


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


_OPS_SCRIPT = """
import sys, numpy as np, torch
from fastdream.fast import _ops
torch.manual_seed(0)
x = (torch.randn(300, 256) * 3).bfloat16().view(torch.int16).numpy()
w, b = (torch.randn(256) * 0.5 + 1).numpy(), (torch.randn(256) * 0.5).numpy()
table = (torch.randn(1024, 256) / 4).bfloat16().view(torch.int16).numpy()
rows = (torch.randint(0, 32, (300, 32)) + torch.arange(32) * 32).numpy()
y = (torch.randn(8, 300, 96) * 2).bfloat16().view(torch.int16).numpy()
gate_bias, deter = (torch.randn(768) * 0.3).numpy(), torch.randn(300, 256).numpy()
prior = (torch.randn(300 * 32 + 5, 32) * 3).bfloat16().view(torch.int16).numpy()  # a partial last tile
u, prior_bias = torch.rand(300 * 32 + 5).numpy(), torch.randn(32 * 32).numpy()
as_f32 = lambda a: torch.from_numpy(a).view(torch.bfloat16).float().numpy()
cat = np.full((300, 3 * 256 + 32), 7, np.int16)  # three parts written in place (rows 800 apart), 32 guard columns
_ops.norm_silu(x, w, b, 1e-3, True, 2, out=cat[:, :256])
_ops.gather_norm_silu(None, table, rows, w, b, 1e-3, True, 2, out=cat[:, 256:512])
_ops.take_rows(x, np.arange(300)[::-1].copy(), cat[:, 512:768], True, 2)
np.savez(sys.argv[1], avx=_ops.avx512_bf16(), norm=as_f32(_ops.norm_silu(x, w, b, 1e-3, True, 2)),
         grouped=as_f32(_ops.norm_silu(x, w, b, 1e-3, True, 2, 8)),
         gather=as_f32(_ops.gather_norm_silu(x, table, rows, w, b, 1e-3, True, 2)),
         gate=_ops.gru_gate(y, gate_bias, deter, True, 2),
         gate_copy=as_f32(_ops.gru_gate(y, gate_bias, deter, True, 2, True)[2]),
         draw=_ops.unimix_index(prior, u, 0.01, True, 2, prior_bias),
         draw_k24=_ops.unimix_index(np.ascontiguousarray(prior[:, :24]), u, 0.01, True, 2),  # a masked dword block
         cat=as_f32(cat), x=as_f32(x),
         gather_alone=as_f32(_ops.gather_norm_silu(None, table, rows, w, b, 1e-3, True, 2)))
"""


def test_avx512_bf16_paths_equal_the_portable_clones(tmp_path, code_path):
    """On a CPU with AVX512_BF16 the bf16 kernels take intrinsics paths; FASTDREAM_PORTABLE_OPS=1 keeps the
    portable clones. Both runs of the same inputs agree within a bf16 rounding (gates: the exp polynomials)."""
    import os
    import subprocess
    import sys

    import numpy as np

    if code_path == "portable":
        pytest.skip("compares the two paths itself (once, under the avx512_bf16 parameter)")
    if not _ops.avx512_bf16_supported:
        pytest.skip("this CPU has no AVX512_BF16: only the portable path exists here")
    out = {}
    for name, env in (("fast", {}), ("portable", {"FASTDREAM_PORTABLE_OPS": "1"})):
        path = tmp_path / f"{name}.npz"
        subprocess.run([sys.executable, "-c", _OPS_SCRIPT, str(path)], check=True, env={**os.environ, **env})
        out[name] = np.load(path)
    assert bool(out["fast"]["avx"]) and not bool(out["portable"]["avx"])
    for name in out:  # in place: each part as the op alone wrote it, the guard columns untouched
        cat, o = out[name]["cat"], out[name]
        np.testing.assert_array_equal(cat[:, :256], o["norm"])
        np.testing.assert_array_equal(cat[:, 256:512], o["gather_alone"])
        np.testing.assert_array_equal(cat[:, 512:768], o["x"][::-1])
        assert (cat[:, 768:] == float(torch.tensor(7, dtype=torch.int16).view(torch.bfloat16))).all()
    for key in ("norm", "grouped", "gather", "cat"):
        np.testing.assert_allclose(out["fast"][key], out["portable"][key], rtol=2**-7, atol=2**-7, err_msg=key)
        assert float(np.mean(out["fast"][key] != out["portable"][key])) < 0.02, key  # mostly the same rounding
    np.testing.assert_allclose(out["fast"]["gate"], out["portable"]["gate"], rtol=1e-4, atol=1e-4)
    # the copies: a bf16 rounding of deters that agree to 1e-4
    np.testing.assert_allclose(out["fast"]["gate_copy"], out["portable"]["gate_copy"], rtol=2**-7, atol=1e-4)
    for key in ("draw", "draw_k24"):  # the two exp polynomials (~2e-7) move at most a draw at a CDF step
        assert int((out["fast"][key] != out["portable"][key]).sum()) <= 2, key
        assert len(np.unique(out["fast"][key])) > 20


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


def test_norm_silu_and_gru_gate_refuse_bad_input():
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
