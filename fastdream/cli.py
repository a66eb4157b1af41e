"""`fastdream` command line: train | eval | collect | plot | bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from fastdream.dream.engines import ENGINES


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def _cmd_collect(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from fastdream.data.collector import Collector, RandomPolicy
    from fastdream.data.envs import make_env
    from fastdream.data.replay import ReplayBuffer

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


def _presets(given: list[str], env_id: str, obs: str | None) -> list[str]:
    """The presets to apply, in order: every ``--preset`` (each comma-separated), after the env's task
    preset unless a task preset is among them (so ``--preset xs`` on LunarLander keeps its task settings)."""
    from fastdream.run.config import TASKS

    presets = [p.strip() for item in given for p in item.split(",") if p.strip()]
    if not any(p in TASKS for p in presets):
        task = {"CartPole-v1": "cartpole", "LunarLander-v3": "lunarlander"}.get(env_id, "cartpole")
        if obs in ("pixels", "both"):
            task += "-pixels"
        presets.insert(0, task)
    return presets


def _load_config(args: argparse.Namespace):
    from fastdream.run.config import Config, apply, apply_presets, apply_sets, validate

    cfg = Config()
    try:
        cfg = apply_presets(cfg, _presets(args.preset or [], args.env or "CartPole-v1", args.obs))
        direct = {}
        if args.env:
            direct["env.id"] = args.env
        for flag, key in (("envs", "env.num_envs"), ("obs", "env.obs"), ("steps", "train.steps"),
                          ("minutes", "train.minutes"), ("train_ratio", "train.train_ratio"), ("seed", "train.seed"),
                          ("device", "train.device"), ("engine", "train.engine"), ("precision", "train.precision")):
            if getattr(args, flag) is not None:
                direct[key] = getattr(args, flag)
        cfg = apply(cfg, direct)
        cfg = apply_sets(cfg, args.set or [])
        validate(cfg)
        if args.env:
            from fastdream.data.envs import resolve_backend

            resolve_backend(args.env)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastdream.run import checkpoint
    from fastdream.run.train import UnhealthyRun, train

    if args.resume:
        run_dir = Path(args.resume)
        if not checkpoint.exists(run_dir):
            raise CliError(f"--resume {run_dir}: no checkpoint there")
        ignored = [f for f in ("env", "envs", "preset", "obs", "train_ratio", "seed", "device", "engine", "precision")
                   if getattr(args, f) is not None] + (["set"] if args.set else [])
        if ignored:
            raise CliError(f"--resume continues the saved config; only --steps and --minutes may change it "
                           f"(got {ignored})")
        from fastdream.run.config import Config

        cfg = Config.from_dict(checkpoint.load(run_dir, with_replay=False)[0]["config"])
        if args.steps is not None:
            cfg.train.steps = args.steps
        if args.minutes is not None:
            cfg.train.minutes = args.minutes
    else:
        cfg = _load_config(args)
        run_dir = Path(args.logdir or f"runs/{cfg.env.id}-{time.strftime('%Y%m%d-%H%M%S')}")
        if checkpoint.exists(run_dir):
            raise CliError(f"{run_dir} already holds a run; use --resume {run_dir} or another --logdir")
    print(f"fastdream train: {cfg.env.id} ({cfg.env.obs}) x{cfg.env.num_envs} envs, "
          f"{cfg.train.steps:,} steps budget, target {cfg.env.target_return:g}, run dir {run_dir}")
    try:
        res = train(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet,
                    steps=args.steps if args.resume else None, minutes=args.minutes if args.resume else None)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except UnhealthyRun as exc:
        print(f"fastdream: run stopped: {exc}", file=sys.stderr)
        return 3
    ev = f"{res.eval_return:.1f}" if res.eval_return is not None else "n/a"
    ups = res.updates / max(res.wall_time, 1e-9)
    print(f"{res.stopped}: eval return {ev} (target {cfg.env.target_return:g}), {res.env_steps:,} env steps, "
          f"{res.updates:,} updates, {res.wall_time / 60:.1f} min wall ({ups:.2f} updates/s); "
          f"checkpoint {res.checkpoint}, metrics {res.metrics}")
    return 0 if res.stopped != "interrupted" else 130


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from fastdream.run import checkpoint
    from fastdream.run.config import Config
    from fastdream.run.train import build_agent, build_env, evaluate

    if args.episodes < 1:
        raise CliError(f"--episodes must be >= 1, got {args.episodes}")
    run_dir = Path(args.run_dir)
    try:
        state, _ = checkpoint.load(run_dir, with_replay=False)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    cfg = Config.from_dict(state["config"])
    env = build_env(cfg, num_envs=1)
    agent = build_agent(cfg, env)
    agent.load_full_state(state["agent"])
    env.close()
    frames: list | None = [] if args.video else None
    rets = evaluate(agent, cfg, args.episodes, seed=args.seed, video_frames=frames, deterministic=not args.sample)
    print(f"eval {cfg.env.id}: mean return {np.mean(rets):.1f} over {len(rets)} episodes "
          f"(min {min(rets):.1f}, max {max(rets):.1f}; {'sampled' if args.sample else 'mode'} actions)")
    if args.video:
        from fastdream.run.logger import write_video

        path = write_video(args.video, frames)
        print(f"video of episode 1 ({len(frames)} frames) written to {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastdream.benchmarks import CASES, format_table, run_case

    unknown = [s for s in args.suites if s not in CASES]
    if unknown:
        raise CliError(f"unknown bench suite(s) {unknown}; choose from {sorted(CASES)}")
    records = []
    for suite in args.suites or list(CASES):
        for make in CASES[suite]:
            case_records = run_case(make(), min_time=args.min_time)
            records += case_records
            if not args.json:  # stream each case's table: a long run shows results as they come
                print(format_table(case_records), flush=True)
    if args.json:
        print(json.dumps(records, indent=1))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fastdream.run.plots import load_curve, parse_group, plot_groups

    try:
        groups = {}
        for spec in args.groups:
            label, dirs = parse_group(spec)
            groups[label] = [load_curve(d) for d in dirs]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    out = plot_groups(groups, args.out, args.title, args.target)
    for label, curves in groups.items():
        best = [float(c.eval_return.max()) for c in curves]
        print(f"{label}: {len(curves)} run(s), best eval {min(best):.1f}-{max(best):.1f}")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdream", description="fastdream: fast DreamerV3-style world-model RL")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DreamerV3 agent (default: CartPole-v1 until solved)")
    t.add_argument("--env", default=None, help="EnvPool or gymnasium id (default: CartPole-v1)")
    t.add_argument("--envs", type=int, default=None, help="parallel training envs (preset default: 64)")
    t.add_argument("--preset", action="append", default=None,
                   help="presets applied in order, comma-separated or repeated: cartpole, cartpole-pixels, "
                        "lunarlander, lunarlander-pixels, tiny, xs, s (the env's task preset comes first "
                        "unless one is given)")
    t.add_argument("--obs", default=None, choices=["vector", "pixels", "both"], help="observation kind")
    t.add_argument("--steps", type=int, default=None, help="env-step budget")
    t.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget in minutes, counted across --resume (default: none)")
    t.add_argument("--train-ratio", type=float, default=None, help="replayed steps per env step")
    t.add_argument("--logdir", default=None, help="run directory (default: runs/<env>-<time>)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    t.add_argument("--engine", default=None, choices=list(ENGINES),
                   help="dream engine (default: the task preset's: auto for vector CartPole, compile for the rest); "
                   + "; ".join(f"{k}: {v}" for k, v in ENGINES.items()))
    t.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="update precision (default: the task preset's: fp32 for vector CartPole, else bf16)")
    t.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.horizon=10 (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no live progress line")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="deterministic evaluation of a run's checkpoint (the policy's mode)")
    e.add_argument("run_dir", help="run directory holding checkpoint/")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--video", default=None, metavar="PATH", help="write episode 1 as .gif or .mp4")
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--sample", action="store_true",
                   help="sample actions from the policy (seeded by the checkpoint) instead of taking its mode")
    e.set_defaults(func=_cmd_eval)

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

    pl = sub.add_parser("plot", help="learning curves (eval return vs env steps and vs wall clock) as a PNG")
    pl.add_argument("groups", nargs="+", metavar="[LABEL=]DIR[,DIR...]",
                    help="runs to draw; the runs of one argument (e.g. seeds) share a colour and a mean curve")
    pl.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    pl.add_argument("--title", default="")
    pl.add_argument("--target", type=float, default=None, help="draw the task's target return as a line")
    pl.set_defaults(func=_cmd_plot)

    b = sub.add_parser("bench", help="run benchmark suites and print one table with ratios")
    b.add_argument("suites", nargs="*", help="suites to run (default: all): replay, env, dream, train")
    b.add_argument("--json", action="store_true", help="print records as JSON")
    b.add_argument("--min-time", type=float, default=1.0, help="seconds per variant (default: 1)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="gymnasium")
    args = build_parser().parse_args(argv)
    from fastdream.fast.runtime import keep_freed_memory

    keep_freed_memory()  # the CLI owns its process: reuse freed activations instead of re-faulting pages
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
