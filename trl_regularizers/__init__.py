"""trl-regularizers: the regularizers that keep RLHF on the rails, as drop-in TRL trainer subclasses.

Names are imported lazily, so ``import trl_regularizers`` stays cheap and the PPO names (TRL 1.12 only,
the ``[ppo]`` extra) raise their ImportError only when used.
"""

from importlib import import_module
from importlib.metadata import version

from packaging.version import Version

__version__ = "0.1.0"

_LAZY = {
    "RegularizedDPOConfig": "configs",
    "RegularizedRewardConfig": "configs",
    "RegularizedGRPOConfig": "configs",
    "RegularizedRLOOConfig": "configs",
    "RegularizedDPOTrainer": "trainers.dpo",
    "RegularizedRewardTrainer": "trainers.reward",
    "RegularizedGRPOTrainer": "trainers.grpo",
    "RegularizedRLOOTrainer": "trainers.rloo",
    "RegularizedPPOTrainer": "trainers.ppo",
    "RegularizedPPOConfig": "trainers.ppo",
    "AdaptiveKLCallback": "callbacks",
    "KLDriftCallback": "drift",
    "PtxStream": "ptx",
}

_PPO_NAMES = {"RegularizedPPOTrainer", "RegularizedPPOConfig"}
# `import *` must work on every TRL: the PPO names exist only with TRL < 1.13 (the [ppo] extra).
__all__ = sorted(name for name in _LAZY if name not in _PPO_NAMES or Version(version("trl")) < Version("1.13"))


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trl_regularizers' has no attribute {name!r}")
    value = getattr(import_module(f"trl_regularizers.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
