"""A controller trained only in the dream ("World Models", Ha & Schmidhuber 2018), scored on the real env.

A run's world model is frozen; a linear controller on its features ``[h, z]`` (``a = W·feat + b``: argmax for
discrete actions, tanh for continuous ones) is evolved by CMA-ES (``cma``). A candidate's fitness is its mean return
over ``dreams`` dreams of ``horizon`` steps from real posterior states; a dream's episode ends when a draw from the
continue head says so. The dream's temperature τ divides the prior logits before DreamerV3's 1 % unimix
(``tempered_prior``): τ > 1 makes the dream noisier and harder to exploit. The candidates of a generation share their
start states and random numbers (common random numbers), so their ranking reflects the controllers, not the draws.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdream.agent import Agent
from fastdream.data.replay import ReplayBuffer
from fastdream.model.maths import onehot, unimix_probs
from fastdream.model.nets import onehot_norm_silu, unimix_index
from fastdream.model.rssm import RSSM
from fastdream.model.world_model import WorldModel
from fastdream.run.checkpoint import CHECKPOINT_DIR
from fastdream.run.config import Config
from fastdream.run.logger import json_text
from fastdream.run.train import build_env, load_run, play

STARTS = ("replay", "reset")


@dataclass(frozen=True)
class EvolveSettings:
    """One evolution per temperature: ``population`` candidates × ``dreams`` dreams of ``horizon`` steps per
    generation; every ``eval_every`` generations (and the last) CMA-ES's mean is scored on ``eval_dreams`` dreams
    and ``episodes`` real episodes. ``start``: dreams start from posterior states of the run's replay or of
    fresh env resets. ``sigma``: CMA-ES's initial step size (the controller starts at zero)."""

    population: int = 64
    dreams: int = 16
    horizon: int = 200
    generations: int = 30
    sigma: float = 0.1
    start: str = "replay"
    eval_every: int = 5
    eval_dreams: int = 1024
    episodes: int = 100
    seed: int = 0

    def check(self) -> None:
        """A ValueError naming the first bad setting and what is allowed."""
        for name, low in (("population", 2), ("dreams", 1), ("horizon", 1), ("generations", 1), ("eval_every", 1),
                          ("eval_dreams", 1), ("episodes", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not (isinstance(self.sigma, int | float) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")


def check_temperature(tau: float) -> float:
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"the dream temperature must be a finite number > 0, got {tau!r}")
    return float(tau)


# ---------------------------------------------------------------- the maths


def controller_size(feat_dim: int, action_dim: int) -> int:
    """Parameters of the linear controller: ``W [A, F]`` then ``b [A]``."""
    return action_dim * (feat_dim + 1)


def controller_actions(params: torch.Tensor, feat: torch.Tensor, discrete: bool) -> torch.Tensor:
    """Stored-form actions ``[P, M, A]`` of ``P`` controllers ``params [P, A·F + A]`` on their features
    ``feat [P, M, F]``: one-hot of ``argmax(W·feat + b)`` (discrete) or ``tanh(W·feat + b)`` (continuous)."""
    p, f = params.shape[0], feat.shape[-1]
    a = params.shape[1] // (f + 1)
    w, b = params[:, : a * f].reshape(p, a, f), params[:, a * f :]
    y = torch.baddbmm(b[:, None, :], feat, w.transpose(1, 2))
    return onehot(y.argmax(-1), a, feat.dtype) if discrete else torch.tanh(y)


def tempered_prior(raw: torch.Tensor, tau: float, unimix: float) -> torch.Tensor:
    """The dream's prior probabilities ``[..., K]`` at temperature ``tau``: ``unimix_probs(raw / tau)`` (τ = 1 is
    the world model's own prior)."""
    return unimix_probs(raw / tau, unimix)


def tempered_draw(rssm: RSSM, deter: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """The classes ``[N, S]`` drawn from ``tempered_prior`` of ``deter [N, D]`` by inverse CDF with uniform
    ``noise [N, S]``, in one pass over the logits (``nets.unimix_index``): the temperature scales the head's
    matmul output and its bias alike, ``softmax((W·x + b) / τ)``."""
    head = rssm.prior_net.head
    unbiased = rssm.prior_unbiased(deter)
    return unimix_index(unbiased / tau, noise, rssm.unimix, head.bias / tau)


@torch.no_grad()
def dream_returns(wm: WorldModel, params: torch.Tensor, starts: tuple[torch.Tensor, torch.Tensor], horizon: int,
                  tau: float, discrete: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dreamed returns and episode lengths ``[P, M]`` of ``P`` controllers ``params [P, ·]``, each from the same
    ``M`` start states ``(deter [M, D], stoch [M, S, K])`` with the same random numbers. Step t: the action from
    the state, ``h_t`` from the core, ``z_t`` drawn from the tempered prior; the reward and continue heads read the
    new state; a dream's episode ends at its first draw ``u ≥ cont`` (then it adds no more reward)."""
    rssm, k = wm.rssm, wm.rssm.classes
    p, m = params.shape[0], starts[0].shape[0]
    deter, stoch = starts[0].repeat(p, 1), starts[1].repeat(p, 1, 1)
    index = stoch.argmax(-1)
    # The layers that read the one-hot stoch gather weight rows by its classes: ~2x faster than their matmuls.
    table, weights = rssm.stoch_table(), rssm.dynhid_weights()
    ret = torch.zeros(p * m)
    alive = torch.ones(p * m)
    length = torch.zeros(p * m)
    for _ in range(horizon):
        action = controller_actions(params, rssm.feat(deter, stoch).reshape(p, m, -1), discrete).reshape(p * m, -1)
        stoch_in = onehot_norm_silu(stoch.flatten(-2), rssm.dynin_stoch[0].weight, rssm.dynin_stoch[1], index, k,
                                    table)
        deter = rssm.gru_next(deter, stoch_in, rssm.action_input(action), weights)
        noise = torch.rand(m, rssm.stoch, generator=generator).repeat(p, 1)
        index = tempered_draw(rssm, deter, tau, noise)
        stoch = onehot(index, k)
        feat = rssm.feat(deter, stoch)
        ret += alive * wm.reward(feat, (index, k))
        length += alive
        alive = alive * (torch.rand(m, generator=generator).repeat(p) < wm.cont(feat, (index, k))).float()
        if not alive.any():
            break
    return ret.reshape(p, m), length.reshape(p, m)


# ---------------------------------------------------------------- start states and the real env


@torch.no_grad()
def replay_starts(wm: WorldModel, replay: ReplayBuffer, windows: int, seq_len: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior states of ``windows`` replayed windows of ``seq_len`` rows, terminal rows left out:
    ``(deter [n, D], stoch [n, S, K])``."""
    batch = {k: torch.as_tensor(v) for k, v in replay.sample(windows, min(seq_len, replay.env_capacity)).items()}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        post = wm.rssm.observe(wm.encode(batch), batch["action"], batch["is_first"])
    keep = ~batch["is_terminal"].reshape(-1)
    return post["deter"].flatten(0, 1)[keep], post["stoch"].flatten(0, 1)[keep]


@torch.no_grad()
def reset_starts(agent: Agent, cfg: Config, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior states of the first observations of ``count`` fresh envs: ``(deter [n, D], stoch [n, S, K])``."""
    env = build_env(cfg, seed=seed, num_envs=count)
    rows = env.reset()
    env.close()
    carry = agent.wm.rssm.initial(count)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        agent.observe_rows(rows, rows["env_ids"], carry)
    return carry


def real_returns(agent: Agent, cfg: Config, params: torch.Tensor, episodes: int, seed: int) -> list[float]:
    """Returns of ``episodes`` real episodes (one per fresh env) of the controller ``params [A·F + A]`` acting on
    the posterior of the real observations (``Agent.observe_rows``)."""
    carry = agent.wm.rssm.initial(episodes)

    def act(rows: dict[str, np.ndarray]) -> np.ndarray:
        feat, _ = agent.observe_rows(rows, rows["env_ids"], carry)
        a = controller_actions(params[None], feat[None], agent.discrete)[0]
        return a.argmax(-1).numpy() if agent.discrete else a.numpy()

    return play(act, cfg, episodes, seed)


# ---------------------------------------------------------------- CMA-ES, resumable


def _save(path: Path, state: dict[str, Any]) -> None:
    from fastdream.data.atomic import write_synced

    tmp = path.with_name(f".{path.name}.tmp")
    write_synced(tmp, lambda f: torch.save(state, f))
    tmp.replace(path)  # atomic: a kill leaves the previous state whole


def evolve_temperature(agent: Agent, cfg: Config, pool: tuple[torch.Tensor, torch.Tensor], tau: float,
                       settings: EvolveSettings, out_dir: Path,
                       on_generation: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """CMA-ES at temperature ``tau`` for ``settings.generations`` generations, resuming from ``out_dir/state.pt``
    when it exists (written after every generation, atomically). Returns the history: one row per generation
    (``dream_best``, ``dream_mean``: the population's mean dreamed returns) and, every ``eval_every`` and at the
    last, CMA-ES's mean scored in the dream (``eval_dream``, ``eval_dream_std``, ``eval_length``) and for real
    (``real``, ``real_std``)."""
    import cma

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "state.pt"
    wm, s = agent.wm, settings
    size = controller_size(wm.rssm.feat_dim, wm.action_dim)
    fixed = {k: v for k, v in asdict(s).items() if k != "generations"}
    if path.exists():
        state = torch.load(path, weights_only=False)
        if state["settings"] != fixed or state["tau"] != tau:
            diff = sorted(k for k in fixed if state["settings"].get(k) != fixed[k])
            raise ValueError(f"{path} holds an evolution with other settings ({diff or ['tau']}); "
                             "use another --out or the same settings")
        es, history = pickle.loads(state["es"]), state["history"]
        generator = torch.Generator().manual_seed(0)
        generator.set_state(state["generator"])
        np.random.set_state(state["numpy"])  # CMA-ES draws its candidates from numpy's global RNG
    else:
        es = cma.CMAEvolutionStrategy(np.zeros(size), s.sigma, {"popsize": s.population, "seed": s.seed + 1,
                                                                "verbose": -9})
        history, generator = [], torch.Generator().manual_seed(s.seed)
    n_pool = pool[0].shape[0]
    while len(history) < s.generations:
        pick = torch.randint(n_pool, (s.dreams,), generator=generator)
        candidates = np.asarray(es.ask())
        rets, _ = dream_returns(wm, torch.as_tensor(candidates, dtype=torch.float32), (pool[0][pick], pool[1][pick]),
                                s.horizon, tau, agent.discrete, generator)
        fitness = rets.mean(1)
        es.tell(list(candidates), (-fitness.double()).tolist())  # CMA-ES minimises
        row: dict[str, Any] = {"generation": len(history) + 1, "dream_best": float(fitness.max()),
                               "dream_mean": float(fitness.mean()), "sigma": float(es.sigma)}
        if row["generation"] % s.eval_every == 0 or row["generation"] == s.generations:
            row.update(score_mean(agent, cfg, pool, es.mean, tau, s, generator))
        history.append(row)
        _save(path, {"settings": fixed, "tau": tau, "es": pickle.dumps(es), "history": history,
                     "generator": generator.get_state(), "numpy": np.random.get_state(), "mean": es.mean})
        if on_generation is not None:
            on_generation(row)
    return history


def score_mean(agent: Agent, cfg: Config, pool: tuple[torch.Tensor, torch.Tensor], mean: np.ndarray, tau: float,
               settings: EvolveSettings, generator: torch.Generator) -> dict[str, float]:
    """CMA-ES's mean controller in the dream (``eval_dreams`` dreams from the pool) and on the real env
    (``episodes`` episodes, the same seed at every evaluation)."""
    params = torch.as_tensor(mean, dtype=torch.float32)
    pick = torch.randint(pool[0].shape[0], (settings.eval_dreams,), generator=generator)
    rets, length = dream_returns(agent.wm, params[None], (pool[0][pick], pool[1][pick]), settings.horizon, tau,
                                 agent.discrete, generator)
    real = np.asarray(real_returns(agent, cfg, params, settings.episodes, seed=10_000 + settings.seed))
    return {"eval_dream": float(rets.mean()), "eval_dream_std": float(rets.std()),
            "eval_length": float(length.mean()), "real": float(real.mean()), "real_std": float(real.std())}


# ---------------------------------------------------------------- the command


def evolve(run_dir: str | Path, taus: list[float], settings: EvolveSettings, out_dir: str | Path | None = None,
           on_generation: Callable[[float, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evolves one controller per temperature in ``taus`` in the dream of the run in ``run_dir`` (its checkpoint,
    frozen) and scores each on the real env. Writes ``out_dir`` (default ``run_dir/evolve``): ``tau-<τ>/state.pt``
    (resumable), ``evolve.json`` (settings, per τ its final scores and history) and ``evolve.png`` (with matplotlib,
    the ``[plot]`` extra; ``summary["plot"]`` is its path or None). Bad settings, a
    run without a checkpoint, or ``out_dir`` inside the run's checkpoint are ValueErrors before any work."""
    settings.check()
    taus = [check_temperature(t) for t in taus]
    if not taus:
        raise ValueError("give at least one dream temperature")
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "evolve"
    ck = (run_dir / CHECKPOINT_DIR).resolve()
    if out.resolve() == ck or ck in out.resolve().parents:
        raise ValueError(f"--out {out} is inside the run's checkpoint {ck}; choose another directory")
    cfg, agent, replay = load_run(run_dir, with_replay=settings.start == "replay")
    if settings.start == "replay" and replay is None:
        raise ValueError(f"{run_dir}'s checkpoint holds no replay to start dreams from; use start 'reset'")
    agent.requires_grad_(False)
    if replay is not None:
        pool = replay_starts(agent.wm, replay, 64, cfg.train.seq_len, settings.seed)
    else:
        pool = reset_starts(agent, cfg, 256, settings.seed)
    results = {}
    for tau in taus:
        hist = evolve_temperature(agent, cfg, pool, tau, settings, out / f"tau-{tau:g}",
                                  None if on_generation is None else (lambda row, t=tau: on_generation(t, row)))
        final = hist[-1]
        results[f"{tau:g}"] = {"tau": tau, "dream": final["eval_dream"], "dream_std": final["eval_dream_std"],
                               "dream_length": final["eval_length"], "real": final["real"],
                               "real_std": final["real_std"], "history": hist}
    summary = {"run_dir": str(run_dir), "env": cfg.env.id, "settings": asdict(settings), "temperatures": results}
    from fastdream.data.atomic import write_synced
    from fastdream.run.plots import plot_evolution

    tmp = out / ".evolve.json.tmp"
    write_synced(tmp, lambda f: f.write(json_text(summary)), mode="w")
    tmp.replace(out / "evolve.json")
    try:
        summary["plot"] = str(plot_evolution(summary, out / "evolve.png"))
    except ImportError:  # matplotlib is the [plot] extra
        summary["plot"] = None
    return summary


def format_evolve_table(summary: dict[str, Any]) -> str:
    """Per temperature: the final mean controller's dreamed and real return (mean ± std) and dream length."""
    s = summary["settings"]
    lines = [f"{'tau':>6}  {'dream (' + format(s['eval_dreams'], ',') + ' dreams)':>22}  "
             f"{'real (' + format(s['episodes'], ',') + ' episodes)':>22}  {'dream length':>12}"]
    for r in summary["temperatures"].values():
        lines.append(f"{r['tau']:>6g}  {r['dream']:>13.1f} ± {r['dream_std']:<6.1f}  "
                     f"{r['real']:>13.1f} ± {r['real_std']:<6.1f}  {r['dream_length']:>12.1f}")
    return "\n".join(lines)
