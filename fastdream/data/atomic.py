"""Directories written whole or not at all: the one helper replay saves and checkpoints share."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_dir(path: str | os.PathLike, keep: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yields an empty temp directory beside ``path``; when the block ends without an error it replaces ``path``
    (an existing one is swapped out by rename, then removed, or with ``keep`` renamed to ``keep``, replacing the one
    kept before), so a crash at any point leaves the old directory or the new one: at ``path``, or (with ``keep``,
    between its two renames) at ``keep`` alone. On an error the temp directory is removed and ``path`` is
    untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # A killed writer's leftovers (one writer per directory: a run's own process).
    for stale in path.parent.glob(f".{path.name}.*-*") if path.parent.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None and path.exists():
        keep = Path(keep)
        if keep.exists():
            shutil.rmtree(keep)
        os.replace(path, keep)
        os.replace(tmp, path)
        return
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_synced(path: Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """Writes ``path`` with ``write(file)`` and fsyncs it before returning (a rename after it is then durable)."""
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
