"""What the GRPO and RLOO adapters share: their log-prob calls, TRL's own KL coefficient, the reference.

Both trainers score every rollout and every loss batch through ``_get_per_token_logps_and_entropies``, called with
``model, input_ids, attention_mask, logits_to_keep`` as its first positional arguments and returning
``(logps, entropies, aux)`` in every supported TRL (1.14 declares them as ``*args``; docs/trl_internals.md §4-5).
``LogpRecorder`` keeps the calls made inside a ``recording()`` block as ``LogpCall`` records, with the final hidden
states when the KL estimator needs the whole distribution. Both trainers read ``self.beta`` at call time and offer
no other switch for their own KL: ``trl_beta`` holds it at a value for one TRL call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from trl.trainer.utils import use_adapter

from trl_regularizers.callbacks import AdaptiveKLCallback
from trl_regularizers.core.records import HiddenStates
from trl_regularizers.models import causal_lm, lm_head_weight
from trl_regularizers.trainers.adapters.base import TrainerAdapter


@dataclass(frozen=True)
class LogpCall:
    """One recorded ``_get_per_token_logps_and_entropies`` call."""

    logps: torch.Tensor
    """[B, T] what the call returned (the completion tokens' log-probs at TRL's temperature)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_to_keep: int
    extra_args: tuple
    kwargs: dict
    states: HiddenStates | None
    """The whole distribution as final hidden states + LM head (only when the estimator needs it)."""

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] float: the completion part of the attention mask."""
        return self.attention_mask[:, -self.logits_to_keep :].to(self.logps.dtype)


class LogpRecorder:
    """The log-prob calls of the current ``recording()`` block (none outside one)."""

    def __init__(self) -> None:
        self.calls: list[LogpCall] | None = None
        self.on_call: Callable[[LogpCall], torch.Tensor | None] | None = None
        self.hidden_states = False
        """Record final hidden states with each call (set by ``attach`` for distribution estimators)."""

    @contextmanager
    def recording(self, on_call: Callable[[LogpCall], torch.Tensor | None] | None = None) -> Iterator[list[LogpCall]]:
        """Record every call inside the block. ``on_call(call)`` runs right after each call, before TRL reads anything
        else; a tensor it returns replaces the log-probs TRL receives."""
        outer = self.calls, self.on_call
        self.calls, self.on_call = [], on_call
        try:
            yield self.calls
        finally:
            self.calls, self.on_call = outer


class OnlineAdapter(TrainerAdapter):
    """GRPO/RLOO: the recorded log-prob calls, ``trl_beta``, and the reference scored like a recorded call."""

    dataset_kind = "prompt"
    TRL_KL: tuple[str, str] = ("k3", "loss")
    """The KL the TRL trainer computes itself (estimator, placement)."""

    def __init__(self, *args, **kwargs):
        self.logp_recorder = LogpRecorder()
        super().__init__(*args, **kwargs)

    def dataset_formats(self, arguments: dict) -> list[tuple[str, ...]] | None:
        """With an ``environment_factory`` (GRPO >= 1.16) the environment's ``reset()`` may supply the prompt."""
        return None if arguments.get("environment_factory") is not None else super().dataset_formats(arguments)

    def attach(self, kl=None, ptx=None) -> None:
        """Also: an adaptive coefficient moves after every optimizer step (``AdaptiveKLCallback``)."""
        super().attach(kl, ptx)
        self.logp_recorder.hidden_states = kl is not None and kl.enabled and kl.plan.needs_distribution
        if kl is not None and kl.enabled and kl.adaptive:
            self.add_callback(AdaptiveKLCallback(kl))

    @contextmanager
    def trl_beta(self, value: float):
        """TRL's own KL coefficient held at ``value`` inside the block (TRL reads ``self.beta`` at call time; 0 skips
        its reference pass and its KL term)."""
        saved, self.beta = self.beta, value
        try:
            yield
        finally:
            self.beta = saved

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        recorder = self.logp_recorder
        if recorder.calls is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        with self._recording_hidden(model, logits_to_keep) if recorder.hidden_states else nullcontext() as hidden:
            logps, *rest = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        states = None
        if recorder.hidden_states:
            states = HiddenStates(torch.cat(hidden), lm_head_weight(self.accelerator.unwrap_model(model), trainable=torch.is_grad_enabled()), self.temperature)
        call = LogpCall(logps, input_ids, attention_mask, logits_to_keep, args, kwargs, states)
        recorder.calls.append(call)
        replaced = recorder.on_call(call) if recorder.on_call is not None else None
        return (logps if replaced is None else replaced, *rest)

    def score_policy(self, call: LogpCall) -> LogpCall:
        """The sequences of ``call`` scored by the policy, without grad, recorded the same way."""
        return self._score(self.model, call)

    def score_reference(self, call: LogpCall) -> LogpCall:
        """The sequences of ``call`` scored by the reference, without grad, recorded the same way: TRL's own reference
        pass (the reference model, or under PEFT the policy with its adapter disabled or its ``"ref"`` adapter; GRPO
        L2710-2736, RLOO L1613-1640 in TRL 1.16)."""
        if self.ref_model is not None:
            return self._score(self.ref_model, call)
        peft_model = self.accelerator.unwrap_model(self.model)
        with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
            return self._score(self.model, call)

    def _score(self, model: torch.nn.Module, call: LogpCall) -> LogpCall:
        # No entropy: TRL 1.16 installs the reference's fused head without one (rloo_trainer.py L716-722)
        kwargs = {**call.kwargs, "compute_entropy": False} if "compute_entropy" in call.kwargs else call.kwargs
        with torch.no_grad(), self.logp_recorder.recording() as calls:
            self._get_per_token_logps_and_entropies(model, call.input_ids, call.attention_mask, call.logits_to_keep, *call.extra_args, **kwargs)
        return calls[0]

    @contextmanager
    def _recording_hidden(self, model: torch.nn.Module, logits_to_keep: int):
        """Collect, per backbone forward of ``model``, the final hidden states that predict the last
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
