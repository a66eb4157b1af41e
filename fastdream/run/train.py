"""The training loop: collect → add → train at a fixed train ratio → eval → checkpoint → log."""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdream.agent import Agent, OptimConfig
from fastdream.data.collector import Collector, RandomPolicy
from fastdream.data.envs import VecEnv, make_env
from fastdream.data.replay import ReplayBuffer
from fastdream.dream.schedule import HorizonSchedule
from fastdream.model.behavior import Behavior
from fastdream.model.world_model import WorldModel
from fastdream.run import checkpoint
from fastdream.run.config import Config, validate
from fastdream.run.logger import Logger, Progress


@dataclass
class TrainResult:
    """What a run ended with."""

    eval_return: float | None  # last mean eval return (None if never evaluated)
    env_steps: int
    updates: int
    wall_time: float  # seconds in this process
    solved: bool
    stopped: str  # solved | budget | interrupted | unhealthy | stop_at
    run_dir: Path
    checkpoint: Path | None
    metrics: Path


class UnhealthyRun(RuntimeError):
    """Too many consecutive skipped updates."""


# ---------------------------------------------------------------- builders


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_env(cfg: Config, seed: int | None = None, num_envs: int | None = None, render: bool = False) -> VecEnv:
    return make_env(cfg.env.id, num_envs or cfg.env.num_envs, seed=cfg.train.seed if seed is None else seed,
                    obs=cfg.env.obs, batch_size=cfg.env.batch_size or None, render=render)


def build_agent(cfg: Config, env: VecEnv, device: torch.device | str = "cpu") -> Agent:
    """Turns config into constructor arguments; the library classes never see ``cfg``."""
    m, t = cfg.model, cfg.train
    vector_dim = env.obs_spec["vector"][0][0] if "vector" in env.obs_spec else 0
    wm = WorldModel(vector_dim, "image" in env.obs_spec, env.num_actions, deter=m.deter, hidden=m.hidden,
                    stoch=m.stoch, classes=m.classes, blocks=m.blocks, units=m.units, layers=m.layers,
                    cnn_mult=m.cnn_mult)
    beh = Behavior(wm.rssm.feat_dim, env.num_actions, env.discrete, units=m.units, layers=m.actor_layers,
                   gamma=t.gamma, lam=t.lam, entropy=t.entropy)
    agent = Agent(wm, beh, env.num_envs, horizon=t.horizon, discrete=env.discrete,
                  wm_opt=OptimConfig(t.wm_lr, 1e-8, t.wm_clip), actor_opt=OptimConfig(t.actor_lr, 1e-5, t.ac_clip),
                  critic_opt=OptimConfig(t.critic_lr, 1e-5, t.ac_clip), seed=t.seed, precision=t.precision,
                  dream_starts=t.dream_starts, engine=t.engine, compile_model=t.compile_model,
                  schedule=HorizonSchedule(t.horizon_mode, t.horizon, t.h_min, t.h_max, t.ramp_start, t.ramp_end,
                                           t.dream_budget))
    return agent.to(device)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(agent: Agent, cfg: Config, episodes: int, seed: int, video_frames: list | None = None,
             deterministic: bool = True) -> list[float]:
    """Returns of ``episodes`` episodes, one per fresh eval env (seeded by ``seed``), acting with the
    policy's mode (``deterministic``) or sampling from it with the agent's generator. The posterior's
    latent draws come from torch's RNG seeded by ``seed`` inside a fork, so the same ``seed`` replays
    the same episodes and an eval leaves the training run's random stream untouched.

    With ``video_frames`` a list, full-resolution frames of env 0's episode are appended to it.
    """
    dev = agent.carry_deter.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return _play(agent, cfg, episodes, seed, video_frames, deterministic)


def _play(agent: Agent, cfg: Config, episodes: int, seed: int, video_frames: list | None,
          deterministic: bool) -> list[float]:
    env = build_env(cfg, seed=seed, num_envs=episodes, render=video_frames is not None)
    dev = agent.carry_deter.device
    carry = agent.wm.rssm.initial(episodes, dev)
    rows = env.reset()
    ret = np.zeros(episodes)
    done = np.zeros(episodes, dtype=bool)
    limit = (env.max_episode_steps or 10_000) + 2
    for _ in range(limit):
        if video_frames is not None and not done[0]:
            video_frames.append(env.render_frames(np.array([0]))[0])
        actions = agent.policy(rows, rows["env_ids"], deterministic=deterministic, carry=carry)
        rows = env.step(actions, rows["env_ids"])
        ids = rows["env_ids"]
        live = ~done[ids]
        ret[ids[live]] += rows["reward"][live]
        done[ids[live & rows["is_last"]]] = True
        if done.all():
            break
    env.close()
    return ret.tolist()


# ---------------------------------------------------------------- the loop


class _StopFlag:
    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
        self.signal = signal.Signals(signum).name


def _rng_state(policy: RandomPolicy) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "random_policy": policy.rng.bit_generator.state, "random_policy_cache": policy._cache,
            "random_policy_pos": policy._pos}


def _set_rng_state(state: dict[str, Any], policy: RandomPolicy) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    policy.rng.bit_generator.state = state["random_policy"]
    policy._cache, policy._pos = state["random_policy_cache"], state["random_policy_pos"]


def train(cfg: Config | None, run_dir: str | Path = "runs/latest", resume: bool = False, progress: bool = True,
          stop_at_env_steps: int | None = None, steps: int | None = None, minutes: float | None = None,
          log_fn=None) -> TrainResult:
    """Trains an agent as ``cfg`` says; returns a TrainResult.

    ``resume`` continues ``run_dir`` with its saved config (``cfg`` may be None); ``steps`` and
    ``minutes`` then override the saved env-step and wall-clock budgets. ``stop_at_env_steps``
    checkpoints and returns once that many env steps are done, as Ctrl-C would.
    """
    run_dir = Path(run_dir)
    state = None
    if resume:
        state, saved_replay = checkpoint.load(run_dir)
        cfg = Config.from_dict(state["config"])
    if cfg is None:
        raise ValueError("train() needs a config unless it resumes a run")
    if steps is not None:
        cfg.train.steps = steps
    if minutes is not None:
        cfg.train.minutes = minutes
    validate(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)
    device = resolve_device(t.device)
    env = build_env(cfg)
    agent = build_agent(cfg, env, device)
    random_policy = RandomPolicy(env, seed=t.seed)
    replay = ReplayBuffer(t.replay_capacity, env.num_envs, env.replay_spec, seed=t.seed)
    counters = {"env_steps": 0, "updates": 0, "owed": 0.0, "last_eval": 0, "evals": 0, "skipped": 0,
                "wall_time": 0.0}
    action_log: list[np.ndarray] = []
    last_eval: float | None = None
    collector = Collector(env, replay, random_policy)
    if state is not None:
        agent.load_full_state(state["agent"])
        agent.carry_deter.copy_(state["carry"][0])
        agent.carry_stoch.copy_(state["carry"][1])
        counters.update(state["counters"])
        last_eval = state.get("last_eval")
        if saved_replay is not None:
            replay = saved_replay
            collector.replay = replay
        # Envs cannot be pickled: replay the logged actions from the same seed to restore them exactly.
        action_log = list(state["action_log"])
        env.render_enabled = False
        collector.rows = env.reset()
        for i, a in enumerate(action_log):
            env.render_enabled = i == len(action_log) - 1
            collector.rows = env.step(a, collector.rows["env_ids"])
        env.render_enabled = True
        env.pop_episodes()
        collector.env_steps = counters["env_steps"]
        _set_rng_state(state["rng"], random_policy)
    else:
        collector.reset()
        counters["env_steps"] = collector.env_steps
    logger = Logger(run_dir)
    (run_dir / "config.json").write_text(__import__("json").dumps(cfg.to_dict(), indent=1))
    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = Progress(t.steps, enabled=progress)
    seq_updates = t.batch_size * t.seq_len
    out = replay.alloc_batch(t.batch_size, t.seq_len)
    t0 = time.perf_counter()
    wall0 = counters["wall_time"]
    updates0 = counters["updates"]
    window = {"env_steps": counters["env_steps"], "updates": counters["updates"], "time": t0}
    returns: list[float] = []
    metrics_acc: dict[str, list[float]] = {}
    consecutive_bad = 0
    stopped = "budget"
    compiled: set[bool] = set()  # train_behavior values whose compiled graphs this process has built

    def save_checkpoint() -> Path:
        counters["wall_time"] = wall0 + time.perf_counter() - t0
        st = {"config": cfg.to_dict(), "agent": agent.full_state(), "counters": dict(counters),
              "carry": (agent.carry_deter.cpu().clone(), agent.carry_stoch.cpu().clone()),
              "rng": _rng_state(random_policy), "action_log": action_log if not env.is_async else [],
              "last_eval": last_eval}
        return checkpoint.save(run_dir, st, replay if t.save_replay else None)

    try:
        while counters["env_steps"] < t.steps:
            if stop.signal:
                stopped = "interrupted"
                break
            if stop_at_env_steps is not None and counters["env_steps"] >= stop_at_env_steps:
                stopped = "stop_at"
                break
            if t.minutes > 0 and wall0 + time.perf_counter() - t0 >= 60.0 * t.minutes:
                stopped = "time_budget"
                break
            training = counters["env_steps"] >= t.prefill
            collector.policy = agent.policy if training else random_policy
            before = collector.env_steps
            collector.step()
            if not env.is_async:
                action_log.append(collector.last_actions.copy())
            new = collector.env_steps - before
            counters["env_steps"] = collector.env_steps
            returns += [r for r, _ in env.pop_episodes()]
            if training and replay.num_windows(t.seq_len) > 0:
                counters["owed"] += new * t.train_ratio / seq_updates
                while counters["owed"] >= 1.0:
                    counters["owed"] -= 1.0
                    replay.sample(t.batch_size, t.seq_len, t.recency, out=out)
                    batch = {k: torch.as_tensor(v).to(device) for k, v in out.items()}
                    behave = counters["updates"] >= t.warmup_updates
                    if agent.compiled and behave not in compiled:  # first call of each graph
                        compiled.add(behave)
                        what = "dream rollout" if behave else "world model"
                        bar.update(counters["env_steps"], f"compiling the {what} (first call, up to a minute; "
                                   "cached on disk by torch.compile for later runs)", force=True)
                    m = agent.train_step(batch, train_behavior=behave, update=counters["updates"])
                    counters["updates"] += 1
                    if m["health/skipped"]:
                        counters["skipped"] += 1
                        consecutive_bad += 1
                        logger.write(counters["env_steps"], {**m, "health/skipped_total": counters["skipped"]})
                        if consecutive_bad >= t.max_bad_updates:
                            raise UnhealthyRun(
                                f"{consecutive_bad} consecutive updates had non-finite losses or gradients "
                                f"(last: {m}); stopped at {counters['env_steps']} env steps, the last good "
                                f"checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR} is intact")
                        continue
                    consecutive_bad = 0
                    for k, v in m.items():
                        metrics_acc.setdefault(k, []).append(v)
                    if counters["updates"] % t.log_every == 0:
                        now = time.perf_counter()
                        dt = max(now - window["time"], 1e-9)
                        row = {k: float(np.mean(v)) for k, v in metrics_acc.items()}
                        row.update({
                            "perf/env_steps_per_s": (counters["env_steps"] - window["env_steps"]) / dt,
                            "perf/updates_per_s": (counters["updates"] - window["updates"]) / dt,
                            "progress/updates": counters["updates"],
                            "health/skipped_total": counters["skipped"],
                        })
                        if returns:
                            row["episode/return"] = float(np.mean(returns[-100:]))
                        logger.write(counters["env_steps"], row)
                        if log_fn:
                            log_fn(counters["env_steps"], row)
                        metrics_acc.clear()
                        window = {"env_steps": counters["env_steps"], "updates": counters["updates"], "time": now}
                    if counters["updates"] % t.checkpoint_every == 0:
                        save_checkpoint()
            if training and counters["env_steps"] - counters["last_eval"] >= t.eval_every:
                counters["last_eval"] = counters["env_steps"]
                counters["evals"] += 1
                rets = evaluate(agent, cfg, t.eval_episodes, seed=t.seed + 100_000 + counters["evals"])
                last_eval = float(np.mean(rets))
                logger.write(counters["env_steps"], {"eval/return": last_eval, "eval/return_min": min(rets),
                                                     "eval/return_max": max(rets),
                                                     "progress/updates": counters["updates"]})
                if log_fn:
                    log_fn(counters["env_steps"], {"eval/return": last_eval})
                if last_eval >= cfg.env.target_return:
                    stopped = "solved"
                    break
            el = time.perf_counter() - t0
            ups = (counters["updates"] - updates0) / max(el, 1e-9)
            ret_txt = f"{np.mean(returns[-100:]):.1f}" if returns else "-"
            ev_txt = f"{last_eval:.1f}" if last_eval is not None else "-"
            # A plain-line log gets a line after every eval (last_eval == env_steps only when one just ran).
            bar.update(counters["env_steps"], f"return {ret_txt}  eval {ev_txt}  updates {counters['updates']}"
                       + (f" ({ups:.1f}/s)" if ups else ""), force=counters["last_eval"] == counters["env_steps"])
    except UnhealthyRun:
        bar.close()
        logger.close()
        env.close()
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    bar.close()
    ck_path = save_checkpoint()
    wall = counters["wall_time"]  # the time the checkpoint holds, so a resume continues from the reported figure
    summary = {"summary/eval_return": last_eval if last_eval is not None else float("nan"),
               "summary/env_steps": counters["env_steps"], "summary/updates": counters["updates"],
               "summary/wall_time": wall, "summary/stopped": stopped}
    logger.write(counters["env_steps"], summary)
    logger.close()
    env.close()
    return TrainResult(eval_return=last_eval, env_steps=counters["env_steps"], updates=counters["updates"],
                       wall_time=wall, solved=stopped == "solved", stopped=stopped, run_dir=run_dir,
                       checkpoint=ck_path, metrics=run_dir / "metrics.jsonl")
