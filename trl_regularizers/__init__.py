"""trl-regularizers: the regularizers that keep RLHF on the rails, as drop-in TRL trainer subclasses.

Names are imported lazily, so ``import trl_regularizers`` stays cheap (it does not import TRL). Every name,
the PPO ones included, exists on every supported TRL release.
"""

from importlib import import_module
__version__ = "0.1.0"

_LAZY = {
    "RegularizedDPOConfig": "configs",
    "RegularizedRewardConfig": "configs",
    "RegularizedGRPOConfig": "configs",
    "RegularizedRLOOConfig": "configs",
    "RegularizedSFTConfig": "configs",
    "RegularizedDPOTrainer": "trainers.dpo",
    "RegularizedRewardTrainer": "trainers.reward",
    "RegularizedGRPOTrainer": "trainers.grpo",
    "RegularizedRLOOTrainer": "trainers.rloo",
    "RegularizedSFTTrainer": "trainers.sft",
    "RegularizedPPOTrainer": "trainers.ppo",
    "RegularizedPPOConfig": "trainers.ppo",
    "AdaptiveKLCallback": "callbacks",
    "KLDriftCallback": "drift",
    "PtxStream": "ptx",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trl_regularizers' has no attribute {name!r}")
    value = getattr(import_module(f"trl_regularizers.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
