"""Drop-in as TRL's own tests define it: each trainer takes ``args=None`` (TRL's quickstart form) and builds its
``Regularized*Config`` defaults, with the output folder TRL would name.

TRL's default config asks for bf16, which transformers refuses on a machine without a bf16 GPU (stock TRL fails
there the same way), so the tests say bf16 is available: they only build the trainers."""

from __future__ import annotations

import pytest
from datasets import Dataset

from trl_regularizers import (
    RegularizedDPOConfig,
    RegularizedDPOTrainer,
    RegularizedGRPOConfig,
    RegularizedGRPOTrainer,
    RegularizedRewardConfig,
    RegularizedRewardTrainer,
    RegularizedRLOOConfig,
    RegularizedRLOOTrainer,
    RegularizedSFTConfig,
    RegularizedSFTTrainer,
)

PAIRS = Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["yes", "yes"], "rejected": ["no", "no"]})
PROMPTS = Dataset.from_dict({"prompt": ["hello", "abc"] * 4})
TEXTS = Dataset.from_dict({"text": ["hello there", "abc def"]})


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize(
    "trainer_cls, config_cls, suffix, needs",
    [
        (RegularizedDPOTrainer, RegularizedDPOConfig, "DPO", "lm"),
        (RegularizedRewardTrainer, RegularizedRewardConfig, "Reward", "rm"),
        (RegularizedGRPOTrainer, RegularizedGRPOConfig, "GRPO", "online"),
        (RegularizedRLOOTrainer, RegularizedRLOOConfig, "RLOO", "online"),
        (RegularizedSFTTrainer, RegularizedSFTConfig, "SFT", "text"),
    ],
)
def test_init_without_args_builds_the_regularized_defaults(tiny_lm_path, tiny_rm_path, tmp_path, monkeypatch, trainer_cls, config_cls, suffix, needs):
    monkeypatch.chdir(tmp_path)  # the default output folder is relative
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    if needs == "online":
        trainer = trainer_cls(model=tiny_lm_path, reward_funcs=reward_len, train_dataset=PROMPTS)
    elif needs == "text":
        trainer = trainer_cls(model=tiny_lm_path, train_dataset=TEXTS)
    else:
        trainer = trainer_cls(model=tiny_rm_path if needs == "rm" else tiny_lm_path, train_dataset=PAIRS)
    defaults = config_cls(output_dir="unused")
    assert type(trainer.args) is config_cls
    model_path = tiny_rm_path if needs == "rm" else tiny_lm_path
    assert trainer.args.output_dir.endswith(f"{model_path.rstrip('/').split('/')[-1]}-{suffix}")
    assert trainer.args.learning_rate == defaults.learning_rate
    assert all(getattr(trainer.args, name) == getattr(defaults, name) for name in ("ptx_coef", "kl_estimator", "margin_source") if hasattr(defaults, name))


TRAINER_PARENTS = {
    RegularizedDPOTrainer: "DPOTrainer", RegularizedRewardTrainer: "RewardTrainer", RegularizedGRPOTrainer: "GRPOTrainer",
    RegularizedRLOOTrainer: "RLOOTrainer", RegularizedSFTTrainer: "SFTTrainer",
}


@pytest.mark.parametrize("trainer_cls", list(TRAINER_PARENTS), ids=lambda cls: cls.__name__)
def test_init_takes_every_parameter_of_the_parent_with_its_default(trainer_cls):
    """Our constructor is TRL's (names, order, kinds, defaults; e.g. GRPO's ``reward_funcs=None`` on TRL 1.16), plus
    keyword-only extras, and binds any call the parent accepts to the same values."""
    import inspect

    import trl

    parent = inspect.signature(getattr(trl, TRAINER_PARENTS[trainer_cls]).__init__).parameters
    ours = inspect.signature(trainer_cls.__init__).parameters
    assert [p for p in ours.values() if p.name in parent] == list(parent.values())
    extras = [p for p in ours.values() if p.name not in parent]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
    from trl_regularizers.trainers.adapters.base import trl_arguments

    positional = [name for name, p in parent.items() if name != "self" and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    values = {name: object() for name in positional}
    assert trl_arguments(getattr(trl, TRAINER_PARENTS[trainer_cls]).__init__, tuple(values.values()), {}) == values
