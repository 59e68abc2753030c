"""KL estimators: one registry whose entries say what they need, how they are computed and where their gradient
is unbiased.

Sampled-token estimators (``needs="log_ratio"``) are functions of the per-token log-ratio
``r = log pi(y_t) - log pi_ref(y_t)`` of a token ``y_t`` sampled from ``pi`` (Schulman 2020, "Approximating KL
divergence"):

* ``reverse`` direction estimates KL(pi || pi_ref) (eq. 2-4 of the regularization chapter);
* ``forward`` direction estimates KL(pi_ref || pi) by importance weighting: with ``s = -r`` and
  ``rho = exp(s) = pi_ref / pi``, the value is ``rho * k(s)``; for k3 this is ``rho * log(rho) - rho + 1``.

Distribution estimators (``needs="distribution"``) read the whole next-token distributions of a ``KLRecord``:
its logits, or its final hidden states and LM heads (``full``, registered in ``core.full_kl``). A trainer records
whichever it can and ``kl_estimate`` calls the entry.

Each entry's ``unbiased`` set says in which (direction, placement) its expected gradient is the gradient of
that direction's KL: the one table read by the configs' choices, the trainers' warnings, the table of
``docs/kl_estimators.md`` (``estimator_table``) and ``tests/core/test_kl_gradients.py`` (which re-derives it by
exact enumeration).

Adding an estimator of either kind is one decorated function with its docstring (formula, shapes, source).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.records import KLRecord

KLEstimatorFn = Callable[[torch.Tensor], torch.Tensor]
DistributionKLFn = Callable[[KLRecord, str], torch.Tensor]
KLDirection = Literal["reverse", "forward"]
KLPlacement = Literal["loss", "reward"]
KLNeeds = Literal["log_ratio", "distribution"]

KL_DIRECTIONS: tuple[str, ...] = ("reverse", "forward")
KL_PLACEMENTS: tuple[str, ...] = ("loss", "reward")
"""``loss``: the estimate is added to the loss (pathwise gradient through log pi only).
``reward``: it is subtracted from the reward (score-function gradient, no gradient through it)."""
KL_NEEDS: tuple[str, ...] = ("log_ratio", "distribution")


@dataclass(frozen=True)
class KLEstimator:
    """A registered KL estimator.

    Attributes:
        name: the ``kl_estimator`` value.
        fn: ``needs="log_ratio"``: per-token estimate from the log-ratio (any shape -> same shape);
            ``needs="distribution"``: ``fn(record, direction) -> [B, T]`` from a ``KLRecord``'s logits or hidden states.
        needs: ``"log_ratio"`` (sampled-token log-probs suffice) or ``"distribution"`` (the whole next-token
            distributions: logits, or final hidden states and the LM head).
        unbiased: (direction, placement) pairs whose expected gradient is the gradient of that KL.
        unbiased_times_ratio: the loss term ``k(r) * pi/pi_old`` (GRPO's ``use_bias_correction_kl``; the ratio
            is 1 in value and adds the score-function part) has an unbiased reverse-KL gradient. Its gradient is
            ``(k'(r) + k(r)) grad log pi``: ``1 + r`` for k1, exactly ``r`` for k3; for ``full`` the added part
            has zero mean.
        summary: the first line of ``fn``'s docstring (the doc table's description).
    """

    name: str
    fn: Callable
    needs: KLNeeds
    unbiased: frozenset[tuple[str, str]]
    unbiased_times_ratio: bool = False

    @property
    def needs_distribution(self) -> bool:
        return self.needs == "distribution"

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl_estimator(
    name: str, needs: KLNeeds = "log_ratio", unbiased: set[tuple[str, str]] = frozenset(), unbiased_times_ratio: bool = False
) -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name`` with what it needs and its gradient metadata: ``fn(log_ratio) -> per-token
    estimate`` (``needs="log_ratio"``) or ``fn(record, direction) -> [B, T]`` (``needs="distribution"``)."""
    if needs not in KL_NEEDS:
        raise ValueError(f"needs={needs!r} is not valid. Allowed values: {', '.join(KL_NEEDS)}.")
    for direction, placement in unbiased:
        if direction not in KL_DIRECTIONS or placement not in KL_PLACEMENTS:
            raise ValueError(f"unknown (direction, placement) {(direction, placement)!r} for {name!r}")

    def decorator(fn: Callable) -> Callable:
        if name in KL_ESTIMATORS:
            raise ValueError(f"KL estimator {name!r} is already registered")
        KL_ESTIMATORS[name] = KLEstimator(name, fn, needs, frozenset(unbiased), unbiased_times_ratio)
        return fn

    return decorator


def unregister_kl_estimator(name: str) -> None:
    """Remove ``name`` from the registry (for tests and experiments that register a temporary estimator)."""
    kl_estimator_info(name)
    del KL_ESTIMATORS[name]


def kl_estimator_names(needs: KLNeeds | None = None) -> tuple[str, ...]:
    """Names accepted by ``kl_estimator`` options, in registration order (``needs``: only those of that kind)."""
    return tuple(name for name, entry in KL_ESTIMATORS.items() if needs is None or entry.needs == needs)


def kl_estimator_info(name: str) -> KLEstimator:
    """The registry entry of ``name``; the error lists the valid names."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"Unknown KL estimator {name!r}. Valid estimators: {', '.join(KL_ESTIMATORS)}.") from None


def get_kl_estimator(name: str) -> KLEstimatorFn:
    """The per-token function of the sampled-token estimator ``name``."""
    entry = kl_estimator_info(name)
    if entry.needs_distribution:
        raise ValueError(
            f"KL estimator {name!r} needs the whole distributions, not log-ratios: use kl_estimate with a KLRecord. "
            f"Sampled-token estimators: {', '.join(kl_estimator_names('log_ratio'))}."
        )
    return entry.fn


def unbiased_estimators(placement: str, direction: str = "reverse", times_ratio: bool = False) -> list[str]:
    """Estimators whose gradient is unbiased for the ``direction`` KL in ``placement`` (sorted names).

    ``times_ratio``: the loss term is multiplied by ``pi/pi_old`` (GRPO's ``use_bias_correction_kl``).
    """
    if placement == "loss" and times_ratio and direction == "reverse":
        return sorted(name for name, entry in KL_ESTIMATORS.items() if entry.unbiased_times_ratio)
    return sorted(name for name, entry in KL_ESTIMATORS.items() if (direction, placement) in entry.unbiased)


def unbiased_pairs(direction: str) -> frozenset[tuple[str, str]]:
    """(estimator, placement) pairs with an unbiased gradient of the ``direction`` KL, from the registry.

    Derived in docs/kl_estimators.md and checked by exact enumeration in tests/core/test_kl_gradients.py. Note that
    reverse-direction k3 in the loss (GRPO's default) has the expected gradient of the *forward* KL."""
    return frozenset((name, p) for name, entry in KL_ESTIMATORS.items() for d, p in entry.unbiased if d == direction)


def estimator_table() -> str:
    """The Markdown table of the registry in ``docs/kl_estimators.md`` (a test keeps the doc equal to it)."""
    rows = ["| estimator | needs | reverse KL, unbiased in | forward KL, unbiased in | with GRPO's `use_bias_correction_kl` | what it is |",
            "|---|---|---|---|---|---|"]
    for name, entry in KL_ESTIMATORS.items():
        places = {d: ", ".join(f"`{p}`" for p in KL_PLACEMENTS if (d, p) in entry.unbiased) or "none" for d in KL_DIRECTIONS}
        ratio = "unbiased" if entry.unbiased_times_ratio else "biased"
        summary = entry.summary.replace("|", "\\|")  # a literal bar inside a table cell
        rows.append(f"| `{name}` | {entry.needs.replace('_', '-')} | {places['reverse']} | {places['forward']} | {ratio} | {summary} |")
    return "\n".join(rows)


@register_kl_estimator("k1", unbiased={("reverse", "reward")}, unbiased_times_ratio=True)
def k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = r. Unbiased for KL(pi||pi_ref), high variance, can be negative per token."""
    return log_ratio


@register_kl_estimator("k2", unbiased={("reverse", "loss")})
def k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = r^2 / 2. Biased (second-order accurate for small KL), low variance, non-negative."""
    return 0.5 * log_ratio.square()


@register_kl_estimator("k3", unbiased_times_ratio=True)
def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-r) - 1 + r. Unbiased for KL(pi||pi_ref), non-negative, low variance.

    ``expm1`` keeps precision for small ``r``; bound ``r`` first (``clamp``) to avoid overflow of exp.
    """
    return torch.expm1(-log_ratio) + log_ratio


@register_kl_estimator("abs")
def abs_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """abs = |r|. Biased (an upper bound of k1 per token), non-negative."""
    return log_ratio.abs()


MAX_CLAMP = 50.0
"""Largest ``kl_clamp``: ``exp(50)`` keeps k3 and the forward direction finite in float32 (``exp(89)`` overflows)."""


@functools.cache
def finite_gradient_bound(dtype: torch.dtype) -> float:
    """Largest ``|r|`` at which the registered log-ratio estimators' values and gradients, in both directions, fit
    ``dtype``: their size is at most ``e^|r| (r^2/2 + |r| + 1)`` (forward k2), so float16 gets about 6.9 and
    bfloat16/float32 about 80 (above ``MAX_CLAMP``: ``kl_clamp`` decides there)."""
    top = math.log(torch.finfo(dtype).max) - math.log(2.0)  # a factor 2 of headroom for the sum of the terms
    low, high = 0.0, top
    for _ in range(60):  # bisection on log(e^c (c^2/2 + c + 1)) <= top
        middle = (low + high) / 2
        low, high = (middle, high) if middle + math.log(middle * middle / 2 + middle + 1) <= top else (low, middle)
    return low


def bound_reference(logps: torch.Tensor, ref_logps: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """Reference log-probs moved to within ``clamp`` of the (detached) policy's, so ``|r| <= clamp`` (``kl_clamp``;
    None: ``MAX_CLAMP``), and never further than ``finite_gradient_bound(logps.dtype)`` (float16: 6.9), so values and
    the gradient that comes back in ``logps``' dtype are finite for any finite input.

    Bounding the reference rather than clamping ``r`` keeps every value exact where the bound is inactive and
    the gradient through ``log pi`` finite and nonzero where it is active (the estimator's slope at
    ``|r| = clamp``): a clamp of ``r`` itself would zero those tokens' gradients. Bounding happens before any
    exp, so k3 cannot overflow (trl #3015, OpenRLHF #525). Shapes: ``[...]`` -> ``[...]``, detached, in at least
    float32.
    """
    if clamp is not None and not 0 < clamp <= MAX_CLAMP:
        raise ValueError(f"clamp must be in (0, {MAX_CLAMP}] or None, got {clamp}")
    limit = min(MAX_CLAMP if clamp is None else clamp, finite_gradient_bound(logps.dtype))
    dtype = torch.promote_types(logps.dtype, torch.float32)  # logps +- clamp would round in half precision
    anchor = logps.detach().to(dtype)
    return torch.clamp(ref_logps.detach().to(dtype), anchor - limit, anchor + limit)


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
        ref_logps: log pi_ref(y_t), same shape; treated as a constant (detached).
        estimator: a name from ``kl_estimator_names("log_ratio")``.
        direction: ``"reverse"`` estimates KL(pi||pi_ref), ``"forward"`` estimates KL(pi_ref||pi).
        clamp: ``kl_clamp``: the reference is bounded to within ``clamp`` of ``logps`` first
            (``bound_reference``), so values and gradients stay finite.

    Returns:
        Tensor of ``logps``' shape, computed and returned in at least float32 (k3 at ``r = -20`` overflows
        float16). Mask and reduce it yourself.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"Unknown KL direction {direction!r}. Valid directions: {', '.join(KL_DIRECTIONS)}.")
    fn = get_kl_estimator(estimator)
    dtype = torch.promote_types(logps.dtype, torch.float32)
    log_ratio = logps.to(dtype) - bound_reference(logps, ref_logps, clamp).to(dtype)
    if direction == "reverse":
        return fn(log_ratio)
    ref_to_policy = -log_ratio  # s = log(pi_ref / pi); rho = exp(s)
    return torch.exp(ref_to_policy) * fn(ref_to_policy)


def kl_estimate(record: KLRecord, estimator: str, direction: KLDirection = "reverse", clamp: float | None = None) -> torch.Tensor:
    """The ``estimator``'s per-token KL [B, T] for a record, zero outside ``record.mask``; checked finite.

    Sampled-token estimators read ``record.logps`` and ``record.ref_logps`` (``per_token_kl``, bounded by
    ``clamp``); distribution estimators call their registered function on the record (they exponentiate no
    log-ratio, so ``clamp`` does not apply). Raises ``FloatingPointError`` naming the estimator if a value is
    not finite.
    """
    entry = kl_estimator_info(estimator)
    if entry.needs_distribution:
        estimate = entry.fn(record, direction)
    elif record.logps is None:
        raise ValueError(f"KL estimator {estimator!r} needs the log-probs of tokens sampled from the policy; this record has none.")
    else:
        estimate = per_token_kl(record.logps, record.ref_logps, estimator, direction, clamp)
    return check_finite(f"KL ({estimator})", estimate * record.mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is nonzero (all dims, or one ``dim``); 0 where none is.
    Masked-out positions count for nothing, even when they hold inf or NaN."""
    mask = mask.to(values.dtype)
    masked = torch.where(mask != 0, values * mask, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        return masked.sum() / mask.sum().clamp(min=1.0)
    return masked.sum(dim) / mask.sum(dim).clamp(min=1.0)


