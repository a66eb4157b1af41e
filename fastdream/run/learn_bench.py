"""``fastdream bench learn``: each task's preset trained per seed to its target; env steps and wall time to it."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastdream.run import checkpoint
from fastdream.run.config import TASKS, Config, apply, apply_presets, task_presets
from fastdream.run.logger import read_rows
from fastdream.run.train import train


def task_config(task: str, seed: int, steps: int | None = None, minutes: float | None = None) -> Config:
    """The config ``fastdream train`` would run for ``task`` (a task preset name, which names its env, or an env id:
    its task preset or the generic one) and ``seed``."""
    cfg = apply_presets(Config(), [task] if task in TASKS else task_presets([], task))
    over: dict[str, Any] = {"train.seed": seed}
    if steps is not None:
        over["train.steps"] = steps
    if minutes is not None:
        over["train.minutes"] = minutes
    return apply(cfg, over)


def _summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary row of a finished run in ``run_dir`` (None if it has not finished)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = read_rows(path)
    ends = [r for r in rows if "summary/stopped" in r]
    if not ends:
        return None
    evals = [r["eval/return"] for r in rows if "eval/return" in r]
    end = ends[-1]
    return {"stopped": end["summary/stopped"], "solved": end["summary/stopped"] == "solved",
            "env_steps": int(end["summary/env_steps"]), "updates": int(end["summary/updates"]),
            "wall_time": float(end["summary/wall_time"]), "final_eval": float(end["summary/eval_return"]),
            "best_eval": max(evals) if evals else float("nan")}


def run_to_end(run_dir: Path, make_cfg: Callable[[], Config], steps: int | None = None, minutes: float | None = None,
               progress: bool = False) -> dict[str, Any]:
    """The summary of the run in ``run_dir``: read back if it finished, resumed if it stopped part-way, else
    trained from ``make_cfg()``; so a sweep of runs can be run again after a crash."""
    done = _summary(run_dir)
    if done is None or done["stopped"] == "interrupted":
        if checkpoint.exists(run_dir):
            train(None, run_dir, resume=True, progress=progress, steps=steps, minutes=minutes)
        else:
            train(make_cfg(), run_dir, progress=progress)
        done = _summary(run_dir)
    return done


def learn(tasks: list[str], seeds: list[int], runs_dir: Path, steps: int | None = None, minutes: float | None = None,
          progress: bool = False, on_run: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Trains every task for every seed in ``runs_dir/<task>-s<seed>`` and returns one record per run
    (``run_to_end``: finished runs are read back, stopped ones resume)."""
    records = []
    for task in tasks:
        for seed in seeds:
            run_dir = runs_dir / f"{task}-s{seed}"
            done = run_to_end(run_dir, lambda t=task, s=seed: task_config(t, s, steps, minutes), steps, minutes,
                              progress)
            cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
            rec = {"task": task, "seed": seed, "env": cfg.env.id, "target": cfg.env.target_return,
                   "run_dir": str(run_dir), **done}
            records.append(rec)
            if on_run:
                on_run(rec)
            if rec["stopped"] == "interrupted":  # Ctrl-C or SIGTERM stops the sweep, not just this run
                return records
    return records


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: seeds solved of seeds run, and the medians of env steps and wall time to the target over the
    solved seeds (None where none solved)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in records):
        runs = [r for r in records if r["task"] == task]
        solved = [r for r in runs if r["solved"]]
        out.append({"task": task, "target": runs[0]["target"], "solved": len(solved), "runs": len(runs),
                    "median_env_steps": statistics.median(r["env_steps"] for r in solved) if solved else None,
                    "median_wall_time": statistics.median(r["wall_time"] for r in solved) if solved else None,
                    "best_eval": max(r["best_eval"] for r in runs)})
    return out


def format_learn_table(records: list[dict[str, Any]]) -> str:
    """One line per run (env steps and minutes to the target, or the best eval of an unsolved run), then one
    summary line per task."""
    lines = [f"{'task':<22} {'seed':>4} {'solved':>6} {'env steps':>10} {'minutes':>8} {'updates':>8} {'best eval':>9}"]
    for r in records:
        lines.append(f"{r['task']:<22} {r['seed']:>4} {'yes' if r['solved'] else 'no':>6} {r['env_steps']:>10,} "
                     f"{r['wall_time'] / 60:>8.2f} {r['updates']:>8,} {r['best_eval']:>9.1f}")
    for s in summarise(records):
        target = "none" if math.isinf(s["target"]) else f"{s['target']:g}"
        med = ("" if s["median_env_steps"] is None else
               f", median {s['median_env_steps']:,.0f} env steps, {s['median_wall_time'] / 60:.2f} min")
        lines.append(f"{s['task']}: {s['solved']}/{s['runs']} seeds reached {target}{med}; best eval "
                     f"{s['best_eval']:.1f}")
    return "\n".join(lines)
