"""Imagined state-steps/s: N in {1024, 4096, 16384}, H = 15, sizes tiny and xs; eager vs compile,
fp32 vs bf16, next to plain-matmul throughput; the prior draw (``unimix_index``); the gathered layers'
weight gradient; and the full xs train step."""

import pytest

from fastdream.benchmarks import dream_case, gather_backward_case, run_case, train_case, unimix_index_case

CASES = [("tiny", 1024), ("tiny", 4096), ("xs", 1024), ("xs", 4096), ("xs", 16384)]


@pytest.mark.parametrize("size, n", CASES)
def test_dream_rollout(benchmark, size, n):
    if benchmark.disabled:  # CI smoke mode: the same code path on a tiny shape, no compile
        case = dream_case("tiny", 64, horizon=3, engines=("eager",))
    else:
        case = dream_case(size, n)
        records = run_case(case)
        benchmark.extra_info.update({f"{r['name']} vs {r['reference']}": {"value": r["value"], "ratio": r["ratio"]}
                                     for r in records})
    benchmark(case.variants[0].fn)


def test_train_step(benchmark):
    if benchmark.disabled:
        case = train_case("tiny", batch_size=2, seq_len=8, horizon=3, setups=(("eager", "fp32"),))
    else:
        case = train_case("xs")
    if not benchmark.disabled:
        records = run_case(case)
        benchmark.extra_info.update({r["name"]: {"value": r["value"], "ratio": r["ratio"]} for r in records})
    benchmark(case.variants[0].fn)


def test_gather_backward(benchmark):
    case = gather_backward_case(m=256) if benchmark.disabled else gather_backward_case()
    if not benchmark.disabled:
        records = run_case(case)
        benchmark.extra_info.update({r["name"]: {"value": r["value"], "ratio": r["ratio"]} for r in records})
    benchmark(case.variants[0].fn)


def test_unimix_index(benchmark):
    case = unimix_index_case(n=64) if benchmark.disabled else unimix_index_case()
    if not benchmark.disabled:
        records = run_case(case)
        benchmark.extra_info.update({r["name"]: {"value": r["value"], "ratio": r["ratio"]} for r in records})
    benchmark(case.variants[0].fn)
