"""One real learning run per dream engine: DreamerV3 on EnvPool CartPole-v1 goes from ~20 to >= 150."""

import json

import pytest

from fastdream.run.config import Config, apply, apply_presets
from fastdream.run.train import train


@pytest.mark.parametrize("engine", ["kernels", "compile"])
def test_cartpole_learns(tmp_path, engine):
    cfg = apply_presets(Config(), ["cartpole"])
    # The default preset with a lower bar and a bounded budget: ~350 updates, ~2-3 minutes here.
    cfg = apply(cfg, {"env.target_return": 150.0, "train.steps": 40_000, "train.eval_every": 2_500,
                      "train.checkpoint_every": 10**9, "train.engine": engine,
                      "train.compile_model": engine == "compile"})
    res = train(cfg, tmp_path / "run", progress=False)
    evals = [json.loads(line)["eval/return"] for line in res.metrics.read_text().splitlines()
             if "eval/return" in line]
    assert evals[0] < 60, evals  # the untrained policy: about 20
    assert res.solved and res.eval_return >= 150.0, evals
