"""Metrics to ``metrics.jsonl`` and TensorBoard, plus a live console progress line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class Logger:
    """Appends one JSON object per ``write`` to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_at: int | None = None) -> None:
        """``resume_at``: the env steps of the checkpoint a resumed run continues from; rows and TensorBoard events
        logged after it (by the process that was killed) are dropped, so each step is logged once, in order."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_at is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["env_steps"] <= resume_at]
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_at is None else resume_at + 1
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"env_steps": step, "time": time.time()}
        for k, v in metrics.items():
            v = float(v) if isinstance(v, int | float) or hasattr(v, "item") else v
            row[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
            if self._tb is not None and isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def add_image(self, tag: str, image: Any, step: int) -> None:
        """An RGB picture ``[h, w, 3]`` uint8 to TensorBoard (nothing without it)."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def json_text(doc: Any) -> str:
    """``doc`` as indented JSON with NaN as null (a report's "no value", e.g. no run reached the target)."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and math.isnan(x) else x

    return json.dumps(clean(doc), indent=1, default=str)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows a ``Logger`` wrote to ``path`` (a ``metrics.jsonl``), in order; non-finite values stay the strings
    it wrote them as."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A one-line status with env steps, return, eval and updates/s: on a terminal a live rich bar with an
    ETA; else (output to a file or pipe, e.g. ``nohup fastdream train > log``) a plain line with the
    elapsed time every ``interval`` seconds and on every ``force``d update, since a redrawn bar would
    reach the file only at the end."""

    def __init__(self, total: int, enabled: bool = True, interval: float = 60.0, console: Any = None) -> None:
        self.enabled = enabled
        self.total = total
        self.interval = interval
        self._live = False
        if not enabled:
            return
        from rich.console import Console

        self._console = console or Console()
        self._live = self._console.is_terminal
        self._start = time.perf_counter()
        self._last_line = -math.inf
        if self._live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self._console)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, info="")

    def update(self, done: int, info: str, force: bool = False) -> None:
        """``done`` env steps of ``total``; ``info`` the rest of the line."""
        if not self.enabled:
            return
        if self._live:
            self._bar.update(self._task, completed=min(done, self.total), info=info)
            return
        now = time.perf_counter()
        if force or now - self._last_line >= self.interval:
            self._last_line = now
            self._console.print(plain_status(done, self.total, info, now - self._start), markup=False,
                                highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._live:
            self._bar.stop()


def plain_status(done: int, total: int, info: str, elapsed: float) -> str:
    """``train 41,792/400,000 env steps (10.4 %)  <info>  12:05 elapsed`` (elapsed in this process)."""
    minutes, seconds = divmod(int(elapsed), 60)
    return (f"train {done:,}/{total:,} env steps ({100.0 * done / max(total, 1):.1f} %)  {info}  "
            f"{minutes}:{seconds:02d} elapsed")


def write_video(path: str | Path, frames: list) -> Path:
    """Writes RGB frames ``[H, W, 3]`` uint8 as an animated GIF (Pillow) or, for .mp4, via imageio."""
    path = Path(path)
    if not frames:
        raise ValueError("no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise ValueError("writing .mp4 needs `pip install fastdream[video]`; use a .gif path instead") from None
        imageio.mimwrite(path, frames, fps=30)
        return path
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=33, loop=0)
    return path
