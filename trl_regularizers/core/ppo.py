"""PPO math for RLHF: masked statistics, per-token KL reward shaping, GAE and the clipped losses.

The RLHF objective (Ouyang et al. 2022, arXiv 2203.02155) is maximized with PPO (Schulman et al. 2017, arXiv 1707.06347):
a per-token reward ``r_t = -beta * KL_t`` plus the sequence score (Ziegler et al. 2019, arXiv 1909.08593),
advantages by GAE (Schulman et al. 2016, arXiv 1506.02438), then the clipped policy and value losses. The
pretraining-mix (ptx) term of Ouyang et al. 2022 is ``trl_regularizers.core.losses.ptx_nll``.

Shapes: B = sequences, T = response tokens. Masks are bool (or 0/1) tensors that are **True on the positions
that count** (TRL 1.12 keeps ``padding_mask``, True on padding, and passes ``~padding_mask``).

The numbers are those of TRL 1.12 (``trl.experimental.ppo``) for float32 inputs, bit for bit, with three
deliberate differences (``tests/core/test_ppo_math.py`` checks the equality and each difference):

* an empty mask gives a mean of 0 (TRL: NaN), and ``masked_var`` of fewer than two elements gives 0 (TRL:
  ValueError for none, NaN for one), so ``masked_whiten`` only centers there (see its docstring);
* reductions of 16-bit inputs run in float32 (TRL sums float16 squares, which overflow above 256);
* float64 ``masked_var`` computes its Bessel factor in float64 (TRL: in float32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from trl_regularizers.core.kl import masked_mean

WHITEN_EPS = 1e-8
"""Added to the variance before ``rsqrt`` in ``masked_whiten`` (the value TRL uses)."""

__all__ = [
    "WHITEN_EPS",
    "PolicyLossStats",
    "ValueLossStats",
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "shape_rewards",
]


class PolicyLossStats(NamedTuple):
    """Detached scalars logged with the clipped policy loss (TRL's ``policy/*`` and ``val/ratio`` metrics)."""

    clipfrac: torch.Tensor
    """Fraction of the masked tokens whose clipped term is strictly the larger one (the clip is active); float32."""
    approxkl: torch.Tensor
    """``0.5 * mean((logprobs - old_logprobs)^2)``, the k2 estimate of KL(pi_old || pi) (Schulman 2020)."""
    ratio_mean: torch.Tensor
    """Mean of ``exp(logprobs - old_logprobs)``."""


class ValueLossStats(NamedTuple):
    """Detached scalars logged with the clipped value loss (TRL's ``val/clipfrac_avg``)."""

    clipfrac: torch.Tensor
    """Fraction of the masked tokens whose clipped squared error is strictly the larger one; float32."""


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floats, else ``dtype`` (float32 and float64 are kept)."""
    return torch.promote_types(dtype, torch.float32)


def _unit_interval(name: str, value: float) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return number


def _positive(name: str, value: float) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _same_shape(**tensors: torch.Tensor) -> None:
    """Refuse silent broadcasting: a [B] tensor against [B, T] builds a wrong loss, not an error."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"expected tensors of one shape, got {listed}")


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the positions where ``mask`` is nonzero (all dims).

    ``var = masked_mean((x - mean)^2) * n / (n - 1)`` with ``n = mask.sum()`` (Bessel's correction if
    ``unbiased``; TRL 1.12's formula and order of operations).

    Args:
        values: any shape.
        mask: ``values``' shape, True (1) on the positions to use.
        unbiased: divide by ``n - 1`` instead of ``n``.

    Returns:
        0-dim tensor, float32 for 16-bit ``values``, else ``values``' dtype. With fewer than two (``unbiased``)
        or one (biased) selected positions there is no spread to estimate and the result is 0 (TRL raises or
        returns NaN); gradients stay finite there too.
    """
    values = values.to(_stats_dtype(values.dtype))
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean).square(), mask)
    if not unbiased:
        return variance
    count = mask.to(values.dtype).sum()
    bessel = count / (count - 1).clamp(min=1.0)  # n / (n - 1); the clamp keeps the unused branch finite
    return torch.where(count > 1, variance * bessel, torch.zeros_like(variance))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = WHITEN_EPS) -> torch.Tensor:
    """Standardize ``values`` with the mean and unbiased variance of the masked positions.

    ``(x - mean) / sqrt(var + eps)``, plus ``mean`` again if not ``shift_mean`` (only the scale changes); used for
    PPO advantages (whitened) and optionally rewards (``whiten_rewards``, not shifted). Every position is
    transformed, masked or not: fill the padding yourself afterwards (TRL: ``masked_fill(padding_mask, 0)``).

    Args:
        values: any shape, typically [B, T].
        mask: ``values``' shape, True (1) on the positions whose statistics are used.
        shift_mean: if False the result keeps the masked mean of ``values``.
        eps: added to the variance (TRL: 1e-8).

    Returns:
        ``values``' shape and dtype (statistics of 16-bit inputs are computed in float32). With fewer than two
        masked positions the variance is undefined and the values are only centered, not scaled:
        ``values - mean`` (``values`` unchanged if not ``shift_mean``), where an empty mask has mean 0, so it
        returns ``values``, and a single masked position becomes 0. Never NaN for finite inputs; positions
        outside the mask can still overflow float16 when the masked spread is tiny.
    """
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    stats_values = values.to(_stats_dtype(values.dtype))
    mean = masked_mean(stats_values, mask)
    variance = masked_var(stats_values, mask)
    count = mask.to(stats_values.dtype).sum()
    scale = torch.where(count > 1, torch.rsqrt(variance + eps), torch.ones_like(variance))
    whitened = (stats_values - mean) * scale
    if not shift_mean:
        whitened = whitened + mean
    return whitened.to(values.dtype)


def shape_rewards(
    kl: torch.Tensor, scores: torch.Tensor, last_index: torch.Tensor, coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with a KL penalty (Ziegler et al. 2019, arXiv 1909.08593).

    ``non_score_reward_t = -coef * KL_t`` and ``reward_t = non_score_reward_t + score * [t == s]`` where the
    score lands on ``s = last_index + 1`` (the token after the last response token) if ``s < T``, else on
    ``s = last_index``. This is TRL 1.12's placement: the value mask (``padding_mask_p1``) reaches one step
    past the response, so the score is seen by the value at that step.

    Args:
        kl: [B, T] per-token KL estimate, already 0 after the response.
        scores: [B] sequence scores (reward model, minus any missing-EOS penalty).
        last_index: [B] integer index of the last response token of each row (TRL ``sequence_lengths``; -1
            for an empty response puts the score on token 0).
        coef: KL coefficient beta, finite and >= 0.

    Returns:
        ``(non_score_reward, rewards)``, both [B, T] in ``kl``'s dtype.
    """
    coef_value = float(coef)
    if not (math.isfinite(coef_value) and coef_value >= 0.0):
        raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
    if kl.dim() != 2:
        raise ValueError(f"kl must have shape [B, T], got {tuple(kl.shape)}")
    batch = kl.shape[0]
    for name, tensor in (("scores", scores), ("last_index", last_index)):
        if tuple(tensor.shape) != (batch,):
            raise ValueError(f"{name} must have shape [B] = ({batch},), got {tuple(tensor.shape)}")
    if last_index.is_floating_point() or last_index.dtype == torch.bool:
        raise ValueError(f"last_index must be an integer tensor, got {last_index.dtype}")
    non_score_reward = -coef_value * kl
    rewards = non_score_reward.clone()
    score_index = torch.where(last_index + 1 < kl.shape[1], last_index + 1, last_index)
    rewards[torch.arange(batch, device=kl.device), score_index] += scores
    return non_score_reward, rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, computed backwards
    with ``V_T = A_T = 0`` (no bootstrap after the last position); ``returns = A + V`` are the TD(lambda)
    targets of the value loss. ``gamma = lam = 1`` gives reward-to-go minus ``V``; ``gamma * lam = 0`` gives
    the one-step TD error. Zero rewards and values after a response leave its advantages unchanged.

    Args:
        rewards: [B, T] per-token rewards (``shape_rewards``).
        values: [B, T] value estimates, 0 where they do not apply (TRL: after ``padding_mask_p1``).
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, both [B, T]; ``advantages`` has ``rewards``' dtype. Not whitened: see
        ``masked_whiten``.
    """
    gamma = _unit_interval("gamma", gamma)
    lam = _unit_interval("lam", lam)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, T], got {tuple(rewards.shape)}")
    _same_shape(rewards=rewards, values=values)
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = 0
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    masked_stats: bool = False,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO's clipped surrogate, as a loss (Schulman et al. 2017, arXiv 1707.06347, eq. 7).

    With ``rho_t = exp(logprobs_t - old_logprobs_t)``:
    ``loss = masked_mean(max(-A_t * rho_t, -A_t * clip(rho_t, 1 - cliprange, 1 + cliprange)))``.
    Its gradient w.r.t. ``logprobs_t`` is ``-A_t * rho_t / n`` (n = masked tokens) unless the clipped term is
    strictly larger, where it is 0.

    Args:
        logprobs: [B, T] log pi(y_t) of the sampled tokens under the current policy; gradients flow through it.
        old_logprobs: [B, T] the same under the policy that sampled them (constant).
        advantages: [B, T] (whitened) advantages (constant).
        mask: [B, T], True on response tokens (TRL: ``~padding_mask``).
        cliprange: epsilon, finite and > 0.
        masked_stats: if False (TRL 1.12), ``approxkl`` and ``ratio_mean`` average over all B*T positions, so
            padding counts as log-ratio 0 / ratio 1 provided both log-prob tensors hold the same value there
            (TRL fills both with ``INVALID_LOGPROB = 1.0``). If True they average over ``mask``.

    Returns:
        ``(loss, stats)``: a 0-dim loss (float32 for 16-bit inputs; 0 for an empty mask) and detached
        ``PolicyLossStats``. Padding is excluded from the loss by multiplying with the mask, so it must hold
        finite numbers (TRL: ``INVALID_LOGPROB`` in both log-probs, 0 advantages).
    """
    cliprange = _positive("cliprange", cliprange)
    _same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.max(unclipped, clipped)
    loss = masked_mean(per_token.to(_stats_dtype(per_token.dtype)), mask)
    with torch.no_grad():
        log_ratio = log_ratio.to(_stats_dtype(log_ratio.dtype))
        ratio = torch.exp(log_ratio)  # recomputed in float32 for 16-bit inputs, where exp overflows sooner
        if masked_stats:
            approxkl, ratio_mean = 0.5 * masked_mean(log_ratio.square(), mask), masked_mean(ratio, mask)
        else:
            approxkl, ratio_mean = 0.5 * log_ratio.square().mean(), ratio.mean()
        stats = PolicyLossStats(
            clipfrac=masked_mean((clipped > unclipped).float(), mask), approxkl=approxkl, ratio_mean=ratio_mean
        )
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, ValueLossStats]:
    """PPO's clipped value loss (Schulman et al. 2017, arXiv 1707.06347; the clipping of OpenAI baselines' ppo2).

    With ``V_clip = clip(V, V_old - c, V_old + c)``:
    ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``. Its gradient w.r.t. ``V_t`` is
    ``(V_t - R_t) / n`` (n = masked tokens) unless the clipped error is strictly larger, where it is 0.

    Args:
        values: [B, T] current value estimates; gradients flow through them.
        old_values: [B, T] value estimates at rollout time (constant).
        returns: [B, T] targets (``gae``'s returns, constant).
        mask: [B, T], True where values apply (TRL: ``~padding_mask_p1``, one step past the response).
        cliprange_value: c, finite and > 0.

    Returns:
        ``(loss, stats)``: a 0-dim loss (float32 for 16-bit inputs; 0 for an empty mask) and detached
        ``ValueLossStats``.
    """
    cliprange_value = _positive("cliprange_value", cliprange_value)
    _same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    per_token = torch.max(unclipped, clipped)
    loss = 0.5 * masked_mean(per_token.to(_stats_dtype(per_token.dtype)), mask)
    with torch.no_grad():
        stats = ValueLossStats(clipfrac=masked_mean((clipped > unclipped).float(), mask))
    return loss, stats
