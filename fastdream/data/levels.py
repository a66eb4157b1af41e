"""Levels for generalisation studies: a classic-control task whose physics each level seed fixes, so a run trains
on levels [a, b) and is tested on levels it never saw (e.g. from 10^6 on).

``fastdream/CartPoleLevels-v1`` is gymnasium's CartPole-v1 (same observation, actions, reward, 500-step limit and
termination) with, per level, physics drawn once from ``np.random.default_rng([level, LEVEL_STREAM])``:
gravity U(7, 12), cart mass U(0.5, 2), pole mass U(0.05, 0.5), pole half-length U(0.25, 1), push force U(6, 14)
(CartPole-v1's own: 9.8, 1.0, 0.1, 0.5, 10). Each episode draws its level uniformly from the env's range with the
env's seeded RNG; ``info["level"]`` names it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

CARTPOLE_LEVELS_ID = "fastdream/CartPoleLevels-v1"
LEVEL_STREAM = 0xC47  # separates the physics stream from any other use of a level's number as a seed
PHYSICS = {"gravity": (7.0, 12.0), "masscart": (0.5, 2.0), "masspole": (0.05, 0.5), "length": (0.25, 1.0),
           "force_mag": (6.0, 14.0)}


def level_physics(level: int) -> dict[str, float]:
    """The CartPole physics of ``level`` (an int >= 0): each of ``PHYSICS`` uniform in its range."""
    if not isinstance(level, int | np.integer) or level < 0:
        raise ValueError(f"a level is an int >= 0, got {level!r}")
    rng = np.random.default_rng([int(level), LEVEL_STREAM])
    return {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in PHYSICS.items()}


def parse_levels(text: str) -> tuple[int, int]:
    """``"a:b"`` → the level range ``[a, b)``; a ValueError names a bad one."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"levels must be 'first:end' (ints, end exclusive), got {text!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"levels must satisfy 0 <= first < end, got {text!r}")
    return lo, hi


class CartPoleLevels(CartPoleEnv):
    """CartPole-v1 with each episode's physics fixed by a level drawn from ``levels = (first, end)``."""

    def __init__(self, levels: tuple[int, int] = (0, 200), render_mode: str | None = None) -> None:
        super().__init__(render_mode=render_mode)
        lo, hi = parse_levels(f"{levels[0]}:{levels[1]}")
        self.levels, self.level = (lo, hi), lo

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = super().reset(seed=seed, options=options)
        self.level = int(self.np_random.integers(*self.levels))
        for k, v in level_physics(self.level).items():
            setattr(self, k, v)
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length
        info["level"] = self.level
        return obs, info


if CARTPOLE_LEVELS_ID not in gym.registry:
    gym.register(CARTPOLE_LEVELS_ID, entry_point=CartPoleLevels, max_episode_steps=500, reward_threshold=475.0)
