"""Benchmark cases shared by bench/ (pytest-benchmark) and `fastdream bench`.

Each case builds its variants once, then times them interleaved in one run, so a ratio
(fast path ÷ reference) stays stable on a noisy machine. A record is
``{"name", "params", "value", "unit", "reference", "ratio"}``: ``value`` is the variant's rate and
``ratio`` is value ÷ the reference variant's rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Variant:
    name: str
    fn: Callable[[], Any]
    work: float  # units of work per call (samples, env steps, bytes, ...)


@dataclass
class Case:
    name: str
    params: dict[str, Any]
    unit: str
    variants: list[Variant]
    # (variant, reference) pairs whose ratio is reported.
    ratios: list[tuple[str, str]] = field(default_factory=list)
    cleanup: Callable[[], None] | None = None

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def _seconds(fn: Callable[[], Any], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run_case(case: Case, min_time: float = 1.0, rounds: int = 6) -> list[dict[str, Any]]:
    """Times every variant of ``case`` and returns its records: after a warm-up call each, ``rounds`` rounds
    time one block of ~``min_time / rounds`` seconds per variant in turn, and the best block counts. Interleaved
    blocks share the machine's drift (this VM's speed moves by up to ~1.5x between runs): in every round a
    variant and its reference are timed within seconds of each other."""
    reps = {}
    for v in case.variants:
        v.fn()  # warm-up (compilation, allocations)
        reps[v.name] = max(1, int(min_time / rounds / max(_seconds(v.fn, 1), 1e-7)))
    secs = {v.name: float("inf") for v in case.variants}
    for _ in range(rounds):
        for v in case.variants:
            secs[v.name] = min(secs[v.name], _seconds(v.fn, reps[v.name]))
    rate = {v.name: v.work / secs[v.name] for v in case.variants}
    records = []
    for v in case.variants:
        refs = [r for name, r in case.ratios if name == v.name and r in rate] or [None]
        for ref in refs:  # one record per (variant, reference) pair
            records.append({
                "name": f"{case.name}/{v.name}",
                "params": case.params,
                "value": rate[v.name],
                "unit": case.unit,
                "reference": f"{case.name}/{ref}" if ref else None,
                "ratio": rate[v.name] / rate[ref] if ref else None,
            })
    if case.cleanup:
        case.cleanup()
    return records


# ---------------------------------------------------------------- replay
def replay_case(kind: str, batch_size: int = 16, seq_len: int = 64, num_envs: int = 16,
                rows_per_env: int = 2000) -> Case:
    """Sample ``[B, T]`` pixel or vector rows: ReplayBuffer vs the tests' list-of-rows numpy reference,
    a vectorised numpy gather (fancy indexing into the same storage), and a plain memcpy of the bytes."""
    from fastdream.data.replay import ReplayBuffer

    spec: dict[str, tuple[tuple[int, ...], str]] = {
        "action": ((2,), "float32"), "reward": ((), "float32"),
        "is_first": ((), "bool"), "is_last": ((), "bool"), "is_terminal": ((), "bool"),
    }
    if kind == "pixels":
        spec["image"] = ((64, 64, 3), "uint8")
    elif kind == "vector":
        spec["vector"] = ((8,), "float32")
    else:
        raise ValueError(f"replay case kind must be 'pixels' or 'vector', got {kind!r}")
    rb = ReplayBuffer(num_envs * rows_per_env, num_envs, spec, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(rows_per_env):
        rows = {}
        for n, (shape, dtype) in spec.items():
            kind = np.dtype(dtype).kind
            if kind == "b":
                rows[n] = rng.random((num_envs, *shape)) < 0.5
            elif kind == "u":
                rows[n] = rng.integers(0, 256, (num_envs, *shape), dtype=np.uint8)
            else:
                rows[n] = rng.standard_normal((num_envs, *shape), dtype=np.float32)
        rb.add(rows)
    out = rb.alloc_batch(batch_size, seq_len)
    storages = {n: rb.storage(n) for n in spec}
    cap = rb.env_capacity

    def fast():
        rb.sample(batch_size, seq_len, out=out)

    nbytes = sum(a.nbytes for a in out.values())

    def numpy_gather():
        env = rng.integers(0, num_envs, batch_size)
        start = rng.integers(0, cap - seq_len, batch_size)
        idx = (start[:, None] + np.arange(seq_len)[None]) % cap
        for n, st in storages.items():
            out[n][...] = st[env[:, None], idx]

    from fastdream.data.replay_reference import NumpyReplay

    ref = NumpyReplay(num_envs * rows_per_env, num_envs, spec)
    for e in range(num_envs):  # the same rows, held as the tests' oracle holds them
        ref.streams[e] = {n: list(storages[n][e]) for n in spec}

    def reference():
        env = rng.integers(0, num_envs, batch_size)
        start = rng.integers(0, cap - seq_len, batch_size)
        ref.gather(env, start, seq_len)

    src = {n: np.ascontiguousarray(st[0, : batch_size * seq_len]) for n, st in storages.items()}
    flat = {n: a.reshape(src[n].shape) for n, a in out.items()}

    def memcpy():
        for n in src:
            np.copyto(flat[n], src[n])

    return Case(
        name=f"replay_sample_{kind}",
        params={"batch_size": batch_size, "seq_len": seq_len, "row_bytes": nbytes // (batch_size * seq_len)},
        unit="MB/s",
        variants=[Variant("fastdream", fast, nbytes / 1e6), Variant("numpy", numpy_gather, nbytes / 1e6),
                  Variant("numpy_reference", reference, nbytes / 1e6), Variant("memcpy", memcpy, nbytes / 1e6)],
        ratios=[("fastdream", "numpy_reference"), ("fastdream", "numpy"), ("fastdream", "memcpy"),
                ("memcpy", "numpy")],
    )


# ---------------------------------------------------------------- environments
def env_case(env_id: str = "CartPole-v1", num_envs: int = 64, steps: int = 50) -> Case:
    """Env steps/s: raw EnvPool, gymnasium SyncVectorEnv, and the collector (env + policy + replay)."""
    import warnings

    import envpool
    import gymnasium as gym

    from fastdream.data.collector import Collector, RandomPolicy
    from fastdream.data.envs import make_env
    from fastdream.data.replay import ReplayBuffer

    warnings.filterwarnings("ignore", module="gymnasium")
    rng = np.random.default_rng(0)
    raw = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=0)
    raw.reset()
    env = make_env(env_id, num_envs, seed=0)
    acts = [rng.integers(0, env.num_actions, num_envs).astype(np.int32) for _ in range(steps)]

    def raw_steps():
        for a in acts:
            raw.step(a)

    sync = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
    sync.reset(seed=0)

    def sync_steps():
        for a in acts:
            sync.step(a)

    rb = ReplayBuffer(num_envs * 100_000, num_envs, env.replay_spec)
    col = Collector(env, rb, RandomPolicy(env, seed=0))
    col.reset()

    def collect():
        for _ in range(steps):
            col.step()

    def cleanup():
        raw.close()
        sync.close()
        env.close()

    work = steps * num_envs
    return Case(
        name=f"env_{env_id}",
        params={"num_envs": num_envs},
        unit="steps/s",
        variants=[Variant("envpool", raw_steps, work), Variant("gymnasium_sync", sync_steps, work),
                  Variant("collector", collect, work)],
        ratios=[("collector", "envpool"), ("envpool", "gymnasium_sync")],
        cleanup=cleanup,
    )


CASES: dict[str, list[Callable[[], Case]]] = {
    "replay": [lambda: replay_case("pixels"), lambda: replay_case("vector")],
    "env": [lambda: env_case()],
}


def format_table(records: list[dict[str, Any]]) -> str:
    """One aligned text table of records."""
    lines = [f"{'benchmark':<38} {'value':>14} {'unit':<10} {'ratio':>8}  reference"]
    for r in records:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        lines.append(f"{r['name']:<38} {r['value']:>14,.1f} {r['unit']:<10} {ratio:>8}  {r['reference'] or ''}")
    return "\n".join(lines)


# ---------------------------------------------------------------- dreams and the train step
def _size_dims(size: str) -> dict[str, int]:
    from fastdream.run.config import SIZES

    d = SIZES[size]
    return {"deter": d["model.deter"], "hidden": d["model.hidden"], "units": d["model.units"],
            "classes": d["model.classes"]}


def record_matmuls(fn: Callable[[], Any]) -> list[tuple[Any, list[tuple[int, ...]], Any]]:
    """Every matmul (``mm``/``addmm``/``bmm``/``baddbmm``) that ``fn()`` dispatches, as
    ``(op, operand shapes, dtype)``, after autocast (so bf16 runs record bf16 matmuls)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    calls: list[tuple[Any, list[tuple[int, ...]], Any]] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                calls.append((func, [tuple(t.shape) for t in tensors], tensors[-1].dtype))
            return func(*args, **(kwargs or {}))

    with _Recorder():
        fn()
    return calls


def matmul_flops(calls: list[tuple[Any, list[tuple[int, ...]], Any]]) -> float:
    """FLOPs (2·m·k·n per product) of ``record_matmuls`` calls."""
    total = 0.0
    for _, shapes, _ in calls:
        a, b = shapes[-2], shapes[-1]
        total += 2.0 * float(np.prod(a)) * b[-1]
    return total


def replay_matmuls(calls: list[tuple[Any, list[tuple[int, ...]], Any]]) -> Callable[[], None]:
    """A function that runs the same matmuls (shapes, dtype, order) on fixed random operands and
    nothing else: the physical limit of a computation made of them."""
    import torch

    operands: dict[tuple, list] = {}
    program = []
    for func, shapes, dtype in calls:
        key = (func, tuple(shapes), dtype)
        if key not in operands:
            operands[key] = [torch.randn(sh).to(dtype) for sh in shapes]
        program.append((func, operands[key]))

    def run() -> None:
        for func, args in program:
            func(*args)
    return run


def dream_case(size: str = "xs", n: int = 4096, horizon: int = 15, engines: tuple[str, ...] = ("kernels", "compile"),
               precisions: tuple[str, ...] = ("fp32", "bf16")) -> Case:
    """Imagined state-steps/s of a no-grad discrete-action dream (rollout + reward/continue/policy
    heads: ``dream.imagine``), per engine and precision, next to the same dream's matmuls alone
    (recorded from the kernels run and replayed: same shapes, dtype and count) as the physical limit.
    Gathers of one-hot stoch rows are not matmuls and count as zero FLOPs."""
    import torch

    from fastdream.dream.rollout import draw_noise, imagine
    from fastdream.model.behavior import Actor
    from fastdream.model.world_model import WorldModel

    dims = _size_dims(size)
    torch.manual_seed(0)
    wm = WorldModel(8, False, 4, deter=dims["deter"], hidden=dims["hidden"], stoch=32, classes=dims["classes"],
                    units=dims["units"])
    actor = Actor(wm.rssm.feat_dim, 4, True, units=dims["units"], layers=2)
    deter = torch.randn(n, dims["deter"])
    stoch = torch.nn.functional.one_hot(torch.randint(0, dims["classes"], (n, 32)), dims["classes"]).float()
    noise = draw_noise(n, horizon, 32, actor, "cpu")

    def make(engine: str, precision: str, onehot: bool = True):
        def fn():
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                # As training dreams: features kept as deter + class indices (ignored without gathers).
                imagine(wm, actor, (deter, stoch), horizon, engine=engine, noise=noise, onehot=onehot,
                        dense_feat=False, precision=precision)
        return fn

    variants = [Variant(f"{e}_{p}", make(e, p), n * horizon) for e in engines for p in precisions]
    # The reference loop: step by step, fp32, dense matmuls on the one-hot stoch (no gathers), C++ kernels where no
    # gradient is needed.
    variants.insert(0, Variant(f"kernels_{precisions[0]}_dense", make("kernels", precisions[0], False), n * horizon))
    params: dict[str, Any] = {"size": size, "n": n, "horizon": horizon}
    for p in precisions:
        calls = record_matmuls(make("kernels", p))
        params[f"gflop_per_dream_{p}"] = round(matmul_flops(calls) / 1e9, 3)
        variants.append(Variant(f"matmuls_only_{p}", replay_matmuls(calls), n * horizon))
    base = f"kernels_{precisions[0]}"
    ratios = [(f"{e}_{p}", f"{base}_dense") for e in engines for p in precisions]
    ratios += [(f"{e}_{p}", base) for e in engines for p in precisions if f"{e}_{p}" != base]
    ratios += [(f"{e}_{p}", f"matmuls_only_{p}") for e in engines for p in precisions]
    return Case(name=f"dream_{size}_n{n}", params=params, unit="steps/s", variants=variants, ratios=ratios)


def train_case(size: str = "xs", batch_size: int = 16, seq_len: int = 64, horizon: int = 15,
               setups: tuple[tuple[str, str], ...] = (("kernels", "fp32"), ("compile", "bf16"))) -> Case:
    """Full train step (world model + dreams from all B*T states + actor-critic) updates/s, per
    (engine, precision) setup, next to the world-model-only update; the compile engine's setup also compiles the
    world model and the critics (``compile_model``)."""
    import torch

    from fastdream.agent import Agent
    from fastdream.model.behavior import Behavior
    from fastdream.model.world_model import WorldModel

    dims = _size_dims(size)
    B, T = batch_size, seq_len
    batch = {"vector": torch.randn(B, T, 8),
             "action": torch.nn.functional.one_hot(torch.randint(0, 4, (B, T)), 4).float(),
             "reward": torch.randn(B, T), "is_first": torch.rand(B, T) < 0.02,
             "is_last": torch.zeros(B, T, dtype=torch.bool), "is_terminal": torch.rand(B, T) < 0.01}

    def make_agent(engine: str, precision: str) -> Agent:
        torch.manual_seed(0)
        wm = WorldModel(8, False, 4, deter=dims["deter"], hidden=dims["hidden"], stoch=32,
                        classes=dims["classes"], units=dims["units"])
        beh = Behavior(wm.rssm.feat_dim, 4, True, units=dims["units"], layers=2)
        return Agent(wm, beh, num_envs=1, horizon=horizon, discrete=True, precision=precision, engine=engine,
                     compile_model=engine == "compile")

    variants = []
    for engine, precision in setups:
        agent = make_agent(engine, precision)
        variants.append(Variant(f"full_{engine}_{precision}", lambda a=agent: a.train_step(batch), 1))
    wm_agent = make_agent("kernels", "fp32")
    variants.append(Variant("world_model_only", lambda: wm_agent.train_step(batch, train_behavior=False), 1))
    first = variants[0].name
    return Case(name=f"train_step_{size}", params={"size": size, "batch_size": B, "seq_len": T, "horizon": horizon},
                unit="updates/s", variants=variants,
                ratios=[(v.name, first) for v in variants[1:-1]] + [(first, "world_model_only")])


def gather_backward_case(m: int = 16384, latents: int = 32, classes: int = 32, width: int = 256) -> Case:
    """Weight gradient of a gathered one-hot layer (``nets.gather_rows_backward``, the C++ kernel on a
    CPU) in gradient rows/s, next to one torch ``index_add_`` per latent (the previous implementation)."""
    import torch

    from fastdream.model.nets import gather_rows_backward

    torch.manual_seed(0)
    g = torch.randn(m, width)
    rows = torch.randint(0, classes, (m, latents)) + torch.arange(latents) * classes
    num_rows = latents * classes

    def index_adds() -> torch.Tensor:
        out = torch.zeros(num_rows, width)
        for s in range(latents):
            out.index_add_(0, rows[:, s], g)
        return out

    variants = [Variant("gather_rows_backward", lambda: gather_rows_backward(g, rows, num_rows), m),
                Variant("index_add_per_latent", index_adds, m)]
    return Case(name=f"gather_backward_m{m}", params={"m": m, "latents": latents, "classes": classes,
                                                       "width": width},
                unit="rows/s", variants=variants, ratios=[("gather_rows_backward", "index_add_per_latent")])


def unimix_index_case(n: int = 4096, latents: int = 32, classes: int = 32) -> Case:
    """One prior draw of N dreams (``n·latents`` rows of ``classes`` bf16 logits) in draws/s: the C++
    ``unimix_index`` next to the same maths in torch ops (softmax, unimix, cumsum, count) eager and compiled."""
    import torch

    from fastdream.fast import runtime
    from fastdream.model.maths import inverse_cdf_index, unimix_probs
    from fastdream.model.nets import unimix_index

    torch.manual_seed(0)
    logits = torch.randn(n * latents, classes).bfloat16()
    noise = torch.rand(n * latents)

    def torch_ops(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return inverse_cdf_index(unimix_probs(x.float()), u)

    compiled = runtime.compiled(torch_ops, "unimix draw (benchmark)", torch_ops)
    rows = float(n * latents)
    variants = [Variant("unimix_index", lambda: unimix_index(logits, noise), rows),
                Variant("torch_eager", lambda: torch_ops(logits, noise), rows),
                Variant("torch_compiled", lambda: compiled(logits, noise), rows)]
    return Case(name=f"unimix_index_n{n}", params={"n": n, "latents": latents, "classes": classes},
                unit="draws/s", variants=variants,
                ratios=[("unimix_index", "torch_eager"), ("unimix_index", "torch_compiled")])


def dream_ops_case(n: int = 4096, units: int = 256, groups: int = 8, horizon: int = 15, bins: int = 255,
                   latents: int = 32, classes: int = 32) -> Case:
    """The no-grad C++ ops of an N-dream step on bf16 inputs, each next to the same maths compiled by
    inductor, in values/s: ``norm_silu`` on ``[N, units]``, ``onehot_norm_silu`` (a first layer on
    ``[N, units]`` dense inputs and ``latents`` one-hot stoch, with its norm and SiLU), ``gru_gate_grouped``
    on the block matmul's ``[G, N, 3·units/G]``, ``twohot_decode`` on the heads' ``[N·H, bins]``."""
    import torch
    import torch.nn.functional as F

    from fastdream.fast import runtime
    from fastdream.kernels.reference import gru_gate_reference
    from fastdream.model.maths import symexp, twohot_bins
    from fastdream.model.nets import Norm, gru_gate_grouped, norm_silu, onehot_linear, onehot_norm_silu, twohot_decode

    torch.manual_seed(0)
    norm = Norm(units)
    x = (torch.randn(n, units) * 3).bfloat16()
    y = (torch.randn(groups, n, 3 * units // groups) * 2).bfloat16()
    bias, deter = torch.randn(3 * units) * 0.3, torch.randn(n, units)
    grid = twohot_bins(bins)
    logits = (torch.randn(n * horizon, bins) * 3).bfloat16()
    index = torch.randint(0, classes, (n, latents))
    weight = torch.randn(units, units + latents * classes) / 16

    def torch_norm_silu(v: torch.Tensor) -> torch.Tensor:
        return F.silu(norm.ln(v.float())).to(v.dtype)

    def torch_onehot(v: torch.Tensor) -> torch.Tensor:
        return torch_norm_silu(onehot_linear(v, weight, index, classes))

    def fused_onehot(v: torch.Tensor) -> torch.Tensor:  # compiled too, as in a rollout: the table cast and rows fuse
        return onehot_norm_silu(v, weight, norm, index, classes)

    def bf16(fn):
        def run(*args):
            with torch.autocast("cpu", torch.bfloat16):
                return fn(*args)
        return run

    def torch_gate(v: torch.Tensor) -> torch.Tensor:
        return gru_gate_reference(v.transpose(0, 1).reshape(n, -1) + bias, deter, groups)

    def torch_decode(v: torch.Tensor) -> torch.Tensor:
        return symexp((v.float().softmax(-1) * grid).sum(-1))

    ops = {name: runtime.compiled(fn, f"{name} (benchmark)", fn)
           for name, fn in (("norm_silu", torch_norm_silu), ("gru_gate", torch_gate), ("twohot_decode", torch_decode),
                            ("onehot_norm_silu", bf16(torch_onehot)), ("onehot_fused", bf16(fused_onehot)))}

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    variants = [Variant("norm_silu", no_grad(lambda: norm_silu(x, norm)), float(x.numel())),
                Variant("norm_silu_compiled", no_grad(lambda: ops["norm_silu"](x)), float(x.numel())),
                # The dense inputs' matmul is part of both; values/s counts the layer's outputs.
                Variant("onehot_norm_silu", no_grad(lambda: ops["onehot_fused"](deter)), float(x.numel())),
                Variant("onehot_norm_silu_compiled", no_grad(lambda: ops["onehot_norm_silu"](deter)), float(x.numel())),
                Variant("gru_gate", no_grad(lambda: gru_gate_grouped(y, bias, deter)), float(deter.numel())),
                Variant("gru_gate_compiled", no_grad(lambda: ops["gru_gate"](y)), float(deter.numel())),
                Variant("twohot_decode", no_grad(lambda: twohot_decode(logits, grid)), float(logits.numel())),
                Variant("twohot_decode_compiled", no_grad(lambda: ops["twohot_decode"](logits)), float(logits.numel()))]
    return Case(name=f"dream_ops_n{n}", params={"n": n, "units": units, "groups": groups, "bins": bins},
                unit="values/s", variants=variants,
                ratios=[(k, f"{k}_compiled") for k in ("norm_silu", "onehot_norm_silu", "gru_gate", "twohot_decode")])


CASES["dream"] = [lambda: dream_case("tiny", 1024), lambda: dream_case("xs", 1024), lambda: dream_case("xs", 4096),
                  lambda: dream_case("xs", 16384, precisions=("bf16",)), lambda: unimix_index_case(),
                  lambda: dream_ops_case()]
CASES["train"] = [lambda: gather_backward_case(), lambda: train_case("xs")]
