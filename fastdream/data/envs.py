"""Vectorised environments (EnvPool, or gymnasium for any other id) in one step-row format.

Rows follow docs/design.md "Episode boundaries": after an episode ends, the next row is the
reset observation with ``is_first=1`` and reward 0; ``is_terminal`` marks true termination only,
``is_last`` both termination and truncation. The action stored with a row is the one that led to
it (zero on ``is_first`` rows, whose action the simulator ignored).
"""

from __future__ import annotations

import difflib
import warnings
from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

from fastdream.data import levels as _levels  # noqa: F401  (registers fastdream/CartPoleLevels-v1)

IMAGE_SIZE = 64
OBS_MODES = ("vector", "pixels", "both")


def _envpool_ids() -> list[str]:
    import envpool

    return list(envpool.list_all_envs())


def _gym_ids() -> list[str]:
    return list(gym.registry.keys())


def resolve_backend(env_id: str) -> str:
    """Returns ``"envpool"`` or ``"gymnasium"``; an unknown id is a ValueError with suggestions."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env id must be a non-empty string, got {env_id!r}")
    if env_id in _envpool_ids():
        return "envpool"
    if env_id in _gym_ids():
        return "gymnasium"
    close = difflib.get_close_matches(env_id, sorted(set(_envpool_ids()) | set(_gym_ids())), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown environment id {env_id!r} (not in EnvPool or gymnasium){hint}")


def env_facts(env_id: str) -> dict[str, Any]:
    """What a generic preset is built from, read from the env's spec and spaces (no env is stepped):
    ``obs`` (``"vector"`` for a 1-D Box observation, else ``"pixels"``: rendered frames), ``discrete`` and
    ``reward_threshold`` (None where the env has none)."""
    backend = resolve_backend(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "envpool":
            import envpool

            spec = envpool.make_spec(env_id)
            space, act, threshold = spec.observation_space, spec.action_space, spec.reward_threshold
        else:
            env = gym.make(env_id)
            space, act = env.observation_space, env.action_space
            env.close()
            threshold = gym.spec(env_id).reward_threshold
    vector = isinstance(space, gym.spaces.Box) and len(space.shape) == 1
    return {"obs": "vector" if vector else "pixels", "discrete": isinstance(act, gym.spaces.Discrete),
            "reward_threshold": None if threshold is None else float(threshold)}


def resize_frames(frames: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Area-downsamples ``[N, H, W, 3]`` uint8 frames to ``[N, size, size, 3]`` uint8."""
    import torch
    import torch.nn.functional as F

    if frames.shape[1:3] == (size, size):
        return np.ascontiguousarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(size, size), mode="area")
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class VecEnv:
    """A batch of environments that returns step rows ``{field: [n, ...]}``.

    ``reset()`` and ``step(actions)`` return the observation field(s) (``vector`` float32 and/or
    ``image`` uint8 64×64×3), ``reward`` float32, ``is_first``/``is_last``/``is_terminal`` bool,
    ``action`` float32 ``[n, A]`` (the action that led to the row: one-hot for discrete, zero on
    ``is_first``), and ``env_ids`` int64 (always present; a subset of envs in async mode).
    ``obs_spec`` describes the fields the env observes, ``replay_spec`` adds ``action``.
    """

    def __init__(self, env_id: str, num_envs: int, seed: int = 0, obs: str = "vector",
                 batch_size: int | None = None, render: bool = False, levels: tuple[int, int] | None = None) -> None:
        if obs not in OBS_MODES:
            raise ValueError(f"obs must be one of {OBS_MODES}, got {obs!r}")
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size <= num_envs):
            raise ValueError(f"batch_size must be an int in [1, num_envs={num_envs}], got {batch_size!r}")
        self.env_id = env_id
        self.num_envs = num_envs
        self.seed = seed
        self.obs_mode = obs
        self.backend = resolve_backend(env_id)
        self.batch_size = batch_size or num_envs
        self.is_async = self.batch_size < num_envs
        if levels is not None and self.backend == "envpool":
            raise ValueError(f"{env_id!r} has no levels; levels are for {_levels.CARTPOLE_LEVELS_ID}")
        if self.is_async and self.backend != "envpool":
            raise ValueError(f"async stepping (batch_size < num_envs) needs an EnvPool id; {env_id!r} is gymnasium")
        self.observe_pixels = obs in ("pixels", "both")
        self.render_enabled = True  # False skips rendering pixel obs (fast-forward on resume)
        render = render or self.observe_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.backend == "envpool":
                import envpool

                kwargs: dict[str, Any] = {"render_mode": "rgb_array"} if render else {}
                self._env = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs,
                                         batch_size=self.batch_size, seed=seed, **kwargs)
                space = self._env.single_observation_space if hasattr(
                    self._env, "single_observation_space") else self._env.observation_space
                act = self._env.single_action_space if hasattr(
                    self._env, "single_action_space") else self._env.action_space
                self.max_episode_steps = int(getattr(self._env.spec.config, "max_episode_steps", 0)) or None
            else:
                kwargs = {"render_mode": "rgb_array"} if render else {}
                if levels is not None:
                    if env_id != _levels.CARTPOLE_LEVELS_ID:
                        raise ValueError(f"{env_id!r} has no levels; levels are for {_levels.CARTPOLE_LEVELS_ID}")
                    kwargs["levels"] = levels
                self._env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", **kwargs)
                space, act = self._env.single_observation_space, self._env.single_action_space
                spec = gym.spec(env_id)
                self.max_episode_steps = spec.max_episode_steps
        if obs in ("vector", "both"):
            if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
                raise ValueError(f"{env_id!r} has observation space {space}; obs={obs!r} needs a 1-D Box")
        self.raw_observation_space = space
        if isinstance(act, gym.spaces.Discrete):
            self.discrete = True
            self.num_actions = int(act.n)
            self.action_space: gym.Space = gym.spaces.Discrete(self.num_actions)
            self._act_low = self._act_high = None
        elif isinstance(act, gym.spaces.Box) and len(act.shape) == 1:
            self.discrete = False
            self.num_actions = int(act.shape[0])
            self.action_space = gym.spaces.Box(-1.0, 1.0, act.shape, np.float32)
            self._act_low = act.low.astype(np.float64)
            self._act_high = act.high.astype(np.float64)
        else:
            raise ValueError(f"{env_id!r} has action space {act}; fastdream supports Discrete and 1-D Box")
        self.raw_action_space = act
        spec_: dict[str, tuple[tuple[int, ...], str]] = {}
        if obs in ("vector", "both"):
            spec_["vector"] = ((int(space.shape[0]),), "float32")
        if self.observe_pixels:
            spec_["image"] = ((IMAGE_SIZE, IMAGE_SIZE, 3), "uint8")
        spec_.update({"reward": ((), "float32"), "is_first": ((), "bool"), "is_last": ((), "bool"),
                      "is_terminal": ((), "bool")})
        self.obs_spec = spec_
        self.action_spec = {"action": ((self.num_actions,), "float32")}
        self.replay_spec = {**self.obs_spec, **self.action_spec}
        self._eye = np.eye(self.num_actions, dtype=np.float32)
        self._last_action = np.zeros((num_envs, self.num_actions), dtype=np.float32)
        self._prev_last = np.ones(num_envs, dtype=bool)
        self._all_ids = np.arange(num_envs, dtype=np.int64)
        self._ep_return = np.zeros(num_envs, dtype=np.float64)
        self._ep_length = np.zeros(num_envs, dtype=np.int64)
        self.episodes: deque[tuple[float, int]] = deque(maxlen=1000)
        self._started = False

    # ---------------------------------------------------------------- actions
    def encode_action(self, actions: Any) -> np.ndarray:
        """Env-form actions (int ``[n]`` or float ``[n, A]`` in [-1, 1]) → stored ``[n, A]`` float32."""
        a = np.asarray(actions)
        if self.discrete:
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise ValueError(f"discrete actions must be an int array [n], got {a.dtype}{a.shape}")
            if a.size and (a.min() < 0 or a.max() >= self.num_actions):
                raise ValueError(f"discrete actions must be in [0, {self.num_actions}), got {a.tolist()}")
            return self._eye[a]
        if a.ndim != 2 or a.shape[1] != self.num_actions:
            raise ValueError(f"continuous actions must be [n, {self.num_actions}], got shape {a.shape}")
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def _to_simulator(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions)
        if self.discrete:
            return a.astype(np.int32, copy=False)
        a = np.clip(a.astype(np.float64), -1.0, 1.0)
        return (self._act_low + (a + 1.0) * 0.5 * (self._act_high - self._act_low)).astype(np.float32)

    # ---------------------------------------------------------------- stepping
    def reset(self) -> dict[str, np.ndarray]:
        """Resets every env and returns the first rows (a batch of them in async mode)."""
        self._prev_last[:] = True
        self._last_action[:] = 0.0
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._started = True
        if self.backend == "envpool":
            if self.is_async:
                self._env.async_reset()
                obs, reward, term, trunc, info = self._env.recv()
                return self._rows(obs, reward, term, trunc, info["env_id"])
            obs, info = self._env.reset()
            ids = info["env_id"]
        else:
            obs, info = self._env.reset(seed=self.seed)
            ids = np.arange(self.num_envs)
        zeros = np.zeros(len(ids), dtype=bool)
        return self._rows(obs, np.zeros(len(ids), np.float32), zeros, zeros, ids)

    def step(self, actions: Any, env_ids: Any = None) -> dict[str, np.ndarray]:
        """Applies env-form ``actions`` to ``env_ids`` (default all; required in async mode)."""
        if not self._started:
            raise RuntimeError("call reset() before step()")
        n = self.batch_size if self.is_async else self.num_envs
        a = np.asarray(actions)
        if env_ids is None:
            if self.is_async:
                raise ValueError("async mode: step(actions, env_ids) needs the env_ids of the last rows")
            sel: Any = slice(None)
        else:
            env_ids = np.asarray(env_ids, dtype=np.int32)
            if len(env_ids) != n:
                raise ValueError(f"expected {n} env ids, got {len(env_ids)}")
            # Sync envs are normally stepped whole and in order: then a slice beats fancy indexing.
            in_order = not self.is_async and (env_ids == self._all_ids).all()
            sel = slice(None) if in_order else env_ids
        if len(a) != n:
            raise ValueError(f"expected {n} actions, got {len(a)}")
        self._last_action[sel] = self.encode_action(a)  # validates before stepping
        sim = self._to_simulator(a)
        if self.backend == "envpool":
            if self.is_async:
                self._env.send(sim, env_ids)
                obs, reward, term, trunc, info = self._env.recv()
            else:
                obs, reward, term, trunc, info = self._env.step(sim, None if isinstance(sel, slice) else env_ids)
            ids = info["env_id"]
        else:
            obs, reward, term, trunc, info = self._env.step(sim)
            ids = self._all_ids
        return self._rows(obs, reward, term, trunc, ids)

    def _rows(self, obs, reward, term, trunc, ids) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        # Sync envs come back in env order: plain slices then replace ~8 fancy-index gathers,
        # which measured ~25 us of the ~60 us Python overhead per 64-env CartPole step.
        sel = slice(None) if len(ids) == self.num_envs and (ids == self._all_ids).all() else ids
        first = self._prev_last[sel].copy()
        not_first = ~first
        term = np.asarray(term, dtype=bool) & not_first
        last = (term | np.asarray(trunc, dtype=bool)) & not_first
        reward = np.asarray(reward, dtype=np.float32) * not_first
        action = self._last_action[sel] * not_first[:, None]
        rows: dict[str, np.ndarray] = {}
        if self.obs_mode in ("vector", "both"):
            rows["vector"] = np.asarray(obs, dtype=np.float32).reshape(len(ids), -1)
        if self.observe_pixels:
            if self.render_enabled:
                rows["image"] = resize_frames(self.render_frames(ids))
            else:
                rows["image"] = np.zeros((len(ids), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        rows.update(reward=reward, is_first=first, is_last=last, is_terminal=term, action=action, env_ids=ids)
        # Episode statistics: the return of an episode counts every reward up to its last row.
        ret = self._ep_return[sel] * not_first + reward
        length = (self._ep_length[sel] + 1) * not_first
        self._ep_return[sel] = ret
        self._ep_length[sel] = length
        if last.any():
            for r, n in zip(ret[last].tolist(), length[last].tolist(), strict=True):
                self.episodes.append((r, n))
        self._prev_last[sel] = last
        return rows

    def render_frames(self, ids: np.ndarray) -> np.ndarray:
        """Full-resolution RGB frames ``[n, H, W, 3]`` of envs ``ids`` (needs pixels or render=True)."""
        if self.backend == "envpool":
            frames = self._env.render(env_ids=np.asarray(ids))
        else:
            frames = np.stack(self._env.render())[np.asarray(ids)]
        return np.asarray(frames)

    def pop_episodes(self) -> list[tuple[float, int]]:
        """Returns and clears the (return, length) of episodes finished since the last call."""
        out = list(self.episodes)
        self.episodes.clear()
        return out

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_env(env_id: str, num_envs: int, seed: int = 0, obs: str = "vector",
             batch_size: int | None = None, render: bool = False, levels: tuple[int, int] | None = None) -> VecEnv:
    """Builds a vectorised env: EnvPool when it has ``env_id``, else a gymnasium vector env.

    ``render=True`` enables ``render_frames`` (videos) without adding pixel observations. ``levels``: the level
    range ``[first, end)`` of a levels env (``data.levels``).
    """
    return VecEnv(env_id, num_envs, seed=seed, obs=obs, batch_size=batch_size, render=render, levels=levels)
