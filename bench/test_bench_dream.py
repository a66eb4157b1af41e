"""Imagined state-steps/s: N in {1024, 4096, 16384}, H = 15, sizes tiny and xs; kernels vs compile,
fp32 vs bf16, next to plain-matmul throughput; the prior draw (``unimix_index``); the no-grad C++ ops
(``norm_silu``, ``gru_gate_grouped``, ``twohot_decode``) against inductor; the gathered layers'
weight gradient; and the full xs train step."""

import pytest

from fastdream.benchmarks import (
    dream_case,
    dream_ops_case,
    gather_backward_case,
    run_case,
    train_case,
    unimix_index_case,
)

CASES = [("tiny", 1024), ("tiny", 4096), ("xs", 1024), ("xs", 4096), ("xs", 16384)]


def _measure(benchmark, case):
    """Unless benchmarks are disabled (CI smoke mode), times every variant of ``case`` in one run and
    stores each record's rate and ratio in ``extra_info``; then pytest-benchmark times the first variant."""
    if not benchmark.disabled:
        for r in run_case(case):
            key = r["name"] if r["reference"] is None else f"{r['name']} vs {r['reference']}"
            benchmark.extra_info[key] = {"value": r["value"], "ratio": r["ratio"]}
    benchmark(case.variants[0].fn)


@pytest.mark.parametrize("size, n", CASES)
def test_dream_rollout(benchmark, size, n):
    # Smoke mode: the same code path on a tiny shape, no compile.
    _measure(benchmark, dream_case("tiny", 64, horizon=3, engines=("kernels",)) if benchmark.disabled
             else dream_case(size, n))


def test_train_step(benchmark):
    _measure(benchmark, train_case("tiny", batch_size=2, seq_len=8, horizon=3, setups=(("kernels", "fp32"),))
             if benchmark.disabled else train_case("xs"))


def test_gather_backward(benchmark):
    _measure(benchmark, gather_backward_case(m=256) if benchmark.disabled else gather_backward_case())


def test_unimix_index(benchmark):
    _measure(benchmark, unimix_index_case(n=64) if benchmark.disabled else unimix_index_case())


def test_dream_ops(benchmark):
    _measure(benchmark, dream_ops_case(n=64, horizon=2) if benchmark.disabled else dream_ops_case())
