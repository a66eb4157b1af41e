"""The training loop: collect → add → train at a fixed train ratio → eval → checkpoint → log."""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdream.agent import Agent, OptimConfig
from fastdream.data.collector import Collector, RandomPolicy
from fastdream.data.envs import VecEnv, make_env
from fastdream.data.levels import parse_levels
from fastdream.data.replay import ReplayBuffer
from fastdream.dream.schedule import HorizonSchedule
from fastdream.fast.precision import auto_precision, resolve_precision
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


def build_env(cfg: Config, seed: int | None = None, num_envs: int | None = None, render: bool = False,
              test: bool = False) -> VecEnv:
    """``cfg``'s env; ``test``: on its test levels (``env.test_levels``, where set) instead of its training ones."""
    levels = (cfg.env.test_levels or cfg.env.levels) if test else cfg.env.levels
    return make_env(cfg.env.id, num_envs or cfg.env.num_envs, seed=cfg.train.seed if seed is None else seed,
                    obs=cfg.env.obs, batch_size=cfg.env.batch_size or None, render=render,
                    levels=parse_levels(levels) if levels else None)


def build_agent(cfg: Config, env: VecEnv, device: torch.device | str = "cpu") -> Agent:
    """Turns config into constructor arguments; the library classes never see ``cfg``."""
    m, t = cfg.model, cfg.train
    precision = auto_precision(device) if t.precision == "auto" else t.precision
    vector_dim = env.obs_spec["vector"][0][0] if "vector" in env.obs_spec else 0
    wm = WorldModel(vector_dim, "image" in env.obs_spec, env.num_actions, deter=m.deter, hidden=m.hidden,
                    stoch=m.stoch, classes=m.classes, blocks=m.blocks, units=m.units, layers=m.layers,
                    cnn_mult=m.cnn_mult)
    beh = Behavior(wm.rssm.feat_dim, env.num_actions, env.discrete, units=m.units, layers=m.actor_layers,
                   gamma=t.gamma, lam=t.lam, entropy=t.entropy, cont=t.cont)
    agent = Agent(wm, beh, env.num_envs, horizon=t.horizon, discrete=env.discrete,
                  wm_opt=OptimConfig(t.wm_lr, 1e-8, t.wm_clip), actor_opt=OptimConfig(t.actor_lr, 1e-5, t.ac_clip),
                  critic_opt=OptimConfig(t.critic_lr, 1e-5, t.ac_clip), seed=t.seed, precision=precision,
                  dream_starts=t.dream_starts, engine=t.engine, compile_model=t.compile_model,
                  reward_noise=cfg.dream.reward_noise,
                  schedule=HorizonSchedule(t.horizon_mode, t.horizon, t.h_min, t.h_max, t.ramp_start, t.ramp_end,
                                           t.dream_budget))
    return agent.to(device)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(agent: Agent, cfg: Config, episodes: int, seed: int, video_frames: list | None = None,
             deterministic: bool = True, test: bool = True) -> list[float]:
    """Returns of ``episodes`` episodes, one per fresh eval env (seeded by ``seed``), acting with the
    policy's mode (``deterministic``) or sampling from it with the agent's generator (``play``).

    With ``video_frames`` a list, full-resolution frames of env 0's episode are appended to it.
    """
    dev = agent.carry_deter.device
    carry = agent.wm.rssm.initial(episodes, dev)

    def act(rows: dict[str, np.ndarray]) -> np.ndarray:
        return agent.policy(rows, rows["env_ids"], deterministic=deterministic, carry=carry)

    return play(act, cfg, episodes, seed, dev, video_frames, test)


@torch.no_grad()
def play(act: Callable[[dict[str, np.ndarray]], np.ndarray], cfg: Config, episodes: int, seed: int,
         device: torch.device | str = "cpu", video_frames: list | None = None, test: bool = True) -> list[float]:
    """Returns of ``episodes`` episodes, one per fresh env of ``cfg``'s task (seeded by ``seed``), acting with
    ``act(rows) -> env-form actions`` (it keeps its own recurrent state). Torch's RNG on ``device`` is seeded by
    ``seed`` inside a fork, so the posterior's latent draws replay for the same ``seed`` and the caller's random
    stream is untouched. With ``video_frames`` a list, env 0's full-resolution frames are appended to it. ``test``:
    on the task's test levels (a levels env with ``env.test_levels``), else its training levels."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        env = build_env(cfg, seed=seed, num_envs=episodes, render=video_frames is not None, test=test)
        rows = env.reset()
        ret = np.zeros(episodes)
        done = np.zeros(episodes, dtype=bool)
        limit = (env.max_episode_steps or 10_000) + 2
        for _ in range(limit):
            if video_frames is not None and not done[0]:
                video_frames.append(env.render_frames(np.array([0]))[0])
            rows = env.step(act(rows), rows["env_ids"])
            ids = rows["env_ids"]
            live = ~done[ids]
            ret[ids[live]] += rows["reward"][live]
            done[ids[live & rows["is_last"]]] = True
            if done.all():
                break
        env.close()
    return ret.tolist()


def load_run(run_dir: str | Path, with_replay: bool = False) -> tuple[Config, Agent, ReplayBuffer | None]:
    """A run's config, its agent as last checkpointed (on the CPU) and, with ``with_replay``, its replay; a run dir
    without a checkpoint is a ValueError naming it."""
    state, replay = checkpoint.load(Path(run_dir), with_replay=with_replay)
    cfg = Config.from_dict(state["config"])
    env = build_env(cfg, num_envs=1)
    agent = build_agent(cfg, env)
    env.close()
    agent.load_full_state(state["agent"])
    return cfg, agent, replay


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
          log_fn: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Trains an agent as ``cfg`` says; returns a TrainResult.

    ``resume`` continues ``run_dir`` with its saved config (``cfg`` may be None); ``steps`` and
    ``minutes`` then override the saved env-step and wall-clock budgets. ``stop_at_env_steps``
    checkpoints and returns once that many env steps are done, as Ctrl-C would. ``log_fn(env_steps, row)``
    sees every metrics row as it is written.
    """
    run = TrainingRun(cfg, Path(run_dir), resume, steps, minutes, progress, log_fn)
    return run.loop(stop_at_env_steps)


class TrainingRun:
    """One run's state and its named steps: ``act`` (one env step with the acting policy, rows into replay),
    ``owe``/``update_due`` (the train ratio), ``update`` (one train step on a replay batch), ``evaluate``,
    ``checkpoint``, ``log`` (a metrics row) and ``report`` (the progress line); ``loop`` strings them together."""

    def __init__(self, cfg: Config | None, run_dir: Path, resume: bool, steps: int | None, minutes: float | None,
                 progress: bool, log_fn: Callable[[int, dict[str, float]], None] | None) -> None:
        state = saved_replay = None
        self.lock = checkpoint.claim(Path(run_dir))  # one process per run directory
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
        self.cfg, self.run_dir, self.log_fn = cfg, run_dir, log_fn
        t = self.t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        self.device = resolve_device(t.device)
        # The run records the precision it ran, so a resume elsewhere keeps it (and stays bit-exact here).
        t.precision, warning = resolve_precision(t.precision, self.device)
        if warning:
            print(f"fastdream: warning: {warning}", file=sys.stderr)
        self.env = build_env(cfg)
        self.agent = build_agent(cfg, self.env, self.device)
        self.random_policy = RandomPolicy(self.env, seed=t.seed)
        self.replay = ReplayBuffer(t.replay_capacity, self.env.num_envs, self.env.replay_spec, seed=t.seed)
        self.counters = {"env_steps": 0, "updates": 0, "owed": 0.0, "last_eval": 0, "evals": 0, "skipped": 0,
                         "wall_time": 0.0}
        self.action_log: list[np.ndarray] = []
        self.last_eval: float | None = None
        self.collector = Collector(self.env, self.replay, self.random_policy)
        if state is not None:
            self._restore(state, saved_replay)
        else:
            self.collector.reset()
            self.counters["env_steps"] = self.collector.env_steps
        self.logger = Logger(run_dir, resume_at=self.counters["env_steps"] if state is not None else None)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self.bar = Progress(t.steps, enabled=progress)
        self.batch = self.replay.alloc_batch(t.batch_size, t.seq_len)
        self.t0 = time.perf_counter()
        self.wall0, self.updates0 = self.counters["wall_time"], self.counters["updates"]
        self.window = {"env_steps": self.counters["env_steps"], "updates": self.counters["updates"], "time": self.t0}
        self.returns: list[float] = []
        self.metrics_acc: dict[str, list[float]] = {}
        self.consecutive_bad = 0
        self.compiled: set[bool] = set()  # train_behavior values whose compiled graphs this process has built

    def _restore(self, state: dict[str, Any], saved_replay: ReplayBuffer | None) -> None:
        """Continues a checkpoint: weights, counters, RNG states, and the envs fast-forwarded through the logged
        actions from the same seed (EnvPool cannot be pickled)."""
        self.agent.load_full_state(state["agent"])
        self.agent.carry_deter.copy_(state["carry"][0])
        self.agent.carry_stoch.copy_(state["carry"][1])
        self.counters.update(state["counters"])
        self.last_eval = state.get("last_eval")
        if saved_replay is not None:
            self.replay = self.collector.replay = saved_replay
        self.action_log = list(state["action_log"])
        env, col = self.env, self.collector
        env.render_enabled = False
        col.rows = env.reset()
        for i, a in enumerate(self.action_log):
            env.render_enabled = i == len(self.action_log) - 1
            col.rows = env.step(a, col.rows["env_ids"])
        env.render_enabled = True
        env.pop_episodes()
        col.env_steps = self.counters["env_steps"]
        _set_rng_state(state["rng"], self.random_policy)

    # ---------------------------------------------------------------- the steps
    def wall_time(self) -> float:
        """Seconds of this run's wall clock, counted across resumes."""
        return self.wall0 + time.perf_counter() - self.t0

    @property
    def training(self) -> bool:
        """Past the random prefill: the agent acts and updates."""
        return self.counters["env_steps"] >= self.t.prefill

    def stop_reason(self, stop_flag: _StopFlag, stop_at_env_steps: int | None) -> str | None:
        """Why the run stops before its next step (None: it goes on)."""
        c, t = self.counters, self.t
        if c["env_steps"] >= t.steps:
            return "budget"
        if stop_flag.signal:
            return "interrupted"
        if stop_at_env_steps is not None and c["env_steps"] >= stop_at_env_steps:
            return "stop_at"
        if t.minutes > 0 and self.wall_time() >= 60.0 * t.minutes:
            return "time_budget"
        return None

    def act(self) -> int:
        """One step of every env with the acting policy (random during prefill), its rows into replay; returns
        the env steps taken."""
        self.collector.policy = self.agent.policy if self.training else self.random_policy
        before = self.collector.env_steps
        self.collector.step()
        if not self.env.is_async:
            self.action_log.append(self.collector.last_actions.copy())
        self.counters["env_steps"] = self.collector.env_steps
        self.returns += [r for r, _ in self.env.pop_episodes()]
        return self.collector.env_steps - before

    def owe(self, new_env_steps: int) -> None:
        """Adds the updates that ``new_env_steps`` earn at the train ratio (one update replays B·T steps)."""
        t = self.t
        if self.training and self.replay.num_windows(t.seq_len) > 0:
            self.counters["owed"] += new_env_steps * t.train_ratio / (t.batch_size * t.seq_len)

    def update_due(self) -> bool:
        """Whether an update is owed; takes it from the count (a checkpoint between updates keeps the rest)."""
        if self.counters["owed"] < 1.0:
            return False
        self.counters["owed"] -= 1.0
        return True

    def update(self) -> None:
        """One train step on a fresh replay batch; a non-finite one is skipped and counted, and too many in a row
        raise ``UnhealthyRun``. Logs and checkpoints at their intervals."""
        c, t = self.counters, self.t
        self.replay.sample(t.batch_size, t.seq_len, t.recency, out=self.batch)
        batch = {k: torch.as_tensor(v).to(self.device) for k, v in self.batch.items()}
        behave = c["updates"] >= t.warmup_updates
        if self.agent.compiled and behave not in self.compiled:  # first call of each graph
            self.compiled.add(behave)
            what = "dream rollout" if behave else "world model"
            self.bar.update(c["env_steps"], f"compiling the {what} (first call, up to a minute; cached on disk by "
                            "torch.compile for later runs)", force=True)
        m = self.agent.train_step(batch, train_behavior=behave, update=c["updates"])
        c["updates"] += 1
        if m["health/skipped"]:
            c["skipped"] += 1
            self.consecutive_bad += 1
            self.logger.write(c["env_steps"], {**m, "health/skipped_total": c["skipped"]})
            if self.consecutive_bad >= t.max_bad_updates:
                raise UnhealthyRun(
                    f"{self.consecutive_bad} consecutive updates had non-finite losses or gradients (last: {m}); "
                    f"stopped at {c['env_steps']} env steps, the last good checkpoint in "
                    f"{self.run_dir / checkpoint.CHECKPOINT_DIR} is intact")
            return
        self.consecutive_bad = 0
        for k, v in m.items():
            self.metrics_acc.setdefault(k, []).append(v)
        if c["updates"] % t.log_every == 0:
            self.log()
        if c["updates"] % t.checkpoint_every == 0:
            self.checkpoint()

    def log(self) -> None:
        """One metrics row: the means of the updates since the last row, rates, returns, wall clock."""
        c, now = self.counters, time.perf_counter()
        dt = max(now - self.window["time"], 1e-9)
        row = {k: float(np.mean(v)) for k, v in self.metrics_acc.items()}
        row.update({
            "perf/env_steps_per_s": (c["env_steps"] - self.window["env_steps"]) / dt,
            "perf/updates_per_s": (c["updates"] - self.window["updates"]) / dt,
            "progress/updates": c["updates"],
            "progress/wall_time": self.wall_time(),
            "health/skipped_total": c["skipped"],
        })
        if self.returns:
            row["episode/return"] = float(np.mean(self.returns[-100:]))
        self.write(row)
        self.metrics_acc.clear()
        self.window = {"env_steps": c["env_steps"], "updates": c["updates"], "time": now}

    def write(self, row: dict[str, Any]) -> None:
        self.logger.write(self.counters["env_steps"], row)
        if self.log_fn:
            self.log_fn(self.counters["env_steps"], row)

    def eval_due(self) -> bool:
        return self.training and self.counters["env_steps"] - self.counters["last_eval"] >= self.t.eval_every

    def evaluate(self) -> float:
        """Deterministic episodes on fresh eval envs; logs and returns their mean return."""
        c, t = self.counters, self.t
        c["last_eval"] = c["env_steps"]
        c["evals"] += 1
        rets = evaluate(self.agent, self.cfg, t.eval_episodes, seed=t.seed + 100_000 + c["evals"])
        self.last_eval = float(np.mean(rets))
        row = {"eval/return": self.last_eval, "eval/return_min": min(rets), "eval/return_max": max(rets),
               "progress/updates": c["updates"], "progress/wall_time": self.wall_time()}
        if self.cfg.env.test_levels:  # the generalisation gap: the same policy on the levels it trains on
            train_rets = evaluate(self.agent, self.cfg, t.eval_episodes, seed=t.seed + 300_000 + c["evals"],
                                  test=False)
            row["eval/train_levels_return"] = float(np.mean(train_rets))
        self.write(row)
        if t.dream_every and (c["evals"] - 1) % t.dream_every == 0 and self.logger.tensorboard:
            self.log_dream(seed=t.seed + 200_000 + c["evals"])
        return self.last_eval

    def log_dream(self, seed: int) -> None:
        """TensorBoard: one open-loop dream of H steps beside the real env it predicts (a fresh env): the frames (real
        above, dreamed below) for pixel runs, the observation, reward and continue curves for vector ones."""
        from fastdream.run.dream_view import dream_prediction, dream_strip, held_out_sequences

        h = self.t.horizon
        seq = held_out_sequences(self.agent, self.cfg, 1, h + 9, seed=seed)
        try:
            pred = dream_prediction(self.agent, seq, h, seed=seed)
        except ValueError:  # the episode ended inside the window: no dream this time
            return
        step = self.counters["env_steps"]
        if "real_image" in pred:
            self.logger.add_image("dream/frames", dream_strip(pred), step)
        try:
            from fastdream.run.plots import plot_dream

            self.logger.add_image("dream/curves", plot_dream(pred), step)
        except ImportError:  # matplotlib is the [plot] extra
            pass

    def checkpoint(self) -> Path:
        """Writes the checkpoint atomically (weights, optimisers, counters, RNG states, carry, action log, replay)."""
        c = self.counters
        c["wall_time"] = self.wall_time()
        st = {"config": self.cfg.to_dict(), "agent": self.agent.full_state(), "counters": dict(c),
              "carry": (self.agent.carry_deter.cpu().clone(), self.agent.carry_stoch.cpu().clone()),
              "rng": _rng_state(self.random_policy), "action_log": self.action_log if not self.env.is_async else [],
              "last_eval": self.last_eval}
        return checkpoint.save(self.run_dir, st, self.replay if self.t.save_replay else None)

    def report(self, force: bool = False) -> None:
        """The progress line: env steps, training and eval returns, updates and their rate."""
        c = self.counters
        ups = (c["updates"] - self.updates0) / max(time.perf_counter() - self.t0, 1e-9)
        ret_txt = f"{np.mean(self.returns[-100:]):.1f}" if self.returns else "-"
        ev_txt = f"{self.last_eval:.1f}" if self.last_eval is not None else "-"
        self.bar.update(c["env_steps"], f"return {ret_txt}  eval {ev_txt}  updates {c['updates']}"
                        + (f" ({ups:.1f}/s)" if ups else ""), force=force)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
        self.env.close()
        self.lock.close()

    # ---------------------------------------------------------------- the loop
    def loop(self, stop_at_env_steps: int | None = None) -> TrainResult:
        """Acts, updates at the train ratio, evaluates, until solved, out of budget or interrupted (Ctrl-C and
        SIGTERM stop it between steps); then checkpoints and summarises."""
        stop = _StopFlag()
        old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while (stopped := self.stop_reason(stop, stop_at_env_steps)) is None:
                self.owe(self.act())
                while self.update_due():
                    self.update()
                evaluated = self.eval_due()
                if evaluated and self.evaluate() >= self.cfg.env.target_return:
                    stopped = "solved"
                    break
                self.report(force=evaluated)  # a plain-line log gets a line after every eval
        except (UnhealthyRun, checkpoint.CheckpointError):
            self.close()
            raise
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return self.finish(stopped)

    def finish(self, stopped: str) -> TrainResult:
        self.bar.close()
        try:
            ck_path = self.checkpoint()
        except checkpoint.CheckpointError:
            self.close()
            raise
        c = self.counters
        wall = c["wall_time"]  # the time the checkpoint holds, so a resume continues from the reported figure
        self.logger.write(c["env_steps"], {
            "summary/eval_return": self.last_eval if self.last_eval is not None else float("nan"),
            "summary/env_steps": c["env_steps"], "summary/updates": c["updates"], "summary/wall_time": wall,
            "summary/stopped": stopped})
        self.logger.close()
        self.env.close()
        self.lock.close()
        return TrainResult(eval_return=self.last_eval, env_steps=c["env_steps"], updates=c["updates"],
                           wall_time=wall, solved=stopped == "solved", stopped=stopped, run_dir=self.run_dir,
                           checkpoint=ck_path, metrics=self.run_dir / "metrics.jsonl")
