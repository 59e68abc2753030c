"""Per-token KL estimators from sampled tokens (Schulman 2020, "Approximating KL divergence").

Every estimator is a function of the per-token log-ratio ``r = log pi(y_t) - log pi_ref(y_t)`` of a
token ``y_t`` sampled from ``pi``. With those samples:

* ``reverse`` direction estimates KL(pi || pi_ref) (eq. 2-4 of the regularization chapter);
* ``forward`` direction estimates KL(pi_ref || pi) by importance weighting: with ``s = -r`` and
  ``rho = exp(s) = pi_ref / pi``, the value is ``rho * k(s)``; for k3 this is the familiar
  ``rho * log(rho) - rho + 1``.

Which estimator x placement gives an unbiased *gradient* is tabulated in ``docs/kl_estimators.md``
and asserted by ``tests/core/test_kl_gradients.py``.

Adding an estimator is one decorated function; config validation and the shared tests pick it up.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

KLEstimatorFn = Callable[[torch.Tensor], torch.Tensor]
KLDirection = Literal["reverse", "forward"]

KL_ESTIMATORS: dict[str, KLEstimatorFn] = {}
KL_DIRECTIONS: tuple[str, ...] = ("reverse", "forward")
FULL_VOCAB_ESTIMATOR = "full"
"""Name of the exact full-vocabulary KL (``trl_regularizers.core.full_kl``); it needs logits, not log-ratios."""


def register_kl_estimator(name: str) -> Callable[[KLEstimatorFn], KLEstimatorFn]:
    """Register ``fn(log_ratio) -> per-token estimate`` under ``name``."""

    def decorator(fn: KLEstimatorFn) -> KLEstimatorFn:
        if name in KL_ESTIMATORS or name == FULL_VOCAB_ESTIMATOR:
            raise ValueError(f"KL estimator {name!r} is already registered")
        KL_ESTIMATORS[name] = fn
        return fn

    return decorator


def kl_estimator_names(include_full: bool = True) -> tuple[str, ...]:
    """Names accepted by ``kl_estimator`` options; ``full`` is the exact full-vocabulary KL."""
    names = tuple(KL_ESTIMATORS)
    return (*names, FULL_VOCAB_ESTIMATOR) if include_full else names


def get_kl_estimator(name: str) -> KLEstimatorFn:
    """Return the sampled-token estimator registered as ``name``; the error lists the valid names."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        hint = " ('full' needs logits: use trl_regularizers.core.full_kl)" if name == FULL_VOCAB_ESTIMATOR else ""
        raise ValueError(
            f"Unknown KL estimator {name!r}{hint}. Valid sampled-token estimators: {', '.join(KL_ESTIMATORS)}."
        ) from None


@register_kl_estimator("k1")
def k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = r. Unbiased for KL(pi||pi_ref), high variance, can be negative per token."""
    return log_ratio


@register_kl_estimator("k2")
def k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = r^2 / 2. Biased (second-order accurate for small KL), low variance, non-negative."""
    return 0.5 * log_ratio.square()


@register_kl_estimator("k3")
def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-r) - 1 + r. Unbiased for KL(pi||pi_ref), non-negative, low variance.

    ``expm1`` keeps precision for small ``r``; bound ``r`` first (``clamp``) to avoid overflow of exp.
    """
    return torch.expm1(-log_ratio) + log_ratio


@register_kl_estimator("abs")
def abs_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """abs = |r|. Biased (an upper bound of k1 per token), non-negative."""
    return log_ratio.abs()


def per_token_kl(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    estimator: str = "k3",
    direction: KLDirection = "reverse",
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL estimate for tokens sampled from the policy.

    Args:
        logps: log pi(y_t), any shape (typically [B, T]); gradients flow through it.
        ref_logps: log pi_ref(y_t), same shape; treated as given (detach it yourself if needed).
        estimator: a name from ``kl_estimator_names(include_full=False)``.
        direction: ``"reverse"`` estimates KL(pi||pi_ref), ``"forward"`` estimates KL(pi_ref||pi).
        clamp: if set, the log-ratio is clamped to ``[-clamp, clamp]`` *before* any exp, so values
            and gradients stay finite (trl #3015, OpenRLHF #525). Clamped tokens get zero gradient.

    Returns:
        Tensor of ``logps``' shape. Mask and reduce it yourself.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"Unknown KL direction {direction!r}. Valid directions: {', '.join(KL_DIRECTIONS)}.")
    if clamp is not None and clamp <= 0:
        raise ValueError(f"clamp must be positive or None, got {clamp}")
    fn = get_kl_estimator(estimator)
    log_ratio = logps - ref_logps
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    if direction == "reverse":
        return fn(log_ratio)
    ref_to_policy = -log_ratio  # s = log(pi_ref / pi); rho = exp(s)
    return torch.exp(ref_to_policy) * fn(ref_to_policy)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is nonzero (all dims, or one ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


KL_PLACEMENTS: tuple[str, ...] = ("loss", "reward")
"""``loss``: the estimate is added to the loss (pathwise gradient through log pi only).
``reward``: it is subtracted from the reward (score-function gradient, no gradient through it)."""

UNBIASED_REVERSE_KL_GRADIENT: frozenset[tuple[str, str]] = frozenset({("k2", "loss"), ("full", "loss"), ("k1", "reward")})
"""(estimator, placement) pairs whose expected gradient equals the gradient of KL(pi||pi_ref) for the reverse
direction. Derived in docs/kl_estimators.md and checked by exact enumeration in tests/core/test_kl_gradients.py."""

UNBIASED_FORWARD_KL_GRADIENT: frozenset[tuple[str, str]] = frozenset({("full", "loss")})
"""The same for ``direction="forward"`` (gradient of KL(pi_ref||pi)). Note that reverse-direction k3 in the
loss (GRPO's default) has the expected gradient of the *forward* KL (see docs/kl_estimators.md)."""
