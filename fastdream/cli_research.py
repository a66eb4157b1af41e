"""The research commands' faces: ``fastdream evolve``, ``fastdream study`` and ``fastdream eval --dream`` /
``--model-error`` (their parsers join ``fastdream.cli``'s)."""

from __future__ import annotations

import argparse
import sys
import time

from fastdream.cli import CliError


def dream_view(args: argparse.Namespace, cfg, agent) -> int:
    from pathlib import Path

    from fastdream.run.dream_view import dream_prediction, held_out_sequences, side_by_side_frames
    from fastdream.run.logger import write_video

    horizon = cfg.train.horizon if args.horizon is None else args.horizon
    if horizon < 1:
        raise CliError(f"--horizon must be >= 1, got {horizon}")
    if args.video and not agent.wm.image:
        raise CliError(f"{args.run_dir} observes {cfg.env.obs} only: a dream video needs a pixel run; without --video "
                       "--dream plots the dreamed observations beside the real ones")
    out = Path(args.out) if args.out else Path(args.run_dir) / "dream"
    seq = held_out_sequences(agent, cfg, 1, horizon + 9, seed=args.seed, deterministic=not args.sample)
    try:
        pred = dream_prediction(agent, seq, horizon, seed=args.seed)
    except ValueError as exc:
        raise CliError(f"{exc}; try another --seed or a shorter --horizon") from None
    print(f"dream of {cfg.env.id}: {horizon} open-loop steps from row {int(pred['start'])} of a fresh episode "
          f"(seed {args.seed})")
    for name in ("vector", "reward", "cont"):
        if f"real_{name}" in pred:
            err = abs(pred[f"pred_{name}"] - pred[f"real_{name}"])
            err = err.mean(-1) if err.ndim > 1 else err
            print(f"  {name:>6} |dream - real|: k=0 {err[0]:.4g}, k={horizon} {err[-1]:.4g}")
    if agent.wm.image:
        path = write_video(args.video or out / "dream.gif", side_by_side_frames(pred))
        print(f"wrote {path} (real left, dream right, {horizon + 1} frames)")
    try:
        from fastdream.run.plots import plot_dream

        print(f"wrote {plot_dream(pred, out / 'dream.png', title=f'{cfg.env.id}: the dream beside the real env')}")
    except ImportError:
        print("no dream.png (install matplotlib: pip install 'fastdream[plot]')")
    return 0


def model_error(args: argparse.Namespace, cfg, agent) -> int:
    from pathlib import Path

    from fastdream.research.model_error import format_model_error, model_error, write_report

    horizon = cfg.train.horizon if args.horizon is None else args.horizon
    if args.envs < 1:
        raise CliError(f"--envs must be >= 1, got {args.envs}")
    try:
        report = model_error(agent, cfg, horizon, envs=args.envs, length=args.length, seed=args.seed,
                             deterministic=not args.sample)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"model error of {cfg.env.id}: {report['starts']:,} open-loop windows of {horizon} steps from "
          f"{args.envs} fresh envs x {args.length} rows ({report['policy']} actions)")
    print(format_model_error(report))
    path, plot = write_report(report, Path(args.out) if args.out else Path(args.run_dir) / "model_error")
    print(f"wrote {path}; {plot or 'no plot (install matplotlib: pip install fastdream[plot])'}")
    return 0


def cmd_evolve(args: argparse.Namespace) -> int:
    from contextlib import nullcontext
    from pathlib import Path

    from fastdream.research.evolve import EvolveSettings, evolve, format_evolve_table

    try:
        taus = [float(t) for t in args.tau.split(",") if t.strip()]
    except ValueError:
        raise CliError(f"--tau takes comma-separated numbers > 0, got {args.tau!r}") from None
    settings = EvolveSettings(population=args.population, dreams=args.dreams, horizon=args.horizon,
                              generations=args.generations, sigma=args.sigma, start=args.start,
                              eval_every=args.eval_every, eval_dreams=args.eval_dreams, episodes=args.episodes,
                              seed=args.seed)
    live = not args.quiet and sys.stdout.isatty()
    if live:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]evolve"), BarColumn(bar_width=24), MofNCompleteColumn(),
                       TextColumn("{task.description}"), TimeRemainingColumn())
        task = bar.add_task("", total=len(taus) * args.generations)
    say = bar.console.print if live else print

    def on_generation(tau: float, row: dict) -> None:
        if live:
            bar.update(task, advance=1, description=f"tau {tau:g} gen {row['generation']} "
                                                    f"dream best {row['dream_best']:.1f}")
        if "real" in row:
            say(f"  tau {tau:g} generation {row['generation']}: mean controller dream {row['eval_dream']:.1f} "
                f"(length {row['eval_length']:.1f}), real {row['real']:.1f} ± {row['real_std']:.1f}", flush=True)

    try:
        with bar if live else nullcontext():
            summary = evolve(args.run_dir, taus, settings, args.out, on_generation)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(format_evolve_table(summary))
    out = Path(args.out) if args.out else Path(args.run_dir) / "evolve"
    plot = summary["plot"] or "no evolve.png (install matplotlib: pip install 'fastdream[plot]')"
    print(f"wrote {out / 'evolve.json'}; {plot}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastdream.research.study import (
        claim_study_dir,
        format_study,
        horizon_settings,
        reward_noise_settings,
        run_study,
        summarise_study,
        write_study,
    )
    from fastdream.run.config import apply, parse_sets, validate
    from fastdream.run.learn_bench import task_config

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        values = [float(v) for v in args.values.split(",") if v.strip()] if args.values else None
        dreams = [int(v) for v in args.dreams.split(",") if v.strip()]
    except ValueError:
        raise CliError("--seeds and --dreams take comma-separated ints, --values comma-separated numbers") from None
    if not seeds:
        raise CliError("--seeds needs at least one seed")
    try:
        extra = parse_sets(args.set)
        base = task_config(args.task, seeds[0], args.steps, args.minutes)
        if args.name == "horizon":
            if values and any(v < 1 or v != int(v) for v in values):
                raise CliError(f"horizon study: --values are horizons, ints >= 1, got {args.values}")
            settings = horizon_settings(base, tuple(int(v) for v in values) if values else (1, 3, 5, 10, 15, 30),
                                        ramp_end=args.ramp_end)
        else:
            if values and any(v < 0 for v in values):
                raise CliError(f"reward-noise study: --values are noise stds >= 0, got {args.values}")
            settings = reward_noise_settings(tuple(values) if values else (0.0, 0.3, 1.0), tuple(dreams))
        for over in settings.values():  # every setting's config checked before the first run
            validate(apply(base, {**extra, **over}))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    study_dir = Path(args.dir or f"runs/study-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        claim_study_dir(study_dir, {"study": args.name, "task": args.task, "settings": settings,
                                    "steps": args.steps, "minutes": args.minutes, "extra": extra})
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"study {args.name}: {args.task}, {len(settings)} settings x seeds {seeds}, runs in {study_dir}", flush=True)

    def show(rec: dict) -> None:
        what = "solved" if rec["solved"] else f"not solved ({rec['stopped']})"
        print(f"  {rec['setting']} seed {rec['seed']}: {what} at {rec['env_steps']:,} env steps, "
              f"{rec['wall_time'] / 60:.2f} min, best eval {rec['best_eval']:.1f}", flush=True)

    records = run_study(settings, args.task, seeds, study_dir, args.steps, args.minutes, extra,
                        progress=not args.quiet and sys.stdout.isatty(), on_run=show)
    if records[-1]["stopped"] == "interrupted":
        print(f"study interrupted; the same command resumes it from {records[-1]['run_dir']}", file=sys.stderr)
        return 130
    summary = summarise_study(records)
    print(format_study(summary))
    path, plot = write_study(study_dir, args.name, args.task, records, summary)
    print(f"wrote {path}; {plot or 'no curves.png (install matplotlib)'}")
    return 0


def add_research_parsers(sub: argparse._SubParsersAction) -> None:
    """Adds ``evolve`` and ``study`` to the ``fastdream`` command's subparsers."""
    ev = sub.add_parser("evolve", help="a linear controller evolved by CMA-ES only in a run's dream (World Models), "
                                       "then scored on the real env")
    ev.add_argument("run_dir", help="a trained run's directory (its checkpoint's world model is used, frozen)")
    ev.add_argument("--tau", default="1.0", help="dream temperatures, comma-separated (default: 1.0): the prior "
                                                 "logits are divided by tau; > 1 is a noisier dream")
    ev.add_argument("--population", type=int, default=64, help="CMA-ES candidates per generation (default: 64)")
    ev.add_argument("--dreams", type=int, default=16, help="dreams per candidate (default: 16)")
    ev.add_argument("--horizon", type=int, default=200, help="dream steps (default: 200)")
    ev.add_argument("--generations", type=int, default=30, help="per temperature (default: 30); more resumes")
    ev.add_argument("--sigma", type=float, default=0.1, help="CMA-ES's initial step size (default: 0.1)")
    ev.add_argument("--start", default="replay", choices=["replay", "reset"],
                    help="dreams start from posterior states of the run's replay or of fresh env resets")
    ev.add_argument("--eval-every", type=int, default=5, help="score the mean controller every N generations")
    ev.add_argument("--eval-dreams", type=int, default=1024, help="dreams per dream score (default: 1024)")
    ev.add_argument("--episodes", type=int, default=100, help="real episodes per real score (default: 100)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default=None, help="output directory (default: RUN_DIR/evolve); again to resume")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_evolve)

    st = sub.add_parser("study", help="a sweep of training runs over seeds, summarised per setting (study.json, "
                                      "curves.png): horizon or reward-noise")
    st.add_argument("name", choices=["horizon", "reward-noise"],
                    help="horizon: H at a fixed imagined-step budget N*H, and a ramp; reward-noise: noise std x "
                         "dreams per update under one wall-clock budget")
    st.add_argument("--task", default="cartpole", help="task preset or env id (default: cartpole)")
    st.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    st.add_argument("--values", default=None, help="horizons (default 1,3,5,10,15,30) or noise stds (0,0.3,1)")
    st.add_argument("--dreams", default="64,256,1024", help="reward-noise: dreams per update (default: 64,256,1024)")
    st.add_argument("--ramp-end", type=int, default=1000, help="horizon: updates of the 1 -> H ramp (default: 1000)")
    st.add_argument("--steps", type=int, default=None, help="env-step budget per run (default: the preset's)")
    st.add_argument("--minutes", type=float, default=None, help="wall-clock budget per run")
    st.add_argument("--dir", default=None, help="study directory (default: runs/study-<name>-<time>); again to resume")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    st.add_argument("--quiet", action="store_true", help="no live progress line")
    st.set_defaults(func=cmd_study)

