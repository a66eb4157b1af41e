"""The house's floors (docs/design.md): each module, imported alone in a fresh interpreter, loads only fastdream
modules of its own floor and the floors below it; the data layer and the config load no torch at all."""

import json
import subprocess
import sys

import pytest

_SCRIPT = """
import importlib, json, sys
exec(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("fastdream"))))
"""

DATA = ("fastdream.data",)
FAST = ("fastdream.fast",)
MODEL = ("fastdream.model", *FAST)
DREAM = ("fastdream.dream", "fastdream.kernels", *MODEL)
AGENT = ("fastdream.agent", *DREAM)
RUN = ("fastdream.run", *AGENT, *DATA)
RESEARCH = ("fastdream.research", *RUN)

# (what runs, the fastdream packages it may load, whether it may load torch)
FLOORS = [
    ("import fastdream", (), False),
    ("import fastdream.data.envs, fastdream.data.replay, fastdream.data.collector, fastdream.data.atomic", DATA,
     False),
    ("import fastdream.fast.ops, fastdream.fast.runtime", FAST, True),
    ("import fastdream.model.maths", ("fastdream.model.maths",), True),
    ("import fastdream.kernels.reference", ("fastdream.kernels", "fastdream.model.maths"), True),
    ("import fastdream.model.nets, fastdream.model.rssm, fastdream.model.world_model, fastdream.model.behavior",
     MODEL, True),
    ("import fastdream.dream.engines, fastdream.dream.schedule",
     ("fastdream.dream.engines", "fastdream.dream.schedule"), False),
    ("import fastdream.dream.rollout", DREAM, True),
    ("import fastdream.agent", AGENT, True),
    ("from fastdream.run.config import Config, validate; validate(Config())",
     ("fastdream.run.config", "fastdream.dream.engines", "fastdream.dream.schedule"), False),
    ("import fastdream.run.train", RUN, True),
    ("import fastdream.research.evolve, fastdream.research.model_error, fastdream.research.study", RESEARCH, True),
]


def loaded_by(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, "-", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize(("code", "allowed", "torch_ok"), FLOORS, ids=[f[0].split(";")[0] for f in FLOORS])
def test_a_floor_loads_only_itself_and_the_floors_below(code, allowed, torch_ok):
    loaded = loaded_by(code)
    packages = {"fastdream", *(p.rsplit(".", 1)[0] for p in allowed if p.count(".") > 1)}  # parents run __init__
    above = [m for m in loaded if m.startswith("fastdream") and m not in packages
             and not any(m == p or m.startswith(p + ".") for p in allowed)]
    assert not above, f"{code!r} loaded modules of floors above it: {above}"
    if not torch_ok:
        assert "torch" not in loaded, f"{code!r} loaded torch"


def test_the_package_hands_out_its_public_names_lazily():
    loaded = loaded_by("import fastdream; fastdream.ReplayBuffer; fastdream.make_env")
    assert "torch" not in loaded and "fastdream.data.replay" in loaded and "fastdream.run.train" not in loaded


def test_the_readme_embedding_names_work_together():
    """The README's embedding section, run: config, env, replay, agent, and a dream from real posterior states."""
    import torch

    import fastdream

    cfg = fastdream.apply_sets(fastdream.apply_presets(fastdream.Config(), ["cartpole"]), ["train.steps=50000"])
    assert cfg.train.steps == 50_000 and cfg.env.id == "CartPole-v1"
    env = fastdream.make_env("CartPole-v1", num_envs=4)
    replay = fastdream.ReplayBuffer(1_000, 4, env.replay_spec)
    rows = env.reset()
    replay.add({k: v for k, v in rows.items() if k != "env_ids"})
    agent = fastdream.build_agent(cfg, env)
    assert isinstance(agent, fastdream.Agent) and isinstance(agent.wm, fastdream.WorldModel)
    actions = agent.policy(rows, rows["env_ids"])
    assert actions.shape == (4,) and set(actions.tolist()) <= {0, 1}
    starts = (agent.carry_deter.clone(), agent.carry_stoch.clone())
    with torch.no_grad():
        traj = fastdream.imagine(agent.wm, agent.behavior.actor, starts, horizon=5, engine="auto")
    assert traj["reward"].shape == (4, 5) and traj["action"].shape == (4, 5, 2)
    assert torch.isfinite(traj["reward"]).all() and len(replay) == 4
    env.close()
