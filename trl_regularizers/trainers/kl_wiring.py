"""KL wiring shared by ``RegularizedGRPOTrainer`` and ``RegularizedRLOOTrainer``.

Both parents compute per-token log-probs through ``_get_per_token_logps_and_entropies`` (same signature in
TRL 1.12 and 1.16, TRL_NOTES §4-5). This mixin captures those tensors, turns them into the configured KL
estimate (``trl_regularizers.core.kl``), logs it, feeds the adaptive controller and warns about biased
estimator x placement combinations. Where the estimate goes (loss or reward) is trainer specific and lives in
``grpo.py`` / ``rloo.py``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from trl_regularizers.callbacks import AdaptiveKLCallback
from trl_regularizers.core.kl import FULL_VOCAB_ESTIMATOR, UNBIASED_REVERSE_KL_GRADIENT, per_token_kl
from trl_regularizers.trainers.common import check_finite, mode_of

UNBIASED_WITH_RATIO_IN_LOSS = frozenset({"k1", "k3", FULL_VOCAB_ESTIMATOR})
"""Estimators whose loss term ``k(r) * pi/pi_old`` (GRPO's ``use_bias_correction_kl``; the ratio is 1 in value
and carries the score-function gradient) has an unbiased reverse-KL gradient: its gradient is
``(k'(r) + k(r)) grad log pi``, and ``k'(r) + k(r)`` is ``1 + r`` for k1 and exactly ``r`` for k3 (the
reverse-KL score); for ``full`` the added term has zero mean."""


def unbiased_estimators(placement: str, ratio_in_loss: bool) -> list[str]:
    """Estimators that give an unbiased reverse-KL gradient in ``placement`` (see docs/kl_estimators.md)."""
    if placement == "loss" and ratio_in_loss:
        return sorted(UNBIASED_WITH_RATIO_IN_LOSS)
    return sorted(name for name, where in UNBIASED_REVERSE_KL_GRADIENT if where == placement)


class KLWiringMixin:
    """Capture log-probs, estimate, log and control the KL. Call ``_setup_kl()`` after ``super().__init__``."""

    _kl_capture: list[tuple[torch.Tensor, tuple, dict]] | None = None
    _kl_on_call = None

    def _setup_kl(self, parent_kl: tuple[str, str], ratio_in_loss: bool = False) -> None:
        """Validate, create the adaptive controller, warn about bias.

        ``parent_kl``: the parent's built-in (estimator, placement). With it (reverse direction) the parent
        computes the KL itself and the subclass only bounds the reference log-probs it reads, so the numbers
        are the parent's to the bit wherever ``kl_clamp`` is inactive.
        """
        args = self.args
        if not hasattr(args, "kl_estimator"):
            raise TypeError(
                f"{type(self).__name__} needs its Regularized*Config (e.g. RegularizedGRPOConfig), got "
                f"{type(args).__name__}: swap the config class together with the trainer class."
            )
        if args.kl_estimator == FULL_VOCAB_ESTIMATOR:
            raise ValueError(
                f"kl_estimator='full' is not supported by {type(self).__name__} yet: TRL >= 1.15 computes the "
                "policy log-probs with a fused LM head that returns no logits. In the loss, 'k2' (and 'k3' with "
                "GRPO's use_bias_correction_kl) also gives an unbiased reverse-KL gradient. In the reward 'full' "
                "would not help: the KL gets no gradient there, and 'k1' is the unbiased choice."
            )
        self._kl_native = (args.kl_estimator, args.kl_placement, args.kl_direction) == (*parent_kl, "reverse")
        if not hasattr(self, "_regularizer_state"):
            self._regularizer_state = {}
        self._kl_callback = None
        if args.kl_target is not None:
            self._kl_callback = AdaptiveKLCallback(self, args.kl_target, args.kl_horizon)
            self.add_callback(self._kl_callback)
        unbiased = unbiased_estimators(args.kl_placement, ratio_in_loss)
        if self.beta != 0.0 and args.kl_direction == "reverse" and args.kl_estimator not in unbiased:
            warnings.warn(
                f"kl_estimator={args.kl_estimator!r} with kl_placement={args.kl_placement!r} gives a biased gradient "
                f"of the reverse KL. Unbiased alternatives: kl_estimator in {unbiased} with this placement, or "
                f"{unbiased_estimators('reward' if args.kl_placement == 'loss' else 'loss', ratio_in_loss)} with "
                "the other one. See docs/kl_estimators.md.",
                UserWarning,
                stacklevel=3,
            )

    @contextmanager
    def _capturing_logps(self, on_call=None):
        """Collect the outputs (and call arguments) of every log-prob call made inside the block.

        ``on_call(logps)``, if given, runs right after each call, before the parent reads anything else.
        """
        self._kl_capture, self._kl_on_call = [], on_call
        try:
            yield self._kl_capture
        finally:
            self._kl_capture, self._kl_on_call = None, None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if self._kl_capture is not None:
            self._kl_capture.append((out[0], (input_ids, attention_mask, logits_to_keep, *args), kwargs))
            if self._kl_on_call is not None:
                self._kl_on_call(out[0])
        return out

    def _bounded_ref(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """Reference log-probs moved to within ``kl_clamp`` of the (detached) policy's, so ``|r| <= kl_clamp``.

        Bounding the reference rather than clamping ``r`` keeps exact numbers wherever the bound is inactive
        and a finite gradient (the estimator's at ``|r| = kl_clamp``) where it is active (trl #3015).
        """
        if self.args.kl_clamp is None:
            return ref_logps.detach()
        anchor = logps.detach()
        return torch.clamp(ref_logps.detach(), anchor - self.args.kl_clamp, anchor + self.args.kl_clamp)

    def _kl_estimate(self, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token estimate of the configured estimator/direction/clamp, zero outside ``mask``; checked finite."""
        estimate = per_token_kl(logps, self._bounded_ref(logps, ref_logps), self.args.kl_estimator, self.args.kl_direction)
        return check_finite(f"KL ({self.args.kl_estimator})", estimate * mask)

    def _log_kl(self, estimate, logps, ref_logps, mask, parent_logs_kl: bool = False) -> None:
        """Log ``kl`` (token mean of the estimate, unless the parent logs it), ``kl/k1``, ``kl/k3``, ``kl/coef``;
        feed the adaptive controller the per-sequence sums of the estimate.

        Collective (token means are reduced over processes): call it on every rank.
        """
        mode = mode_of(self)
        compare = {
            name: per_token_kl(logps.detach(), self._bounded_ref(logps, ref_logps), name, self.args.kl_direction) * mask
            for name in ("k1", "k3")
        }
        sums = torch.stack([estimate.detach().sum(), compare["k1"].sum(), compare["k3"].sum(), mask.sum().float()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        count = sums[3].clamp(min=1.0)
        if not parent_logs_kl:
            self._metrics[mode]["kl"].append((sums[0] / count).item())
        self._metrics[mode]["kl/k1"].append((sums[1] / count).item())
        self._metrics[mode]["kl/k3"].append((sums[2] / count).item())
        self._metrics[mode]["kl/coef"].append(float(self.beta))
        if self._kl_callback is not None and mode == "train":
            self._kl_callback.observe(estimate.detach().sum(-1))
