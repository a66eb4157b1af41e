"""Atomic checkpoints: one directory (``state.pt`` + optional ``replay/``) swapped into place whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastdream.data.atomic import atomic_dir, write_synced
from fastdream.data.replay import ReplayBuffer

CHECKPOINT_DIR = "checkpoint"


def save(run_dir: Path, state: dict[str, Any], replay: ReplayBuffer | None) -> Path:
    """Writes ``run_dir/checkpoint`` atomically (``atomic_dir``): a crash leaves the previous checkpoint intact."""
    final = Path(run_dir) / CHECKPOINT_DIR
    with atomic_dir(final) as tmp:
        write_synced(tmp / "state.pt", lambda f: torch.save(state, f))
        if replay is not None:
            replay.save(tmp / "replay")
    return final


def exists(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / "state.pt").is_file()


def load(run_dir: Path, with_replay: bool = True) -> tuple[dict[str, Any], ReplayBuffer | None]:
    """Reads ``run_dir/checkpoint`` (and its replay unless ``with_replay=False``); a missing or
    damaged one is a ValueError."""
    ck = Path(run_dir) / CHECKPOINT_DIR
    if not (ck / "state.pt").is_file():
        raise ValueError(f"no checkpoint in {run_dir} (expected {ck / 'state.pt'})")
    try:
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds on a truncated file
        raise ValueError(f"cannot read checkpoint {ck / 'state.pt'}: {exc}") from None
    replay = ReplayBuffer.load(ck / "replay") if with_replay and (ck / "replay").is_dir() else None
    return state, replay
