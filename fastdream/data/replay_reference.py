"""A deliberately plain numpy replay (lists of rows): the oracle for fastdream.ReplayBuffer in tests and bench."""

from __future__ import annotations

import numpy as np


class NumpyReplay:
    """Per-env Python lists of rows; windows addressed by (env, logical start)."""

    def __init__(self, capacity: int, num_envs: int, spec: dict) -> None:
        self.env_capacity = capacity // num_envs
        self.spec = spec
        self.streams: list[dict[str, list]] = [{k: [] for k in spec} for _ in range(num_envs)]

    def add(self, rows: dict, env_ids) -> None:
        for i, e in enumerate(env_ids):
            for k in self.spec:
                self.streams[e][k].append(np.array(rows[k][i]))

    def count(self, env: int) -> int:
        return len(self.streams[env]["reward"] if "reward" in self.spec else next(iter(self.streams[env].values())))

    def is_valid(self, env: int, start: int, seq_len: int) -> bool:
        count = self.count(env)
        oldest = count - min(count, self.env_capacity)
        return oldest <= start and start + seq_len <= count

    def window(self, env: int, start: int, seq_len: int) -> dict[str, np.ndarray]:
        return {k: np.stack(v[start:start + seq_len]) for k, v in self.streams[env].items()}

    def gather(self, envs, starts, seq_len: int) -> dict[str, np.ndarray]:
        wins = [self.window(e, s, seq_len) for e, s in zip(envs, starts, strict=True)]
        return {k: np.stack([w[k] for w in wins]) for k in self.spec}

    def num_windows(self, seq_len: int) -> int:
        return sum(max(0, min(self.count(e), self.env_capacity) - seq_len + 1) for e in range(len(self.streams)))
