"""fastdream: a performance-engineered DreamerV3-style world-model RL training engine."""

from fastdream.agent import Agent
from fastdream.config import Config
from fastdream.envs import make_env
from fastdream.replay import ReplayBuffer
from fastdream.train import TrainResult, train
from fastdream.world_model import WorldModel

__all__ = ["Agent", "Config", "ReplayBuffer", "TrainResult", "WorldModel", "make_env", "train"]
__version__ = "0.1.0"
