"""Learning curves from runs' ``metrics.jsonl``: eval return against env steps and against wall clock, one colour
per group of runs (seeds), each run thin and the group's mean thick (``fastdream plot``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastdream.run.logger import read_rows


@dataclass
class Curve:
    """One run's evaluations: ``env_steps [E]``, ``minutes [E]`` of training wall clock, ``eval_return [E]``."""

    run_dir: Path
    env_steps: np.ndarray
    minutes: np.ndarray
    eval_return: np.ndarray


def load_curve(run_dir: str | Path) -> Curve:
    """The eval rows of ``run_dir/metrics.jsonl``; wall clock from ``progress/wall_time`` where the rows carry it
    (counted across resumes), else from the rows' timestamps since the first row. A run without a metrics file or
    without any evaluation is a ValueError naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"no metrics.jsonl in {run_dir}")
    rows = read_rows(path)
    evals = [r for r in rows if "eval/return" in r]
    if not evals:
        raise ValueError(f"{path} has no eval/return rows yet")
    t0 = rows[0]["time"]
    minutes = [(r["progress/wall_time"] if "progress/wall_time" in r else r["time"] - t0) / 60.0 for r in evals]
    return Curve(Path(run_dir), np.array([r["env_steps"] for r in evals], dtype=float), np.array(minutes),
                 np.array([float(r["eval/return"]) for r in evals]))


def group_mean(curves: list[Curve], axis: str, points: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard deviation of the groups' eval returns on a common grid of ``axis`` (``env_steps`` or
    ``minutes``) up to where the longest run ends, linearly interpolated: ``(grid, mean, std)``, each ``[points]``.
    A run that ended (solved, or out of budget) counts with its last evaluation from there on."""
    end = max(float(getattr(c, axis)[-1]) for c in curves)
    start = min(float(getattr(c, axis)[0]) for c in curves)
    grid = np.linspace(start, max(end, start), points)
    values = np.stack([np.interp(grid, getattr(c, axis), c.eval_return) for c in curves])
    return grid, values.mean(0), values.std(0)


def plot_groups(groups: dict[str, list[Curve]], out: str | Path, title: str = "", target: float | None = None) -> Path:
    """Writes a PNG of two panels (eval return vs env steps, vs wall-clock minutes) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (label, curves), colour in zip(groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4,
                                       strict=False):
        for ax, axis in zip(axes, ("env_steps", "minutes"), strict=True):
            for c in curves:
                ax.plot(getattr(c, axis), c.eval_return, color=colour, alpha=0.3, lw=1)
            grid, mean, std = group_mean(curves, axis)
            ax.plot(grid, mean, color=colour, lw=2, label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(grid, mean - std, mean + std, color=colour, alpha=0.15)
    for ax, name in zip(axes, ("env steps", "wall clock (minutes)"), strict=True):
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=1)
    axes[0].set_ylabel("eval return (mean of the eval episodes)")
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse_group(spec: str) -> tuple[str, list[Path]]:
    """``LABEL=DIR[,DIR...]`` or ``DIR[,DIR...]`` (the label is then the first directory's name)."""
    label, _, dirs = spec.rpartition("=")
    paths = [Path(d) for d in dirs.split(",") if d]
    if not paths:
        raise ValueError(f"no run directory in {spec!r} (expected LABEL=DIR[,DIR...])")
    return label or paths[0].name, paths


def plot_evolution(summary: dict, out: str | Path) -> Path:
    """Writes a PNG of ``fastdream evolve``'s scores against generations: per temperature (one colour) CMA-ES's
    mean controller in the dream (solid; its mean std over dreams in the legend) and on the real env (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4
    for (label, r), colour in zip(summary["temperatures"].items(), colours, strict=False):
        rows = [h for h in r["history"] if "real" in h]
        gen = np.array([h["generation"] for h in rows])
        dream = np.array([h["eval_dream"] for h in rows])
        spread = np.array([h["eval_dream_std"] for h in rows])  # per dream: in the label, a band hid the curves
        ax.plot(gen, dream, color=colour, lw=2, marker="o", ms=3, label=f"τ={label} dream (±{spread.mean():.0f})")
        ax.plot(gen, [h["real"] for h in rows], color=colour, lw=2, ls="--", marker="s", ms=3,
                label=f"τ={label} real")
    ax.set_xlabel("generation")
    ax.set_ylabel("return of CMA-ES's mean controller")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{summary['env']}: a controller evolved in the dream")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_model_error(report: dict, out: str | Path) -> Path:
    """Writes a PNG of ``fastdream eval --model-error``'s open-loop errors against k: the latent KL (left) and the
    observation, reward and continue errors (right, log scale; k = 0 is the posterior)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    errors = report["errors"]
    k = np.arange(report["horizon"] + 1)
    axes[0].plot(k[1:], errors["latent_kl"][1:], marker="o", ms=3, lw=2)
    axes[0].set_ylabel("KL(posterior || k-step prior), nats")
    for name, values in errors.items():
        if name != "latent_kl":
            axes[1].plot(k, np.maximum(values, 1e-12), marker="o", ms=3, lw=2,
                         label=f"{name} (x{report['growth'][name]:.2f}/step)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("error (obs: squared; reward, cont: absolute)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("k (open-loop steps from a posterior state)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['env']}: open-loop model error on {report['starts']:,} held-out windows")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_dream(pred: dict, out: str | Path | None = None, title: str = "") -> Path | np.ndarray:
    """The dream beside the real env over k = 0..H (``run.dream_view.dream_prediction``): one panel per observation
    dimension, then reward and continue; real solid, dreamed dashed. Writes a PNG to ``out``, or returns the
    picture as an RGB array ``[h, w, 3]`` uint8 when ``out`` is None (TensorBoard)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"obs[{i}]", pred["real_vector"][:, i], pred["pred_vector"][:, i])
              for i in range(pred["real_vector"].shape[1] if "real_vector" in pred else 0)]
    series += [("reward", pred["real_reward"], pred["pred_reward"]), ("continue", pred["real_cont"], pred["pred_cont"])]
    cols = min(len(series), 3)
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.4 * rows), squeeze=False)
    k = np.arange(len(pred["real_reward"]))
    for ax, (name, real, dream) in zip(axes.flat, series, strict=False):
        ax.plot(k, real, color="black", lw=1.5, label="real")
        ax.plot(k, dream, color="tab:orange", lw=1.5, ls="--", label="dream")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel(f"k (open-loop steps from row {int(pred['start'])})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if out is None:
        fig.canvas.draw()
        picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return picture
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
