"""DreamerV3's maths in plain torch, readable beside the paper: the reference every fast path is tested against.

Imports nothing of fastdream: the C++ and Triton paths (``fastdream.fast``, ``fastdream.kernels``) stand in for
some of these where no gradient is needed, and ``model/nets.py`` chooses between them at the call site.
Shapes use ``[..., D]``; ``N`` rows, ``H`` horizon, ``S`` latents, ``K`` classes per latent or two-hot bins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- symlog and two-hot


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) · ln(1 + |x|)."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of symlog: sign(x) · (exp(|x|) − 1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def twohot_bins(num_bins: int = 255, low: float = -20.0, high: float = 20.0) -> torch.Tensor:
    """Bin centres in symlog space, ``[num_bins]`` (DreamerV3: 255 bins on [-20, 20])."""
    return torch.linspace(low, high, num_bins)


def twohot_neighbours(y: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For symlog-space ``y [...]`` (clipped to the bins): the bins below and above, and the weight of
    the one above, so that ``(1 − w) · bins[below] + w · bins[above] = y``."""
    y = y.clamp(bins[0], bins[-1])
    above = torch.searchsorted(bins, y.contiguous(), right=True).clamp(1, len(bins) - 1)
    below = above - 1
    w_hi = ((y - bins[below]) / (bins[above] - bins[below])).clamp(0.0, 1.0)
    return below, above, w_hi


def twohot_encode(y: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Two-hot encodes symlog-space targets ``y [...]`` over ``bins [K]`` → ``[..., K]``: the two neighbouring
    bins share the mass so that their weighted mean is exactly ``y`` (clipped to the bin range)."""
    below, above, w_hi = twohot_neighbours(y, bins)
    out = torch.zeros(*y.shape, len(bins), dtype=y.dtype, device=y.device)
    out.scatter_(-1, below.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, above.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def twohot_decode(logits: torch.Tensor, bins: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """symexp of the expected bin of ``logits [..., K]`` (plus ``bias [K]``) → ``[...]`` float32."""
    x = logits.float() if bias is None else logits.float() + bias
    return symexp((x.softmax(-1) * bins).sum(-1))  # not a matmul: autocast would make it bf16


def twohot_decode_logp(logp: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """``twohot_decode`` from log-probabilities ``logp [..., K]`` (a ``log_softmax`` computed already)."""
    return symexp((logp.exp() * bins).sum(-1))


def twohot_nll(logp: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of log-probabilities ``logp [..., K]`` against the two-hot of symlog(``target [...]``) →
    ``[...]``: two gathered log-probabilities, no ``[..., K]`` target tensor."""
    below, above, w_hi = twohot_neighbours(symlog(target), bins)
    lp_lo = logp.gather(-1, below.unsqueeze(-1)).squeeze(-1)
    lp_hi = logp.gather(-1, above.unsqueeze(-1)).squeeze(-1)
    return -((1.0 - w_hi) * lp_lo + w_hi * lp_hi)


def twohot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """``twohot_nll`` of ``logits [..., K]`` (float32 log-softmax first) → ``[...]``."""
    return twohot_nll(logits.float().log_softmax(-1), target, bins)


# ---------------------------------------------------------------- categoricals


def unimix_probs(logits: torch.Tensor, unimix: float = 0.01) -> torch.Tensor:
    """``(1 − unimix) · softmax(logits) + unimix / K`` over the last axis."""
    return (1.0 - unimix) * logits.softmax(-1) + unimix / logits.shape[-1]


def unimix_logits(logits: torch.Tensor, unimix: float = 0.01) -> torch.Tensor:
    """Logits (log-probabilities) of ``unimix_probs``."""
    if unimix <= 0:
        return logits.log_softmax(-1)
    return unimix_probs(logits, unimix).log()


def inverse_cdf_index(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Class index ``[...]`` drawn from ``probs [..., K]`` with one uniform ``noise [...]`` per row: K× fewer random
    numbers than Gumbel-max, and plain ops, so a compiled rollout has no graph break."""
    return (probs.detach().cumsum(-1) < noise.unsqueeze(-1)).sum(-1).clamp(max=probs.shape[-1] - 1)


def unimix_index(logits: torch.Tensor, noise: torch.Tensor, unimix: float = 0.01,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``inverse_cdf_index(unimix_probs(logits + bias), noise)`` for ``logits [..., S, K]``, ``noise [..., S]`` →
    classes ``[..., S]``; ``bias [S·K]`` or None (a head's bias left out of its matmul)."""
    full = logits if bias is None else logits + bias.reshape(-1, logits.shape[-1])
    return inverse_cdf_index(unimix_probs(full.float(), unimix), noise)


def onehot(index: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[...]`` class indices → one-hot ``[..., classes]`` of ``dtype`` (no int64 intermediate)."""
    out = torch.zeros(*index.shape, classes, dtype=dtype, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1), 1.0)


def straight_through_draw(probs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot draw ``[..., K]`` from ``probs [..., K]`` with the straight-through gradient
    ``onehot + p − sg(p)`` (only built when ``probs`` needs a gradient), and its class ``index [...]``."""
    index = inverse_cdf_index(probs, noise)
    sample = onehot(index, probs.shape[-1], probs.dtype)
    if probs.requires_grad:
        sample = sample + probs - probs.detach()
    return sample, index


def straight_through_sample(logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot sample ``[..., K]`` of categorical ``logits [..., K]`` with straight-through gradients;
    ``noise [...]`` uniform in [0, 1) (drawn if not given) makes the draw reproducible."""
    probs = logits.softmax(-1)
    if noise is None:
        noise = torch.rand(logits.shape[:-1], device=logits.device, dtype=probs.dtype)
    return straight_through_draw(probs, noise)[0]


def noisy_rewards(reward: torch.Tensor, sigma: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Imagined rewards ``[N, H]`` plus zero-mean Gaussian noise of std ``sigma`` (``noise``: standard normal draws
    of ``reward``'s shape, fresh ones if None): the reward-noise study of "On Training in Imagination" (2026)."""
    if noise is None:
        noise = torch.randn_like(reward)
    return reward + sigma * noise


def categorical_kl(lhs_logits: torch.Tensor, rhs_logits: torch.Tensor) -> torch.Tensor:
    """KL(lhs ‖ rhs) of categoricals ``[..., S, K]`` summed over the S latents → ``[...]``."""
    lhs_logp = lhs_logits.log_softmax(-1)
    rhs_logp = rhs_logits.log_softmax(-1)
    return (lhs_logp.exp() * (lhs_logp - rhs_logp)).sum((-2, -1))


def kl_losses(post: torch.Tensor, prior: torch.Tensor, free: float = 1.0) -> tuple[torch.Tensor, ...]:
    """DreamerV3 KL balance on logits ``[..., S, K]``: ``(dyn, rep, raw_kl)``, each ``[...]``.

    dyn = max(free, KL(sg(post) ‖ prior)), rep = max(free, KL(post ‖ sg(prior))); free bits 1 nat.
    """
    dyn = categorical_kl(post.detach(), prior)
    rep = categorical_kl(post, prior.detach())
    return dyn.clamp(min=free), rep.clamp(min=free), dyn.detach()


# ---------------------------------------------------------------- the RSSM's layers


def norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """SiLU(LayerNorm(x) · weight + bias) over the last axis of ``x [..., C]`` (DreamerV3's eps 1e-3)."""
    return F.silu(F.layer_norm(x, (x.shape[-1],), weight, bias, eps))


def gru_gate(x: torch.Tensor, deter: torch.Tensor, groups: int) -> torch.Tensor:
    """Block-GRU update (DreamerV3) → next deter ``[N, D]`` float32 from the gate pre-activations ``x [N, 3D]``
    laid out ``[N, G, 3, D/G]`` (bias included) and ``deter [N, D]``:
    reset = σ(r), cand = tanh(reset · c), update = σ(u − 1); update · cand + (1 − update) · deter."""
    n, d = deter.shape
    r, c, u = x.float().reshape(n, groups, 3, d // groups).unbind(2)
    r, c, u = (t.reshape(n, d) for t in (r, c, u))
    reset = torch.sigmoid(r)
    # tanh(x) as 2σ(2x) − 1: inductor's CPU tanh was the slow part of the fused gate (3.0 → 2.0 ms, N=4096 xs bf16).
    cand = 2.0 * torch.sigmoid(2.0 * reset * c) - 1.0
    update = torch.sigmoid(u - 1.0)
    return update * cand + (1.0 - update) * deter.float()


# ---------------------------------------------------------------- returns


def lambda_return(reward: torch.Tensor, cont: torch.Tensor, value: torch.Tensor, gamma: float,
                  lam: float) -> torch.Tensor:
    """λ-returns ``[N, H]`` from ``reward [N, H]``, ``cont [N, H]`` (of transition t → t+1) and
    ``value [N, H+1]``: R_t = r_t + γ c_t [(1 − λ) v_{t+1} + λ R_{t+1}], R_H = v_H."""
    H = reward.shape[1]
    ret = value[:, H]
    out = []
    for t in reversed(range(H)):
        ret = reward[:, t] + gamma * cont[:, t] * ((1.0 - lam) * value[:, t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1], 1)


def return_weights(cont: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loss weights ``[N, H+1]`` from state continues ``cont [N, H+1]``: γ^t · ∏_{k≤t} c_k."""
    return torch.cumprod(gamma * cont, 1) / gamma


def return_norm_update(lo: torch.Tensor, hi: torch.Tensor, returns: torch.Tensor, decay: float = 0.99,
                       low_q: float = 0.05, high_q: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA of the 5th and 95th return percentiles: returns the new ``(lo, hi)``."""
    flat = returns.detach().flatten().float()
    q = torch.quantile(flat, torch.tensor([low_q, high_q], device=flat.device))
    return decay * lo + (1 - decay) * q[0], decay * hi + (1 - decay) * q[1]


def return_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """S = max(1, hi − lo)."""
    return torch.clamp(hi - lo, min=1.0)
