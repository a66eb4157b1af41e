"""The AVX512_BF16 paths against the portable ones, in fresh processes (FASTDREAM_PORTABLE_OPS=1 at import)."""

import pytest
import torch

from fastdream.fast import _ops

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
