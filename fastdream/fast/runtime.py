"""Process-level settings that a training process (the CLI, the benchmarks) opts into."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 2**31 - 1, mmap: bool = False) -> bool:
    """Asks glibc's malloc to serve blocks from its heap, not from fresh ``mmap``s (``mmap=False``: none at all;
    ``True``: those under ``mmap_threshold`` bytes, at most 32 MiB), and to keep freed memory instead of handing
    it back to the OS.

    A train step or a dream allocates and frees the same multi-MB activations every update; a block served by
    ``mmap`` is unmapped when freed, and its pages fault in (zeroed) again on first touch. Measured here: copying
    a ``[1024, 15, 256]`` slice went from 16 ms to 2.6 ms with the 32 MiB threshold; an N=16384 xs dream (blocks
    of 64-250 MB, above any threshold) faulted 600 MB of pages per call, none without mmap, and its median time
    went 1.51-1.60 s -> 1.08-1.14 s (alternated runs). Returns False where there is no glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    # glibc's default M_MMAP_MAX (65536) turns mmap back on; 0 turns it off.
    return ok and bool(mallopt(_M_MMAP_MAX, 65536 if mmap else 0))


_COMPILED: dict[tuple, tuple[Callable, tuple]] = {}
_INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False}


def compiled(owners: object | tuple, name: str, fn: Callable) -> Callable:
    """``torch.compile(fn)`` (full graph, static shapes) built once per ``(owners, name)``: a training
    loop's hot pieces (the posterior step, the dream rollout and its reward/continue heads, the actor's
    log-probabilities, the critic's passes) compile on first use and stay out of the modules, so state
    dicts and checkpoints do not change. ``owners``: the module or tuple of modules ``fn`` closes over
    (the cache keeps them alive)."""
    owners = owners if isinstance(owners, tuple) else (owners,)
    key = (*(id(o) for o in owners), name)
    if key not in _COMPILED:
        # fullgraph: a graph break would silently fall back to Python between ops. No size/alignment asserts in
        # the generated wrapper: one Python call per op output, ~0.5k per N=4096 dream (its wrapper ran 4-12 ms
        # faster without, alternated); the custom ops' shapes and strides are their fake kernels', which the
        # compile-vs-eager tests check by value.
        _COMPILED[key] = (torch.compile(fn, fullgraph=True, dynamic=False, options=_INDUCTOR_OPTIONS), owners)
    return _COMPILED[key][0]
