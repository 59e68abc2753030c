"""KL wiring shared by ``RegularizedGRPOTrainer`` and ``RegularizedRLOOTrainer``.

Both parents compute per-token log-probs through ``_get_per_token_logps_and_entropies`` (same signature in
TRL 1.12 and 1.16, TRL_NOTES §4-5). This mixin captures those tensors, turns them into the configured KL
estimate (``trl_regularizers.core.kl``), logs it, feeds the adaptive controller and warns about biased
estimator x placement combinations. Where the estimate goes (loss or reward) is trainer specific and lives in
``grpo.py`` / ``rloo.py``.

``kl_estimator="full"`` also records the backbone's final hidden states in those calls (TRL >= 1.15 scores
tokens with a fused LM head that returns no logits) and computes the exact KL from them and the LM heads
(``core.full_kl.full_vocab_kl_from_hidden``); the rollout keeps the reference's hidden states, not its logits.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from accelerate.utils import DistributedType

from trl_regularizers.callbacks import AdaptiveKLCallback
from trl_regularizers.core.full_kl import full_vocab_kl_from_hidden
from trl_regularizers.core.kl import FULL_VOCAB_ESTIMATOR, UNBIASED_REVERSE_KL_GRADIENT, per_token_kl
from trl_regularizers.trainers.common import check_finite, mode_of

LOGIT_SCALING_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
"""Model-config fields that change the logits after the LM-head product: ``full`` refuses models that set them."""
REF_HIDDEN_KEY = "ref_hidden_states"
"""Rollout-batch key of the reference's final hidden states at the completion positions (``full`` in the loss)."""

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


class LogpCall(NamedTuple):
    """One captured ``_get_per_token_logps_and_entropies`` call."""

    logps: torch.Tensor
    args: tuple
    kwargs: dict
    hidden: torch.Tensor | None
    """Final hidden states that predict the completion tokens [B, T, H] (only for ``kl_estimator="full"``)."""


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` module inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class KLWiringMixin:
    """Capture log-probs, estimate, log and control the KL. Call ``_setup_kl()`` after ``super().__init__``."""

    _kl_capture: list[LogpCall] | None = None
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
        if args.kl_estimator == FULL_VOCAB_ESTIMATOR and self.beta != 0.0:
            self._check_full_kl_supported()
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

    def _check_full_kl_supported(self) -> None:
        """``full`` recomputes logits as ``hidden @ W.T / temperature``: refuse setups where that is not the logits."""
        name = type(self).__name__
        if self.accelerator.distributed_type == DistributedType.FSDP or (
            self.accelerator.distributed_type == DistributedType.DEEPSPEED
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise ValueError(
                f"kl_estimator='full' in {name} needs the whole LM-head weight outside the forward; FSDP and "
                "DeepSpeed ZeRO-3 shard it. Use DDP or ZeRO-1/2, or a sampled-token estimator ('k2' in the loss)."
            )
        models = [self.model] if self.ref_model is None else [self.model, self.ref_model]
        for model in map(causal_lm, map(self.accelerator.unwrap_model, models)):
            head = model.get_output_embeddings()
            if type(head) is not torch.nn.Linear or head.bias is not None:
                raise ValueError(
                    f"kl_estimator='full' in {name} needs a plain bias-free nn.Linear LM head, got {head!r} "
                    "(an adapter on the LM head or a bias would be left out of the recomputed logits)."
                )
            config = model.config.get_text_config()
            for attribute in LOGIT_SCALING_ATTRIBUTES:
                if getattr(config, attribute, None) not in (None, 1.0):
                    raise ValueError(
                        f"kl_estimator='full' in {name} does not support models whose config sets {attribute}="
                        f"{getattr(config, attribute)!r}: the recomputed logits would miss that scaling."
                    )

    @contextmanager
    def _recording_hidden(self, model: torch.nn.Module, logits_to_keep: int):
        """Collect, per forward of ``model``'s backbone, the final hidden states that predict the last
        ``logits_to_keep`` tokens (the positions TRL scores), with their autograd graph."""
        recorded: list[torch.Tensor] = []

        def record(module, inputs, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            recorded.append(hidden[:, -logits_to_keep - 1 : -1])

        handle = causal_lm(self.accelerator.unwrap_model(model)).base_model.register_forward_hook(record)
        try:
            yield recorded
        finally:
            handle.remove()

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
        if self._kl_capture is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        with_hidden = self.args.kl_estimator == FULL_VOCAB_ESTIMATOR
        with self._recording_hidden(model, logits_to_keep) if with_hidden else nullcontext() as hidden:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        args = (input_ids, attention_mask, logits_to_keep, *args)
        self._kl_capture.append(LogpCall(out[0], args, kwargs, torch.cat(hidden) if with_hidden else None))
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

    def _kl_estimate(self, policy: LogpCall, ref_logps: torch.Tensor, mask: torch.Tensor, ref_hidden=None) -> torch.Tensor:
        """Per-token estimate of the configured estimator/direction/clamp, zero outside ``mask``; checked finite.

        ``full`` is exact over the vocabulary, from the policy's and the reference's final hidden states
        (``policy.hidden``, ``ref_hidden``) and LM heads, chunk by chunk without materializing logits; the
        clamp does not apply to it (it never exponentiates a log-ratio).
        """
        if self.args.kl_estimator == FULL_VOCAB_ESTIMATOR:
            weight = self._lm_head_weight(self.model)
            ref_weight = weight if self.ref_model is None else self._lm_head_weight(self.ref_model)  # PEFT: same head
            # logits / temperature == (hidden / temperature) @ W.T, as TRL scores the sampled tokens
            hidden, ref_hidden = policy.hidden / self.temperature, ref_hidden.detach() / self.temperature
            estimate = full_vocab_kl_from_hidden(
                hidden.to(weight.dtype), ref_hidden.to(ref_weight.dtype), weight, ref_weight, direction=self.args.kl_direction
            )
        else:
            bounded_ref = self._bounded_ref(policy.logps, ref_logps)
            estimate = per_token_kl(policy.logps, bounded_ref, self.args.kl_estimator, self.args.kl_direction)
        return check_finite(f"KL ({self.args.kl_estimator})", estimate * mask)

    def _lm_head_weight(self, model: torch.nn.Module) -> torch.Tensor:
        return causal_lm(self.accelerator.unwrap_model(model)).get_output_embeddings().weight

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
