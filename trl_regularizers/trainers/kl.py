"""The KL penalty of the online trainers (GRPO, RLOO): estimator, direction, clamp, placement, adaptive control.

``KLRegularizer`` is mixed in before an online adapter (``adapters.grpo``, ``adapters.rloo``) and fills its
insertion points from ``KLArguments``: ``kl_plan`` (what TRL's own KL becomes), ``bound_reference`` (``kl_clamp``)
and ``kl_penalty`` (the estimate from a ``KLRecord``, logged and fed to the adaptive controller). It names no
TRL internals.
"""

from __future__ import annotations

import warnings

import torch
from accelerate.utils import DistributedType

from trl_regularizers.callbacks import AdaptiveKLCallback
from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.full_kl import full_vocab_kl, full_vocab_kl_from_hidden
from trl_regularizers.core.kl import bound_reference, kl_estimator_info, per_token_kl, unbiased_estimators
from trl_regularizers.trainers.adapters.base import KLPlan, causal_lm, gathered, why_logits_are_not_a_product
from trl_regularizers.trainers.records import KLRecord


def estimate_kl(record: KLRecord, estimator: str, direction: str, clamp: float | None) -> torch.Tensor:
    """Per-token KL estimate [B, T], zero outside ``record.mask``; checked finite.

    Estimators that need logits are exact over the vocabulary, from the records' logits or hidden states + LM
    heads, chunk by chunk (``core.full_kl``); ``clamp`` does not apply to them (they exponentiate no log-ratio).
    """
    if not kl_estimator_info(estimator).needs_logits:
        estimate = per_token_kl(record.logps, record.ref_logps, estimator, direction, clamp)
    elif record.logits is not None:
        estimate = full_vocab_kl(record.logits, record.ref_logits, mask=record.mask, direction=direction)
    else:
        policy, ref = record.policy_states, record.ref_states
        with gathered(policy.weight, ref.weight):  # ZeRO-3 (reward placement only): the partitioned heads, gathered
            estimate = full_vocab_kl_from_hidden(
                (policy.hidden / policy.temperature).to(policy.weight.dtype),
                (ref.hidden.detach() / ref.temperature).to(ref.weight.dtype),
                policy.weight,
                ref.weight,
                mask=record.mask,
                direction=direction,
            )
    return check_finite(f"KL ({estimator})", estimate * record.mask)


class KLRegularizer:
    """KL options for an online adapter; the coefficient is the parent's ``beta``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        args = self.args
        if kl_estimator_info(args.kl_estimator).needs_logits and self.beta != 0.0:
            self._check_logits_recomputable()
        self._kl_callback = None
        if args.kl_target is not None:
            self._kl_callback = AdaptiveKLCallback(self, args.kl_target, args.kl_horizon)
            self.add_callback(self._kl_callback)
        self._warn_if_biased()

    def kl_plan(self) -> KLPlan:
        args = self.args
        native = (args.kl_estimator, args.kl_placement, args.kl_direction) == (self.trl_kl_estimator, self.trl_kl_placement, "reverse")
        return KLPlan(native, args.kl_placement, kl_estimator_info(args.kl_estimator).needs_logits)

    def bound_reference(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        return bound_reference(logps, ref_logps, self.args.kl_clamp)

    def kl_penalty(self, record: KLRecord, logged_by_trl: bool) -> torch.Tensor:
        """The configured estimate; logs ``kl`` (unless TRL logs it), ``kl/k1``, ``kl/k3``, ``kl/coef`` and feeds
        the adaptive controller the per-sequence sums. Collective: every rank calls it."""
        args = self.args
        estimate = estimate_kl(record, args.kl_estimator, args.kl_direction, args.kl_clamp)
        logps = record.logps.detach()
        sums = [estimate.detach().sum()]
        for name in ("k1", "k3"):
            sums.append((per_token_kl(logps, record.ref_logps, name, args.kl_direction, args.kl_clamp) * record.mask).sum())
        sums = self.accelerator.reduce(torch.stack([*sums, record.mask.sum().float()]), reduction="sum")
        count = sums[3].clamp(min=1.0)
        if not logged_by_trl:
            self.log_reduced_metric("kl", (sums[0] / count).item())
        self.log_reduced_metric("kl/k1", (sums[1] / count).item())
        self.log_reduced_metric("kl/k3", (sums[2] / count).item())
        self.log_reduced_metric("kl/coef", self.beta)
        if self._kl_callback is not None and self.mode == "train":
            self._kl_callback.observe(estimate.detach().sum(-1))
        return estimate

    def _warn_if_biased(self) -> None:
        args = self.args
        times_ratio = bool(getattr(args, "use_bias_correction_kl", False))
        unbiased = unbiased_estimators(args.kl_placement, "reverse", times_ratio)
        if self.beta != 0.0 and args.kl_direction == "reverse" and args.kl_estimator not in unbiased:
            other = "reward" if args.kl_placement == "loss" else "loss"
            warnings.warn(
                f"kl_estimator={args.kl_estimator!r} with kl_placement={args.kl_placement!r} gives a biased gradient "
                f"of the reverse KL. Unbiased alternatives: kl_estimator in {unbiased} with this placement, or "
                f"{unbiased_estimators(other, 'reverse', times_ratio)} with the other one. See docs/kl_estimators.md.",
                UserWarning,
                stacklevel=3,
            )

    def _check_logits_recomputable(self) -> None:
        """The exact KL recomputes logits as ``hidden @ W.T / temperature`` outside the forward: refuse setups where
        that is not the logits, or where the LM-head weight cannot be read there (see ``adapters.base.full_weight``
        and ``gathered``)."""
        name, estimator, state = type(self).__name__, self.args.kl_estimator, self.accelerator.state
        if state.distributed_type == DistributedType.FSDP and not self.accelerator.is_fsdp2:
            raise ValueError(
                f"kl_estimator={estimator!r} in {name} needs the whole LM-head weight outside the forward; FSDP1 keeps it "
                "in flat sharded parameters. Use FSDP2 (fsdp_version: 2), DDP or DeepSpeed ZeRO-1/2."
            )
        if state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin.zero_stage == 3 and self.args.kl_placement == "loss":
            raise ValueError(
                f"kl_estimator={estimator!r} with kl_placement='loss' in {name} is not supported under DeepSpeed ZeRO-3: "
                "its gradient would reach an LM head that ZeRO-3 partitions outside the engine's forward. Use "
                "kl_placement='reward' (the head is gathered without gradient), FSDP2, or ZeRO-1/2."
            )
        models = [self.model] if self.ref_model is None else [self.model, self.ref_model]
        for model in map(causal_lm, map(self.accelerator.unwrap_model, models)):
            reason = why_logits_are_not_a_product(model)
            if reason is not None:
                raise ValueError(f"kl_estimator={estimator!r} in {name} recomputes the logits as hidden @ W.T, but {reason}.")
