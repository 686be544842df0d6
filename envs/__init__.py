"""Gymnasium environments of autoprune (installed as ``autoprune.envs``).

``import autoprune.envs`` registers ``autoprune/Pruning-v0``::

    env = gymnasium.make("autoprune/Pruning-v0")                  # the embedded default task
    env = gymnasium.make("autoprune/Pruning-v0", task=task, budget="flops=0.25", reward="acc")
"""

from autoprune.envs.pruning_env import FEATURES, PruningEnv
from autoprune.envs.rewards import REWARDS, get_reward
from gymnasium.envs.registration import register, registry

ENV_ID = "autoprune/Pruning-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="autoprune.envs.pruning_env:PruningEnv")

__all__ = ["ENV_ID", "FEATURES", "REWARDS", "PruningEnv", "get_reward"]
