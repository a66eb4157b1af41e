import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from fastdream.run import checkpoint
from fastdream.run.config import Config, apply
from fastdream.run.train import UnhealthyRun, train

SMALL = {"model.deter": 32, "model.hidden": 32, "model.units": 32, "model.stoch": 8, "model.classes": 4,
         "model.blocks": 4, "train.horizon": 5, "env.num_envs": 4, "train.batch_size": 2, "train.seq_len": 8,
         "train.prefill": 64, "train.train_ratio": 4.0, "train.warmup_updates": 5, "train.steps": 320,
         "train.eval_every": 10**9, "train.checkpoint_every": 20, "train.log_every": 5,
         "train.replay_capacity": 4 * 200, "train.wm_lr": 1e-3, "train.actor_lr": 1e-3, "train.critic_lr": 1e-3}


def weights(run_dir):
    state, replay = checkpoint.load(run_dir)
    return state, replay


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = apply(Config(), SMALL)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_at_env_steps=160)
    assert part.stopped == "stop_at" and part.env_steps == 160
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert full.updates == resumed.updates > 50
    assert full.env_steps == resumed.env_steps == 320
    sa, ra = weights(tmp_path / "full")
    sb, rb = weights(tmp_path / "part")
    ma, mb = sa["agent"]["model"], sb["agent"]["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for k in ("wm", "actor", "critic"):
        ea, eb = sa["agent"]["opts"][k]["state"], sb["agent"]["opts"][k]["state"]
        assert all(torch.equal(ea[i]["exp_avg"], eb[i]["exp_avg"]) for i in ea)
    for name in ra.spec:
        np.testing.assert_array_equal(ra.storage(name), rb.storage(name))
    assert sa["counters"]["updates"] == sb["counters"]["updates"]
    # The metrics file has loss, KL, entropy, return-normaliser and speed columns.
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for k in ("wm/loss", "wm/dyn", "wm/rep", "wm/kl", "wm/rec_vector", "wm/reward", "wm/cont",
              "behavior/entropy", "behavior/return", "behavior/value", "behavior/retnorm_scale",
              "grad/wm_norm", "grad/actor_norm", "perf/env_steps_per_s", "perf/updates_per_s", "summary/env_steps"):
        assert k in keys, k
    assert list((tmp_path / "full" / "tb").iterdir()), "no TensorBoard events"


def test_wall_clock_budget_stops_the_run_and_counts_across_resume(tmp_path):
    cfg = apply(Config(), {**SMALL, "train.minutes": 1e-4})  # 6 ms: stops long before 320 env steps
    first = train(cfg, tmp_path / "run", progress=False)
    assert first.stopped == "time_budget" and 0 < first.env_steps < 320 and first.wall_time >= 0.006
    # The spent time is saved: resuming under the same budget stops at once, where it was.
    again = train(None, tmp_path / "run", resume=True, progress=False)
    assert again.stopped == "time_budget" and again.env_steps == first.env_steps
    assert again.wall_time >= first.wall_time
    # A resume may lift the budget (0: none); the run then finishes its env-step budget.
    rest = train(None, tmp_path / "run", resume=True, progress=False, minutes=0)
    assert rest.stopped == "budget" and rest.env_steps == 320


def test_checkpoint_is_small_and_holds_no_duplicate_tensors(tmp_path):
    cfg = apply(Config(), {**SMALL, "train.steps": 160, "train.save_replay": False})
    train(cfg, tmp_path / "run", progress=False)
    state, replay = checkpoint.load(tmp_path / "run")
    assert replay is None
    model = state["agent"]["model"]
    ptrs = [t.untyped_storage().data_ptr() for t in model.values()]
    assert len(ptrs) == len(set(ptrs))
    n_params = sum(t.numel() for t in model.values())
    size = (tmp_path / "run" / "checkpoint" / "state.pt").stat().st_size
    # weights + 2 Adam moments ~ 3 x 4 bytes per parameter, plus the action log and small extras.
    assert size < 3 * 4 * n_params * 1.3 + 200_000


class NaNAfter50(gym.Wrapper):
    """CartPole whose observations turn NaN after 50 steps (a broken simulator)."""

    def __init__(self, **kwargs):
        super().__init__(gym.make("CartPole-v1", **kwargs))
        self.t = 0

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self.t += 1
        if self.t > 50:
            obs = np.full_like(obs, np.nan)
        return obs, r, term, trunc, info


def test_repeated_non_finite_updates_stop_the_run_with_last_checkpoint_intact(tmp_path):
    env_id = "fastdream-test/NaNCartPole-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=NaNAfter50, max_episode_steps=10_000)
    cfg = apply(Config(), {**SMALL, "env.id": env_id, "env.num_envs": 1, "train.prefill": 16,
                           "train.train_ratio": 16.0, "train.max_bad_updates": 3, "train.checkpoint_every": 1,
                           "train.replay_capacity": 1000})
    with pytest.raises(UnhealthyRun, match="3 consecutive updates had non-finite"):
        train(cfg, tmp_path / "run", progress=False)
    state, _ = checkpoint.load(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in state["agent"]["model"].values() if t.is_floating_point())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("health/skipped", 0) for r in rows) == 3
