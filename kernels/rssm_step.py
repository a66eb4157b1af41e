"""Fused pieces of the imagination step as Triton kernels, with autograd Functions.

``gru_gate``: the block-GRU gate maths (3 activations + the convex update) in one pass over
``[N, 3D]``, forward and backward kernels. ``unimix_sample``: softmax, unimix, log, CDF and the
straight-through one-hot draw per categorical in one pass; its backward is the softmax Jacobian in
torch. ``rssm_step`` runs one prior step of an RSSM with these kernels around torch's matmuls.

On a CUDA device the kernels are compiled; on a CPU they run only under ``TRITON_INTERPRET=1``
(tests). ``available(device)`` says which. The maths is kernels/reference.py's, the oracle.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # e.g. macOS / Windows wheels: the triton engine is then unavailable, never silent
    HAVE_TRITON = False


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on ``device``: compiled on CUDA, interpreted on CPU."""
    if not HAVE_TRITON:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


if HAVE_TRITON:

    @triton.jit
    def _gru_gate_load(x_ptr, deter_ptr, idx, mask, D, DG):
        """Element idx = n·D + k of deter and its three gate inputs in x laid out [N, G, 3, D/G]."""
        n = idx // D
        k = idx % D
        base = n * 3 * D + (k // DG) * 3 * DG + k % DG
        r = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(x_ptr + base + DG, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + base + 2 * DG, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(deter_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        return base, r, c, u, d

    @triton.jit
    def _gru_gate_fwd(x_ptr, deter_ptr, out_ptr, total, D, DG, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        base, r, c, u, d = _gru_gate_load(x_ptr, deter_ptr, idx, mask, D, DG)
        reset = tl.sigmoid(r)
        cand = 2.0 * tl.sigmoid(2.0 * reset * c) - 1.0  # tanh
        update = tl.sigmoid(u - 1.0)
        tl.store(out_ptr + idx, update * cand + (1.0 - update) * d, mask=mask)

    @triton.jit
    def _gru_gate_bwd(x_ptr, deter_ptr, gout_ptr, gx_ptr, gdeter_ptr, total, D, DG, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        base, r, c, u, d = _gru_gate_load(x_ptr, deter_ptr, idx, mask, D, DG)
        go = tl.load(gout_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        reset = tl.sigmoid(r)
        cand = 2.0 * tl.sigmoid(2.0 * reset * c) - 1.0
        update = tl.sigmoid(u - 1.0)
        g_cand = go * update * (1.0 - cand * cand)
        tl.store(gx_ptr + base, g_cand * c * reset * (1.0 - reset), mask=mask)
        tl.store(gx_ptr + base + DG, g_cand * reset, mask=mask)
        tl.store(gx_ptr + base + 2 * DG, go * (cand - d) * update * (1.0 - update), mask=mask)
        tl.store(gdeter_ptr + idx, go * (1.0 - update), mask=mask)

    @triton.jit
    def _unimix_sample_fwd(logits_ptr, noise_ptr, mixed_ptr, sample_ptr, index_ptr, K, unimix,
                           BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_K)
        mask = cols < K
        x = tl.load(logits_ptr + row * K + cols, mask=mask, other=-float("inf")).to(tl.float32)
        x = x - tl.max(x, axis=0)
        e = tl.where(mask, tl.exp(x), 0.0)
        probs = (1.0 - unimix) * e / tl.sum(e, axis=0) + unimix / K
        probs = tl.where(mask, probs, 0.0)
        cdf = tl.cumsum(probs, axis=0)
        u = tl.load(noise_ptr + row).to(tl.float32)
        index = tl.minimum(tl.sum(tl.where(mask & (cdf < u), 1, 0), axis=0), K - 1)
        tl.store(mixed_ptr + row * K + cols, tl.log(tl.where(mask, probs, 1.0)), mask=mask)
        tl.store(sample_ptr + row * K + cols, tl.where(cols == index, 1.0, 0.0), mask=mask)
        tl.store(index_ptr + row, index.to(tl.int64))


_BLOCK = 1024


class GruGate(torch.autograd.Function):
    """Autograd face of the gate kernels: ``(x [N, 3D], deter [N, D]) → deter' [N, D]`` (fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, deter: torch.Tensor, groups: int) -> torch.Tensor:
        x, deter = x.float().contiguous(), deter.float().contiguous()
        n, d = deter.shape
        if x.shape != (n, 3 * d) or d % groups:
            raise ValueError(f"gru_gate: x {tuple(x.shape)} must be [N, 3D] for deter {tuple(deter.shape)}, "
                             f"D divisible by groups {groups}")
        out = torch.empty_like(deter)
        total = n * d
        _gru_gate_fwd[(triton.cdiv(total, _BLOCK),)](x, deter, out, total, d, d // groups, BLOCK=_BLOCK)
        ctx.save_for_backward(x, deter)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, gout: torch.Tensor):
        x, deter = ctx.saved_tensors
        n, d = deter.shape
        gx, gdeter = torch.empty_like(x), torch.empty_like(deter)
        total = n * d
        _gru_gate_bwd[(triton.cdiv(total, _BLOCK),)](x, deter, gout.float().contiguous(), gx, gdeter, total, d,
                                                     d // ctx.groups, BLOCK=_BLOCK)
        return gx, gdeter, None


class UnimixSample(torch.autograd.Function):
    """Autograd face of the unimix/sample kernel: ``(logits [N, S, K], noise [N, S]) → (mixed, sample,
    index [N, S])``; ``index`` (int64, the drawn classes) has no gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, noise: torch.Tensor, unimix: float):
        logits = logits.float().contiguous()
        n, s, k = logits.shape
        mixed, sample = torch.empty_like(logits), torch.empty_like(logits)
        index = torch.empty(n, s, dtype=torch.int64, device=logits.device)
        _unimix_sample_fwd[(n * s,)](logits, noise.float().contiguous(), mixed, sample, index, k, float(unimix),
                                     BLOCK_K=triton.next_power_of_2(k))
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(index)
        ctx.unimix = unimix
        return mixed, sample, index

    @staticmethod
    def backward(ctx, g_mixed: torch.Tensor | None, g_sample: torch.Tensor | None, _g_index: None):
        (logits,) = ctx.saved_tensors
        soft = logits.softmax(-1)
        probs = (1.0 - ctx.unimix) * soft + ctx.unimix / logits.shape[-1]
        # Both outputs are functions of p: mixed = log p, sample = onehot + p − sg(p).
        g_p = torch.zeros_like(probs)
        if g_mixed is not None:
            g_p = g_p + g_mixed / probs
        if g_sample is not None:
            g_p = g_p + g_sample
        g_soft = (1.0 - ctx.unimix) * g_p
        return soft * (g_soft - (g_soft * soft).sum(-1, keepdim=True)), None, None


def gru_gate(x: torch.Tensor, deter: torch.Tensor, groups: int) -> torch.Tensor:
    """Fused block-GRU gates; same maths as ``reference.gru_gate_reference``."""
    return GruGate.apply(x, deter, groups)


def unimix_sample(logits: torch.Tensor, noise: torch.Tensor, unimix: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused unimix + straight-through sample ``(mixed, sample, index)``; same maths as
    ``reference.unimix_sample_reference``."""
    return UnimixSample.apply(logits, noise, unimix)


def rssm_step(rssm, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor, noise: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prior step of ``fastdream.model.rssm.RSSM`` with the fused kernels: ``(deter, stoch, prior_logits,
    index)``, as ``RSSM.img_step``."""
    deter = gru_gate(rssm.gate_inputs(deter, stoch, rssm.action_input(action)), deter, rssm.blocks)
    mixed, sample, index = unimix_sample(rssm.prior_raw(deter), noise, rssm.unimix)
    return deter, sample, mixed, index
