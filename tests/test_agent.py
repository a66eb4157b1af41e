import numpy as np
import pytest
import torch

from fastdream import ReplayBuffer, make_env
from fastdream.data.collector import Collector, RandomPolicy
from fastdream.run.config import Config, apply
from fastdream.run.train import build_agent

TINY = {"model.deter": 32, "model.hidden": 32, "model.units": 32, "model.stoch": 8, "model.classes": 4,
        "model.blocks": 4, "model.cnn_mult": 4, "train.horizon": 5}


def collect_batch(env, B=2, T=8):
    rb = ReplayBuffer(env.num_envs * 200, env.num_envs, env.replay_spec, seed=0)
    col = Collector(env, rb, RandomPolicy(env, seed=0))
    col.collect(env.num_envs * (T + 4))
    return {k: torch.as_tensor(v) for k, v in rb.sample(B, T).items()}


@pytest.mark.parametrize("env_id, obs", [
    ("CartPole-v1", "vector"), ("CartPole-v1", "pixels"), ("CartPole-v1", "both"),
    ("Pendulum-v1", "vector"), ("Pendulum-v1", "pixels"), ("Pendulum-v1", "both"),
])
def test_shapes_and_one_update(env_id, obs):
    torch.manual_seed(0)
    env = make_env(env_id, 2, seed=0, obs=obs)
    cfg = apply(Config(), {**TINY, "env.id": env_id, "env.obs": obs, "env.num_envs": 2})
    agent = build_agent(cfg, env)
    batch = collect_batch(env)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    m = agent.train_step(batch)
    assert m["health/skipped"] == 0.0
    for key in ("wm/loss", "wm/reward", "wm/cont", "wm/dyn", "wm/rep", "behavior/actor_loss",
                "behavior/critic_loss", "behavior/entropy", "grad/wm_norm", "grad/actor_norm"):
        assert np.isfinite(m[key]), key
    assert ("wm/rec_vector" in m) == (obs != "pixels")
    assert ("wm/rec_image" in m) == (obs != "vector")
    after = agent.state_dict()
    for prefix in ("wm.rssm.", "wm.reward_head.", "behavior.actor.", "behavior.critic."):
        changed = [k for k in after if k.startswith(prefix) and not torch.equal(after[k], before[k])]
        assert changed, f"no parameter under {prefix} changed"
    # The slow critic moved 2 % of the way toward the critic.
    k = "behavior.slow_critic.net.body.0.weight"
    torch.testing.assert_close(after[k], before[k] + 0.02 * (after[k.replace("slow_critic", "critic")] - before[k]),
                               rtol=0, atol=1e-3)
    # Acting: one env-form action per env, in the action space.
    rows = env.reset()
    actions = agent.policy(rows, rows["env_ids"])
    if env.discrete:
        assert actions.shape == (2,) and set(actions.tolist()) <= {0, 1}
    else:
        assert actions.shape == (2, 1) and (np.abs(actions) <= 1).all()
    env.step(actions)


def test_update_of_conv_weights_equals_plain_adam():
    """The agent's world-model step (fused Adam, clipping) moves every weight, conv weights included,
    exactly as torch's plain per-tensor Adam does with the same gradients. Conv weight gradients come
    back channels-last here, and the fused Adam misread them before the agent matched their layout."""
    import copy

    env = make_env("CartPole-v1", num_envs=2, obs="pixels")
    agent = build_agent(apply(Config(), {**TINY, "env.obs": "pixels"}), env)
    wm = agent.wm
    params = [p for p in wm.parameters() if p.requires_grad]
    loss, _, _ = wm.loss(collect_batch(env))
    grads = [g.detach() for g in torch.autograd.grad(loss, params)]
    # A surrogate loss whose gradient is exactly ``grads`` in their own layout (channels-last convs):
    # Adam amplifies the last-bit differences between two evaluations of the real loss.
    surrogate = lambda: sum((p * g).sum() for p, g in zip(params, grads, strict=True))  # noqa: E731
    layouts = [g.stride() == p.stride() for p, g in
               zip(params, torch.autograd.grad(surrogate(), params), strict=True) if p.dim() == 4]
    assert layouts and not all(layouts)
    ref = copy.deepcopy(params)
    cfg = agent.opt_cfg["wm"]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    for r, g in zip(ref, grads, strict=True):
        r.grad = (g * min(1.0, cfg.clip / (norm + 1e-6))).contiguous()
    torch.optim.Adam(ref, lr=cfg.lr, eps=cfg.eps, foreach=False, fused=False).step()
    before = [p.detach().clone() for p in params]
    agent._step("wm", surrogate(), params)
    names = [n for n, p in wm.named_parameters() if p.requires_grad]
    for name, p, r, b in zip(names, params, ref, before, strict=True):
        if p.dim() == 4:
            assert not torch.equal(p, b), name  # the conv weights did move
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-7, msg=name)


def test_non_finite_batch_skips_the_update_and_leaves_weights_alone():
    env = make_env("CartPole-v1", 2, seed=0)
    cfg = apply(Config(), {**TINY, "env.num_envs": 2})
    agent = build_agent(cfg, env)
    batch = collect_batch(env)
    batch["vector"][0, 3, 1] = float("nan")
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    m = agent.train_step(batch)
    assert m["health/skipped"] == 1.0
    after = agent.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_continuous_actor_gets_gradients_through_dynamics():
    torch.manual_seed(0)
    env = make_env("Pendulum-v1", 2, seed=0)
    cfg = apply(Config(), {**TINY, "env.id": "Pendulum-v1", "env.num_envs": 2})
    agent = build_agent(cfg, env)
    from fastdream.dream.rollout import imagine

    deter, stoch = agent.wm.rssm.initial(4)
    traj = imagine(agent.wm, agent.behavior.actor, (deter, stoch), 3, grad=True)
    # The imagined reward at step 3 depends on the first action through the dynamics.
    g = torch.autograd.grad(traj["feat"][:, -1].sum(), list(agent.behavior.actor.parameters()), allow_unused=True)
    assert any(x is not None and x.abs().sum() > 0 for x in g)
    traj_d = imagine(agent.wm, agent.behavior.actor, (deter, stoch), 3, grad=False)
    assert not traj_d["feat"].requires_grad
