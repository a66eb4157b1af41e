import os
import sys
import warnings

# Keep tests quiet and deterministic on the 2-core CI box.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", module="gymnasium")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

# A briefly trained CartPole run: the research tools need its checkpoint (a world model), not a good one.
TINY_RUN = {"model.deter": 32, "model.hidden": 32, "model.units": 32, "model.stoch": 8, "model.classes": 4,
            "model.blocks": 4, "train.horizon": 5, "env.num_envs": 4, "train.batch_size": 2, "train.seq_len": 8,
            "train.prefill": 64, "train.train_ratio": 4.0, "train.warmup_updates": 5, "train.steps": 160,
            "train.eval_every": 10**9, "train.checkpoint_every": 10**9, "train.log_every": 50,
            "train.replay_capacity": 4 * 100}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from fastdream.run.config import Config, apply
    from fastdream.run.train import train

    path = tmp_path_factory.mktemp("tiny") / "run"
    train(apply(Config(), TINY_RUN), path, progress=False)
    return path
