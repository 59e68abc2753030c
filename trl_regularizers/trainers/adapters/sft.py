"""Adapter of ``trl.SFTTrainer`` (docs/trl_internals.md §7). Line numbers are TRL 1.16's ``sft_trainer.py``.

SFT's batch is the model's forward keywords plus ``labels`` (``-100`` where no loss is taken: prompts under
``completion_only_loss``, non-assistant turns under ``assistant_only_loss``, padding, the first token of each packed or
padding-free sequence). ``compute_loss`` runs one policy forward with gradient (L1611; through the model's own loss
in 1.12, L1789) and normalizes the summed NLL by ``num_items_in_batch`` (the trained tokens of the whole
gradient-accumulation window and every process, times the process count when ``average_tokens_across_devices``,
L1616-1624). A forward hook on the policy's backbone records its final hidden states; the adapter scores the same
inputs with the frozen reference's backbone and hands the attached ``KLAnchor`` a ``KLRecord`` of the trained
positions, whose KL it adds to TRL's loss with TRL's normalizer, so the term accumulates like the NLL.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from trl import SFTTrainer

from trl_regularizers.callbacks import AdaptiveKLCallback
from trl_regularizers.components.kl import KLAnchor
from trl_regularizers.core.records import HiddenStates, KLRecord
from trl_regularizers.data import DATASET_FORMATS
from trl_regularizers.models import causal_lm, lm_head_weight
from trl_regularizers.trainers.adapters.base import OutputRecorder, TrainerAdapter

IGNORE_INDEX = -100


def last_hidden_state(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class SFTAdapter(TrainerAdapter, SFTTrainer):
    TRL_CLASSES = ("Trainer", "SFTTrainer")
    dataset_kind = "language_modeling"

    def __init__(self, *args, **kwargs):
        self.hidden_recorder = OutputRecorder()
        self.kl_anchor: KLAnchor | None = None
        self.reference_model: torch.nn.Module | None = None
        super().__init__(*args, **kwargs)

    def dataset_formats(self, arguments: dict) -> list[tuple[str, ...]] | None:
        """SFT reads ``dataset_text_field`` for plain text; a ``formatting_func`` makes the text from any columns, and
        ``dataset_kwargs={"skip_prepare_dataset": True}`` hands the rows to the collator as they are."""
        args = arguments["args"]
        if arguments.get("formatting_func") is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            return None
        return [(args.dataset_text_field,), *(columns for columns in DATASET_FORMATS[self.dataset_kind] if columns != ("text",))]

    def attach(self, anchor: KLAnchor | None = None, reference: torch.nn.Module | None = None, ptx=None) -> None:
        """Take the KL anchor and its reference (a frozen copy; None: the policy with its PEFT adapter disabled)."""
        super().attach(ptx=ptx)
        self.kl_anchor, self.reference_model = anchor, reference
        if anchor is None or not anchor.enabled:
            return
        causal_lm(self.accelerator.unwrap_model(self.model)).base_model.register_forward_hook(self.hidden_recorder.hook)
        if anchor.adaptive:
            self.regularizer_state.register("kl_controller", anchor.controller)
            self.add_callback(AdaptiveKLCallback(anchor))

    def stock_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor = self.kl_anchor
        if anchor is None or not anchor.enabled:
            return super().stock_loss(model, inputs, return_outputs, num_items_in_batch)
        if "shift_labels" in inputs:  # context/sequence parallelism pre-shifts and splits the labels (1.12 L1756)
            raise ValueError("sft_kl_coef > 0 is not supported with context or sequence parallelism (pre-shifted labels).")
        labels = inputs["labels"]
        with self.hidden_recorder.recording() as outputs:
            result = super().stock_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, model_outputs = result if return_outputs else (result, None)
        trained = labels[:, 1:] != IGNORE_INDEX  # the positions whose next token the NLL trains
        policy = last_hidden_state(outputs[0])[:, :-1][trained]  # the policy forward with gradient comes first
        reference = self._reference_hidden(inputs)[:, :-1][trained]
        record = KLRecord(
            None, None, torch.ones(1, policy.shape[0], device=policy.device),
            HiddenStates(policy[None], lm_head_weight(self.accelerator.unwrap_model(model))),
            HiddenStates(reference[None], lm_head_weight(self._reference(), trainable=False)),
        )
        kl = anchor.penalty(record)
        loss = loss + anchor.coef * kl.sum() / self._token_normalizer(trained, num_items_in_batch)
        return (loss, model_outputs) if return_outputs else loss

    def _reference(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model) if self.reference_model is None else self.reference_model

    def _reference_hidden(self, inputs: dict) -> torch.Tensor:
        """[B, T, H] final hidden states of the reference on the batch, without grad (PEFT: adapter disabled)."""
        model = self._reference()
        forward = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
        disabled = model.disable_adapter() if self.reference_model is None else nullcontext()
        with torch.no_grad(), disabled:
            return last_hidden_state(causal_lm(model).base_model(**forward, use_cache=False))

    def _token_normalizer(self, trained: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """What TRL divides the summed NLL by: ``num_items_in_batch`` (over the processes' count when
        ``average_tokens_across_devices``), or this batch's trained tokens."""
        if num_items_in_batch is None:
            return trained.sum().clamp(min=1)
        count = torch.as_tensor(num_items_in_batch, device=trained.device).clamp(min=1)
        return count / self.accelerator.num_processes if self.args.average_tokens_across_devices else count
