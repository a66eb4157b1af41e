"""The dream floor: many short imagined rollouts as one batch (``rollout``), the engine registry (``engines``) and
horizon schedules (``schedule``). ``imagine``, ``draw_noise``, ``HorizonSchedule`` and ``ENGINES`` load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"imagine": "rollout", "draw_noise": "rollout", "HorizonSchedule": "schedule", "ENGINES": "engines",
           "resolve_engine": "engines"}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fastdream.dream' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
