"""Reward-aware losses of direct alignment: RPO, REBEL and reward-weighted DPO (torch only).

The chapter's "Margin-based Regularization" section names them: "Reward weighted DPO, Reward-aware Preference
Optimization (RPO), which integrates reward model scores into the update rule following a DPO loss, or REBEL that
has a reward delta weighting in a regression-loss formulation". Each takes, per (chosen, rejected) pair,

* the policy's log-ratio gap ``gap = [log pi/pi_ref](y_c) - [log pi/pi_ref](y_r)`` (Δ̂; summed over the
  completion tokens, or averaged per token: ``logratio_gap``), with its autograd graph, and
* the reward difference ``reward_diff = r(y_c) - r(y_r)`` of a reward model or of annotator scores (no graph).

Notation: ``a = beta * gap`` is the implicit reward gap of DPO, ``b = eta * reward_diff`` the scaled reward gap
(``Δr`` in docs/reward_aware.md), ``sigma`` the logistic function, ``ls = log sigma``.

* ``rpo_loss``: Nemotron-4 340B's RPO (NVIDIA 2024, arXiv 2406.11704, sec. 3.4.3) and its distance family
  (Sun et al. 2025, arXiv 2502.00203): ``D[a || b]`` with ``sq`` ``(a - b)^2``, ``bwd_kl``
  ``KL(Bern(sigma(b)) || Bern(sigma(a)))`` (Nemotron's D) or ``fwd_kl`` ``KL(Bern(sigma(a)) || Bern(sigma(b)))``.
* ``rebel_loss``: REBEL's regression (Gao et al. 2024, arXiv 2404.16767, eq. 1) with pi_t = pi_ref, offline and
  pairwise: ``(gap / eta - reward_diff)^2``.
* ``weighted_dpo_loss`` with ``reward_weights``: the DPO sigmoid loss of each pair times a weight of its reward
  gap.

Shapes: ``B`` pairs; inputs [B] or [B, 1]; outputs [B]. Half-precision inputs are computed and returned in float32.
Every user-set number (``beta``, ``eta``, the normalizer) is checked finite and in range; tensors are not
inspected (no device sync).

``REWARD_AWARE_LOSSES`` is the registry of the names ``reward_aware_loss`` accepts: each entry is one decorated
function ``fn(gap, reward_diff, settings) -> RewardAwareResult`` with what the config must check about it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trl_regularizers.core.losses import compute_dtype, per_pair

RPO_DISTANCES: tuple[str, ...] = ("sq", "bwd_kl", "fwd_kl")
"""Distances ``D[a || b]`` between the implicit reward gap ``a`` and the scaled reward gap ``b``."""
REWARD_WEIGHTINGS: tuple[str, ...] = ("abs_normalized", "abs", "sigmoid")
"""Weights of reward-weighted DPO: ``|Δr| / mean |Δr|``, ``|Δr|``, ``sigma(Δr)`` with ``Δr = eta * reward_diff``."""
MAX_ABS_GAP = 1e15
"""Documented domain: finite results while |beta * gap|, |eta * reward_diff|, |gap / eta| stay below this (the
squared losses then stay below float32's max, 3.4e38)."""


def check_number(name: str, value, *, low: float, inclusive: bool = True, high: float | None = None) -> float:
    """``value`` as a float; raise ``ValueError`` naming ``name`` unless it is a finite real number >= ``low``
    (> ``low`` when not ``inclusive``) and <= ``high`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if (value < low) if inclusive else (value <= low):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return value


def _pairs(gap: torch.Tensor, other: torch.Tensor, other_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    gap, other = per_pair(gap, "logratio_gap"), per_pair(other, other_name)
    if gap.shape != other.shape:
        raise ValueError(f"{other_name} has {other.shape[0]} rows but there are {gap.shape[0]} pairs")
    dtype = compute_dtype(gap, other)
    return gap.to(dtype), other.to(dtype), dtype


def logratio_gap(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Δ̂ = ``(chosen - ref_chosen) / n_c - (rejected - ref_rejected) / n_r`` per pair, in at least float32.

    Args:
        chosen_logps, rejected_logps: [B] policy log-probs of the completions, summed over their tokens.
        ref_chosen_logps, ref_rejected_logps: [B] the reference's, summed over the same tokens.
        chosen_tokens, rejected_tokens: [B] completion token counts to average per token (both or neither;
            counts below 1 count as 1). None: summed log-ratios (DPO's Δ̂).

    Returns:
        [B] Δ̂.
    """
    if (chosen_tokens is None) != (rejected_tokens is None):
        raise ValueError("pass both chosen_tokens and rejected_tokens, or neither")
    parts = [per_pair(t, name) for t, name in ((chosen_logps, "chosen_logps"), (rejected_logps, "rejected_logps"),
                                               (ref_chosen_logps, "ref_chosen_logps"), (ref_rejected_logps, "ref_rejected_logps"))]
    if len({tuple(p.shape) for p in parts}) != 1:
        raise ValueError(f"the four log-prob sums must have the same shape [B], got {[tuple(p.shape) for p in parts]}")
    dtype = compute_dtype(*parts)
    chosen, rejected, ref_chosen, ref_rejected = (p.to(dtype) for p in parts)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if chosen_tokens is not None:
        chosen_ratio = chosen_ratio / per_pair(chosen_tokens, "chosen_tokens").to(dtype).clamp(min=1.0)
        rejected_ratio = rejected_ratio / per_pair(rejected_tokens, "rejected_tokens").to(dtype).clamp(min=1.0)
    return chosen_ratio - rejected_ratio


def bernoulli_kl(p_logit: torch.Tensor, q_logit: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(sigma(p)) || Bern(sigma(q)))`` elementwise, from logits, in at least float32.

    ``sigma(p) (ls(p) - ls(q)) + sigma(-p) (ls(-p) - ls(-q))``: the weight that vanishes multiplies the term that
    grows, so finite logits give a finite value (no ``log 0``). Gradient w.r.t. ``q``: ``sigma(q) - sigma(p)``.
    """
    dtype = compute_dtype(p_logit, q_logit)
    p, q = p_logit.to(dtype), q_logit.to(dtype)
    return torch.sigmoid(p) * (F.logsigmoid(p) - F.logsigmoid(q)) + torch.sigmoid(-p) * (F.logsigmoid(-p) - F.logsigmoid(-q))


def rpo_loss(logratio_gap: torch.Tensor, reward_diff: torch.Tensor, beta: float, eta: float, distance: str = "bwd_kl") -> torch.Tensor:
    """Reward-aware Preference Optimization: ``D[beta * gap || eta * reward_diff]`` per pair.

    Nemotron-4 340B (arXiv 2406.11704, sec. 3.4.3) writes ``L_rpo = D[r_pi(x,y_c) - r_pi(x,y_l) || eta (r*(x,y_c)
    - r*(x,y_l))]`` with the implicit reward ``r_pi = beta log pi/pi_ref`` and ``D[a||b] = sigma(b) log(sigma(b) /
    sigma(a)) + (1 - sigma(b)) log((1 - sigma(b)) / (1 - sigma(a)))``, i.e. ``bwd_kl`` below; arXiv 2502.00203
    adds the squared distance and the forward KL. With ``a = beta * gap``, ``b = eta * reward_diff``:

    * ``sq``: ``(a - b)^2``; d/d gap = ``2 beta (a - b)``. At ``eta = 0``: ``(beta gap)^2`` (pull the gap to 0).
    * ``bwd_kl``: ``KL(Bern(sigma(b)) || Bern(sigma(a)))``; d/d gap = ``beta (sigma(a) - sigma(b))``. As
      ``b -> +inf`` it tends to DPO's ``-log sigma(a)``.
    * ``fwd_kl``: ``KL(Bern(sigma(a)) || Bern(sigma(b)))``; d/d gap = ``beta sigma(a) sigma(-a) (a - b)``.

    Every distance is 0 exactly where ``a = b`` and is symmetric under swapping chosen and rejected (both gaps
    change sign), so the preference label itself carries no information beyond the scores.

    Args:
        logratio_gap: [B] Δ̂ (``logratio_gap``), with its graph.
        reward_diff: [B] ``r(y_c) - r(y_r)``.
        beta: > 0, DPO's beta. eta: >= 0, the reward scale.
        distance: one of ``RPO_DISTANCES``.

    Returns:
        [B] losses; finite for finite inputs in the domain of ``MAX_ABS_GAP``.
    """
    if distance not in RPO_DISTANCES:
        raise ValueError(f"distance={distance!r} is not valid. Allowed values: {', '.join(RPO_DISTANCES)}.")
    beta = check_number("beta", beta, low=0.0, inclusive=False)
    eta = check_number("eta", eta, low=0.0)
    gap, diff, _ = _pairs(logratio_gap, reward_diff, "reward_diff")
    implicit, target = beta * gap, eta * diff
    if distance == "sq":
        return (implicit - target) ** 2
    if distance == "bwd_kl":
        return bernoulli_kl(target, implicit)
    return bernoulli_kl(implicit, target)


def rebel_loss(logratio_gap: torch.Tensor, reward_diff: torch.Tensor, eta: float) -> torch.Tensor:
    """REBEL's regression of the relative reward, offline and pairwise: ``(gap / eta - reward_diff)^2`` per pair.

    Gao et al. 2024 (arXiv 2404.16767, eq. 1) fit ``1/eta (ln pi(y|x)/pi_t(y|x) - ln pi(y'|x)/pi_t(y'|x))`` to
    ``r(x,y) - r(x,y')`` by least squares, ``pi_t`` being the previous iterate; here ``pi_t = pi_ref`` and (y, y')
    = (chosen, rejected), so the bracket is Δ̂. ``eta`` is REBEL's step size (> 0): the minimizer is
    ``gap = eta * reward_diff``, and as ``eta -> 0`` it is the reference (``eta^2`` times the loss tends to
    ``gap^2``). It equals ``rpo_loss(.., beta=1/eta, eta=1, distance="sq")``.

    d/d gap = ``(2 / eta) (gap / eta - reward_diff)``.

    Args:
        logratio_gap: [B] Δ̂, with its graph. reward_diff: [B]. eta: > 0.

    Returns:
        [B] losses.
    """
    eta = check_number("eta", eta, low=0.0, inclusive=False)
    gap, diff, _ = _pairs(logratio_gap, reward_diff, "reward_diff")
    return (gap / eta - diff) ** 2


def reward_weights(reward_diff: torch.Tensor, weighting: str, eta: float, normalizer: float | None = None) -> torch.Tensor:
    """Per-pair weights of reward-weighted DPO from ``Δr = eta * reward_diff`` (no graph).

    * ``abs``: ``|Δr|`` (NeMo-Aligner's ``scale`` preference loss, with its ``gt_reward_scale`` as ``eta``).
    * ``abs_normalized``: ``|reward_diff| / normalizer``, ``normalizer`` > 0 being the mean ``|reward_diff|``
      over the training pairs, so the weights average 1 over the data and the step size stays DPO's (``eta``
      cancels).
    * ``sigmoid``: ``sigma(Δr)``, the Bradley-Terry probability, under the scores, that the chosen completion is
      the better one (``eta``: inverse temperature). Pairs whose scores contradict their label weigh < 1/2.

    At equal rewards the weight is 0 (``abs``, ``abs_normalized``: the pair drops out) or 1/2 (``sigmoid``),
    never undefined.

    Returns:
        [B] non-negative weights in at least float32.
    """
    if weighting not in REWARD_WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not valid. Allowed values: {', '.join(REWARD_WEIGHTINGS)}.")
    eta = check_number("eta", eta, low=0.0)
    diff = per_pair(reward_diff, "reward_diff")
    diff = diff.detach().to(compute_dtype(diff))
    if weighting == "abs":
        return (eta * diff).abs()
    if weighting == "sigmoid":
        return torch.sigmoid(eta * diff)
    if normalizer is None:
        raise ValueError("weighting='abs_normalized' needs the normalizer (the mean |reward_diff| over the training pairs)")
    normalizer = check_number("normalizer", normalizer, low=0.0, inclusive=False)
    return diff.abs() / normalizer


def weighted_dpo_loss(logratio_gap: torch.Tensor, weights: torch.Tensor, beta: float, margin: torch.Tensor | None = None) -> torch.Tensor:
    """``weights * -log sigma(beta * gap - margin)`` per pair: DPO's sigmoid loss (with an optional ODPO margin)
    weighted per pair. d/d gap = ``-weights * beta * sigma(-(beta * gap - margin))``.

    Args:
        logratio_gap: [B] Δ̂, with its graph. weights: [B] (``reward_weights``; treated as constants).
        beta: > 0. margin: [B] or None.

    Returns:
        [B] losses in at least float32.
    """
    beta = check_number("beta", beta, low=0.0, inclusive=False)
    gap, w, dtype = _pairs(logratio_gap, weights, "weights")
    logits = beta * gap
    if margin is not None:
        margin = per_pair(margin, "margin")
        if margin.shape != gap.shape:
            raise ValueError(f"margin has {margin.shape[0]} rows but there are {gap.shape[0]} pairs")
        logits = logits - margin.to(dtype)
    return w.detach() * -F.logsigmoid(logits)


@dataclass(frozen=True)
class RewardAwareSettings:
    """What a reward-aware loss reads besides the per-pair tensors."""

    beta: float
    """DPO's beta (> 0)."""
    eta: float
    """The reward scale / REBEL step size / weight scale (``reward_eta``)."""
    weighting: str = "abs_normalized"
    """``reward_weighting`` (weighted DPO)."""
    normalizer: float | None = None
    """Mean ``|r_c - r_r|`` over the training pairs (weighted DPO with ``"abs_normalized"``)."""
    margin: torch.Tensor | None = None
    """[B] per-pair margins (weighted DPO only)."""


@dataclass(frozen=True)
class RewardAwareResult:
    """[B] per-pair tensors of a reward-aware loss."""

    losses: torch.Tensor
    """The loss of each pair, with its graph."""
    implicit_gap: torch.Tensor
    """The policy-side quantity fitted to the target (``reward_aware/implicit_gap``)."""
    reward_gap: torch.Tensor
    """The target from the scores (``reward_aware/reward_gap``)."""
    weights: torch.Tensor | None = None
    """Pair weights, where the loss weighs pairs (``reward_aware/weight``)."""


@dataclass(frozen=True)
class RewardAwareLoss:
    """A registered reward-aware loss: its function and what its config must satisfy."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, RewardAwareSettings], RewardAwareResult]
    takes_margin: bool = False
    """Per-pair margins combine with it (elsewhere the reward gap already sets the target)."""
    eta_positive: bool = False
    """It divides by ``eta``, which must then be > 0 (else >= 0)."""
    uses_weighting: bool = False
    """It reads ``reward_weighting`` (and, for ``"abs_normalized"``, the normalizer)."""


REWARD_AWARE_LOSSES: dict[str, RewardAwareLoss] = {}


def register_reward_aware_loss(name: str, takes_margin: bool = False, eta_positive: bool = False, uses_weighting: bool = False):
    """Register ``fn(gap [B], reward_diff [B], settings) -> RewardAwareResult`` under the ``reward_aware_loss`` name."""

    def decorator(fn):
        if name in REWARD_AWARE_LOSSES:
            raise ValueError(f"reward-aware loss {name!r} is already registered")
        REWARD_AWARE_LOSSES[name] = RewardAwareLoss(name, fn, takes_margin, eta_positive, uses_weighting)
        return fn

    return decorator


def _register_rpo(distance: str) -> None:
    def rpo(gap: torch.Tensor, reward_diff: torch.Tensor, settings: RewardAwareSettings) -> RewardAwareResult:
        return RewardAwareResult(rpo_loss(gap, reward_diff, settings.beta, settings.eta, distance), settings.beta * gap, settings.eta * reward_diff)

    rpo.__doc__ = f"RPO with the {distance!r} distance: ``rpo_loss(gap, reward_diff, beta, eta, {distance!r})``."
    register_reward_aware_loss(f"rpo_{distance}")(rpo)


for _distance in RPO_DISTANCES:
    _register_rpo(_distance)


@register_reward_aware_loss("rebel", eta_positive=True)
def rebel(gap: torch.Tensor, reward_diff: torch.Tensor, settings: RewardAwareSettings) -> RewardAwareResult:
    """REBEL: ``rebel_loss(gap, reward_diff, eta)``; fits ``gap / eta`` to the reward gap."""
    return RewardAwareResult(rebel_loss(gap, reward_diff, settings.eta), gap / settings.eta, reward_diff)


@register_reward_aware_loss("weighted_dpo", takes_margin=True, uses_weighting=True)
def weighted_dpo(gap: torch.Tensor, reward_diff: torch.Tensor, settings: RewardAwareSettings) -> RewardAwareResult:
    """Reward-weighted DPO: ``weighted_dpo_loss(gap, reward_weights(reward_diff, ...), beta, margin)``."""
    weights = reward_weights(reward_diff, settings.weighting, settings.eta, settings.normalizer)
    losses = weighted_dpo_loss(gap, weights, settings.beta, settings.margin)
    return RewardAwareResult(losses, settings.beta * gap, settings.eta * reward_diff, weights)
