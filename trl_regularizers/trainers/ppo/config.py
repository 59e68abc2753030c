"""PPO's configs: ``PPOConfig`` (TRL 1.12's fields on ``transformers.TrainingArguments``, for TRL >= 1.13, which has no
PPO) and ``RegularizedPPOConfig``, validated like every other ``Regularized*Config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import trl
from packaging.version import Version
from transformers import TrainingArguments

from trl_regularizers.arguments import KL_ESTIMATOR_CHOICES, KLArguments, PtxArguments
from trl_regularizers.validation import Choice, ValidatedConfig, at_least, in_range, positive

STOCK_PPO = Version(trl.__version__).release < (1, 13)
"""TRL 1.12 still has ``trl.experimental.ppo``: ``RegularizedPPOTrainer`` subclasses it. Newer TRL: the package's own."""


@dataclass
class PPOConfig(TrainingArguments):
    r"""
    PPO settings: the fields (names, defaults, meanings) of TRL 1.12's `trl.experimental.ppo.PPOConfig`, on top
    of [`~transformers.TrainingArguments`], so a TRL 1.12 PPO script keeps its config on any TRL.

    Defaults that differ from `TrainingArguments` (as in TRL): `learning_rate=3e-6`, `logging_steps=10`,
    `gradient_checkpointing=True` (PPO's loop does not apply it, as TRL 1.12's did not), `bf16=not fp16`.
    Derived fields (`world_size`, `num_total_batches`, `micro_batch_size`, `local_batch_size`, `batch_size`,
    `local_mini_batch_size`, `mini_batch_size`) are set by the trainer.
    """

    learning_rate: float = field(default=3e-6, metadata={"help": "Initial learning rate (AdamW)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (a float in [0, 1) is a ratio of the total)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Kept for compatibility; the PPO loop does not enable it."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None means `not fp16`."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra scheduler arguments."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset processing."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches per rollout batch."})
    total_episodes: int | None = field(default=None, metadata={"help": "Total episodes (sequences); default num_train_epochs * dataset size."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={"help": "Per-process batch of the no-grad rollout forwards."})
    num_sample_generations: int = field(default=10, metadata={"help": "Number of sample-generation printouts during training."})
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per response."})
    stop_token: Literal["eos"] | None = field(default=None, metadata={"help": "'eos' stops and truncates at the tokenizer's EOS (exclusive with stop_token_id)."})
    stop_token_id: int | None = field(default=None, metadata={"help": "Token id to stop and truncate at (exclusive with stop_token)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a response without EOS."})
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path of the SFT model (informational)."})
    world_size: int | None = field(default=None, metadata={"help": "Number of processes (set by the trainer)."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Number of PPO updates (set by the trainer)."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "per_device_train_batch_size * world_size (set by the trainer)."})
    local_batch_size: int | None = field(default=None, metadata={"help": "per_device_train_batch_size * gradient_accumulation_steps (set by the trainer)."})
    batch_size: int | None = field(default=None, metadata={"help": "local_batch_size * world_size (set by the trainer)."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Per-process mini-batch size (set by the trainer)."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Mini-batch size across processes (set by the trainer)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the model to the Hub after training."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path of the reward model (informational)."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "PEFT adapter to train (several adapters)."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "PEFT adapter used as the reference (several adapters)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards."})
    kl_coef: float = field(default=0.05, metadata={"help": "Coefficient of the per-token KL penalty in the reward."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "DeepSpeed ZeRO-3 only (not supported by this implementation)."})

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        super().__post_init__()




if STOCK_PPO:
    from trl.experimental.ppo import PPOConfig as BasePPOConfig
else:
    BasePPOConfig = PPOConfig


@dataclass
class RegularizedPPOConfig(ValidatedConfig, PtxArguments, KLArguments, BasePPOConfig):
    r"""
    The fields of TRL 1.12's [`~trl.experimental.ppo.PPOConfig`] (its subclass on TRL 1.12; the same fields with
    the same defaults on newer TRL) plus a choice of KL estimator, direction, clamp and adaptive control
    ([`KLArguments`], coefficient = `kl_coef`), and PPO-ptx ([`PtxArguments`]).

    The KL penalty is per token in the reward, as PPO does: `r_t = -kl_coef * KL_t`, plus the score on the
    last token. Defaults (`k1`, reverse, fixed `kl_coef`, no ptx) reproduce stock PPO.

    kl_estimator (`str`, *optional*, defaults to `"k1"`):
        A name of the estimator registry (`core.kl.KL_ESTIMATORS`: `"k1"`, `"k2"`, `"k3"`, `"abs"` per sampled token,
        `"full"`: the exact KL over the vocabulary at each position, from the rollout's policy and reference logits,
        computed in chunks).
    kl_placement (`str`, *optional*, defaults to `"reward"`):
        Only `"reward"`: PPO's KL penalty is part of the per-token reward.
    kl_target (`float` or `None`, *optional*, defaults to `None`):
        If set, `kl_coef` adapts after every PPO update toward this KL per sequence (summed over tokens)
        ([Ziegler et al. 2019](https://huggingface.co/papers/1909.08593)). Its state is saved in checkpoints.
    kl_horizon (`float`, *optional*, defaults to `10000`):
        Horizon of the adaptive controller in episodes (sequences), as in Ziegler et al.: each update moves
        the coefficient by `clip(KL / kl_target - 1, ±0.2) * batch_size / kl_horizon`.
    """

    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator.", "choices": KL_ESTIMATOR_CHOICES})
    kl_placement: str = field(default="reward", metadata={"help": "Where the KL penalty goes (PPO: reward only).", "choices": ["reward"]})

    KL_COEFFICIENT = "kl_coef"
    RULES = {
        "kl_placement": Choice(("reward",)),
        **{name: at_least(1) for name in ("num_ppo_epochs", "num_mini_batches", "response_length", "local_rollout_forward_batch_size")},
        "total_episodes": at_least(1, allow_none=True),
        "num_sample_generations": at_least(0),
        **{name: positive() for name in ("temperature", "cliprange", "cliprange_value")},
        "vf_coef": at_least(0.0),
        "missing_eos_penalty": at_least(0.0, allow_none=True),
        **{name: in_range(0.0, 1.0) for name in ("gamma", "lam")},
    }
