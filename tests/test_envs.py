import gymnasium as gym
import numpy as np
import pytest

from fastdream import ReplayBuffer, make_env
from fastdream.data.collector import Collector, RandomPolicy


def balance(rows):
    """A PD controller that keeps CartPole up for the full 500 steps."""
    v = rows["vector"]
    return ((v[:, 2] + 0.5 * v[:, 3] + 0.05 * v[:, 0] + 0.1 * v[:, 1]) > 0).astype(np.int64)


def check_boundaries(trace):
    """Every row after an is_last row of the same env is is_first with reward 0, and vice versa."""
    prev_last = {}
    n_first = 0
    for rows in trace:
        for i, e in enumerate(rows["env_ids"]):
            expected_first = prev_last.get(int(e), True)
            assert rows["is_first"][i] == expected_first, (e, i)
            if rows["is_first"][i]:
                n_first += 1
                assert rows["reward"][i] == 0.0
                assert not rows["is_last"][i] and not rows["is_terminal"][i]
            if rows["is_terminal"][i]:
                assert rows["is_last"][i]
            prev_last[int(e)] = bool(rows["is_last"][i])
    return n_first


def test_cartpole_rows_follow_episode_boundary_rules():
    env = make_env("CartPole-v1", 8, seed=0)
    assert env.backend == "envpool"
    assert env.obs_spec["vector"] == ((4,), "float32")
    rows = env.reset()
    assert rows["is_first"].all() and (rows["reward"] == 0).all()
    trace = [rows]
    rng = np.random.default_rng(0)
    for _ in range(200):
        trace.append(env.step(rng.integers(0, 2, 8)))
    n_first = check_boundaries(trace)
    eps = env.pop_episodes()
    assert n_first == 8 + len(eps) - sum(bool(trace[-1]["is_last"][i]) for i in range(8))
    assert len(eps) > 30  # random CartPole episodes last ~22 steps
    # CartPole pays 1 per step, including the terminal one: return == length.
    assert all(ret == length for ret, length in eps)
    assert 10 < np.mean([r for r, _ in eps]) < 40


def test_cartpole_truncation_at_500_is_not_terminal():
    env = make_env("CartPole-v1", 2, seed=1)
    rows = env.reset()
    lasts = []
    for t in range(502):
        rows = env.step(balance(rows))
        if rows["is_last"].any():
            lasts.append((t, rows["is_terminal"].copy(), rows["reward"].copy()))
        if t == 500:
            assert rows["is_first"].all() and (rows["reward"] == 0).all()
    assert len(lasts) == 1
    t, term, reward = lasts[0]
    assert t == 499  # the 500th step
    assert not term.any() and (reward == 1.0).all()
    assert env.pop_episodes() == [(500.0, 500), (500.0, 500)]


def test_termination_is_terminal():
    env = make_env("CartPole-v1", 1, seed=0)
    env.reset()
    for _ in range(100):
        rows = env.step(np.array([1]))  # always push right: the pole falls within ~10 steps
        if rows["is_last"][0]:
            break
    assert rows["is_terminal"][0] and rows["is_last"][0]
    assert env.pop_episodes()[0][1] < 30


def test_pixels_are_64x64_uint8_frames():
    env = make_env("CartPole-v1", 3, seed=0, obs="both")
    assert env.obs_spec["image"] == ((64, 64, 3), "uint8")
    rows = env.reset()
    img = rows["image"]
    assert img.shape == (3, 64, 64, 3) and img.dtype == np.uint8
    assert img.std() > 10  # a rendered cart and pole on white, not a blank frame
    rows2 = env.step(np.array([1, 1, 1]))
    rows3 = env.step(np.array([1, 1, 1]))
    assert not np.array_equal(rows2["image"], rows3["image"])  # the cart moves
    assert rows3["vector"].shape == (3, 4)


def test_continuous_actions_are_rescaled_from_unit_box():
    # Pendulum torque is in [-2, 2]; its reward has a -0.001 u^2 term on the pre-step state, so
    # from identical states, a = +1 (u = 2) must pay exactly 0.004 more than a = 0 (u = 0).
    env_a = make_env("Pendulum-v1", 2, seed=3)
    env_b = make_env("Pendulum-v1", 2, seed=3)
    assert env_a.action_space == gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    ra, rb = env_a.reset(), env_b.reset()
    np.testing.assert_array_equal(ra["vector"], rb["vector"])
    ra = env_a.step(np.array([[1.0], [-1.0]], np.float32))
    rb = env_b.step(np.array([[0.0], [0.0]], np.float32))
    np.testing.assert_allclose(rb["reward"] - ra["reward"], [0.004, 0.004], atol=1e-5)
    with pytest.raises(ValueError, match=r"continuous actions must be \[n, 1\]"):
        env_a.step(np.zeros((2, 3), np.float32))


def test_async_envpool_returns_env_ids_and_keeps_per_env_boundaries():
    env = make_env("CartPole-v1", 8, seed=0, batch_size=4)
    assert env.is_async
    rows = env.reset()
    trace = [rows]
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rows["env_ids"]
        assert len(ids) == 4 and len(set(ids.tolist())) == 4
        assert ((ids >= 0) & (ids < 8)).all()
        seen.update(ids.tolist())
        rows = env.step(rng.integers(0, 2, 4), ids)
        trace.append(rows)
    assert seen == set(range(8))
    check_boundaries(trace)
    with pytest.raises(ValueError, match="needs the env_ids"):
        env.step(np.zeros(4, np.int64))


def test_gymnasium_fallback_for_ids_envpool_lacks():
    env_id = "fastdream-test/CartPoleGym-v1"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                     max_episode_steps=500)
    env = make_env(env_id, 3, seed=0, obs="both")
    assert env.backend == "gymnasium"
    rows = env.reset()
    trace = [rows]
    for _ in range(60):
        trace.append(env.step(np.ones(3, np.int64)))
    assert check_boundaries(trace) > 3
    assert trace[-1]["image"].shape == (3, 64, 64, 3)


def test_unknown_id_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown environment id 'CartPol-v1'.*CartPole-v1"):
        make_env("CartPol-v1", 2)
    with pytest.raises(ValueError, match="obs must be one of"):
        make_env("CartPole-v1", 2, obs="rgb")
    with pytest.raises(ValueError, match="batch_size must be an int in"):
        make_env("CartPole-v1", 2, batch_size=3)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_collector_writes_rows_with_the_action_that_led_to_them(batch_size):
    env = make_env("CartPole-v1", 8, seed=0, batch_size=batch_size)
    rb = ReplayBuffer(8 * 500, 8, env.replay_spec)
    col = Collector(env, rb, RandomPolicy(env, seed=0))
    col.collect(1000)
    assert len(rb) == col.env_steps >= 1000
    counts = rb.counts()
    assert counts.sum() == len(rb)
    for e in range(8):
        c = counts[e]
        first = rb.storage("is_first")[e, :c]
        action = rb.storage("action")[e, :c]
        assert first[0]
        np.testing.assert_array_equal(action[first], 0.0)  # reset rows carry no action
        np.testing.assert_array_equal(action[~first].sum(-1), 1.0)  # one-hot elsewhere
        # The vector obs moves in the direction of the stored action: x_dot rises after 'right'.
        v = rb.storage("vector")[e, :c]
        cont = ~first[1:]
        dv = v[1:, 1] - v[:-1, 1]
        right = action[1:, 1] == 1
        assert (dv[cont & right] > 0).all() and (dv[cont & ~right] < 0).all()


def test_sync_step_with_permuted_env_ids_applies_each_action_to_its_env():
    env = make_env("CartPole-v1", 4, seed=0)
    env.reset()
    ids = np.array([3, 1, 0, 2])
    actions = np.array([1, 0, 0, 1])  # env 3 and env 2 pushed right, envs 1 and 0 left
    rows = env.step(actions, ids)
    by_env = dict(zip(rows["env_ids"].tolist(), rows["action"].argmax(-1).tolist(), strict=True))
    assert by_env == {3: 1, 1: 0, 0: 0, 2: 1}
    v = dict(zip(rows["env_ids"].tolist(), rows["vector"][:, 1].tolist(), strict=True))
    assert v[3] > 0 and v[2] > 0 and v[1] < 0 and v[0] < 0  # cart velocity follows the push
