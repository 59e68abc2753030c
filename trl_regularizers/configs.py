"""Config dataclasses: each subclasses the TRL config it extends and adds flat, validated fields.

The argument groups (``arguments.py``) are mixed in *before* the TRL config so that the parent's positional order
(``output_dir`` first) is unchanged and the new fields come last; ``ValidatedConfig`` runs their checks after TRL's
own ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig
from transformers import TrainingArguments

from trl_regularizers.arguments import (
    KL_ESTIMATOR_CHOICES,
    KLArguments,
    MarginArguments,
    PtxArguments,
    RewardAwareArguments,
    SFTKLArguments,
)
from trl_regularizers.core.kl import KL_PLACEMENTS
from trl_regularizers.validation import Choice, ValidatedConfig, at_least, validate

NLL_NORMALIZATIONS: tuple[str, ...] = ("completion", "sequence")
__all__ = ["KLArguments", "MarginArguments", "PtxArguments", "RewardAwareArguments", "SFTKLArguments", "RegularizedDPOConfig",
           "RegularizedGRPOConfig", "RegularizedRLOOConfig", "RegularizedRewardConfig", "RegularizedSFTConfig", "regularized_config"]


@dataclass
class RegularizedDPOConfig(ValidatedConfig, PtxArguments, RewardAwareArguments, MarginArguments, DPOConfig):
    r"""
    [`~trl.DPOConfig`] plus DPO+NLL (eq. 7-8), per-pair margins and pretraining mixing.

    > DPO + NLL ([Pang et al. 2024](https://huggingface.co/papers/2404.19733))

    nll_alpha (`float`, *optional*, defaults to `0.0`):
        Weight alpha of the length-normalized NLL of the chosen completion, computed from the log-probs
        the DPO forward already produced (no extra forward pass). `0.0` disables it.
    nll_normalization (`str`, *optional*, defaults to `"completion"`):
        Length the NLL is divided by: `"completion"` (chosen completion tokens) or `"sequence"`
        (prompt + completion tokens, eq. 8's |c| + |y| with the prompt counted).

    Margins (see [`MarginArguments`]) enter DPO as an offset inside the sigmoid,
    `-log sigmoid(beta * delta - m)` ([ODPO](https://huggingface.co/papers/2402.10571)).
    Reward-aware losses (RPO, REBEL, reward-weighted DPO): see [`RewardAwareArguments`].
    Pretraining mixing: see [`PtxArguments`].
    """

    nll_alpha: float = field(default=0.0, metadata={"help": "Weight of the chosen-completion NLL (eq. 7-8). 0 disables it."})
    nll_normalization: str = field(default="completion", metadata={"help": "NLL length normalizer.", "choices": list(NLL_NORMALIZATIONS)})

    RULES = {"nll_alpha": at_least(0.0), "nll_normalization": Choice(NLL_NORMALIZATIONS)}


@dataclass
class RegularizedRewardConfig(ValidatedConfig, MarginArguments, RewardConfig):
    r"""
    [`~trl.RewardConfig`] plus the Llama 2 margin loss (eq. 9) with margins derived from ratings.

    With `margin_source=None` the trainer behaves like [`~trl.RewardTrainer`], which already subtracts a
    `margin` column when the dataset has one. Other sources derive that column before training; see
    [`MarginArguments`]. (No pretraining mixing: a reward model has a sequence-classification head, not a
    language-modeling one.)
    """


@dataclass
class RegularizedGRPOConfig(ValidatedConfig, PtxArguments, KLArguments, GRPOConfig):
    r"""
    [`~trl.GRPOConfig`] plus a choice of KL estimator, placement, direction, clamp and adaptive control
    ([`KLArguments`], coefficient = `beta`), and pretraining mixing ([`PtxArguments`]).

    Defaults (`k3` in the loss, reverse) reproduce stock GRPO.
    """


@dataclass
class RegularizedRLOOConfig(ValidatedConfig, PtxArguments, KLArguments, RLOOConfig):
    r"""
    [`~trl.RLOOConfig`] plus a choice of KL estimator, placement, direction, clamp and adaptive control
    ([`KLArguments`], coefficient = `beta`), and pretraining mixing ([`PtxArguments`]).

    Defaults (`k1` in the reward, reverse) reproduce stock RLOO.
    """

    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator.", "choices": KL_ESTIMATOR_CHOICES})
    kl_placement: str = field(default="reward", metadata={"help": "Where the KL penalty goes.", "choices": list(KL_PLACEMENTS)})


@dataclass
class RegularizedSFTConfig(ValidatedConfig, PtxArguments, SFTKLArguments, SFTConfig):
    r"""
    [`~trl.SFTConfig`] plus a KL anchor to the base model ([`SFTKLArguments`]) and replay of prior data
    ([`PtxArguments`]). Defaults (`sft_kl_coef=0`, no ptx) reproduce stock SFT.
    """


def regularized_config(args, config_cls: type, model, trainer_name: str, from_training_arguments: bool = False):
    """The ``config_cls`` a ``Regularized*Trainer`` runs with, from what the user passed as ``args``.

    * ``None``: ``config_cls`` defaults, with the output folder TRL's own default names (``<model>-<trainer_name>``);
    * a ``config_cls``: itself;
    * the stock TRL config that ``config_cls`` extends (the user swapped only the trainer class): a ``config_cls``
      with every value of ``args`` and every new field at its default. The values are copied as they are, not
      re-derived: TRL's ``__post_init__`` already ran on them (it derives fields such as GRPO's
      ``generation_batch_size`` and refuses them when given twice).
    * with ``from_training_arguments`` (SFT, whose TRL trainer does the same), plain ``transformers``
      ``TrainingArguments``: a ``config_cls`` built from their values, every TRL and new field at its default.
    """
    if args is None:
        name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or type(model).__name__
        return config_cls(output_dir=f"{name.rstrip('/').split('/')[-1]}-{trainer_name}")
    if isinstance(args, config_cls):
        return args
    stock = next(base for base in config_cls.__mro__[1:] if base.__module__.startswith("trl."))
    if from_training_arguments and type(args) is TrainingArguments:
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict hides it
        return config_cls(**values)
    if not isinstance(args, stock):
        raise TypeError(f"args must be a {config_cls.__name__} or a {stock.__name__}, got {type(args).__name__}.")
    upgraded = object.__new__(config_cls)
    upgraded.__dict__.update(vars(args))
    for new_field in fields(config_cls):
        if new_field.name not in upgraded.__dict__:
            default = new_field.default if new_field.default_factory is MISSING else new_field.default_factory()
            setattr(upgraded, new_field.name, default)
    validate(upgraded)
    return upgraded
