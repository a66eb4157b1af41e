"""`fastdream` command line: collect | bench (train and eval arrive with the agent)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def _cmd_collect(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from fastdream.collector import Collector, RandomPolicy
    from fastdream.envs import make_env
    from fastdream.replay import ReplayBuffer

    try:
        env = make_env(args.env, args.envs, seed=args.seed, obs=args.obs)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    replay = ReplayBuffer(max(args.capacity, args.envs), args.envs, env.replay_spec, seed=args.seed)
    col = Collector(env, replay, RandomPolicy(env, seed=args.seed))
    col.reset()
    t0 = time.perf_counter()
    returns: list[float] = []
    with Progress(TextColumn("[bold]collect"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} steps"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=args.quiet) as bar:
        task = bar.add_task("collect", total=args.steps, info="")
        while col.env_steps < args.steps:
            col.step()
            returns += [r for r, _ in env.pop_episodes()]
            if col.env_steps % (args.envs * 50) < args.envs:
                rate = col.env_steps / (time.perf_counter() - t0)
                mean = sum(returns[-100:]) / max(1, len(returns[-100:]))
                bar.update(task, completed=col.env_steps, info=f"{rate:,.0f} steps/s  return {mean:.1f}")
        bar.update(task, completed=min(col.env_steps, args.steps))
    secs = time.perf_counter() - t0
    mean = sum(returns[-100:]) / max(1, len(returns[-100:]))
    print(f"collected {col.env_steps:,} steps from {args.envs} x {args.env} in {secs:.1f}s "
          f"({col.env_steps / secs:,.0f} steps/s); {len(returns)} episodes, mean return {mean:.1f}; "
          f"replay {len(replay):,} rows, {replay.nbytes / 2**20:.1f} MiB")
    if args.save:
        replay.save(args.save)
        print(f"replay saved to {args.save}")
    env.close()
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastdream.benchmarks import CASES, format_table, run_case

    unknown = [s for s in args.suites if s not in CASES]
    if unknown:
        raise CliError(f"unknown bench suite(s) {unknown}; choose from {sorted(CASES)}")
    records = []
    for suite in args.suites or list(CASES):
        for make in CASES[suite]:
            records += run_case(make(), min_time=args.min_time)
    print(json.dumps(records, indent=1) if args.json else format_table(records))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdream", description="fastdream: fast DreamerV3-style world-model RL")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="step a random policy in vectorised envs into the replay buffer")
    c.add_argument("--env", default="CartPole-v1", help="EnvPool or gymnasium id (default: CartPole-v1)")
    c.add_argument("--envs", type=int, default=64, help="number of parallel envs (default: 64)")
    c.add_argument("--steps", type=int, default=200_000, help="env steps to collect (default: 200000)")
    c.add_argument("--obs", default="vector", choices=["vector", "pixels", "both"], help="observation kind")
    c.add_argument("--capacity", type=int, default=1_000_000, help="replay capacity in rows")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--save", default=None, help="directory to save the replay to")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_collect)

    b = sub.add_parser("bench", help="run benchmark suites and print one table with ratios")
    b.add_argument("suites", nargs="*", help="suites to run (default: all): replay, env")
    b.add_argument("--json", action="store_true", help="print records as JSON")
    b.add_argument("--min-time", type=float, default=1.0, help="seconds per variant (default: 1)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="gymnasium")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"fastdream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
