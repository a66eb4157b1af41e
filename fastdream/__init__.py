"""fastdream: a performance-engineered DreamerV3-style world-model RL training engine.

The public names below load on first use, so importing a light part of the package (``fastdream.data``) does not
pull in torch and the model stack.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_PUBLIC = {
    "Agent": "fastdream.agent",
    "Config": "fastdream.run.config",
    "ReplayBuffer": "fastdream.data.replay",
    "TrainResult": "fastdream.run.train",
    "WorldModel": "fastdream.model.world_model",
    "apply_presets": "fastdream.run.config",
    "apply_sets": "fastdream.run.config",
    "build_agent": "fastdream.run.train",
    "evaluate": "fastdream.run.train",
    "imagine": "fastdream.dream.rollout",
    "make_env": "fastdream.data.envs",
    "train": "fastdream.run.train",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fastdream' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
