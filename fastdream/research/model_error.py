"""How far a world model's imagination drifts from the real env ("On Training in Imagination", 2026): open-loop
k-step prediction errors on held-out real sequences, their per-step growth, and Lipschitz estimates of the
dynamics, reward and policy at real states (``fastdream eval RUN_DIR --model-error``).

The paper bounds a return's error in imagination by the per-step model error compounding through the Lipschitz
constants of dynamics, reward and policy; this measures each ingredient. The k-step state of the open loop
(``run.dream_view.open_loop``) is compared with row t+k: the latent KL(posterior ‖ k-step prior), the decoded
observation's error, the reward's and the continue probability's. k = 0 is the posterior itself (what the decoders
make of a state that saw its observation).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdream.agent import Agent
from fastdream.model.maths import categorical_kl, symexp
from fastdream.run.config import Config
from fastdream.run.dream_view import held_out_sequences, open_loop, windows
from fastdream.run.logger import json_text

METRICS = ("latent_kl", "obs_vector", "obs_image", "reward", "cont")


@torch.no_grad()
def open_loop_errors(agent: Agent, seq: dict[str, torch.Tensor], horizon: int, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Mean errors ``[horizon + 1]`` per k (k = 0: the posterior) over every start row t whose rows t+1..t+H lie in
    its episode: ``latent_kl`` (nats, summed over the latents; NaN at k = 0), ``obs_vector`` (mean squared error
    of the decoded vector, in observation units), ``obs_image`` (mean squared error per pixel in [0, 1]),
    ``reward`` and ``cont`` (absolute errors of the predicted reward and continue probability). Also ``starts``."""
    wm, rssm = agent.wm, agent.wm.rssm
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        post = rssm.observe(wm.encode(seq), seq["action"], seq["is_first"])
        e_idx, t_idx = windows(seq["is_first"], horizon)
        if len(e_idx) == 0:
            raise ValueError(f"no window of {horizon + 1} rows inside one episode; use longer sequences")
        out: dict[str, list[float]] = {k: [] for k in METRICS}
        for k, deter, stoch, prior in open_loop(wm, post, seq["action"], e_idx, t_idx, horizon):
            row = t_idx + k
            kl = math.nan if prior is None else float(categorical_kl(post["post"][e_idx, row], prior).mean())
            out["latent_kl"].append(kl)
            feat = rssm.feat(deter, stoch)
            if wm.vector_dim:
                err = (symexp(wm.vec_dec(feat)) - seq["vector"][e_idx, row]) ** 2
                out["obs_vector"].append(float(err.mean()))
            if wm.image:
                err = (wm.img_dec(feat) + 0.5 - seq["image"][e_idx, row].float() / 255.0) ** 2
                out["obs_image"].append(float(err.mean()))
            out["reward"].append(float((wm.reward(feat) - seq["reward"][e_idx, row]).abs().mean()))
            live = (~seq["is_terminal"][e_idx, row]).float()
            out["cont"].append(float((wm.cont(feat) - live).abs().mean()))
    res = {k: np.asarray(v) for k, v in out.items() if v}
    res["starts"] = np.asarray(len(e_idx))
    return res


def growth_per_step(errors: np.ndarray) -> float:
    """The per-step growth factor g of a least-squares fit ``log e_k = a + k log g`` over k = 1..H (errors
    ``[H + 1]``, k = 0 first; non-positive ones left out); NaN with fewer than two points."""
    k = np.arange(len(errors))[1:]
    e = np.asarray(errors, dtype=float)[1:]
    ok = np.isfinite(e) & (e > 0)
    if ok.sum() < 2:
        return math.nan
    return float(np.exp(np.polyfit(k[ok], np.log(e[ok]), 1)[0]))


def jacobian_norms(fn, x: torch.Tensor) -> torch.Tensor:
    """Spectral norms ``[N]`` of the Jacobians of a row-wise map ``fn: [N, I] → [N, O]`` at each row of ``x``, built
    by O backward passes (one per output dimension, all rows at once)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < y.shape[1] - 1)[0] for i in range(y.shape[1])]
    return torch.linalg.matrix_norm(torch.stack(rows, 1), ord=2)


def lipschitz_estimates(agent: Agent, seq: dict[str, torch.Tensor], states: int = 256, seed: int = 0
                        ) -> dict[str, dict[str, float]]:
    """Local Lipschitz constants at ``states`` real posterior states (drawn from ``seq``): the dynamics
    ``‖∂h'/∂h‖`` (``core`` with that row's stoch and next action), the reward ``‖∂r̂/∂feat‖`` and the policy
    ``‖∂π/∂feat‖`` (the actor's logits, or its mean for continuous actions); mean, 90th percentile and max each."""
    wm, rssm, actor = agent.wm, agent.wm.rssm, agent.behavior.actor
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.no_grad():
            post = rssm.observe(wm.encode(seq), seq["action"], seq["is_first"])
        e, t = seq["is_first"].shape
        flat = torch.randperm(e * (t - 1))[:states]
        ei, ti = flat // (t - 1), flat % (t - 1)
    deter, stoch = post["deter"][ei, ti], post["stoch"][ei, ti]
    action = seq["action"][ei, ti + 1]
    feat = rssm.feat(deter, stoch)

    def policy_out(f: torch.Tensor) -> torch.Tensor:
        out = actor.net(f)
        return out if actor.discrete else torch.tanh(out.chunk(2, -1)[0])

    norms = {"dynamics": jacobian_norms(lambda h: rssm.core(h, stoch, action), deter),
             "reward": jacobian_norms(lambda f: wm.reward(f)[:, None], feat),
             "policy": jacobian_norms(policy_out, feat)}
    return {k: {"mean": float(v.mean()), "p90": float(v.quantile(0.9)), "max": float(v.max())}
            for k, v in norms.items()}


def model_error(agent: Agent, cfg: Config, horizon: int, envs: int = 16, length: int = 256, seed: int = 54321,
                deterministic: bool = True) -> dict[str, Any]:
    """The whole report: ``errors`` per metric ``[H + 1]``, ``growth`` per metric, ``lipschitz``, and the data
    (``envs`` fresh envs × ``length`` rows, ``starts`` open-loop windows)."""
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    if not isinstance(length, int) or length < horizon + 2:
        raise ValueError(f"length must be an int >= horizon + 2 = {horizon + 2}, got {length!r}")
    seq = held_out_sequences(agent, cfg, envs, length, seed, deterministic)
    errors = open_loop_errors(agent, seq, horizon, seed)
    starts = int(errors.pop("starts"))
    return {"env": cfg.env.id, "horizon": horizon, "envs": envs, "length": length, "seed": seed, "starts": starts,
            "policy": "mode" if deterministic else "sampled", "errors": {k: v.tolist() for k, v in errors.items()},
            "growth": {k: growth_per_step(v) for k, v in errors.items()},
            "lipschitz": lipschitz_estimates(agent, seq, seed=seed)}


def format_model_error(report: dict[str, Any]) -> str:
    """The k-step table (every k up to 5, then every 5th) and the growth and Lipschitz lines."""
    names = list(report["errors"])
    h = report["horizon"]
    ks = [k for k in range(h + 1) if k <= 5 or k % 5 == 0 or k == h]
    lines = [f"{'k':>3}  " + "  ".join(f"{n:>11}" for n in names)]
    for k in ks:
        lines.append(f"{k:>3}  " + "  ".join(f"{report['errors'][n][k]:>11.4g}" for n in names))
    lines.append("growth/step " + "  ".join(f"{n} x{report['growth'][n]:.3f}" for n in names))
    lines.append("lipschitz   " + "  ".join(f"{n} {v['mean']:.3g} (p90 {v['p90']:.3g}, max {v['max']:.3g})"
                                        for n, v in report["lipschitz"].items()))
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path | None]:
    """``out_dir/model_error.json`` (atomically) and ``model_error.png`` (None without matplotlib)."""
    from fastdream.data.atomic import write_synced
    from fastdream.run.plots import plot_model_error

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model_error.json"
    tmp = out_dir / ".model_error.json.tmp"
    write_synced(tmp, lambda f: f.write(json_text(report)), mode="w")
    tmp.replace(path)
    try:
        return path, plot_model_error(report, out_dir / "model_error.png")
    except ImportError:
        return path, None
