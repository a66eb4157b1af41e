"""Python face of the C++ replay ring buffer: spec checks, save/load, numpy/torch views.

One ring per env stream; ``capacity`` is the total over envs. A sampled sequence is a contiguous
window of one env's stream that never contains unwritten slots and never straddles the write
cursor. Windows may span episode ends: ``is_first`` marks them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastdream.data import _replay
from fastdream.data.atomic import atomic_dir, write_synced

FORMAT = "fastdream-replay"
VERSION = 1
# Above this many bytes per sample call the gather is split over two threads: measured on the
# 2-core dev box, one thread already saturates memcpy below ~1 MiB and thread start-up dominates.
_PARALLEL_BYTES = 1 << 20

SpecLike = Mapping[str, tuple[tuple[int, ...], Any]]


def normalize_spec(spec: SpecLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Validates ``{name: (shape, dtype)}`` and returns it with tuple shapes and numpy dtypes."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"spec must be a non-empty dict of name -> (shape, dtype), got {spec!r}")
    out = {}
    for name, entry in spec.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"spec field names must be non-empty strings, got {name!r}")
        try:
            shape, dtype = entry
            shape = tuple(int(d) for d in shape)
            dtype = np.dtype(dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"spec field {name!r}: expected (shape, dtype), got {entry!r} ({exc})") from None
        if any(d <= 0 for d in shape):
            raise ValueError(f"spec field {name!r}: every dimension must be >= 1, got {shape}")
        if dtype.kind not in "buif":
            raise ValueError(f"spec field {name!r}: dtype {dtype} is not bool/int/uint/float")
        out[name] = (shape, dtype)
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ReplayBuffer:
    """Replay ring buffer of step rows, sampled as ``[B, T, ...]`` windows.

    Args:
        capacity: total rows over all envs (each env keeps ``capacity // num_envs``).
        num_envs: number of env streams.
        spec: ``{name: (shape, dtype)}`` of one row.
        seed: seed of the window sampler.
    """

    def __init__(self, capacity: int, num_envs: int, spec: SpecLike, seed: int = 0) -> None:
        if not isinstance(num_envs, int | np.integer) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        if not isinstance(capacity, int | np.integer) or capacity < num_envs:
            raise ValueError(f"capacity must be an int >= num_envs ({num_envs}), got {capacity!r}")
        self.spec = normalize_spec(spec)
        self.capacity = int(capacity)
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        core_spec = [(n, list(s), d) for n, (s, d) in self.spec.items()]
        self._core = _replay.ReplayCore(self.capacity, self.num_envs, core_spec, self.seed)
        self._names = list(self.spec)
        self._name_set = set(self._names)
        self._all_envs = np.arange(self.num_envs, dtype=np.int64)

    # ---------------------------------------------------------------- properties
    @property
    def env_capacity(self) -> int:
        """Rows kept per env stream."""
        return self._core.env_capacity

    @property
    def nbytes(self) -> int:
        """Bytes of allocated storage."""
        per_row = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in self.spec.values())
        return per_row * self.env_capacity * self.num_envs

    def __len__(self) -> int:
        return self._core.size()

    def counts(self) -> np.ndarray:
        """Rows ever written per env, ``[num_envs]``."""
        return np.asarray(self._core.counts(), dtype=np.int64)

    def num_windows(self, seq_len: int) -> int:
        """Complete windows of ``seq_len`` rows available to sample."""
        return self._core.num_windows(int(seq_len))

    def storage(self, name: str) -> np.ndarray:
        """Zero-copy view of one field, ``[num_envs, env_capacity, *shape]`` (slot order)."""
        shape, dtype = self.spec[name]
        raw = self._core.storage(self._names.index(name))
        return raw.view(dtype).reshape(self.num_envs, self.env_capacity, *shape)

    # ---------------------------------------------------------------- add
    def add(self, rows: Mapping[str, Any], env_ids: Any = None) -> None:
        """Appends one row per env: ``rows[name]`` is ``[n, *shape]``, n = len(env_ids) or num_envs."""
        if not isinstance(rows, Mapping):
            raise TypeError(f"rows must be a dict of arrays, got {type(rows).__name__}")
        if env_ids is None:
            ids = self._all_envs
        else:
            ids = _as_numpy(env_ids)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ValueError(f"env_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
            ids = np.ascontiguousarray(ids, dtype=np.int64)  # range and repeats: checked in C++
        if rows.keys() - {"env_ids"} != self._name_set:
            missing = [n for n in self._names if n not in rows]
            unknown = [k for k in rows if k not in self.spec and k != "env_ids"]
            if missing:
                raise ValueError(f"rows are missing field(s) {missing}; the spec has {self._names}")
            raise ValueError(f"rows have unknown field(s) {unknown}; the spec has {self._names}")
        # Dtypes, shapes and the row count are checked by the C++ core before it copies anything.
        arrays = []
        for name in self._names:
            a = rows[name]
            if type(a) is not np.ndarray or not a.flags.c_contiguous:
                a = np.ascontiguousarray(_as_numpy(a))
            arrays.append(a)
        self._core.add(ids, arrays)

    # ---------------------------------------------------------------- sample
    def alloc_batch(
        self, batch_size: int, seq_len: int, as_torch: bool = False, pin_memory: bool = False
    ) -> dict[str, Any]:
        """Allocates a reusable output dict ``{name: [B, T, *shape]}`` for ``sample(out=...)``.

        With ``as_torch`` the arrays are torch tensors (pinned with ``pin_memory``) that the
        gather writes into directly, so a host-to-device copy needs no extra staging copy.
        """
        if as_torch:
            import torch

            def make(shape, dtype):
                t = torch.empty(
                    (batch_size, seq_len, *shape),
                    dtype=torch.from_numpy(np.empty(0, dtype)).dtype,
                    pin_memory=pin_memory,
                )
                return t

            return {n: make(s, d) for n, (s, d) in self.spec.items()}
        return {n: np.empty((batch_size, seq_len, *s), dtype=d) for n, (s, d) in self.spec.items()}

    def sample(
        self, batch_size: int, seq_len: int, recency: float = 0.0, out: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Samples ``batch_size`` windows of ``seq_len`` rows: ``{name: [B, T, *shape]}``.

        ``recency`` in [0, 1] is the probability that a window's age within its env stream is
        drawn from a density favouring recent data (twice uniform at the newest, zero at the
        oldest) instead of uniformly. ``out`` (from ``alloc_batch``) is filled in place.
        """
        batch, _, _ = self.sample_with_index(batch_size, seq_len, recency, out)
        return batch

    def sample_with_index(
        self, batch_size: int, seq_len: int, recency: float = 0.0, out: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """Like ``sample`` and also returns the env id ``[B]`` and logical start index ``[B]``."""
        for name, val in (("batch_size", batch_size), ("seq_len", seq_len)):
            if not isinstance(val, int | np.integer) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if not isinstance(recency, int | float) or not 0.0 <= recency <= 1.0:
            raise ValueError(f"recency must be a number in [0, 1], got {recency!r}")
        if seq_len > self.env_capacity:
            raise ValueError(
                f"seq_len {seq_len} exceeds the per-env capacity {self.env_capacity} "
                f"(capacity {self.capacity} // num_envs {self.num_envs})"
            )
        if self.num_windows(seq_len) == 0:
            raise ValueError(
                f"cannot sample seq_len {seq_len}: no env stream holds that many rows yet "
                f"(rows per env: max {int(self.counts().max())})"
            )
        if out is None:
            out = self.alloc_batch(batch_size, seq_len)
        elif set(out) != set(self._names):
            raise ValueError(f"out must have exactly the spec fields {self._names}, got {sorted(out)}")
        arrays = [_as_numpy(out[n]) for n in self._names]
        env = np.empty(batch_size, dtype=np.int64)
        start = np.empty(batch_size, dtype=np.int64)
        total = batch_size * seq_len * sum(a[0, 0].nbytes for a in arrays)
        threads = min(os.cpu_count() or 1, 4) if total >= _PARALLEL_BYTES else 1
        self._core.sample(batch_size, seq_len, float(recency), arrays, env, start, threads)
        return out, env, start

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Writes the buffer to directory ``path`` atomically (``atomic.atomic_dir``: temp dir + rename)."""
        counts = self.counts()
        used = int(np.minimum(counts, self.env_capacity).max(initial=0))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "seed": self.seed,
            "spec": {n: [list(s), d.str] for n, (s, d) in self.spec.items()},
            "counts": counts.tolist(),
            "used_slots": used,
            "rng_state": self._core.rng_state().hex(),
        }
        with atomic_dir(path) as tmp:
            for i, name in enumerate(self._names):
                write_synced(tmp / f"field{i}.npy", lambda f, n=name: np.save(f, self.storage(n)[:, :used]))
            write_synced(tmp / "meta.json", lambda f: json.dump(meta, f), mode="w")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Loads a buffer written by ``save``; a damaged or foreign directory is a ValueError."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{path} is not a fastdream replay directory (no meta.json)")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            if meta.get("version") != VERSION:
                raise ValueError(f"version {meta.get('version')!r}, this fastdream reads {VERSION}")
            spec = {n: (tuple(s), np.dtype(d)) for n, (s, d) in meta["spec"].items()}
            rb = cls(int(meta["capacity"]), int(meta["num_envs"]), spec, int(meta["seed"]))
            counts = np.asarray(meta["counts"], dtype=np.int64)
            used = int(meta["used_slots"])
            if counts.shape != (rb.num_envs,) or (counts < 0).any():
                raise ValueError("counts do not match num_envs")
            if used != int(np.minimum(counts, rb.env_capacity).max(initial=0)):
                raise ValueError("used_slots disagrees with counts")
            for i, name in enumerate(rb._names):
                arr = np.load(path / f"field{i}.npy", allow_pickle=False)
                shape, dtype = rb.spec[name]
                want = (rb.num_envs, used, *shape)
                if arr.dtype != dtype or arr.shape != want:
                    raise ValueError(f"field {name!r} file has {arr.dtype}{arr.shape}, expected {dtype}{want}")
                rb.storage(name)[:, :used] = arr
            rb._core.set_counts(counts.tolist())
            rb._core.set_rng_state(bytes.fromhex(meta["rng_state"]))
        except ValueError as exc:
            raise ValueError(f"cannot load replay from {path}: {exc}") from None
        except (OSError, KeyError, TypeError, json.JSONDecodeError, EOFError) as exc:
            raise ValueError(f"cannot load replay from {path}: damaged ({type(exc).__name__}: {exc})") from None
        return rb

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={d}{list(s)}" for n, (s, d) in self.spec.items())
        return f"ReplayBuffer(len={len(self)}, capacity={self.capacity}, num_envs={self.num_envs}, {fields})"
