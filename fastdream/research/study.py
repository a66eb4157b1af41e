"""Sweeps of training runs side by side (``fastdream study``): each setting a set of config overrides, trained for
every seed in ``STUDY_DIR/<setting>-s<seed>`` (sequentially, resumable), summarised per setting over the seeds.

- ``horizon``: H ∈ {1, 3, 5, 10, 15, 30} at a fixed imagined-step budget N·H per update (the base run's: more
  starts for shorter dreams), plus the ramp curriculum 1 → H over the first ``ramp_end`` updates.
- ``reward-noise``: σ of zero-mean noise on imagined rewards × N dreams per update, every run under the same
  wall-clock budget (``--minutes``): "On Training in Imagination" (2026) says the noise adds variance that falls
  with N, so more dreams should buy back what the noise costs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastdream.run.config import Config, apply
from fastdream.run.learn_bench import run_to_end, task_config
from fastdream.run.logger import json_text
from fastdream.run.plots import Curve, load_curve

STUDIES = ("horizon", "reward-noise")


def horizon_settings(base: Config, horizons: tuple[int, ...] = (1, 3, 5, 10, 15, 30), ramp_end: int = 1000
                     ) -> dict[str, dict[str, Any]]:
    """``H=h`` at the base's imagined steps per update (N·H = its dreams × its horizon), and ``ramp``."""
    t = base.train
    budget = (t.dream_starts or t.batch_size * t.seq_len) * t.horizon
    out: dict[str, dict[str, Any]] = {
        f"H={h}": {"train.horizon_mode": "budget", "train.horizon": h, "train.dream_budget": budget}
        for h in horizons}
    out[f"ramp 1-{t.horizon}"] = {"train.horizon_mode": "ramp", "train.h_min": 1, "train.h_max": t.horizon,
                                  "train.ramp_start": 0, "train.ramp_end": ramp_end}
    return out


def reward_noise_settings(sigmas: tuple[float, ...] = (0.0, 0.3, 1.0), dreams: tuple[int, ...] = (64, 256, 1024)
                          ) -> dict[str, dict[str, Any]]:
    """``sigma=σ N=n``: noise std σ on imagined rewards and n dreams per update."""
    return {f"sigma={s:g} N={n}": {"dream.reward_noise": float(s), "train.dream_starts": int(n)}
            for s in sigmas for n in dreams}


def run_study(settings: dict[str, dict[str, Any]], task: str, seeds: list[int], study_dir: Path,
              steps: int | None = None, minutes: float | None = None, extra: dict[str, Any] | None = None,
              progress: bool = False, on_run: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Trains ``task`` (a task preset or env id, as ``fastdream train`` would) under every setting for every seed;
    ``extra`` overrides apply to all, under the setting's own (the study's variable wins). Returns one record per
    run (``learn_bench.run_to_end``'s summary)."""
    records = []
    for label, over in settings.items():
        for seed in seeds:
            run_dir = study_dir / f"{_slug(label)}-s{seed}"

            def make(over: dict[str, Any] = over, seed: int = seed) -> Config:
                return apply(task_config(task, seed, steps, minutes), {**(extra or {}), **over})

            rec = {"setting": label, "seed": seed, "run_dir": str(run_dir),
                   **run_to_end(run_dir, make, steps, minutes, progress)}
            records.append(rec)
            if on_run:
                on_run(rec)
            if rec["stopped"] == "interrupted":  # Ctrl-C or SIGTERM stops the study, not just this run
                return records
    return records


def claim_study_dir(study_dir: Path, spec: dict[str, Any]) -> None:
    """Writes ``study_dir/spec.json`` (what the study runs: its name, task, settings, budgets, overrides), or checks
    it against the one there: a directory holding another study is a ValueError naming what differs, so a study
    never mixes into or overwrites an earlier one (more seeds of the same study are fine)."""
    path = study_dir / "spec.json"
    spec = json.loads(json_text(spec))  # as it reads back: tuples as lists, NaN as null
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            raise ValueError(f"{study_dir} holds another study (its {', '.join(diff)} differ); use another --dir")
        return
    from fastdream.data.atomic import write_synced

    study_dir.mkdir(parents=True, exist_ok=True)
    tmp = study_dir / f".spec.json.tmp-{os.getpid()}"  # studies of other seeds may start beside it
    write_synced(tmp, lambda f: f.write(json_text(spec)), mode="w")
    tmp.replace(path)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label)


def area_under_curve(curve: Curve, end: float) -> float:
    """The mean eval return over env steps 0..``end``: the curve linearly interpolated, held at its first
    evaluation before it and at its last after it (a run that stopped, solved or out of budget)."""
    grid = np.linspace(0.0, end, 200)
    return float(np.interp(grid, curve.env_steps, curve.eval_return).mean())


def summarise_study(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting, over its seeds: mean ± std of the final and best eval return and of the area under the curve
    (over the study's longest run), runs that reached the target, and mean ± std of their env steps and minutes."""
    curves = {r["run_dir"]: load_curve(r["run_dir"]) for r in records}
    end = max(float(c.env_steps[-1]) for c in curves.values())
    out = {}
    for label in dict.fromkeys(r["setting"] for r in records):
        runs = [r for r in records if r["setting"] == label]
        solved = [r for r in runs if r["solved"]]

        def stat(values: list[float]) -> dict[str, float]:
            return {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else \
                {"mean": math.nan, "std": math.nan}

        out[label] = {"seeds": [r["seed"] for r in runs], "solved": len(solved),
                      "final_eval": stat([r["final_eval"] for r in runs]),
                      "best_eval": stat([r["best_eval"] for r in runs]),
                      "auc": stat([area_under_curve(curves[r["run_dir"]], end) for r in runs]),
                      "env_steps_to_target": stat([r["env_steps"] for r in solved]),
                      "minutes_to_target": stat([r["wall_time"] / 60 for r in solved])}
    return out


def format_study(summary: dict[str, dict[str, Any]]) -> str:
    """One line per setting: runs solved, final and best eval, AUC, env steps and minutes to the target."""
    def pm(s: dict[str, float], fmt: str) -> str:
        return "-" if math.isnan(s["mean"]) else f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"

    lines = [f"{'setting':<20} {'solved':>6} {'final eval':>15} {'best eval':>15} {'AUC':>15} "
             f"{'env steps to target':>21} {'minutes':>13}"]
    for label, s in summary.items():
        lines.append(f"{label:<20} {s['solved']:>2}/{len(s['seeds']):<3} {pm(s['final_eval'], '.1f'):>15} "
                     f"{pm(s['best_eval'], '.1f'):>15} {pm(s['auc'], '.1f'):>15} "
                     f"{pm(s['env_steps_to_target'], ',.0f'):>21} {pm(s['minutes_to_target'], '.2f'):>13}")
    return "\n".join(lines)


def write_study(study_dir: Path, name: str, task: str, records: list[dict[str, Any]],
                summary: dict[str, dict[str, Any]]) -> tuple[Path, Path | None]:
    """``study.json`` (atomically) and ``curves.png`` (return vs env steps and vs wall clock, one colour per
    setting, its seeds thin and their mean thick with a ±1 std band; None without matplotlib)."""
    from fastdream.data.atomic import write_synced

    path = study_dir / "study.json"
    tmp = study_dir / f".study.json.tmp-{os.getpid()}"
    doc = {"study": name, "task": task, "settings": summary, "runs": records}
    write_synced(tmp, lambda f: f.write(json_text(doc)), mode="w")
    tmp.replace(path)
    try:
        from fastdream.run.plots import plot_groups

        groups = {label: [load_curve(r["run_dir"]) for r in records if r["setting"] == label] for label in summary}
        target = Config.from_dict(json.loads((Path(records[0]["run_dir"]) / "config.json").read_text()))
        goal = target.env.target_return
        plot = plot_groups(groups, study_dir / "curves.png", title=f"{name} study: {task}",
                           target=goal if math.isfinite(goal) else None)
    except ImportError:
        plot = None
    return path, plot
