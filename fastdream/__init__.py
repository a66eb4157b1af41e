"""fastdream: a performance-engineered DreamerV3-style world-model RL training engine."""

from fastdream.envs import make_env
from fastdream.replay import ReplayBuffer

__all__ = ["ReplayBuffer", "make_env"]
__version__ = "0.1.0"
