"""Every knob as a dataclass field (the comment after it is its help), plus presets and ``--set``."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EnvConfig:
    id: str = "CartPole-v1"  # EnvPool or gymnasium id
    num_envs: int = 64  # parallel training envs
    obs: str = "vector"  # vector | pixels | both
    batch_size: int = 0  # async EnvPool batch (0 = synchronous)
    target_return: float = 475.0  # mean eval return that counts as solved (stops the run)
    levels: str = ""  # levels env (data/levels.py): training levels "first:end" ("": the env's own, 0:200)
    test_levels: str = ""  # levels env: the levels evaluations run on, e.g. "1000000:1000100" ("": training's)


@dataclass
class ModelConfig:
    deter: int = 128  # RSSM deterministic state size
    hidden: int = 128  # RSSM hidden units
    stoch: int = 32  # categorical latents
    classes: int = 16  # classes per latent
    blocks: int = 8  # block-GRU groups
    units: int = 128  # MLP units (encoder, decoder, heads, actor, critic)
    layers: int = 1  # MLP layers in encoder/decoder/heads
    actor_layers: int = 2  # MLP layers of actor and critic
    cnn_mult: int = 16  # CNN channel multiplier for pixels


@dataclass
class TrainConfig:
    steps: int = 300_000  # env-step budget
    minutes: float = 0.0  # wall-clock budget in minutes, counted across resumes (0: none)
    train_ratio: float = 64.0  # replayed steps per env step (updates per env step = ratio / (B*T))
    batch_size: int = 16  # B sequences per update
    seq_len: int = 64  # T steps per sequence
    prefill: int = 5_000  # random-policy env steps before training
    warmup_updates: int = 100  # world-model-only updates before the actor and critic train
    horizon: int = 15  # imagination horizon H
    dream_starts: int = 0  # dreams per update from the B*T posterior states (0: one from each; more: drawn again)
    horizon_mode: str = "fixed"  # fixed | ramp (h_min -> h_max) | budget (N*H = dream_budget)
    h_min: int = 1  # ramp: horizon at ramp_start
    h_max: int = 15  # ramp: horizon from ramp_end on
    ramp_start: int = 0  # ramp: first update of the ramp
    ramp_end: int = 20_000  # ramp: last update of the ramp
    dream_budget: int = 15_360  # budget: imagined steps N*H per update
    engine: str = "auto"  # dream engine: auto | eager | kernels | compile | triton | cudagraph (dream/engines.py)
    compile_model: bool = False  # torch.compile the world model's posterior steps, image nets and critic passes
    gamma: float = 1 - 1 / 333  # discount
    lam: float = 0.95  # lambda of lambda-returns
    cont: str = "prob"  # prob | mode: the continue head's probability or its mode (DreamerV3) discounts lambda-returns
    entropy: float = 3e-4  # actor entropy scale
    wm_lr: float = 1e-4  # world-model learning rate
    actor_lr: float = 3e-5  # actor learning rate
    critic_lr: float = 3e-5  # critic learning rate
    wm_clip: float = 1000.0  # world-model gradient clip (global norm)
    ac_clip: float = 100.0  # actor/critic gradient clip
    replay_capacity: int = 1_000_000  # replay rows over all envs
    recency: float = 0.0  # replay recency mix in [0, 1]
    eval_every: int = 10_000  # env steps between evaluations
    eval_episodes: int = 10  # episodes per evaluation
    checkpoint_every: int = 500  # updates between checkpoints
    save_replay: bool = True  # save the replay beside checkpoints
    log_every: int = 50  # updates between metric rows
    dream_every: int = 5  # evals between TensorBoard pictures of a dream beside the real env (0: none; ~0.4 s each)
    max_bad_updates: int = 10  # consecutive skipped updates before the run stops
    seed: int = 0  # seed of envs, networks, sampling
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 (autocast of the update's forward passes; auto: fast/precision.py)
    threads: int = 0  # torch CPU threads (0 = all cores)


@dataclass
class DreamConfig:
    reward_noise: float = 0.0  # std of zero-mean Gaussian noise added to every imagined reward (0: none)


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        cfg = cls()
        for section, values in d.items():
            sub = getattr(cfg, section)
            for k, v in values.items():
                setattr(sub, k, v)
        return cfg


SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"model.deter": 128, "model.hidden": 128, "model.units": 128, "model.layers": 1,
             "model.classes": 16, "model.cnn_mult": 16},
    # DreamerV3 paper sizes.
    "xs": {"model.deter": 256, "model.hidden": 256, "model.units": 256, "model.layers": 1,
           "model.classes": 32, "model.cnn_mult": 24},
    "s": {"model.deter": 512, "model.hidden": 512, "model.units": 512, "model.layers": 2,
          "model.classes": 32, "model.cnn_mult": 32},
}

# The long tasks' settings: compiled dreams and posterior steps (~1 min of compiling first); bf16 where auto says so.
_COMPILED = {"train.engine": "compile", "train.compile_model": True}
# Learning rates above DreamerV3's defaults: the tiny model on these short tasks learns faster with them.
_FAST_LR = {"train.wm_lr": 3e-4, "train.actor_lr": 1e-4, "train.critic_lr": 1e-4}
# Pixel variants: 16 envs (rendering dominates env cost), a smaller replay (1 row = 12 kB), ratio 64.
_PIXELS = {"env.obs": "pixels", "env.num_envs": 16, "train.replay_capacity": 200_000, "train.train_ratio": 64.0}

TASKS: dict[str, dict[str, Any]] = {
    # docs/results.md: 8 envs and T=32 windows give a first batch after 1,024 random steps (64 envs x T=64 needed
    # 4,096); with 3x-10x DreamerV3's learning rates seed 0 solved at 8k env steps and 438 updates.
    "cartpole": {"env.id": "CartPole-v1", "env.target_return": 475.0, "env.num_envs": 8, "train.steps": 100_000,
                 "train.train_ratio": 32.0, "train.seq_len": 32, "train.prefill": 1_024, "train.warmup_updates": 50,
                 "train.eval_every": 1_000, "train.eval_episodes": 30, "train.dream_starts": 256,
                 "train.wm_lr": 1e-3, "train.actor_lr": 5e-4, "train.critic_lr": 5e-4,
                 # The tiny model's update is no faster in bf16 (236 against 232 ms on a Zen 4), and its runs are fp32.
                 "train.precision": "fp32"},
    # Solved LunarLander-v3 (209.2 over 10 eval episodes) in 300k env steps, 9,076 updates, 84.6 min here
    # with the xs model and bf16 updates; the tiny model plateaued at 160-186 in 90 minutes.
    "lunarlander": {"env.id": "LunarLander-v3", "env.target_return": 200.0, "train.steps": 1_000_000,
                    "train.train_ratio": 32.0, "train.prefill": 10_000, "train.eval_every": 20_000,
                    "train.dream_starts": 512, **_FAST_LR, **SIZES["xs"], **_COMPILED},
}
# Solved CartPole-v1 from pixels (457.5) in 50k env steps, 5,624 updates, 65.0 min here (compile engine, bf16).
# T=32: the image nets are most of a pixel update, so half-length windows give ~2x the updates per minute
# at the same train ratio; with T=64 the same run had eval 171 after 85 min.
TASKS["cartpole-pixels"] = {"env.id": "CartPole-v1", "env.target_return": 400.0, "train.steps": 400_000,
                            "train.prefill": 5_000, "train.eval_every": 10_000, "train.dream_starts": 256,
                            "train.seq_len": 32, **_FAST_LR, **_PIXELS, **_COMPILED}
TASKS["lunarlander-pixels"] = {**TASKS["lunarlander"], **_PIXELS}
PRESETS: dict[str, dict[str, Any]] = {**TASKS, **SIZES}
# The env ids with a task preset of their own; any other id gets ``generic_preset``.
TASK_OF_ENV = {"CartPole-v1": "cartpole", "LunarLander-v3": "lunarlander"}


def generic_preset(env_id: str, obs: str, reward_threshold: float | None) -> dict[str, Any]:
    """The task preset of an env without one (``data.envs.env_facts`` reads its arguments from the env): CartPole's
    settings, the pixel variant's where ``obs`` is pixels or both, and the env's ``reward_threshold`` as the target
    (where it has none, an infinite one: the run spends its budget). The encoders follow ``obs`` and the actor the
    action space when the agent is built."""
    base = TASKS["cartpole-pixels"] if obs in ("pixels", "both") else TASKS["cartpole"]
    target = float("inf") if reward_threshold is None else float(reward_threshold)
    return {**base, "env.id": env_id, "env.obs": obs, "env.target_return": target, "train.steps": 500_000,
            "train.eval_every": max(base["train.eval_every"], 2_000)}


def valid_keys() -> list[str]:
    cfg = Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def _parse_value(key: str, text: str, current: Any) -> Any:
    kind = type(current)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"bad value {text!r} for {key} (expected {kind.__name__})") from None


def apply(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Returns a copy of ``cfg`` with ``{"section.field": value}`` applied (values typed already)."""
    cfg = copy.deepcopy(cfg)
    keys = valid_keys()
    for key, value in overrides.items():
        if key not in keys:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(keys)}")
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def apply_presets(cfg: Config, names: list[str | dict[str, Any]]) -> Config:
    """Applies presets in order (e.g. ``["lunarlander", "xs"]``); a dict is a preset itself (``generic_preset``)."""
    for name in names:
        if isinstance(name, dict):
            cfg = apply(cfg, name)
            continue
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        cfg = apply(cfg, PRESETS[name])
    return cfg


def task_presets(given: list[str], env_id: str, obs: str | None = None) -> list[str | dict[str, Any]]:
    """The presets to apply, in order: every name in ``given`` (each may be comma-separated), after the env's task
    preset unless a task preset is among them (so ``xs`` on LunarLander keeps its task settings). An env without a
    task preset gets ``generic_preset``, built from its spaces and reward threshold."""
    presets: list[str | dict[str, Any]] = [p.strip() for item in given for p in item.split(",") if p.strip()]
    if not any(p in TASKS for p in presets):
        if env_id in TASK_OF_ENV:
            presets.insert(0, TASK_OF_ENV[env_id] + ("-pixels" if obs in ("pixels", "both") else ""))
        else:
            from fastdream.data.envs import env_facts

            facts = env_facts(env_id)
            presets.insert(0, generic_preset(env_id, obs or facts["obs"], facts["reward_threshold"]))
    return presets


def apply_sets(cfg: Config, items: list[str]) -> Config:
    """Applies ``--set section.field=value`` strings, parsing each value as the field's type."""
    return apply(cfg, parse_sets(items))


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set section.field=value`` strings as typed overrides ``{"section.field": value}``."""
    cfg = Config()
    keys = valid_keys()
    parsed = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects section.field=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(keys)}")
        section, name = key.split(".")
        parsed[key] = _parse_value(key, text, getattr(getattr(cfg, section), name))
    return parsed


def validate(cfg: Config) -> None:
    """Raises ValueError naming the first out-of-range value (imports no torch)."""
    from fastdream.dream.engines import ENGINES
    from fastdream.dream.schedule import HorizonSchedule

    e, m, t = cfg.env, cfg.model, cfg.train
    checks = [
        (e.num_envs >= 1, "env.num_envs must be >= 1", e.num_envs),
        (e.obs in ("vector", "pixels", "both"), "env.obs must be vector, pixels or both", e.obs),
        (t.batch_size >= 1 and t.seq_len >= 2, "train.batch_size >= 1 and train.seq_len >= 2",
         (t.batch_size, t.seq_len)),
        (t.train_ratio > 0, "train.train_ratio must be > 0", t.train_ratio),
        (t.horizon >= 1, "train.horizon must be >= 1", t.horizon),
        (t.minutes >= 0, "train.minutes must be >= 0 (0: no wall-clock budget)", t.minutes),
        (t.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda", t.device),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16", t.precision),
        (t.engine in ENGINES, f"train.engine must be one of {', '.join(ENGINES)}", t.engine),
        (t.horizon_mode in ("fixed", "ramp", "budget"), "train.horizon_mode must be fixed, ramp or budget",
         t.horizon_mode),
        (m.deter % m.blocks == 0, "model.deter must be divisible by model.blocks", (m.deter, m.blocks)),
        (t.replay_capacity // e.num_envs >= t.seq_len, "train.replay_capacity // env.num_envs must be >= "
         "train.seq_len", (t.replay_capacity, e.num_envs, t.seq_len)),
        (0.0 <= t.recency <= 1.0, "train.recency must be in [0, 1]", t.recency),
        (t.cont in ("prob", "mode"), "train.cont must be prob or mode", t.cont),
        (t.eval_episodes >= 1, "train.eval_episodes must be >= 1", t.eval_episodes),
        (t.dream_every >= 0, "train.dream_every must be >= 0 (0: no dream pictures)", t.dream_every),
        (cfg.dream.reward_noise >= 0 and math.isfinite(cfg.dream.reward_noise),
         "dream.reward_noise must be a finite number >= 0", cfg.dream.reward_noise),
    ]
    for ok, msg, got in checks:
        if not ok:
            raise ValueError(f"{msg}, got {got!r}")
    for name in ("levels", "test_levels"):
        if getattr(e, name):
            from fastdream.data.levels import parse_levels

            try:
                parse_levels(getattr(e, name))
            except ValueError as exc:
                raise ValueError(f"env.{name}: {exc}") from None
    HorizonSchedule(t.horizon_mode, t.horizon, t.h_min, t.h_max, t.ramp_start, t.ramp_end, t.dream_budget)
