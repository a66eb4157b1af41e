"""CartPole-v1 with 64 envs: raw EnvPool, gymnasium SyncVectorEnv, and the collector."""

from fastdream.benchmarks import env_case, run_case


def test_env_steps(benchmark):
    case = env_case(steps=20 if benchmark.disabled else 50)
    if not benchmark.disabled:
        records = run_case(case)
        benchmark.extra_info.update({r["name"]: {"value": r["value"], "ratio": r["ratio"]} for r in records})
    benchmark(case.variant("collector").fn)
    if case.cleanup:
        case.cleanup()
