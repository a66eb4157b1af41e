"""The dream engine: many short imagined rollouts from posterior start states, as one batch.

The engines (``fastdream.dream.engines.ENGINES``) run the same maths and give the same outputs for the same noise,
within float tolerance; ``eager`` runs it in plain torch and is the reference the others are tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from fastdream.dream.engines import resolve_engine
from fastdream.dream.step import DreamStep
from fastdream.fast import ops, runtime
from fastdream.fast.ops import write_into
from fastdream.model.behavior import Actor
from fastdream.model.maths import onehot as onehot_rows  # _rollout's flag is named onehot
from fastdream.model.nets import matmul_dtype_of, onehot_table
from fastdream.model.world_model import WorldModel

# ---------------------------------------------------------------- noise and the rollout


def draw_noise(n: int, horizon: int, stoch: int, actor: Actor, device, generator=None) -> dict[str, torch.Tensor]:
    """All random numbers of a rollout: ``stoch [H, N, S]`` uniform, ``action [H, N]`` uniform
    (discrete) or ``[H, N, A]`` standard normal (continuous)."""
    out = {"stoch": torch.rand(horizon, n, stoch, device=device, generator=generator)}
    if actor.discrete:
        out["action"] = torch.rand(horizon, n, device=device, generator=generator)
    else:
        out["action"] = torch.randn(horizon, n, actor.action_dim, device=device, generator=generator)
    return out


def _rollout(world_model: WorldModel, actor: Actor, deter: torch.Tensor, stoch: torch.Tensor,
             noise_stoch: torch.Tensor, noise_action: torch.Tensor, step: Callable | None = None,
             onehot: bool = False,
             tables: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None,
             dtype: torch.dtype = torch.float32):
    """``H = len(noise_stoch)`` steps from one-hot start ``stoch`` → time-major-backed ``deter [N, H+1, D]``,
    ``stoch [N, H+1, S, K]`` (``None`` if ``onehot``), ``action [N, H, A]``, ``index [N, H+1, S]`` (the stoch
    classes). ``onehot`` (no-grad dreams): the steps run on the classes (``DreamStep``), every layer reading stoch
    gathers weight rows by them and no dense stoch is kept, so a compiled rollout never writes one. ``step``: another
    step function of ``RSSM.img_step``'s signature (the triton engine's). ``tables``: ``_gather_tables`` built
    already. ``dtype``: the matmuls' (``matmul_dtype``), which a one-hot rollout keeps its deter sequence in."""
    if onehot and step is None:
        return _onehot_rollout(world_model, actor, deter, stoch, noise_stoch, noise_action, tables, dtype)
    rssm = world_model.rssm
    index = stoch.argmax(-1)
    deters, stochs, actions, indices = [deter], [stoch], [], [index]
    weights = rssm.dynhid_weights()  # once for the H steps, not per step
    for t in range(noise_stoch.shape[0]):
        action = actor.sample_with_noise(rssm.feat(deter, stoch), noise_action[t])
        if step is None:  # RSSM.img_step with the weights built once
            deter = rssm.gru_step(deter, stoch, rssm.action_input(action), weights)
            stoch, _, index = rssm.prior_draw(deter, noise_stoch[t])
        else:
            deter, stoch, _, index = step(rssm, deter, stoch, action, noise_stoch[t])
        deters.append(deter)
        stochs.append(stoch)
        actions.append(action)
        indices.append(index)
    return tuple(_batch_major(torch.stack(x)) for x in (deters, stochs, actions, indices))


def _onehot_rollout(world_model: WorldModel, actor: Actor, deter: torch.Tensor, stoch: torch.Tensor,
                    noise_stoch: torch.Tensor, noise_action: torch.Tensor,
                    tables: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None,
                    dtype: torch.dtype = torch.float32):
    """``_rollout`` of a no-grad dream on the stoch classes. In bf16 (``dtype``) its ``deter`` sequence is kept in
    bf16, as every layer reads it (the recurrence stays float32): the gate kernel writes that copy and the
    block matmul's grouped one as it rounds, where inductor's casts wrote one per consumer, and the low-precision
    deter rows and the classes go straight into their time-major sequences (the gate and draw kernels write step
    t's rows in place), where stacking them copied every step's."""
    rssm = world_model.rssm
    index = class_index(stoch)
    if tables is None:
        tables = _gather_tables(world_model, actor, dtype)
    actor_table, stoch_table, action_table = tables
    deters, actions, indices = [_as_dtype(deter, dtype)], [], [index]
    seqs = low = None
    if deters[0].dtype != deter.dtype:  # bf16: carry deter's low-precision copies
        g, h = rssm.blocks, noise_stoch.shape[0]
        seqs = (deters[0].new_empty(h + 1, *deters[0].shape), index.new_empty(h + 1, *index.shape))
        write_into(deters[0], seqs[0][0])
        write_into(index, seqs[1][0])
        low = (seqs[0][0], deters[0].reshape(-1, g, rssm.deter // g).transpose(0, 1).contiguous())
    dream = DreamStep(rssm, stoch_table, low)
    for t in range(noise_stoch.shape[0]):
        hot = (index, rssm.classes, actor_table)
        if action_table is not None:  # a one-hot action's GRU input is a row of the action table
            picked = actor.sample_index_with_noise(deters[-1], noise_action[t], hot)
            action = onehot_rows(picked, actor.action_dim, noise_action.dtype)
            action_in = (action_table, picked)
        else:
            action = actor.sample_with_noise(deters[-1], noise_action[t], hot)
            action_in = rssm.action_input(action)
        deter, index = dream(deter, index, action_in, noise_stoch[t], None if seqs is None else
                             (seqs[0][t + 1], seqs[1][t + 1]))
        deters.append(dream.low[0] if low is not None else _as_dtype(deter, dtype))
        actions.append(action)
        indices.append(index)
    deter_seq, index_seq = seqs if seqs is not None else (torch.stack(deters), torch.stack(indices))
    return _batch_major(deter_seq), None, _batch_major(torch.stack(actions)), _batch_major(index_seq)


def matmul_dtype(deter: torch.Tensor, precision: str | None) -> torch.dtype:
    """The dtype a dream's matmuls run in: bfloat16 for ``precision="bf16"``, float32 for ``"fp32"``; with ``None``
    the one the caller's autocast gives a matmul reading the float32 ``deter`` (the one place a dream reads
    autocast's state)."""
    if precision is None:
        return matmul_dtype_of(deter.float())
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or None (the caller's autocast), got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 ``x`` in the matmuls' ``dtype``, cast once for every layer that reads it (autocast casts per op:
    the dream heads each wrote their own 31 MB bf16 copy of the features at N=4096); other dtypes as they are."""
    return x.to(dtype) if x.dtype == torch.float32 and dtype != torch.float32 else x


def _batch_major(x: torch.Tensor) -> torch.Tensor:
    """A time-major ``[T, N, ...]`` sequence as ``[N, T, ...]``: a view (``.transpose(0, 1)`` gives the contiguous
    original back)."""
    return x.transpose(0, 1)


def class_index(stoch: torch.Tensor) -> torch.Tensor:
    """The classes ``[..., S]`` of one-hot (or all-zero) rows ``stoch [..., S, K]``: ``Σ_k k·stoch_k`` rounded, which
    is their argmax (0 for a zero row, as argmax's first maximum; a straight-through sample's 1 may be off by an ulp).
    One fused pass: a compiled argmax over K = 32 took 1.9 ms for an N=4096 start batch [4096, 32, 32], this 0.2 ms."""
    k = torch.arange(stoch.shape[-1], dtype=torch.float32, device=stoch.device)
    return (stoch.float() * k).sum(-1).round().long()


def _feat_from_index(deter: torch.Tensor, index: torch.Tensor, classes: int) -> torch.Tensor:
    """``[deter, one_hot(index)]`` → ``[N, T, D + S·K]`` written in place (no separate one-hot and cat), time-major
    underneath as the rollout's sequences (``_batch_major``)."""
    d = deter.shape[-1]
    n, t = deter.shape[:2]
    feat = _batch_major(torch.zeros(t, n, d + index.shape[-1] * classes, dtype=deter.dtype, device=deter.device))
    feat[..., :d] = deter
    feat[..., d:].unflatten(-1, (index.shape[-1], classes)).scatter_(-1, index.unsqueeze(-1), 1.0)
    return feat


_GRAPHS: dict[tuple, tuple] = {}


def _gather_tables(world_model: WorldModel, actor: Actor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The gather tables (``nets.onehot_table``) of the actor's first layer and the GRU's stoch input, and for a
    discrete actor the GRU's action input per action (``RSSM.action_table``), built once for a rollout's H steps.
    A compiled rollout takes them as inputs: built inside it, inductor wrote one copy per gather (every step's),
    ~4.5 ms of an N=4096 dream. Tables in ``dtype``, the matmuls' they stand in for."""
    rssm, body = world_model.rssm, actor.net.body
    actor_table = onehot_table(body[0].weight, rssm.stoch * rssm.classes, dtype) if len(body) else None
    return actor_table, rssm.stoch_table(dtype), rssm.action_table(actor.action_dim) if actor.discrete else None


class _Dreamer(torch.nn.Module):
    """The world model and the actor as one module, for ``torch.func.functional_call`` of ``_rollout``."""

    def __init__(self, world_model: WorldModel, actor: Actor) -> None:
        super().__init__()
        self.world_model, self.actor = world_model, actor

    def forward(self, *args, onehot: bool = False, tables=None, dtype: torch.dtype = torch.float32):
        return _rollout(self.world_model, self.actor, *args, onehot=onehot, tables=tables, dtype=dtype)


def matmul_weights(module: torch.nn.Module, dtype: torch.dtype, prefixes: tuple[str, ...] = ("",)
                   ) -> dict[str, torch.Tensor]:
    """``module``'s weights (parameters of two or more dims, under ``prefixes``) in the matmuls' ``dtype``: what
    autocast would cast each of them to per matmul. Cast once here, a compiled H-step rollout reads one copy; cast by
    autocast per op, inductor wrote one copy per step (15 of every weight, its first kernel ~3 ms of an N=4096
    dream). Empty for float32."""
    if dtype == torch.float32:
        return {}
    return {name: p.to(dtype) for name, p in module.named_parameters()
            if p.ndim >= 2 and p.is_floating_point() and name.startswith(prefixes)}


def _rollout_fn(world_model: WorldModel, actor: Actor, onehot: bool, dtype: torch.dtype) -> Callable:
    """``_rollout`` as the compile engine traces it: ``fn(deter, stoch, noise_stoch, noise_action, tables)`` on
    the weights cast once (``matmul_weights``)."""
    dreamer = _Dreamer(world_model, actor)

    def fn(deter, stoch, noise_stoch, noise_action, tables=None):
        weights = matmul_weights(dreamer, dtype, ("world_model.rssm.", "actor."))
        return torch.func.functional_call(dreamer, weights, (deter, stoch, noise_stoch, noise_action),
                                          {"onehot": onehot, "tables": tables, "dtype": dtype})

    return fn


def _compiled(world_model: WorldModel, actor: Actor, onehot: bool, dtype: torch.dtype) -> Callable:
    return runtime.compiled((world_model, actor), f"rollout onehot={onehot} {dtype}",
                            _rollout_fn(world_model, actor, onehot, dtype))


def _window(x: torch.Tensor, start: int) -> torch.Tensor:
    """The H states of ``x [N, H+1, ·]`` from ``start`` (0: s_0..s_{H-1}, 1: s_1..s_H), time-major ``[H, N, ·]``
    as a matmul reads them: a view of a rollout's time-major sequences (``_batch_major``), which are contiguous
    in that order; any other bf16 sequence is copied contiguous (a strided matmul input became a batched matmul)."""
    x = x.transpose(0, 1)[start: start + x.shape[1] - 1]
    return x.contiguous() if x.dtype != torch.float32 else x


def _heads(world_model: WorldModel, feat: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward and continue predicted at the dreamed states s_1..s_H of ``feat [N, H+1, ·]`` (``index``: the
    classes of all H+1)."""
    # The classes' window, once for both heads (a view of a rollout's time-major index).
    hot = None if index is None else (_window(index, 1), world_model.rssm.classes)
    nxt = _as_dtype(_window(feat, 1), dtype)  # one cast for both heads
    return _batch_major(world_model.reward(nxt, hot)), _batch_major(world_model.cont(nxt, hot))


def _compiled_heads(world_model: WorldModel, dtype: torch.dtype) -> Callable:
    """``_heads`` compiled (no-grad dreams of the compile engine): inductor fuses the heads' norms,
    activations and the two-hot softmax/decode, which measured ~45 ms eager at N=1024, H=15, xs."""
    return runtime.compiled(world_model, f"dream heads {dtype}",
                            lambda feat, index: _heads(world_model, feat, index, dtype))


def _policy_terms(policy: Actor, feat: torch.Tensor, action: torch.Tensor, index: torch.Tensor | None,
                  classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``policy.log_prob`` of the actions taken at s_0..s_{H-1} of ``feat [N, H+1, ·]``, each ``[N, H]``."""
    hot = None if index is None else (_window(index, 0), classes)
    logprob, entropy = policy.log_prob(_window(feat, 0), action.transpose(0, 1), hot)
    return _batch_major(logprob), _batch_major(entropy)


def _cudagraph(world_model: WorldModel, actor: Actor, deter, stoch, noise_stoch, noise_action, onehot: bool,
               dtype: torch.dtype):
    key = (id(world_model), id(actor), tuple(deter.shape), tuple(noise_stoch.shape), deter.dtype, dtype, onehot)
    if key not in _GRAPHS:
        static = [t.clone() for t in (deter, stoch, noise_stoch, noise_action)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture, as CUDA graphs require
                _rollout(world_model, actor, *static, onehot=onehot, dtype=dtype)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _rollout(world_model, actor, *static, onehot=onehot, dtype=dtype)
        _GRAPHS[key] = (graph, static, outs)
    graph, static, outs = _GRAPHS[key]
    for dst, src in zip(static, (deter, stoch, noise_stoch, noise_action), strict=True):
        dst.copy_(src)
    graph.replay()
    return tuple(None if o is None else o.clone() for o in outs)


def imagine(world_model: WorldModel, policy: Actor, starts: tuple[torch.Tensor, torch.Tensor], horizon: int,
            engine: str = "kernels", augment: Callable | None = None, grad: bool = False,
            noise: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
            onehot: bool = True, dense_feat: bool = True, precision: str | None = None) -> dict[str, torch.Tensor]:
    """Dreams ``horizon`` steps from each of ``starts = (deter [N, D], stoch [N, S, K])`` under ``policy``.

    Returns ``feat [N, H+1, F]``, ``action [N, H, A]`` (taken at s_0..s_{H-1}), ``reward [N, H]``
    and ``cont [N, H]`` (predicted at s_1..s_H), and the policy's ``logprob [N, H]`` and
    ``entropy [N, H]`` of those actions (with gradients for the actor). ``engine``: a name of
    ``fastdream.dream.engines.ENGINES`` (``eager``: plain torch, the reference). With ``grad=False``
    (discrete actions: REINFORCE needs no gradient through the dynamics) the rollout itself runs
    without autograd. ``noise`` (from ``draw_noise``) fixes every random draw. ``augment(feat)``
    may transform the imagined features before the heads see them (off by default). ``precision``: ``"bf16"`` runs
    the dream's matmuls in bfloat16 (autocast) and keeps its deter sequence, weights and gather tables in it,
    ``"fp32"`` in float32; ``None`` follows the caller's autocast.

    ``onehot`` (default): the starts' stoch are one-hot draws, as ``RSSM.observe`` and every imagined
    step produce; layers reading a one-hot stoch without needing its gradient then gather weight rows
    instead of multiplying by zeros (same values; ~half the rollout's and the heads' FLOPs at size xs).
    Pass ``False`` for soft or zero stoch. ``traj["index"] [N, H+1, S]`` (or ``None``) carries the
    stoch classes on to ``Behavior.losses``. ``dense_feat=False`` (no-grad dreams with ``onehot``): ``feat``
    is only its dense part ``[N, H+1, D]``, the stoch being ``traj["index"]``; every layer given ``hot`` reads
    just that, and the one-hot columns (80 % of ``feat`` at size xs, ~84 MB at N=1024) are never written.
    The sequences are views of time-major buffers (``x.transpose(0, 1)`` is contiguous ``[H, N, ·]``): a layer
    reading H states of them reads a contiguous block, not a copy.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    deter, stoch = starts
    grad = grad and torch.is_grad_enabled()
    engine = resolve_engine(engine, deter.device, grad)
    dtype = matmul_dtype(deter, precision)
    cast = nullcontext() if precision is None else torch.autocast(deter.device.type, torch.bfloat16,
                                                                    enabled=dtype == torch.bfloat16)
    with cast, ops.kernels(False) if engine == "eager" else nullcontext():
        return _imagine(world_model, policy, starts, horizon, engine, augment, grad, noise, generator, onehot,
                        dense_feat, dtype)


def _imagine(world_model: WorldModel, policy: Actor, starts: tuple[torch.Tensor, torch.Tensor], horizon: int,
             engine: str, augment: Callable | None, grad: bool, noise: dict[str, torch.Tensor] | None,
             generator: torch.Generator | None, onehot: bool, dense_feat: bool, dtype: torch.dtype
             ) -> dict[str, torch.Tensor]:
    """``imagine`` on a resolved ``engine``, gradients and the matmuls' ``dtype`` decided."""
    deter, stoch = starts
    if noise is None:
        noise = draw_noise(deter.shape[0], horizon, stoch.shape[-2], policy, deter.device, generator)
    ns, na = noise["stoch"][:horizon], noise["action"][:horizon]
    gather = onehot and not grad  # with gradients through the dynamics the stoch must stay dense
    with torch.set_grad_enabled(grad):
        if engine in ("eager", "kernels"):
            out = _rollout(world_model, policy, deter, stoch, ns, na, onehot=gather, dtype=dtype)
        elif engine == "compile":
            tables = _gather_tables(world_model, policy, dtype) if gather else None
            out = _compiled(world_model, policy, gather, dtype)(deter, stoch, ns, na, tables)
        elif engine == "triton":
            from fastdream.kernels.rssm_step import rssm_step

            out = _rollout(world_model, policy, deter, stoch, ns, na, step=rssm_step, onehot=gather)
        else:
            out = _cudagraph(world_model, policy, deter, stoch, ns, na, gather, dtype)
    deter_seq, stoch_seq, action, index = out
    k = world_model.rssm.classes
    if not onehot:
        index = None
    if gather and not dense_feat and augment is None:
        feat = deter_seq
    elif stoch_seq is None:
        feat = _feat_from_index(deter_seq, index, k)
    else:  # time-major underneath, as the sequences
        feat = _batch_major(world_model.rssm.feat(deter_seq.transpose(0, 1), stoch_seq.transpose(0, 1)))
    if augment is not None:
        feat, index = augment(feat), None  # an augmentation may leave the one-hot layout
    if engine == "compile":
        terms = runtime.compiled(policy, f"log_prob classes={k}",
                                 lambda f, a, i: _policy_terms(policy, f, a, i, k))
    else:
        terms = lambda f, a, i: _policy_terms(policy, f, a, i, k)  # noqa: E731
    logprob, entropy = terms(feat if grad else feat.detach(), action.detach(), index)
    # Without gradients through the dynamics the world-model heads need no graph either.
    with torch.set_grad_enabled(grad):
        if engine == "compile" and not grad:
            reward, cont = _compiled_heads(world_model, dtype)(feat, index)
        else:
            reward, cont = _heads(world_model, feat, index, dtype)
    return {"feat": feat, "action": action, "reward": reward, "cont": cont, "logprob": logprob,
            "entropy": entropy, "index": index, "classes": k}
