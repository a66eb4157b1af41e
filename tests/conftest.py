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
from tiny import TINY_RUN  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from fastdream.run.config import Config, apply
    from fastdream.run.train import train

    path = tmp_path_factory.mktemp("tiny") / "run"
    train(apply(Config(), TINY_RUN), path, progress=False)
    return path
