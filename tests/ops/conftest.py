"""The C++ kernels of fastdream.fast._ops (through their nets call sites and directly): values against torch's
maths in float64 or fp32 on every code path the CPU has, and bad input refused before memory is read.

Every test here runs once per path: the portable one on every CPU (forced where AVX512_BF16 exists) and the
AVX512_BF16 one where the CPU has it. Tolerances come from the precision of operands and outputs (a bf16 output
is within one bf16 spacing, 2^-8 of its value, of the exact maths of the operands it read), never from one CPU's
rounding: the bf16 operands a kernel reads (e.g. a matmul's bf16 output, whose fp32 accumulation order differs
between oneDNN's kernels for AVX-512, AMX and AVX2) are taken as they are, not recomputed.
"""

import pytest

from fastdream.fast import _ops, ops

PATHS = ["portable", "avx512_bf16"] if _ops.avx512_bf16_supported else ["portable"]


@pytest.fixture(params=PATHS, autouse=True)
def code_path(request):
    """Runs the test on one of the kernels' code paths (``fastdream.fast.ops.set_avx512_bf16``)."""
    before = ops.set_avx512_bf16(request.param == "avx512_bf16")
    yield request.param
    ops.set_avx512_bf16(before)
