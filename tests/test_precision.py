import re

import pytest
import torch

from fastdream.fast import precision as P


def test_auto_precision_follows_the_cpu_features():
    feats = P.cpu_features()
    assert set(feats) == {"amx_bf16", "avx512_bf16"}
    # bf16 only where the CPU has bf16 matmuls in hardware: without them they run ~150x slower than fp32's.
    assert P.auto_precision("cpu") == ("bf16" if feats["amx_bf16"] or feats["avx512_bf16"] else "fp32")
    assert P.resolve_precision("auto", "cpu") == (P.auto_precision("cpu"), None)
    assert P.native_bf16("cpu") == (feats["amx_bf16"] or feats["avx512_bf16"])


def test_explicit_precisions_are_kept():
    assert P.resolve_precision("fp32", "cpu") == ("fp32", None)
    got, warning = P.resolve_precision("bf16", "cpu")
    assert got == "bf16" and (warning is None) == P.native_bf16("cpu")


def test_bf16_without_hardware_bf16_warns_with_measured_rates(monkeypatch):
    monkeypatch.setattr(P, "cpu_features", lambda: {"amx_bf16": False, "avx512_bf16": False})
    got, warning = P.resolve_precision("bf16", "cpu")
    assert got == "bf16"
    assert warning.startswith("train.precision=bf16 on a CPU without AVX512_BF16 or AMX: its bf16 matmuls run ")
    bf16, fp32 = (float(x) for x in re.findall(r"run ([\d.]+) GFLOP/s here against ([\d.]+) for fp32", warning)[0])
    assert bf16 > 0 and fp32 > 0 and "train.precision=auto picks fp32 here" in warning
    assert P.auto_precision("cpu") == "fp32"


def test_bad_precision_names_the_choices():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        P.resolve_precision("fp16", "cpu")


def test_matmul_rate_counts_flops():
    rate = P.matmul_rate(torch.float32, 64, min_time=0.005)
    # 2·64³ FLOP per call over the time taken: a positive, finite rate below any CPU's 100 TFLOP/s (a loaded
    # CI box may run it at well under 1 GFLOP/s).
    assert 0 < rate < 1e14
