"""The public names: `import *` works on every TRL and each name resolves to what the README documents
(the PPO names too: on TRL 1.12 subclasses of trl.experimental.ppo, on newer TRL the package's own PPO)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trl
from packaging.version import Version

import trl_regularizers
from trl_regularizers import core

TRL_HAS_PPO = Version(trl.__version__) < Version("1.13")
PARENTS = {
    "RegularizedDPOTrainer": "DPOTrainer",
    "RegularizedDPOConfig": "DPOConfig",
    "RegularizedRewardTrainer": "RewardTrainer",
    "RegularizedRewardConfig": "RewardConfig",
    "RegularizedGRPOTrainer": "GRPOTrainer",
    "RegularizedGRPOConfig": "GRPOConfig",
    "RegularizedRLOOTrainer": "RLOOTrainer",
    "RegularizedRLOOConfig": "RLOOConfig",
    "RegularizedSFTTrainer": "SFTTrainer",
    "RegularizedSFTConfig": "SFTConfig",
}


def test_star_import_gives_every_listed_name():
    namespace: dict = {}
    exec("from trl_regularizers import *", namespace)
    assert set(trl_regularizers.__all__) <= set(namespace)
    assert {"RegularizedPPOTrainer", "RegularizedPPOConfig"} <= set(namespace)


def test_ppo_names_exist_on_every_trl():
    """TRL 1.12: drop-in subclasses of the stock PPO classes. Newer TRL (no PPO): a transformers Trainer and
    TrainingArguments with the stock constructor and fields."""
    import inspect

    import transformers

    trainer, config = trl_regularizers.RegularizedPPOTrainer, trl_regularizers.RegularizedPPOConfig
    assert issubclass(trainer, transformers.Trainer) and issubclass(config, transformers.TrainingArguments)
    assert list(inspect.signature(trainer.__init__).parameters)[:8] == [
        "self", "args", "processing_class", "model", "ref_model", "reward_model", "train_dataset", "value_model"
    ]
    if TRL_HAS_PPO:
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        assert issubclass(trainer, PPOTrainer) and issubclass(config, PPOConfig)
    else:
        assert not any(cls.__module__.startswith("trl.") for cls in trainer.__mro__ + config.__mro__)


@pytest.mark.parametrize("name, parent", sorted(PARENTS.items()))
def test_drop_in_classes_subclass_their_trl_parent(name, parent):
    assert issubclass(getattr(trl_regularizers, name), getattr(trl, parent))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'RegularizedKTOTrainer'"):
        trl_regularizers.RegularizedKTOTrainer  # noqa: B018


def test_core_exports_resolve():
    assert all(hasattr(core, name) for name in core.__all__)


def test_import_is_lazy():
    """`import trl_regularizers` must not import trl (the PPO names may not exist, and it keeps startup cheap)."""
    code = "import sys, trl_regularizers; print('trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
