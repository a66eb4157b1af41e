"""Actor, critic (with slow EMA critic), return normalisation, λ-returns and the behaviour losses."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastdream.fast import runtime
from fastdream.model.maths import (
    lambda_return,
    onehot,
    return_norm_update,
    return_scale,
    return_weights,
    twohot_bins,
    twohot_decode_logp,
    twohot_nll,
    unimix_logits,
    unimix_probs,
)
from fastdream.model.nets import MLP, Hot, twohot_decode, unimix_index

# ---------------------------------------------------------------- modules


class Actor(nn.Module):
    """π(a | s): unimix categorical (discrete) or bounded normal (continuous) over ``[..., F]``."""

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, units: int = 128, layers: int = 2,
                 unimix: float = 0.01, min_std: float = 0.1, max_std: float = 1.0) -> None:
        super().__init__()
        self.discrete, self.action_dim, self.unimix = discrete, action_dim, unimix
        self.min_std, self.max_std = min_std, max_std
        self.net = MLP(feat_dim, units, layers, action_dim if discrete else 2 * action_dim)

    def dist(self, feat: torch.Tensor, hot: Hot | None = None) -> torch.distributions.Distribution:
        """π over ``feat [..., F]`` (``hot``: see ``MLP.forward``)."""
        x = self.net(feat, hot)
        if self.discrete:
            return torch.distributions.Categorical(logits=unimix_logits(x, self.unimix), validate_args=False)
        mean, std = x.chunk(2, -1)
        std = (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std
        normal = torch.distributions.Normal(torch.tanh(mean), std, validate_args=False)
        return torch.distributions.Independent(normal, 1, validate_args=False)

    def sample_with_noise(self, feat: torch.Tensor, noise: torch.Tensor,
                          hot: Hot | None = None) -> torch.Tensor:
        """Stored-form action from fixed noise, with plain ops (no torch.distributions) so that a
        compiled rollout has no graph break: inverse-CDF one-hot for ``noise [N]`` uniform (discrete),
        ``tanh(mean) + std · noise`` for ``noise [N, A]`` standard normal (continuous)."""
        if self.discrete:
            return onehot(self.sample_index_with_noise(feat, noise, hot), self.action_dim, noise.dtype)
        x = self.net(feat, hot)
        mean, std = x.chunk(2, -1)
        std = (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std
        return torch.tanh(mean) + std * noise

    def sample_index_with_noise(self, feat: torch.Tensor, noise: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        """Discrete: the action classes ``[N]`` that ``sample_with_noise`` marks one-hot (a rollout gathers the GRU's
        action input by them)."""
        return unimix_index(self.net(feat, hot), noise, self.unimix)

    def log_prob(self, feat: torch.Tensor, action: torch.Tensor, hot: Hot | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log π(action), entropy)`` for stored-form actions ``[..., A]``."""
        if self.discrete:
            # Σ_a action_a log p_a of the one-hot action and -Σ_a p_a log p_a, in float32 from the unimix
            # probabilities: torch.distributions renormalised them and found the action by an argmax (at
            # [15, 4096, 4] compiled 2.0 ms, in bfloat16 under autocast; this 0.5 ms).
            x = self.net(feat, hot).float()
            if self.unimix > 0:
                probs = unimix_probs(x, self.unimix)
                logp = probs.log()
            else:
                logp = x.log_softmax(-1)
                probs = logp.exp()
            return (logp * action).sum(-1), -(probs * logp).sum(-1)
        d = self.dist(feat, hot)
        return d.log_prob(action), d.entropy()


class Critic(nn.Module):
    """v(s): two-hot symlog distribution over 255 bins with a zero-initialised output layer."""

    def __init__(self, feat_dim: int, units: int = 128, layers: int = 2, num_bins: int = 255) -> None:
        super().__init__()
        self.net = MLP(feat_dim, units, layers, num_bins, zero_out=True)
        self.register_buffer("bins", twohot_bins(num_bins), persistent=False)

    def forward(self, feat: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        """Logits ``[..., K]`` (``hot``: see ``MLP.forward``)."""
        return self.net(feat, hot)

    def value(self, feat: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        return twohot_decode(self.net(feat, hot), self.bins)

    def logp(self, feat: torch.Tensor, hot: Hot | None = None) -> torch.Tensor:
        """fp32 log-probabilities over the bins ``[..., K]``: values and both critic losses read them."""
        return self.net(feat, hot).float().log_softmax(-1)


class Behavior(nn.Module):
    """Actor + critic + slow critic + return normaliser state."""

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, units: int = 128, layers: int = 2,
                 gamma: float = 1 - 1 / 333, lam: float = 0.95, entropy: float = 3e-4, slow_rate: float = 0.02,
                 slow_reg: float = 1.0, retnorm_decay: float = 0.99, cont: str = "prob") -> None:
        super().__init__()
        if cont not in ("prob", "mode"):
            raise ValueError(f"cont must be 'prob' or 'mode', got {cont!r}")
        self.cont = cont  # what discounts the λ-returns: the continue head's probability, or its mode (DreamerV3)
        self.actor = Actor(feat_dim, action_dim, discrete, units, layers)
        self.critic = Critic(feat_dim, units, layers)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.discrete = discrete
        self.gamma, self.lam, self.entropy_scale = gamma, lam, entropy
        self.slow_rate, self.slow_reg, self.retnorm_decay = slow_rate, slow_reg, retnorm_decay
        self.register_buffer("ret_lo", torch.zeros(()))
        self.register_buffer("ret_hi", torch.zeros(()))

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters(), strict=True):
            slow.lerp_(fast, self.slow_rate)

    def losses(self, traj: dict[str, torch.Tensor], compiled: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Actor and critic losses on an imagined trajectory.

        ``traj``: ``feat [N, H+1, F]``, ``action [N, H, A]``, ``reward [N, H]`` and ``cont [N, H]``
        (predicted at s_1..s_H), ``start_cont [N]``; optional ``index [N, H+1, S]`` and ``classes`` (the
        stoch classes, from ``dream.imagine``) let the critics gather instead of multiplying by one-hots.
        ``compiled``: the critic's and the slow critic's passes run as compiled graphs (forward and
        backward), each read by one loss only, so the two separate gradient calls stay possible.
        """
        critic_logp = runtime.compiled(self.critic, "logp", self.critic.logp) if compiled else self.critic.logp
        slow_value = (runtime.compiled(self.slow_critic, "value", self.slow_critic.value) if compiled
                      else self.slow_critic.value)
        # The critics read the states time-major ([H+1, N, ·], their outputs transposed back): the order in
        # which dream.imagine's sequences are contiguous, so no window of them is copied.
        feat = traj["feat"].transpose(0, 1)
        index = traj.get("index")
        H = traj["action"].shape[1]
        hot_all = None if index is None else (index.transpose(0, 1), traj["classes"])
        hot = None if index is None else (hot_all[0][:H], traj["classes"])
        # One critic pass and log_softmax over all H+1 states serves the values and (discrete) both
        # critic losses, forward and backward.
        logp_all = critic_logp(feat if not self.discrete else feat.detach(), hot_all).transpose(0, 1)  # [N, H+1, K]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.discrete):
            value = twohot_decode_logp(logp_all, self.critic.bins)  # discrete: only read detached
        cont = traj["cont"] if self.cont == "prob" else (traj["cont"] > 0.5).to(traj["cont"].dtype)
        ret = lambda_return(traj["reward"], cont, value if not self.discrete else value.detach(), self.gamma, self.lam)
        state_cont = torch.cat([traj["start_cont"][:, None], cont], 1)
        weight = return_weights(state_cont, self.gamma).detach()[:, :H]
        lo, hi = return_norm_update(self.ret_lo, self.ret_hi, ret, self.retnorm_decay)
        self.ret_lo.copy_(lo)
        self.ret_hi.copy_(hi)
        scale = return_scale(lo, hi)
        base = value[:, :H].detach()
        logp, ent = traj["logprob"], traj["entropy"]
        if self.discrete:
            adv = ((ret - base) / scale).detach()
            actor_obj = logp * adv
        else:
            actor_obj = (ret - base) / scale
        actor_loss = -(weight * (actor_obj + self.entropy_scale * ent)).mean()
        with torch.no_grad():
            slow = slow_value(feat[:H].detach(), hot).transpose(0, 1)
        # Continuous: the values above carry the actor's gradient, so the critic loss reads its own pass.
        logp = logp_all[:, :H] if self.discrete else critic_logp(feat[:H].detach(), hot).transpose(0, 1)
        critic_nll = twohot_nll(logp, ret.detach(), self.critic.bins)
        slow_nll = twohot_nll(logp, slow, self.critic.bins)
        critic_loss = (weight * (critic_nll + self.slow_reg * slow_nll)).mean()
        metrics = {
            "behavior/actor_loss": actor_loss.detach(),
            "behavior/critic_loss": critic_loss.detach(),
            "behavior/entropy": ent.detach().mean(),
            "behavior/return": ret.detach().mean(),
            "behavior/value": base.mean(),
            "behavior/dream_reward": traj["reward"].detach().mean(),
            "behavior/dream_cont": traj["cont"].detach().mean(),
            "behavior/retnorm_scale": scale.detach(),
            "behavior/retnorm_lo": lo.detach(),
            "behavior/retnorm_hi": hi.detach(),
        }
        return actor_loss, critic_loss, metrics
