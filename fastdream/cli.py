"""`fastdream` command line: train | eval | collect | plot | bench."""

from __future__ import annotations

import argparse
import json
import math
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


def _load_config(args: argparse.Namespace):
    from fastdream.run.config import Config, apply, apply_presets, apply_sets, task_presets, validate

    cfg = Config()
    try:
        cfg = apply_presets(cfg, task_presets(args.preset or [], args.env or "CartPole-v1", args.obs))
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


def _target_text(target: float) -> str:
    if math.isinf(target):
        return "no target (the env has no reward threshold: the run spends its budget)"
    return f"target {target:g}"


def _precision_text(cfg) -> str:
    from fastdream.fast.precision import auto_precision
    from fastdream.run.train import resolve_device

    t = cfg.train
    if t.precision != "auto":
        return f"precision {t.precision}"
    return f"precision {auto_precision(resolve_device(t.device))} (auto)"


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastdream.run import checkpoint
    from fastdream.run.checkpoint import CheckpointError
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
    print(f"fastdream train: {cfg.env.id} ({cfg.env.obs}) x{cfg.env.num_envs} envs, {cfg.train.steps:,} steps budget, "
          f"{_target_text(cfg.env.target_return)}, {_precision_text(cfg)}, run dir {run_dir}")
    try:
        res = train(cfg, run_dir, resume=bool(args.resume), progress=not args.quiet,
                    steps=args.steps if args.resume else None, minutes=args.minutes if args.resume else None)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except (UnhealthyRun, CheckpointError) as exc:
        print(f"fastdream: run stopped: {exc}", file=sys.stderr)
        return 3
    ev = f"{res.eval_return:.1f}" if res.eval_return is not None else "n/a"
    ups = res.updates / max(res.wall_time, 1e-9)
    print(f"{res.stopped}: eval return {ev} ({_target_text(cfg.env.target_return)}), {res.env_steps:,} env steps, "
          f"{res.updates:,} updates, {res.wall_time / 60:.1f} min wall ({ups:.2f} updates/s); "
          f"checkpoint {res.checkpoint}, metrics {res.metrics}")
    return 0 if res.stopped != "interrupted" else 130


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from fastdream.run.train import evaluate, load_run

    if args.episodes < 1:
        raise CliError(f"--episodes must be >= 1, got {args.episodes}")
    if args.dream and args.model_error:
        raise CliError("--dream and --model-error are separate reports; ask for one")
    try:
        cfg, agent, _ = load_run(Path(args.run_dir))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.model_error or args.dream:
        from fastdream.cli_research import dream_view, model_error

        return (model_error if args.model_error else dream_view)(args, cfg, agent)
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

    unknown = [s for s in args.suites if s not in CASES and s != "learn"]
    if unknown:
        raise CliError(f"unknown bench suite(s) {unknown}; choose from {sorted([*CASES, 'learn'])}")
    if "learn" in args.suites:
        if len(args.suites) > 1:
            raise CliError("bench learn trains agents for minutes to hours; run it on its own, not with "
                           f"{[s for s in args.suites if s != 'learn']}")
        return _bench_learn(args)
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


def _bench_learn(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastdream.run.learn_bench import format_learn_table, learn, summarise

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.seeds < 1:
        raise CliError(f"--seeds must be >= 1, got {args.seeds}")
    runs_dir = Path(args.runs_dir or f"runs/bench-learn-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.json:
        print(f"bench learn: {', '.join(tasks)} x seeds 0..{args.seeds - 1}, runs in {runs_dir}", flush=True)

    def show(rec: dict) -> None:
        if not args.json:
            what = "solved" if rec["solved"] else f"not solved ({rec['stopped']})"
            print(f"  {rec['task']} seed {rec['seed']}: {what} at {rec['env_steps']:,} env steps, "
                  f"{rec['wall_time'] / 60:.2f} min, best eval {rec['best_eval']:.1f}", flush=True)

    try:
        records = learn(tasks, list(range(args.seeds)), runs_dir, steps=args.steps, minutes=args.minutes,
                        progress=not args.json and sys.stdout.isatty(), on_run=show)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps({"runs": records, "tasks": summarise(records)}, indent=1))
    else:
        print(format_learn_table(records))
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
    t.add_argument("--envs", type=int, default=None, help="parallel training envs (default: the preset's; CartPole 8)")
    t.add_argument("--preset", action="append", default=None,
                   help="presets applied in order, comma-separated or repeated: cartpole, cartpole-pixels, "
                        "lunarlander, lunarlander-pixels, tiny, xs, s (the env's task preset comes first "
                        "unless one is given; an env without one gets a generic preset from its spaces and "
                        "reward threshold)")
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
    t.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="update precision (default auto: bf16 on a bf16 GPU or an AMX or AVX512-BF16 CPU, else fp32)")
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
    e.add_argument("--dream", action="store_true",
                   help="instead: one open-loop dream beside the fresh real episode it predicts: a video (real left, "
                        "dream right) for pixel runs with --video, and a plot of observations, reward and continue")
    e.add_argument("--model-error", action="store_true",
                   help="instead: open-loop k-step prediction errors on fresh real sequences, their growth per "
                        "step, and Lipschitz estimates of dynamics, reward and policy (table, JSON, PNG)")
    e.add_argument("--horizon", type=int, default=None,
                   help="dream and model error: k up to H (default: the run's horizon)")
    e.add_argument("--envs", type=int, default=16, help="model error: fresh envs (default: 16)")
    e.add_argument("--length", type=int, default=256, help="model error: rows per env (default: 256)")
    e.add_argument("--out", default=None,
                   help="dream and model error: output directory (default: RUN_DIR/dream or RUN_DIR/model_error)")
    e.set_defaults(func=_cmd_eval)

    from fastdream.cli_research import add_research_parsers

    add_research_parsers(sub)

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
    b.add_argument("suites", nargs="*", help="suites to run (default: all but learn): replay, env, dream, train; "
                                              "or learn alone (training runs to each task's target)")
    b.add_argument("--json", action="store_true", help="print records as JSON")
    b.add_argument("--min-time", type=float, default=1.0, help="seconds per variant (default: 1)")
    b.add_argument("--tasks", default="cartpole", help="learn: comma-separated task presets or env ids "
                                                     "(default: cartpole)")
    b.add_argument("--seeds", type=int, default=3, help="learn: seeds 0..N-1 per task (default: 3)")
    b.add_argument("--runs-dir", default=None, help="learn: where the runs go (default: runs/bench-learn-<time>); "
                                                    "run again with the same dir to resume")
    b.add_argument("--steps", type=int, default=None, help="learn: env-step budget per run (default: the preset's)")
    b.add_argument("--minutes", type=float, default=None, help="learn: wall-clock budget per run")
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
