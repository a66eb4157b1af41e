"""Agent: world model + behaviour, acting (``policy``) and learning (``train_step``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastdream.dream.rollout import imagine
from fastdream.dream.schedule import HorizonSchedule
from fastdream.model.behavior import Behavior
from fastdream.model.maths import noisy_rewards
from fastdream.model.world_model import WorldModel


@dataclass
class OptimConfig:
    """Adam settings for one optimiser: learning rate, epsilon and global-norm clip."""

    lr: float
    eps: float
    clip: float


def _optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of ~10 ops per tensor (the world model has ~60).
    return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, fused=True)


class Agent(torch.nn.Module):
    """DreamerV3 agent for one env's spaces.

    Args:
        world_model: the world model.
        behavior: actor, critic and return normaliser.
        num_envs: number of acting envs (one recurrent carry each).
        horizon: imagination horizon H.
        discrete: whether actions are discrete (env form: index) or continuous ([-1, 1]).
    """

    def __init__(self, world_model: WorldModel, behavior: Behavior, num_envs: int, horizon: int = 15,
                 discrete: bool = True, wm_opt: OptimConfig | None = None, actor_opt: OptimConfig | None = None,
                 critic_opt: OptimConfig | None = None, seed: int = 0, precision: str = "fp32",
                 dream_starts: int = 0, engine: str = "auto", schedule: HorizonSchedule | None = None,
                 compile_model: bool = False, reward_noise: float = 0.0) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.dream_starts = dream_starts  # 0: dream from every posterior state of the batch
        self.engine = engine
        self.reward_noise = reward_noise  # std of zero-mean noise on imagined rewards (0: none)
        # Compiled graphs for the world model's posterior steps and image nets (WorldModel.loss) and the critics'
        # passes (Behavior.losses), whatever the dream engine.
        self.compiled = compile_model
        self.schedule = schedule or HorizonSchedule("fixed", horizon=horizon)
        self.wm, self.behavior = world_model, behavior
        self.horizon, self.discrete, self.num_envs = horizon, discrete, num_envs
        wm_opt = wm_opt or OptimConfig(1e-4, 1e-8, 1000.0)
        actor_opt = actor_opt or OptimConfig(3e-5, 1e-5, 100.0)
        critic_opt = critic_opt or OptimConfig(3e-5, 1e-5, 100.0)
        self.opt_cfg = {"wm": wm_opt, "actor": actor_opt, "critic": critic_opt}
        self.opts = {
            "wm": _optimizer(self.wm.parameters(), wm_opt),
            "actor": _optimizer(self.behavior.actor.parameters(), actor_opt),
            "critic": _optimizer(self.behavior.critic.parameters(), critic_opt),
        }
        self.generator = torch.Generator().manual_seed(seed)
        d, s = self.wm.rssm.initial(num_envs)
        self.register_buffer("carry_deter", d, persistent=False)
        self.register_buffer("carry_stoch", s, persistent=False)

    # ---------------------------------------------------------------- acting
    def obs_to_torch(self, rows: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = {}
        for k in ("vector", "image", "action", "is_first"):  # what acting reads
            if k in rows:
                out[k] = torch.as_tensor(rows[k], device=device)
        return out

    @torch.no_grad()
    def observe_rows(self, rows: dict[str, np.ndarray], env_ids: np.ndarray,
                     carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One posterior step for the envs ``env_ids`` from their latest rows, written into their carry (the agent's,
        or ``carry``): their features ``[n, F]`` and which of them came from a non-finite observation ``[n]``
        (their state is zeroed, so a broken simulator cannot poison the carry)."""
        dev = self.carry_deter.device
        obs = self.obs_to_torch(rows, dev)
        ids = torch.as_tensor(np.asarray(env_ids), dtype=torch.long, device=dev)
        deter_all, stoch_all = carry if carry is not None else (self.carry_deter, self.carry_stoch)
        embed = self.wm.encode(obs)
        deter, stoch, _ = self.wm.rssm.obs_step(deter_all[ids], stoch_all[ids], obs["action"], embed,
                                                   obs["is_first"])
        bad = ~(torch.isfinite(deter).all(-1) & torch.isfinite(stoch).flatten(1).all(-1))
        deter, stoch = torch.nan_to_num(deter), torch.nan_to_num(stoch)
        deter_all[ids], stoch_all[ids] = deter, stoch
        return self.wm.rssm.feat(deter, stoch), bad

    @torch.no_grad()
    def policy(self, rows: dict[str, np.ndarray], env_ids: np.ndarray, deterministic: bool = False,
               carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
        """Env-form actions for the envs ``env_ids`` given their latest rows (updates their carry)."""
        feat, bad = self.observe_rows(rows, env_ids, carry)
        # A non-finite observation: its env acts uniformly at random; the training side skips and counts the bad
        # updates.
        dist = self.behavior.actor.dist(feat)
        if bad.any() and self.discrete:
            probs = dist.probs.clone()
            probs[bad] = 1.0 / probs.shape[-1]
            dist = torch.distributions.Categorical(probs=probs, validate_args=False)
        if self.discrete:
            if deterministic:
                return dist.probs.argmax(-1).cpu().numpy()
            return torch.multinomial(dist.probs, 1, generator=self.generator).squeeze(-1).cpu().numpy()
        if deterministic:
            a = dist.mean
        else:
            base = dist.base_dist
            a = base.loc + base.scale * torch.randn(base.loc.shape, generator=self.generator)
        return a.clamp(-1, 1).cpu().numpy()

    # ---------------------------------------------------------------- learning
    def _step(self, name: str, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, bool]:
        """Clipped Adam step of ``params`` on ``loss``; skipped (returns False) on a non-finite gradient."""
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            # The fused Adam reads a gradient in its parameter's memory layout. Conv weight gradients come
            # back channels-last here (pytorch#106951), which it misread without an error on this CPU: the
            # pixel encoder/decoder learned ~5x slower (image loss 1380 against 313 after 36 updates).
            p.grad = g if g is None or g.stride() == p.stride() else torch.empty_like(p, dtype=g.dtype).copy_(g)
        norm = torch.nn.utils.clip_grad_norm_(params, self.opt_cfg[name].clip, foreach=True)
        ok = bool(torch.isfinite(norm))
        if ok:
            self.opts[name].step()
        for p in params:
            p.grad = None
        return norm, ok

    def train_step(self, batch: dict[str, torch.Tensor], train_behavior: bool = True, update: int = 0
                   ) -> dict[str, float]:
        """One update: world model on ``batch`` ``[B, T]``, then actor and critic on dreams from
        every posterior state. Non-finite losses skip the update and report ``health/skipped = 1``.
        """
        with self._autocast():
            wm_loss, metrics, states = self.wm.loss(batch, compiled=self.compiled)
        if not torch.isfinite(wm_loss):
            return {"health/skipped": 1.0, "wm/loss": float(wm_loss.detach())}
        wm_params = [p for p in self.wm.parameters() if p.requires_grad]
        metrics["grad/wm_norm"], ok = self._step("wm", wm_loss, wm_params)
        if not ok:
            return {"health/skipped": 1.0, "wm/loss": float(wm_loss.detach()),
                    "grad/wm_norm": float(metrics["grad/wm_norm"])}
        if train_behavior:
            B, T = states["deter"].shape[:2]
            starts = (states["deter"].reshape(B * T, -1), states["stoch"].reshape(B * T, *states["stoch"].shape[2:]))
            start_cont = (~batch["is_terminal"]).float().reshape(B * T)
            horizon = self.schedule.horizon_at(update)
            n = self.schedule.starts_at(update, B * T, self.dream_starts)
            if n != B * T:  # fewer dreams: distinct states; more (a budget of short dreams): states drawn again
                dev = start_cont.device
                pick = torch.randperm(B * T, device=dev)[:n] if n < B * T else torch.randint(B * T, (n,), device=dev)
                starts, start_cont = (starts[0][pick], starts[1][pick]), start_cont[pick]
            metrics["dream/horizon"] = torch.tensor(float(horizon))
            metrics["dream/starts"] = torch.tensor(float(n))
            with self._autocast():
                traj = imagine(self.wm, self.behavior.actor, starts, horizon, engine=self.engine,
                               grad=not self.discrete, dense_feat=False, precision=self.precision)
                traj["start_cont"] = start_cont
                if self.reward_noise > 0:
                    traj["reward"] = noisy_rewards(traj["reward"], self.reward_noise)
                actor_loss, critic_loss, bm = self.behavior.losses(traj, compiled=self.compiled)
            metrics.update(bm)
            if not (torch.isfinite(actor_loss) and torch.isfinite(critic_loss)):
                metrics["health/skipped"] = torch.tensor(1.0)
                return {k: float(v) for k, v in metrics.items()}
            metrics["grad/actor_norm"], ok_a = self._step("actor", actor_loss, list(self.behavior.actor.parameters()))
            metrics["grad/critic_norm"], ok_c = self._step("critic", critic_loss,
                                                           list(self.behavior.critic.parameters()))
            if not (ok_a and ok_c):
                metrics["health/skipped"] = torch.tensor(1.0)
                return {k: float(v) for k, v in metrics.items()}
            self.behavior.update_slow_critic()
        out = {k: float(v) for k, v in metrics.items()}
        out["health/skipped"] = 0.0
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            out["health/nonfinite_metrics"] = float(len(bad))
        return out

    def _autocast(self):
        """bf16 autocast for matmuls (~2.6x the fp32 matmul rate on an AVX-512-bf16 CPU); fp32 otherwise."""
        dev = self.carry_deter.device.type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # ---------------------------------------------------------------- state
    def full_state(self) -> dict[str, Any]:
        """Weights, optimiser states and the acting RNG state (for checkpoints)."""
        return {
            "model": self.state_dict(),
            "opts": {k: o.state_dict() for k, o in self.opts.items()},
            "generator": self.generator.get_state(),
        }

    def load_full_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        for k, o in self.opts.items():
            o.load_state_dict(state["opts"][k])
        self.generator.set_state(state["generator"])
