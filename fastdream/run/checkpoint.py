"""Atomic checkpoints: one directory (``state.pt`` + its SHA-256 + optional ``replay/``) swapped into place whole,
the one before it kept as ``checkpoint.prev``: a checkpoint that cannot be read (truncated, damaged, its checksum
wrong) falls back to the previous one, with a warning naming the file."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import IO, Any

import torch

from fastdream.data.atomic import atomic_dir, write_synced
from fastdream.data.replay import ReplayBuffer

CHECKPOINT_DIR = "checkpoint"
PREVIOUS_DIR = "checkpoint.prev"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the ones before it are intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(run_dir: Path, state: dict[str, Any], replay: ReplayBuffer | None) -> Path:
    """Writes ``run_dir/checkpoint`` atomically (``atomic_dir``), moving the one it replaces to
    ``checkpoint.prev``: a crash or a full disk at any point leaves at least one whole checkpoint. A failed write
    is a ``CheckpointError`` (its temp directory removed)."""
    final = Path(run_dir) / CHECKPOINT_DIR
    try:
        with atomic_dir(final, keep=Path(run_dir) / PREVIOUS_DIR) as tmp:
            write_synced(tmp / "state.pt", lambda f: torch.save(state, f))
            digest = _sha256(tmp / "state.pt")
            write_synced(tmp / "state.sha256", lambda f: f.write(digest), mode="w")
            if replay is not None:
                replay.save(tmp / "replay")
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        kept = final if final.exists() else Path(run_dir) / PREVIOUS_DIR
        raise CheckpointError(f"cannot write checkpoint {final}: {exc}; the last good one, {kept}, is intact"
                              ) from None
    return final


def claim(run_dir: Path) -> IO:
    """Locks ``run_dir`` for this process (``run_dir/lock``, an exclusive ``flock`` the OS drops when the process
    ends, however it ends): a second process training in the same directory is a ValueError, not two writers
    interleaving one run's checkpoints and metrics. Keep the returned file open while training; close it after."""
    import fcntl
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{run_dir} is in use by {owner}; wait for it or use another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


def exists(run_dir: Path) -> bool:
    return any((Path(run_dir) / d / "state.pt").is_file() for d in (CHECKPOINT_DIR, PREVIOUS_DIR))


def _read(ck: Path, with_replay: bool) -> tuple[dict[str, Any], ReplayBuffer | None]:
    """One checkpoint directory; anything unreadable is a ValueError naming the file."""
    path = ck / "state.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint in {ck.parent} (expected {path})")
    sums = ck / "state.sha256"
    if sums.is_file() and sums.read_text().strip() != _sha256(path):
        raise ValueError(f"checkpoint {path} is damaged (its SHA-256 does not match {sums.name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds on a truncated file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    replay = ReplayBuffer.load(ck / "replay") if with_replay and (ck / "replay").is_dir() else None
    return state, replay


def load(run_dir: Path, with_replay: bool = True) -> tuple[dict[str, Any], ReplayBuffer | None]:
    """Reads ``run_dir/checkpoint`` (and its replay unless ``with_replay=False``); if that one is missing or
    damaged, ``checkpoint.prev`` with a warning on stderr. Neither readable is a ValueError naming the files."""
    run_dir = Path(run_dir)
    errors = []
    for name in (CHECKPOINT_DIR, PREVIOUS_DIR):
        try:
            out = _read(run_dir / name, with_replay)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if errors:
            print(f"fastdream: warning: {errors[0]}; using the previous checkpoint {run_dir / name}", file=sys.stderr)
        return out
    if not exists(run_dir):
        raise ValueError(f"no checkpoint in {run_dir} (expected {run_dir / CHECKPOINT_DIR / 'state.pt'})")
    raise ValueError("; ".join(errors))
