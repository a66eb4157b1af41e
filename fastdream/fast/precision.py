"""Which update precision a device should run: bf16 where its hardware has bf16 matmuls, fp32 elsewhere.

Measured (2 cores; docs/performance.md): an xs train step, compiled, ran 2.0 updates/s in bf16 against 0.9 in
fp32 on an AMD Zen 4 with AVX512_BF16; Intel Xeons with AMX run bf16 matmuls 4-9x faster than fp32; an AMD Zen 3
(AVX2 only) runs them ~150x slower (~1 GFLOP/s against ~150).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_features() -> dict[str, bool]:
    """``{"amx_bf16": .., "avx512_bf16": ..}`` for this CPU, from torch's cpuinfo (or /proc/cpuinfo's flags)."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
        return {"amx_bf16": bool(caps.get("amx_bf16")), "avx512_bf16": bool(caps.get("avx512_bf16"))}
    except (AttributeError, RuntimeError):
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        return {"amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware (a CUDA GPU with bf16, a CPU with AMX or AVX512_BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    feats = cpu_features()
    return feats["amx_bf16"] or feats["avx512_bf16"]


def auto_precision(device: torch.device | str) -> str:
    """``"bf16"`` where ``device`` has hardware bf16 matmuls (a bf16 GPU, a CPU with AMX or AVX512_BF16), else
    ``"fp32"``."""
    return "bf16" if native_bf16(device) else "fp32"


def matmul_rate(dtype: torch.dtype, n: int = 256, min_time: float = 0.02) -> float:
    """FLOP/s of an ``[n, n] @ [n, n]`` CPU matmul in ``dtype``, over one timed loop of at least ``min_time`` s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_time or reps < 2:
        a @ b
        reps += 1
    return 2 * n**3 * reps / elapsed


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str | None]:
    """``(precision to run, warning or None)`` for a requested ``auto | fp32 | bf16`` on ``device``; asking for bf16
    on a CPU without hardware bf16 runs it, with a warning giving both matmul rates measured here."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return auto_precision(device), None
    if precision == "bf16" and torch.device(device).type == "cpu" and not native_bf16("cpu"):
        bf16, fp32 = matmul_rate(torch.bfloat16, 128), matmul_rate(torch.float32, 128)
        return "bf16", (f"train.precision=bf16 on a CPU without AVX512_BF16 or AMX: its bf16 matmuls run "
                        f"{bf16 / 1e9:.1f} GFLOP/s here against {fp32 / 1e9:.1f} for fp32 ({fp32 / bf16:.0f}x slower); "
                        "train.precision=auto picks fp32 here")
    return precision, None
