"""Layers (MLPs, BlockLinear, CNN encoder/decoder) and the call sites that choose, per call, a C++ kernel of
``fastdream.fast.ops`` or the plain maths of ``fastdream.model.maths`` beside it: the kernel where it may stand in
(a float32/bfloat16 CPU tensor, no gradient needed, kernels enabled), the maths everywhere else.

Shapes use ``[..., D]``; ``B`` batch, ``T`` time, ``S`` latents, ``K`` classes per latent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdream.fast import ops
from fastdream.model import maths

# One-hot stoch known by its class indices: ``(index [..., S], classes K)``, see ``onehot_linear``; a third entry
# is the first layer's ``onehot_table``, built once for a rollout's steps.
Hot = tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]

# ---------------------------------------------------------------- the call sites: C++ kernel or plain maths


def twohot_decode(logits: torch.Tensor, bins: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Expected value of ``logits [..., K]`` (plus ``bias [K]``, a head's bias left out of its matmul) over
    ``bins``, mapped back with symexp → ``[...]`` (float32).

    On a CPU without gradients: the C++ kernel ``_ops.twohot_decode`` (one exp per logit, no probabilities
    written; the bias added as it reads a row, where an addmm had copied it into all N·H rows on one thread,
    ~7 ms of an N=4096 dream); inductor's softmax, weighting and sum took ~25 ms for its ``[61440, 255]``."""
    params = (bins,) if bias is None else (bins, bias)
    if _no_grad_cpu(logits, *params) and logits.shape[-1] == bins.shape[0] and logits.numel():
        k = logits.shape[-1]
        b = None if bias is None else bias.detach().float()
        return ops.twohot_decode(logits.reshape(-1, k), bins.detach().float(), b).reshape(logits.shape[:-1])
    return maths.twohot_decode(logits, bins, bias)


def unimix_index(logits: torch.Tensor, noise: torch.Tensor, unimix: float = 0.01,
                 bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``inverse_cdf_index(unimix_probs(logits + bias), noise)`` for ``logits [..., S, K]``, ``noise [..., S]`` →
    ``[..., S]``, without the probabilities; ``bias [S·K]`` (or None): a head's bias left out of its matmul. On a
    CPU: the C++ kernel ``fastdream.fast._ops.unimix_index``, one pass over the logits (fp32 or bf16, maths in fp32)
    on torch's threads, adding the bias as it reads them. At ``[131072, 32]`` bf16 (an N=4096 prior step) here:
    ~0.45 ms (AVX512_BF16 path, software-prefetched), against ~8.5 ms for the softmax, cumsum and count of a
    compiled step and ~20 ms eager. ``out``: a contiguous int64 array of ``noise``'s shape to write the classes into
    (returned), e.g. one step of a stacked sequence."""
    k = logits.shape[-1]
    if out is not None and (out.shape != noise.shape or out.dtype != torch.int64 or not out.is_contiguous()):
        raise ValueError(f"unimix_index: out must be a contiguous int64 {tuple(noise.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)} (contiguous: {out.is_contiguous()})")
    if logits.device.type != "cpu" or not ops.kernels_enabled():
        index = maths.unimix_index(logits, noise, unimix, bias)
        return index if out is None else out.copy_(index)
    flat = logits.detach().reshape(-1, k)
    if flat.dtype not in (torch.float32, torch.bfloat16):
        flat = flat.float()
    b = None if bias is None else bias.detach().float()
    u = noise.detach().reshape(-1).float()
    if out is not None:
        ops.unimix_index_into(flat, u, float(unimix), b, out.view(-1))
        return out
    return ops.unimix_index(flat, u, float(unimix), b).reshape(noise.shape)


def matmul_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul reading ``x`` runs in: autocast's on ``x``'s device where it is on, else ``x``'s."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _no_grad_cpu(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """True where a C++ kernel may stand in for the plain maths: a float32/bfloat16 CPU tensor, no gradient needed
    and kernels enabled (``fastdream.fast.ops.kernels``)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not needs_grad
            and ops.kernels_enabled())


def norm_silu(x: torch.Tensor, norm: Norm, groups: int = 1, add: torch.Tensor | None = None,
              add_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(norm(x))`` for ``x [..., C]``. On a CPU without gradients: the C++ kernel ``_ops.norm_silu``
    (one pass per row, float32 maths, ``x``'s dtype out); at ``[4096, 256]`` bf16 here 0.17 ms (AVX512_BF16
    path) against inductor's fused LayerNorm+SiLU 0.35 ms. ``groups > 1``: the result as a block matmul
    reads its input, ``[G, M, C/G]`` contiguous (M rows of ``x``); the kernel writes it in that layout.
    ``add [Ga, M, C/Ga]`` (a block matmul's output as its bmm leaves it) and ``add_bias [C]``: summed into
    ``x``'s rows first, by the kernel as it reads them (an addmm had copied one part into its output on one
    thread, and the bmm's output needed a transposed copy)."""
    ln = norm.ln
    c = x.shape[-1]
    extra = tuple(t for t in (add, add_bias) if t is not None)
    fast = _no_grad_cpu(x, ln.weight, ln.bias, *extra) and (add is None or add.dtype == x.dtype)
    if not fast:
        if add is not None:
            x = x.reshape(-1, c) + add.transpose(0, 1).reshape(-1, c)
        if add_bias is not None:
            x = x + add_bias.to(x.dtype)
        y = maths.norm_silu(x, ln.weight, ln.bias, ln.eps)
        return y if groups == 1 else y.reshape(-1, groups, c // groups).transpose(0, 1).contiguous()
    out = ops.norm_silu(x.reshape(-1, c), ln.weight.detach().float(), ln.bias.detach().float(), float(ln.eps),
                         groups, add, None if add_bias is None else add_bias.detach().float())
    return out.reshape(x.shape) if groups == 1 else out


def gru_gate_grouped(y: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, copies: bool = False,
                     rows_out: torch.Tensor | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block-GRU update (``maths.gru_gate``) from the block matmul's own output
    ``y [G, N, 3·D/G]`` before its ``bias [3D]``, and ``deter [N, D]`` → next deter ``[N, D]`` (float32).

    On a CPU without gradients: the C++ kernel ``_ops.gru_gate`` reads ``y`` where the matmul left it (no
    transpose, no bias pass) and writes only the new deter. Elsewhere: the reference maths. ``copies``: also the
    new deter in ``y``'s dtype as the next step's matmuls read it, ``[N, D]`` and ``[G, N, D/G]`` (the kernel
    rounds what it writes anyway; inductor's cast wrote 4 copies, the block matmul's in a layout it copied again).
    ``rows_out`` (with ``copies``): a contiguous ``[N, D]`` of ``y``'s dtype that the ``[N, D]`` copy is written
    into and returned as (e.g. one step of a stacked sequence).
    """
    g, n, k = y.shape
    if rows_out is not None and (not copies or rows_out.shape != (n, g * (k // 3)) or rows_out.dtype != y.dtype
                                 or not rows_out.is_contiguous()):
        raise ValueError(f"gru_gate_grouped: rows_out must be a contiguous {y.dtype} [{n}, {g * (k // 3)}] with "
                         f"copies=True, got {rows_out.dtype} {tuple(rows_out.shape)} (copies={copies})")
    if _no_grad_cpu(y, bias, deter):
        if copies and y.dtype == torch.bfloat16:
            rows = y.new_empty(n, g * (k // 3)) if rows_out is None else rows_out
            out, grouped = ops.gru_gate_into(y, bias.detach().float(), deter.float(), rows)
            return out, rows, grouped
        out = ops.gru_gate(y, bias.detach().float(), deter.float())
    else:
        out = maths.gru_gate(y.transpose(0, 1).reshape(n, g * k) + bias, deter, g)
    if not copies:
        return out
    low = out.to(y.dtype) if rows_out is None else rows_out.copy_(out)
    return out, low, low.reshape(n, g, k // 3).transpose(0, 1).contiguous()


class _GatherRows(torch.autograd.Function):
    """``y [M, O] = Σ_s weight[:, rows[m, s]]`` for ``weight [O, R]``, ``rows [M, S]``: forward is an
    ``embedding_bag``; backward (fp32) is ``gather_rows_backward``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = weight.shape[1]
        return _embedding_sum(weight, rows)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return gather_rows_backward(g, rows, ctx.num_rows).t(), None


def gather_rows_backward(g: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out [num_rows, O]`` (fp32) with ``out[rows[m, s]] += g[m]`` for ``g [M, O]``, ``rows [M, S]``.

    On a CPU: the C++ kernel ``fastdream.fast._ops.gather_rows_backward`` (reads g once). Elsewhere:
    one ``index_add`` per latent; on this CPU those measured 62 ms at M = 15360, S = 32, O = 256 (the
    matmul with the one-hot 94 ms, torch's embedding_bag backward ~2x the index_adds).
    """
    g = g.float()
    if g.device.type == "cpu" and ops.kernels_enabled():
        return ops.gather_rows_backward(g, rows, num_rows)
    grad = torch.zeros(num_rows, g.shape[1], dtype=torch.float32, device=g.device)
    for s in range(rows.shape[1]):
        grad.index_add_(0, rows[:, s], g)
    return grad


def _embedding_sum(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``Σ_s weight[:, rows[m, s]]`` → ``[M, O]`` (no autograd of its own)."""
    flat = rows.reshape(-1)
    offsets = torch.arange(0, flat.numel(), rows.shape[1], device=rows.device)
    # In the precision of the matmul it stands for: under bf16 autocast, half the bytes to read.
    table = weight.t().to(matmul_dtype_of(weight))
    return F.embedding_bag(flat, table.contiguous(), offsets, mode="sum")


def latent_rows(index: torch.Tensor, classes: int) -> torch.Tensor:
    """Classes ``index [..., S]`` → the rows ``[M, S]`` of an ``[S·K, ·]`` table they pick (latent s: s·K + class)."""
    groups = index.shape[-1]
    return index.reshape(-1, groups) + torch.arange(groups, device=index.device) * classes


def onehot_linear(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, classes: int) -> torch.Tensor:
    """``[x, one_hot(index)] @ weight.T`` (``weight [O, I]``, ``index [..., S]``, ``K = classes``): the
    one-hot columns become a gather-sum of weight rows (``embedding_bag``) instead of a matmul with
    zeros. At ``[15360, 1024] x [1024, 256]`` here: 7 ms against 155 ms (fp32) or 89 ms (bf16).

    ``x`` is either the dense part ``[..., I − S·K]`` alone or the whole input ``[..., I]`` ending in the
    one-hot columns; a whole ``x`` that needs a gradient takes the plain matmul, so those columns get one.
    """
    groups = index.shape[-1]
    start = weight.shape[1] - groups * classes
    if x.shape[-1] == weight.shape[1] and x.requires_grad:
        return F.linear(x, weight)
    rows = latent_rows(index, classes)
    hot_weight = weight[:, start:]
    if torch.is_grad_enabled() and weight.requires_grad:
        y = _GatherRows.apply(hot_weight, rows)
    else:
        y = _embedding_sum(hot_weight, rows)
    y = y.reshape(*index.shape[:-1], -1)
    if start:  # slice before any reshape: a reshape of a strided x would copy all of its columns
        y = y + F.linear(x[..., :start], weight[:, :start])
    return y


def onehot_table(weight: torch.Tensor, columns: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The gather table of a layer whose last ``columns`` inputs are one-hot: ``weight [O, I]``'s last columns
    as rows ``[columns, O]`` in ``dtype``; None: the precision of the matmul it stands for, as autocast sets it."""
    dtype = matmul_dtype_of(weight) if dtype is None else dtype
    # Cast, then transpose: a transposing copy that also casts took ~1.4x as long ([256, 1024] fp32 -> bf16).
    return weight[:, weight.shape[1] - columns:].to(dtype).t().contiguous()


def onehot_norm_silu(x: torch.Tensor, weight: torch.Tensor, norm: Norm, index: torch.Tensor,
                     classes: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(norm(onehot_linear(x, weight, index, classes)))`` → ``[..., O]``: a first layer on one-hot
    stoch with its LayerNorm and SiLU. On a CPU without gradients: the C++ kernel ``_ops.gather_norm_silu``
    sums the gathered weight rows and the dense part's matmul output in registers and normalises them
    in the same pass (0.55 against 0.73 ms for embedding_bag + add + norm_silu at ``[4096, 256]`` bf16,
    32 latents); elsewhere the composed ops. ``table``: ``onehot_table(weight, S·K)`` built already (a compiled
    rollout otherwise rebuilt every step's tables: inductor does not deduplicate them, ~4.5 ms per N=4096 dream)."""
    ln = norm.ln
    groups = index.shape[-1]
    start = weight.shape[1] - groups * classes
    if not _no_grad_cpu(x, weight, ln.weight, ln.bias) or x.shape[-1] not in (start, weight.shape[1]):
        return norm_silu(onehot_linear(x, weight, index, classes), norm)
    table = onehot_table(weight, groups * classes) if table is None else table
    dense = F.linear(x[..., :start], weight[:, :start]).reshape(-1, weight.shape[0]) if start else None
    if dense is not None and dense.dtype != table.dtype:
        return norm_silu(onehot_linear(x, weight, index, classes), norm)
    # The kernel adds each latent's table offset (s·K) itself: no [M, S] rows tensor is written and read again.
    out = ops.gather_norm_silu(dense, table, index.reshape(-1, groups), ln.weight.detach().float(),
                                ln.bias.detach().float(), float(ln.eps), classes)
    return out.reshape(*index.shape[:-1], weight.shape[0])


def norm_silu_cat(x: torch.Tensor, norm: Norm, table: torch.Tensor, index: torch.Tensor, classes: int,
                  table_norm: Norm, rows_table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``cat([norm_silu(x, norm), norm_silu(Σ_s table[s·K + index[:, s]], table_norm), rows_table[rows]], -1)`` →
    ``[N, C0 + C1 + C2]`` for ``x [N, C0]``, ``table [S·K, C1]`` (``onehot_table``), ``index [N, S]`` classes,
    ``rows_table [A, C2]`` and ``rows [N]``: the block GRU's input parts (deter, stoch, action). On a CPU without
    gradients one op whose kernels write each part straight into its columns (``out=``), where a compiled ``cat``
    copied all three (~0.15 ms per N=4096 step); elsewhere the composed ops."""
    ln0, ln1 = norm.ln, table_norm.ln
    same = x.dtype == table.dtype == rows_table.dtype
    if not (same and _no_grad_cpu(x, table, rows_table, ln0.weight, ln0.bias, ln1.weight, ln1.bias)):
        gathered = _embedding_sum(table.t(), latent_rows(index, classes)).to(x.dtype)
        return torch.cat([norm_silu(x, norm), norm_silu(gathered, table_norm), rows_table[rows].to(x.dtype)], -1)
    return ops.norm_silu_cat(x, ln0.weight.detach().float(), ln0.bias.detach().float(), float(ln0.eps), table,
                              index, classes, ln1.weight.detach().float(), ln1.bias.detach().float(), float(ln1.eps),
                              rows_table, rows)


# ---------------------------------------------------------------- layers


class Norm(nn.Module):
    """LayerNorm over the last axis with DreamerV3's eps=1e-3."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


class Stack(nn.Sequential):
    """``nn.Sequential`` that runs each ``Norm`` followed by ``nn.SiLU`` as one ``norm_silu`` (same modules,
    same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        i = 0
        while i < len(mods):
            if isinstance(mods[i], Norm) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.SiLU):
                x = norm_silu(x, mods[i])
                i += 2
            else:
                x = mods[i](x)
                i += 1
        return x


class MLP(nn.Module):
    """``layers`` × (Linear → LayerNorm → SiLU), then an optional output Linear."""

    def __init__(self, in_dim: int, units: int, layers: int, out_dim: int | None = None,
                 zero_out: bool = False) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers):
            mods += [nn.Linear(d, units, bias=False), Norm(units), nn.SiLU()]
            d = units
        self.body = Stack(*mods)
        self.out_dim = d if out_dim is None else out_dim
        self.head = nn.Linear(d, out_dim) if out_dim is not None else None
        if self.head is not None and zero_out:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        """``[..., in_dim]`` → ``[..., out_dim]``. ``hot = (index [..., S], classes)``: ``x`` ends in the
        one-hot stoch ``one_hot(index)``, and the first layer gathers instead of multiplying."""
        x = self.features(x, hot)
        return self.head(x) if self.head is not None else x

    def features(self, x: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        """The hidden layers alone (``forward`` without the output layer) → ``[..., units]``."""
        if hot is not None and len(self.body):
            return self.body[3:](onehot_norm_silu(x, self.body[0].weight, self.body[1], *hot))
        return self.body(x)


class BlockLinear(nn.Module):
    """Block-diagonal linear map: ``[..., G·I] → [..., G·O]``, each of G groups on its own chunk."""

    def __init__(self, in_dim: int, out_dim: int, groups: int) -> None:
        super().__init__()
        if in_dim % groups or out_dim % groups:
            raise ValueError(f"in_dim {in_dim} and out_dim {out_dim} must be divisible by groups {groups}")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, in_dim // groups, out_dim // groups))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        bound = 1.0 / math.sqrt(in_dim // groups)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.grouped(x).transpose(0, 1)  # [N, G, O]
        return y.reshape(*lead, -1) + self.bias

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The block matmul alone, as it leaves the bmm: ``[..., G·I]`` → ``[G, N, O]`` (no bias)."""
        # [G, N, I], contiguous: a compiled graph then writes it in the bmm's layout (fused with any cast);
        # a strided view made aten's bmm copy it on one thread (~3 % of a compiled dream).
        xg = x.reshape(-1, self.groups, x.shape[-1] // self.groups).transpose(0, 1).contiguous()
        return torch.bmm(xg, self.weight)


class ImageEncoder(nn.Module):
    """64×64×3 uint8 → features: stride-2 convs (depth mult·[1, 2, 4, 8]) with norm and SiLU."""

    def __init__(self, mult: int = 16) -> None:
        super().__init__()
        chans = [3, mult, 2 * mult, 4 * mult, 8 * mult]
        mods: list[nn.Module] = []
        for i in range(4):
            mods += [nn.Conv2d(chans[i], chans[i + 1], 4, 2, 1, bias=False), ChannelNorm(chans[i + 1]), nn.SiLU()]
        self.net = nn.Sequential(*mods)
        self.out_dim = 8 * mult * 4 * 4

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[..., 64, 64, 3]`` uint8 → ``[..., out_dim]``."""
        lead = image.shape[:-3]
        x = image.reshape(-1, *image.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0 - 0.5
        return self.net(x).reshape(*lead, -1)


class ImageDecoder(nn.Module):
    """Features → 64×64×3 image in [0, 1] (predicted mean; loss is MSE on [0, 1] pixels)."""

    def __init__(self, in_dim: int, mult: int = 16) -> None:
        super().__init__()
        self.mult = mult
        self.fc = nn.Linear(in_dim, 8 * mult * 4 * 4)
        chans = [8 * mult, 4 * mult, 2 * mult, mult]
        mods: list[nn.Module] = []
        for i in range(3):
            mods += [nn.ConvTranspose2d(chans[i], chans[i + 1], 4, 2, 1, bias=False), ChannelNorm(chans[i + 1]),
                     nn.SiLU()]
        mods += [nn.ConvTranspose2d(mult, 3, 4, 2, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim]`` → ``[..., 64, 64, 3]`` (centred: target is pixels/255 − 0.5)."""
        lead = feat.shape[:-1]
        x = self.fc(feat.reshape(-1, feat.shape[-1])).reshape(-1, 8 * self.mult, 4, 4)
        return self.net(x).permute(0, 2, 3, 1).reshape(*lead, 64, 64, 3)


class ChannelNorm(nn.Module):
    """LayerNorm over channels of ``[N, C, H, W]``."""

    def __init__(self, chans: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(chans, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
