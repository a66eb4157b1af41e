"""Replay sample throughput: ReplayBuffer vs a numpy gather vs a plain memcpy of the same bytes."""

import pytest

from fastdream.benchmarks import replay_case, run_case


@pytest.mark.parametrize("kind", ["pixels", "vector"])
def test_replay_sample(benchmark, kind):
    case = replay_case(kind)
    if not benchmark.disabled:
        records = run_case(case)
        benchmark.extra_info.update({r["name"]: {"value": r["value"], "ratio": r["ratio"]} for r in records})
    benchmark(case.variant("fastdream").fn)
