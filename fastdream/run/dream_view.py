"""The dream beside the real env: fresh real sequences, the world model's open-loop predictions from their posterior
states with the real actions, and the pictures of both (``fastdream eval --dream``, TensorBoard at every eval).

Open loop: from the posterior state at row t, the prior alone is rolled with the real actions of rows t+1..t+k (its
stoch drawn from the prior), and the k-step state is decoded beside row t+k; k = 0 is the posterior itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastdream.agent import Agent
from fastdream.model.maths import straight_through_draw, symexp, unimix_probs
from fastdream.model.world_model import WorldModel
from fastdream.run.config import Config
from fastdream.run.train import build_env


@torch.no_grad()
def held_out_sequences(agent: Agent, cfg: Config, envs: int, length: int, seed: int, deterministic: bool = True
                       ) -> dict[str, torch.Tensor]:
    """``length`` rows ``[envs, length, ...]`` of fresh envs of the run's task (seeded by ``seed``, not the
    replay's), acting with the run's policy (its mode, or sampled); the caller's random stream is untouched."""
    env = build_env(cfg, seed=seed, num_envs=envs)
    carry = agent.wm.rssm.initial(envs, agent.carry_deter.device)
    rows = env.reset()
    steps = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(length):
            if not np.array_equal(rows["env_ids"], np.arange(envs)):
                raise RuntimeError(f"expected the rows of envs 0..{envs - 1} in order, got {rows['env_ids']}")
            steps.append({k: v for k, v in rows.items() if k != "env_ids"})
            rows = env.step(agent.policy(rows, rows["env_ids"], deterministic=deterministic, carry=carry),
                            rows["env_ids"])
    env.close()
    return {k: torch.as_tensor(np.stack([s[k] for s in steps], 1)) for k in steps[0]}


def windows(is_first: torch.Tensor, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The start rows ``(env [M], t [M])`` of ``is_first [E, T]`` whose rows t+1..t+H lie in t's episode."""
    firsts = torch.cumsum(is_first.long(), 1)
    t = torch.arange(is_first.shape[1] - horizon)
    e_idx, t_idx = ((firsts[:, t + horizon] - firsts[:, t]) == 0).nonzero(as_tuple=True)
    return e_idx, t[t_idx]


OpenLoopStep = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]


@torch.no_grad()
def open_loop(wm: WorldModel, post: dict[str, torch.Tensor], action: torch.Tensor, e_idx: torch.Tensor,
              t_idx: torch.Tensor, horizon: int) -> Iterator[OpenLoopStep]:
    """For k = 0..H: ``(k, deter [M, D], stoch [M, S, K], prior logits [M, S, K] or None at k = 0)`` of the open-loop
    states from the posterior ``post`` (``RSSM.observe``'s) at rows ``t_idx`` of envs ``e_idx``, rolled with the
    real ``action [E, T, A]`` (torch's RNG draws the prior's stochs)."""
    rssm = wm.rssm
    deter, stoch = post["deter"][e_idx, t_idx], post["stoch"][e_idx, t_idx]
    yield 0, deter, stoch, None
    for k in range(1, horizon + 1):
        deter = rssm.core(deter, stoch, action[e_idx, t_idx + k])
        prior = rssm.prior_logits(deter)
        stoch, _ = straight_through_draw(unimix_probs(rssm.prior_raw(deter), rssm.unimix),
                                         torch.rand(deter.shape[0], rssm.stoch))
        yield k, deter, stoch, prior


@torch.no_grad()
def dream_prediction(agent: Agent, seq: dict[str, torch.Tensor], horizon: int, warmup: int = 8, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """One open-loop dream beside the real rows it predicts: from the first row ≥ ``warmup`` of env 0 whose next
    ``horizon`` rows stay in its episode. ``real_*``/``pred_*`` ``[H + 1, ...]`` for ``vector``, ``image``
    (uint8), ``reward`` and ``cont``, and ``start`` (that row)."""
    wm = agent.wm
    e_idx, t_idx = windows(seq["is_first"], horizon)
    pick = ((e_idx == 0) & (t_idx >= warmup)).nonzero()
    if len(pick) == 0:
        pick = (e_idx == 0).nonzero()
    if len(pick) == 0:
        raise ValueError(f"env 0's rows hold no window of {horizon + 1} rows inside one episode")
    e, t = e_idx[pick[0]], t_idx[pick[0]]
    out: dict[str, list] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        post = wm.rssm.observe(wm.encode(seq), seq["action"], seq["is_first"])
        for k, deter, stoch, _ in open_loop(wm, post, seq["action"], e, t, horizon):
            feat = wm.rssm.feat(deter, stoch)
            row = (e, t + k)
            if wm.vector_dim:
                out.setdefault("pred_vector", []).append(symexp(wm.vec_dec(feat))[0])
                out.setdefault("real_vector", []).append(seq["vector"][row][0])
            if wm.image:
                img = ((wm.img_dec(feat)[0] + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                out.setdefault("pred_image", []).append(img)
                out.setdefault("real_image", []).append(seq["image"][row][0])
            out.setdefault("pred_reward", []).append(wm.reward(feat)[0])
            out.setdefault("real_reward", []).append(seq["reward"][row][0])
            out.setdefault("pred_cont", []).append(wm.cont(feat)[0])
            out.setdefault("real_cont", []).append((~seq["is_terminal"][row][0]).float())
    res = {k: torch.stack(v).numpy() for k, v in out.items()}
    res["start"] = np.asarray(int(t))
    return res


def side_by_side_frames(pred: dict[str, np.ndarray], scale: int = 3) -> list[np.ndarray]:
    """Video frames ``[64·scale, 128·scale, 3]`` uint8: the real frame (left) beside the dream's (right), per k."""
    frames = []
    for real, dream in zip(pred["real_image"], pred["pred_image"], strict=True):
        pair = np.concatenate([real, dream], 1)
        frames.append(np.repeat(np.repeat(pair, scale, 0), scale, 1))
    return frames


def dream_strip(pred: dict[str, np.ndarray]) -> np.ndarray:
    """One image ``[128, 64·(H+1), 3]`` uint8: the real frames along the top row, the dream's below them."""
    return np.concatenate([np.concatenate(list(pred["real_image"]), 1), np.concatenate(list(pred["pred_image"]), 1)],
                          0)
