"""Pure math of the regularizers: torch only (no trl, no transformers)."""

from trl_regularizers.core.control import AdaptiveKLController, FixedKLController, KLController, make_kl_controller
from trl_regularizers.core.full_kl import full_vocab_kl, full_vocab_kl_from_hidden
from trl_regularizers.core.kl import (
    KL_DIRECTIONS,
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    UNBIASED_FORWARD_KL_GRADIENT,
    UNBIASED_REVERSE_KL_GRADIENT,
    get_kl_estimator,
    kl_estimator_names,
    masked_mean,
    per_token_kl,
    register_kl_estimator,
)
from trl_regularizers.core.losses import length_normalized_nll, margin_preference_loss, per_pair, ptx_nll
from trl_regularizers.core.margins import (
    LLAMA2_MARGIN_LARGE,
    LLAMA2_MARGIN_SMALL,
    MARGIN_SOURCES,
    label_margin,
    likert_margin,
    rating_margin,
)
from trl_regularizers.core.ppo import (
    PolicyLossStats,
    ValueLossStats,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_var,
    masked_whiten,
    shape_rewards,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "KL_DIRECTIONS",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "UNBIASED_FORWARD_KL_GRADIENT",
    "UNBIASED_REVERSE_KL_GRADIENT",
    "LLAMA2_MARGIN_LARGE",
    "LLAMA2_MARGIN_SMALL",
    "MARGIN_SOURCES",
    "PolicyLossStats",
    "ValueLossStats",
    "clipped_policy_loss",
    "clipped_value_loss",
    "full_vocab_kl",
    "full_vocab_kl_from_hidden",
    "gae",
    "get_kl_estimator",
    "kl_estimator_names",
    "label_margin",
    "length_normalized_nll",
    "likert_margin",
    "make_kl_controller",
    "margin_preference_loss",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_pair",
    "per_token_kl",
    "ptx_nll",
    "rating_margin",
    "register_kl_estimator",
    "shape_rewards",
]
