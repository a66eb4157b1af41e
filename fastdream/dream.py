"""The dream engine: imagined rollouts from posterior start states (reference loop for now)."""

from __future__ import annotations

import torch

from fastdream.behavior import Actor
from fastdream.world_model import WorldModel


def imagine(world_model: WorldModel, policy: Actor, starts: tuple[torch.Tensor, torch.Tensor], horizon: int,
            grad: bool = False) -> dict[str, torch.Tensor]:
    """Rolls ``horizon`` steps from ``starts = (deter [N, D], stoch [N, S, K])`` under ``policy``.

    Returns ``feat [N, H+1, F]``, ``action [N, H, A]`` (taken at s_0..s_{H-1}), ``reward [N, H]`` and
    ``cont [N, H]`` predicted at s_1..s_H. With ``grad=False`` (discrete actions: REINFORCE needs no
    gradient through the dynamics) the rollout runs without autograd.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    rssm = world_model.rssm
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        deter, stoch = starts
        feats = [rssm.feat(deter, stoch)]
        actions = []
        for _ in range(horizon):
            action = policy.sample(feats[-1] if grad else feats[-1].detach())
            deter, stoch, _ = rssm.img_step(deter, stoch, action)
            actions.append(action)
            feats.append(rssm.feat(deter, stoch))
        feat = torch.stack(feats, 1)
        nxt = feat[:, 1:]
        return {"feat": feat, "action": torch.stack(actions, 1), "reward": world_model.reward(nxt),
                "cont": world_model.cont(nxt)}
