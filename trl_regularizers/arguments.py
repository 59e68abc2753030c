"""The argument groups of the ``Regularized*Config`` dataclasses: flat fields with ``help`` entries (so
``TrlParser``/``HfArgumentParser`` expose them on the command line and in YAML) and the checks of the one validation
system (``RULES``, ``cross_check``; ``trl_regularizers.validation``). Names come from the registries (``core.kl``,
``core.margins``, ``core.reward_aware``)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from trl_regularizers.core.kl import KL_DIRECTIONS, KL_PLACEMENTS, MAX_CLAMP, kl_estimator_info, kl_estimator_names
from trl_regularizers.core.margins import LLAMA2_MARGIN_LARGE, LLAMA2_MARGIN_SMALL, MARGIN_SOURCES
from trl_regularizers.core.reward_aware import MAX_ABS_GAP, REWARD_AWARE_LOSSES, REWARD_WEIGHTINGS
from trl_regularizers.validation import Choice, RegistryChoices, at_least, in_range, positive

MARGIN_LABEL_MAPS: dict[str, dict[str, float]] = {"llama2_small": LLAMA2_MARGIN_SMALL, "llama2_large": LLAMA2_MARGIN_LARGE}
KL_ESTIMATOR_CHOICES = RegistryChoices(kl_estimator_names)


def warn_if_unused(config, options: tuple[str, ...], coefficient: str) -> None:
    """Warn when KL options are set away from their defaults while the coefficient that applies them is 0 (TRL's GRPO
    default ``beta=0.0``): the run would train without the KL the user asked for."""
    if getattr(config, coefficient) != 0:
        return
    defaults = {item.name: item.default for item in fields(config) if item.name in options}
    changed = {name: getattr(config, name) for name in options if getattr(config, name) != defaults[name]}
    if changed:
        settings = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        warnings.warn(f"{settings} set, but {coefficient}=0: no KL penalty is applied. Set {coefficient} > 0 to use it.", UserWarning, stacklevel=4)


@dataclass
class PtxArguments:
    r"""
    > Pretraining-data mixing (PPO-ptx, eq. 6; [InstructGPT](https://huggingface.co/papers/2203.02155))

    ptx_coef (`float`, *optional*, defaults to `0.0`):
        Coefficient gamma of the token-mean NLL on batches of the `pretrain_dataset=` passed to the trainer.
        `0.0` disables mixing. The NLL is computed from the final hidden states and the LM head in chunks, without
        the batch's `[B, T, V]` logits, unless the model's logits are not `hidden @ W.T` (docs/dpo_reward.md).
    ptx_batch_size (`int` or `None`, *optional*, defaults to `None`):
        Sequences per ptx batch on each process. `None` uses `per_device_train_batch_size`.
    ptx_block_size (`int`, *optional*, defaults to `256`):
        Length in tokens of the packed ptx sequences.
    ptx_text_field (`str`, *optional*, defaults to `"text"`):
        Column of the pretraining dataset holding raw text (ignored if it already has `input_ids`).
    """

    ptx_coef: float = field(default=0.0, metadata={"help": "Coefficient gamma of the pretraining NLL (eq. 6, PPO-ptx). 0 disables it."})
    ptx_batch_size: int | None = field(default=None, metadata={"help": "Sequences per ptx batch per process (default: per_device_train_batch_size)."})
    ptx_block_size: int = field(default=256, metadata={"help": "Length in tokens of the packed ptx sequences."})
    ptx_text_field: str = field(default="text", metadata={"help": "Text column of the pretraining dataset."})

    RULES = {"ptx_coef": at_least(0.0), "ptx_batch_size": positive(allow_none=True), "ptx_block_size": at_least(2)}


@dataclass
class MarginArguments:
    r"""
    > Preference margins m(y_c, y_r) (eq. 9; [Llama 2](https://huggingface.co/papers/2307.09288))

    margin_source (`str` or `None`, *optional*, defaults to `None`):
        Where the per-pair margin comes from: `"column"` (a numeric column named `margin_column`),
        `"rating"` (`margin_scale * (chosen - rejected)` from two rating columns), `"likert"` (the same
        delta on a 1..`margin_likert_points` scale, divided by `points - 1`), or `"label"` (a preference
        strength label mapped through `margin_label_map`). `None` adds no margin of ours.
    margin_column (`str`, *optional*, defaults to `"margin"`):
        Column read when `margin_source="column"`.
    margin_chosen_rating_field (`str`, *optional*, defaults to `"chosen_rating"`):
        Rating of the chosen completion (`"rating"`/`"likert"`).
    margin_rejected_rating_field (`str`, *optional*, defaults to `"rejected_rating"`):
        Rating of the rejected completion (`"rating"`/`"likert"`).
    margin_label_field (`str`, *optional*, defaults to `"preference_strength"`):
        Column of strength labels such as `"significantly better"` (`"label"`).
    margin_label_map (`str`, *optional*, defaults to `"llama2_small"`):
        `"llama2_small"` ({1, 2/3, 1/3, 0}), `"llama2_large"` ({3, 2, 1, 0}) or a JSON object mapping
        labels to numbers. Labels are matched ignoring case and spacing; unknown labels are an error.
    margin_likert_points (`int`, *optional*, defaults to `7`):
        Number of points of the Likert scale.
    margin_scale (`float`, *optional*, defaults to `1.0`):
        Multiplier applied to every derived margin; > 0.
    """

    margin_source: str | None = field(default=None, metadata={"help": f"Margin source: None, {', '.join(MARGIN_SOURCES)}."})
    margin_column: str = field(default="margin", metadata={"help": "Numeric margin column (margin_source='column')."})
    margin_chosen_rating_field: str = field(default="chosen_rating", metadata={"help": "Rating column of the chosen completion."})
    margin_rejected_rating_field: str = field(default="rejected_rating", metadata={"help": "Rating column of the rejected completion."})
    margin_label_field: str = field(default="preference_strength", metadata={"help": "Preference-strength label column."})
    margin_label_map: str = field(default="llama2_small", metadata={"help": "'llama2_small', 'llama2_large' or a JSON object label -> margin (a mapping in YAML)."})
    margin_likert_points: int = field(default=7, metadata={"help": "Points of the Likert scale (margin_source='likert')."})
    margin_scale: float = field(default=1.0, metadata={"help": "Multiplier applied to derived margins."})

    RULES = {"margin_source": Choice(lambda: MARGIN_SOURCES, allow_none=True), "margin_likert_points": at_least(2),
             "margin_scale": positive()}

    def cross_check(self) -> None:
        if isinstance(self.margin_label_map, Mapping):  # a YAML mapping: keep it as the JSON text the field holds
            self.margin_label_map = json.dumps(dict(self.margin_label_map))
        self.margin_labels()  # validates the map

    def margin_labels(self) -> dict[str, float]:
        """The label -> margin table named or spelled out by ``margin_label_map``."""
        if self.margin_label_map in MARGIN_LABEL_MAPS:
            return MARGIN_LABEL_MAPS[self.margin_label_map]
        try:
            table = json.loads(self.margin_label_map)
        except json.JSONDecodeError:
            table = None
        numbers = isinstance(table, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in table.values()
        )
        if not numbers:
            raise ValueError(
                f"margin_label_map={self.margin_label_map!r} is not valid. Allowed values: "
                f"{', '.join(MARGIN_LABEL_MAPS)}, or a JSON object (a mapping in YAML) of labels to finite numbers."
            )
        return {str(k): float(v) for k, v in table.items()}


@dataclass
class RewardAwareArguments:
    r"""
    > Reward-aware direct alignment: RPO ([Nemotron-4 340B](https://huggingface.co/papers/2406.11704),
    > [Sun et al. 2025](https://huggingface.co/papers/2502.00203)), REBEL
    > ([Gao et al. 2024](https://huggingface.co/papers/2404.16767)) and reward-weighted DPO. See docs/reward_aware.md.

    reward_aware_loss (`str` or `None`, *optional*, defaults to `None`):
        `"rpo_sq"`, `"rpo_bwd_kl"`, `"rpo_fwd_kl"` (RPO: a distance between `beta * delta` and
        `reward_eta * (r_c - r_r)`), `"rebel"` (`(delta / reward_eta - (r_c - r_r))^2`) or `"weighted_dpo"` (DPO's
        sigmoid loss of each pair times a weight of its reward gap). These replace (RPO, REBEL) or reweight
        (weighted DPO) TRL's `"sigmoid"` term, which `loss_type` must contain. `None` disables them.
    reward_eta (`float`, *optional*, defaults to `1.0`):
        eta: the scale between reward units and log-ratio units. RPO's reward scale (>= 0), REBEL's step size
        (> 0), the inverse temperature of the `"sigmoid"` and the scale of the `"abs"` weights.
    reward_weighting (`str`, *optional*, defaults to `"abs_normalized"`):
        Weight of each pair in `"weighted_dpo"`: `"abs_normalized"` (`|r_c - r_r|` divided by its mean over the
        training pairs), `"abs"` (`reward_eta * |r_c - r_r|`) or `"sigmoid"` (`sigmoid(reward_eta * (r_c - r_r))`).
    reward_length_normalize (`bool`, *optional*, defaults to `False`):
        Use the per-token mean log-ratio of each completion in delta instead of the sum over its tokens.
    reward_chosen_score_field (`str`, *optional*, defaults to `"chosen_score"`):
        Column of the chosen completion's reward score (read, or written by `reward_model=`).
    reward_rejected_score_field (`str`, *optional*, defaults to `"rejected_score"`):
        Column of the rejected completion's reward score.
    reward_model_batch_size (`int`, *optional*, defaults to `16`):
        Pairs per forward pass when a `reward_model=` passed to the trainer scores the dataset before training.
    reward_model_max_length (`int` or `None`, *optional*, defaults to `None`):
        Truncate each scored text to this many tokens (`None`: no truncation).
    """

    reward_aware_loss: str | None = field(default=None, metadata={"help": "Reward-aware loss: None or a name of core.reward_aware.REWARD_AWARE_LOSSES (rpo_sq, rpo_bwd_kl, rpo_fwd_kl, rebel, weighted_dpo)."})
    reward_eta: float = field(default=1.0, metadata={"help": "eta: reward scale of RPO, step size of REBEL, weight scale/inverse temperature."})
    reward_weighting: str = field(default="abs_normalized", metadata={"help": "Pair weight of weighted_dpo.", "choices": list(REWARD_WEIGHTINGS)})
    reward_length_normalize: bool = field(default=False, metadata={"help": "Per-token mean log-ratios instead of sums."})
    reward_chosen_score_field: str = field(default="chosen_score", metadata={"help": "Score column of the chosen completion."})
    reward_rejected_score_field: str = field(default="rejected_score", metadata={"help": "Score column of the rejected completion."})
    reward_model_batch_size: int = field(default=16, metadata={"help": "Pairs per reward-model forward when scoring before training."})
    reward_model_max_length: int | None = field(default=None, metadata={"help": "Truncation of scored texts in tokens (None: none)."})

    RULES = {"reward_aware_loss": Choice(lambda: REWARD_AWARE_LOSSES, allow_none=True), "reward_weighting": Choice(REWARD_WEIGHTINGS),
             "reward_eta": in_range(0.0, MAX_ABS_GAP), "reward_model_batch_size": positive(), "reward_model_max_length": at_least(1, allow_none=True)}

    def cross_check(self) -> None:
        if self.reward_aware_loss is not None and REWARD_AWARE_LOSSES[self.reward_aware_loss].eta_positive:
            positive()("reward_eta", self.reward_eta)  # the loss divides by it
        names = (self.reward_chosen_score_field, self.reward_rejected_score_field)
        if not all(isinstance(name, str) and name for name in names) or names[0] == names[1]:
            raise ValueError(
                f"reward_chosen_score_field and reward_rejected_score_field must be two different column names, got {names!r}."
            )


@dataclass
class KLArguments:
    r"""
    > KL penalty to the reference policy (eq. 2-4; estimators from [Schulman 2020](http://joschu.net/blog/kl-approx.html))

    The coefficient is the parent's `beta`. Estimator x placement changes the gradient: see
    `docs/kl_estimators.md` for which combinations are unbiased for the reverse KL.

    kl_estimator (`str`, *optional*):
        `"k1"`, `"k2"`, `"k3"`, `"abs"` (per sampled token) or `"full"` (exact sum over the vocabulary,
        computed in chunks: from the reference logits in PPO, from the final hidden states and the LM heads
        in GRPO/RLOO; see docs/online_rl.md for its memory).
    kl_placement (`str`, *optional*):
        `"loss"` adds beta * KL to the per-token loss; `"reward"` subtracts beta * (KL summed over the
        completion) from each sequence's reward before advantages are computed (no gradient through it).
    kl_direction (`str`, *optional*, defaults to `"reverse"`):
        `"reverse"` for KL(pi || pi_ref), `"forward"` for KL(pi_ref || pi) (importance-weighted).
    kl_clamp (`float` or `None`, *optional*, defaults to `20.0`):
        Bound on |log pi - log pi_ref|, in (0, 50], applied before any exp by moving the reference log-prob to
        within `kl_clamp` of the policy's, so k3 cannot overflow (trl #3015) and clamped tokens keep a gradient.
        In float16 it is never looser than 6.9, where k3's gradient still fits. `None`: the largest bound, 50.
    kl_target (`float` or `None`, *optional*, defaults to `None`):
        If set, beta is adapted toward this KL per sequence after each optimizer step that saw new KL values (in
        the loss: every step; in the reward: once per generation)
        ([Ziegler et al. 2019](https://huggingface.co/papers/1909.08593)); beta must then be > 0.
    kl_horizon (`float`, *optional*, defaults to `10000`):
        Horizon K of the adaptive controller (steps for a 20% error to move beta by 20%).
    """

    kl_estimator: str = field(default="k3", metadata={"help": "KL estimator.", "choices": KL_ESTIMATOR_CHOICES})
    kl_placement: str = field(default="loss", metadata={"help": "Where the KL penalty goes.", "choices": list(KL_PLACEMENTS)})
    kl_direction: str = field(default="reverse", metadata={"help": "KL direction.", "choices": list(KL_DIRECTIONS)})
    kl_clamp: float | None = field(default=20.0, metadata={"help": "Bound on the log-ratio before exp (None: the largest, 50)."})
    kl_target: float | None = field(default=None, metadata={"help": "Target KL for adaptive beta (None: fixed beta)."})
    kl_horizon: float = field(default=10_000.0, metadata={"help": "Horizon of the adaptive KL controller."})

    KL_COEFFICIENT = "beta"
    """The field of the TRL config that holds the KL coefficient (PPO: ``kl_coef``)."""
    RULES = {"kl_estimator": Choice(kl_estimator_names), "kl_placement": Choice(KL_PLACEMENTS), "kl_direction": Choice(KL_DIRECTIONS),
             "kl_clamp": in_range(0.0, MAX_CLAMP, open_low=True, allow_none=True), "kl_target": positive(allow_none=True),
             "kl_horizon": positive()}

    def cross_check(self) -> None:
        coef = getattr(self, self.KL_COEFFICIENT)
        at_least(0.0)(self.KL_COEFFICIENT, coef)
        if self.kl_target is not None and not coef > 0:
            raise ValueError(f"kl_target={self.kl_target} needs {self.KL_COEFFICIENT} > 0 to adapt from, got {self.KL_COEFFICIENT}={coef}.")
        warn_if_unused(self, ("kl_estimator", "kl_placement", "kl_direction", "kl_clamp"), self.KL_COEFFICIENT)


@dataclass
class SFTKLArguments:
    r"""
    > KL anchor of supervised fine-tuning to the base model (the chapter's "Implicit Regularization", eq. 15;
    > [RL's Razor](https://huggingface.co/papers/2509.04259))

    sft_kl_coef (`float`, *optional*, defaults to `0.0`):
        Coefficient of the KL between the policy and the frozen base (reference) model, summed over the positions the
        SFT loss trains and normalized like the SFT loss (per token). `0.0` is stock SFT.
    sft_kl_direction (`str`, *optional*, defaults to `"forward"`):
        `"forward"` for KL(pi_0 || pi), RL's Razor's measure of drift, or `"reverse"` for KL(pi || pi_0).
    sft_kl_estimator (`str`, *optional*, defaults to `"full"`):
        An estimator of the registry that reads the whole distribution (`"full"`: exact over the vocabulary, in chunks,
        from final hidden states and the LM heads). The tokens of SFT come from the dataset, not from the policy, so a
        sampled-token estimator (k1, k2, k3, abs) is no estimate of the KL here and is refused.
    sft_kl_target (`float` or `None`, *optional*, defaults to `None`):
        If set, the coefficient adapts after each optimizer step toward this KL per trained token
        ([Ziegler et al. 2019](https://huggingface.co/papers/1909.08593)); `sft_kl_coef` must then be > 0.
    sft_kl_horizon (`float`, *optional*, defaults to `10000`):
        Horizon of the adaptive controller (steps for a 20% error to move the coefficient by 20%).
    """

    sft_kl_coef: float = field(default=0.0, metadata={"help": "Coefficient of the exact KL to the base model on the trained positions. 0: stock SFT."})
    sft_kl_direction: str = field(default="forward", metadata={"help": "KL direction: forward = KL(pi_0 || pi), reverse = KL(pi || pi_0).", "choices": list(KL_DIRECTIONS)})
    sft_kl_estimator: str = field(default="full", metadata={"help": "A distribution estimator of the registry (sampled-token ones do not apply to data tokens).", "choices": KL_ESTIMATOR_CHOICES})
    sft_kl_target: float | None = field(default=None, metadata={"help": "Target KL per trained token for an adaptive coefficient (None: fixed)."})
    sft_kl_horizon: float = field(default=10_000.0, metadata={"help": "Horizon of the adaptive controller."})

    RULES = {"sft_kl_coef": at_least(0.0), "sft_kl_direction": Choice(KL_DIRECTIONS), "sft_kl_estimator": Choice(kl_estimator_names),
             "sft_kl_target": positive(allow_none=True), "sft_kl_horizon": positive()}

    def cross_check(self) -> None:
        if not kl_estimator_info(self.sft_kl_estimator).needs_distribution:
            raise ValueError(
                f"sft_kl_estimator={self.sft_kl_estimator!r} estimates the KL from tokens sampled from the policy, but SFT's "
                "tokens come from the dataset, so it is no estimate of the KL here. Use an estimator of the whole "
                f"distribution: {', '.join(kl_estimator_names('distribution'))}."
            )
        if self.sft_kl_target is not None and not self.sft_kl_coef > 0:
            raise ValueError(f"sft_kl_target={self.sft_kl_target} needs sft_kl_coef > 0 to adapt from, got sft_kl_coef={self.sft_kl_coef}.")
        warn_if_unused(self, ("sft_kl_direction", "sft_kl_estimator"), "sft_kl_coef")
