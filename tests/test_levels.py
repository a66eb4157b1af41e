import gymnasium as gym
import numpy as np
import pytest
from tiny import TINY_RUN

from fastdream.data.envs import make_env
from fastdream.data.levels import CARTPOLE_LEVELS_ID, PHYSICS, CartPoleLevels, level_physics, parse_levels
from fastdream.run.config import Config, apply, validate
from fastdream.run.logger import read_rows
from fastdream.run.train import train


def test_each_level_fixes_its_own_physics_within_the_documented_ranges():
    a, again, b = level_physics(3), level_physics(3), level_physics(1_000_003)
    assert a == again and a != b
    for phys in (level_physics(n) for n in range(200)):
        assert all(lo <= phys[k] <= hi for k, (lo, hi) in PHYSICS.items())
    lengths = [level_physics(n)["length"] for n in range(200)]
    assert max(lengths) - min(lengths) > 0.5  # the levels really differ (range 0.25-1)
    with pytest.raises(ValueError, match="a level is an int >= 0, got -1"):
        level_physics(-1)
    assert parse_levels("10:20") == (10, 20)
    for bad in ("5", "3:3", "a:b", "-1:4"):
        with pytest.raises(ValueError, match="levels must"):
            parse_levels(bad)


def test_the_levels_env_draws_its_level_per_episode_and_steps_that_physics():
    env = CartPoleLevels(levels=(1_000_000, 1_000_010))
    seen = set()
    for i in range(20):
        obs, info = env.reset(seed=i)
        assert 1_000_000 <= info["level"] < 1_000_010 and env.level == info["level"]
        assert env.length == level_physics(info["level"])["length"] and env.polemass_length == env.masspole * env.length
        seen.add(info["level"])
    assert len(seen) > 3
    # The same seeded episode replays: same level, same observations.
    first = [env.reset(seed=5)[0]] + [env.step(1)[0] for _ in range(5)]
    second = [env.reset(seed=5)[0]] + [env.step(1)[0] for _ in range(5)]
    np.testing.assert_array_equal(np.stack(first), np.stack(second))
    # Against CartPole-v1 from the same start state and actions, the level's physics moves the pole differently.
    plain = gym.make("CartPole-v1").unwrapped
    plain.reset(seed=5)
    plain.state = np.array(first[0], dtype=np.float64)
    other = [plain.step(1)[0] for _ in range(5)]
    assert np.abs(np.stack(other) - np.stack(first[1:])).max() > 0.01
    assert gym.spec(CARTPOLE_LEVELS_ID).max_episode_steps == 500


def test_levels_reach_the_env_and_only_a_levels_env():
    env = make_env(CARTPOLE_LEVELS_ID, 3, seed=0, levels=(7, 8))
    rows = env.reset()
    assert rows["vector"].shape == (3, 4)
    env.step(np.zeros(3, dtype=np.int64))
    assert [e.unwrapped.level for e in env._env.envs] == [7, 7, 7]
    env.close()
    with pytest.raises(ValueError, match="'CartPole-v1' has no levels; levels are for fastdream/CartPoleLevels-v1"):
        make_env("CartPole-v1", 2, levels=(0, 4))
    with pytest.raises(ValueError, match="env.test_levels: levels must be 'first:end'"):
        validate(apply(Config(), {"env.id": CARTPOLE_LEVELS_ID, "env.test_levels": "1e6"}))


def test_a_run_with_test_levels_evaluates_on_them_and_on_its_training_levels(tmp_path):
    cfg = apply(Config(), {**TINY_RUN, "env.id": CARTPOLE_LEVELS_ID, "env.levels": "0:4",
                           "env.test_levels": "1000000:1000010", "train.steps": 128, "train.eval_every": 64,
                           "train.eval_episodes": 3, "train.dream_every": 0})
    train(cfg, tmp_path / "run", progress=False)
    evals = [r for r in read_rows(tmp_path / "run" / "metrics.jsonl") if "eval/return" in r]
    assert evals and all(r["eval/train_levels_return"] >= 8 and r["eval/return"] >= 8 for r in evals)
