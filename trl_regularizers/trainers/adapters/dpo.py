"""Adapter of ``trl.DPOTrainer`` (docs/trl_internals.md §2). Line numbers are TRL 1.16's ``dpo_trainer.py``.

The batch is ``[chosen; rejected]`` along dim 0 (``DataCollatorForPreference``). ``_compute_loss`` keeps its
log-probs local and returns only the loss, so forward hooks record the outputs of the forwards it runs anyway
(no extra forward) and the adapter turns them into a ``PreferenceRecord`` for the attached ``PreferenceTerms``,
whose loss it adds to TRL's. Per-pair float columns (margins, reward scores) travel from the dataset into the
batch beside TRL's own, and are taken out before TRL's forwards.
"""

from __future__ import annotations

import torch
import trl
from trl import DPOTrainer
from trl.trainer.utils import selective_log_softmax

from trl_regularizers.components.preference import PreferenceTerms
from trl_regularizers.core.records import PreferenceRecord
from trl_regularizers.trainers.adapters.base import OutputRecorder, TrainerAdapter


def completion_token_logps(output, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """[N, T-1] log-probs of the completion tokens (0 elsewhere) from a recorded causal-LM output. TRL >= 1.15
    returns them from its fused LM head (``.log_probs``, L1299-1302); older TRL returns ``.logits``."""
    shift_mask = completion_mask[:, 1:]
    log_probs = getattr(output, "log_probs", None)
    if log_probs is None:
        log_probs = selective_log_softmax(output.logits[:, :-1], input_ids[:, 1:])
    return torch.where(shift_mask.bool(), log_probs[:, -shift_mask.size(1) :], 0.0)


class PairColumnsCollator:
    """Wraps TRL's collator and adds each per-pair column as a float [B] tensor."""

    def __init__(self, collator, columns: list[str]):
        self.collator, self.columns = collator, columns

    def __call__(self, examples):
        batch = self.collator(examples)
        for name in self.columns:
            batch[name] = torch.tensor([float(example[name]) for example in examples], dtype=torch.float32)
        return batch


class DPOAdapter(TrainerAdapter, DPOTrainer):
    TRL_CLASSES = ("Trainer", "DPOTrainer")
    dataset_kind = "preference"

    def __init__(self, *args, **kwargs):
        self.output_recorder = OutputRecorder()
        self.preference_terms: PreferenceTerms | None = None
        self.pair_columns: list[str] = []
        super().__init__(*args, **kwargs)

    def attach(self, preference: PreferenceTerms | None = None, pair_columns: list[str] = (), ptx=None) -> None:
        """Take the preference terms and the per-pair columns their records carry (present in the prepared datasets)."""
        super().attach(ptx=ptx)
        self.preference_terms, self.pair_columns = preference, list(pair_columns)
        needs = preference.needs if preference is not None else None
        if needs is not None and self.args.use_liger_kernel and hasattr(DPOTrainer, "_compute_loss_liger"):
            # TRL 1.12-1.13 route compute_loss to _compute_loss_liger (L1757-1768 in 1.12), whose forwards the hooks miss
            raise ValueError(
                f"use_liger_kernel=True replaces DPO's loss with Liger's in TRL {trl.__version__}, which leaves no "
                "log-probs to regularize: set use_liger_kernel=False, or upgrade TRL (1.16 applies Liger to layers only)."
            )
        if needs is not None:
            for module in (self.model, self.ref_model):
                if module is not None:
                    self.accelerator.unwrap_model(module).register_forward_hook(self.output_recorder.hook)
        if self.pair_columns:
            self.data_collator = PairColumnsCollator(self.data_collator, self.pair_columns)

    def loss_weight(self, loss_type: str) -> float:
        """The weight TRL gives the ``loss_type`` term of its loss (``loss_type`` must be one of them)."""
        return self.loss_weights[self.loss_types.index(loss_type)]

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [name for name in self.pair_columns if name not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in self.pair_columns})

    def stock_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        columns = {name: inputs.pop(name) for name in self.pair_columns}  # TRL would pass them to the forward
        needs = self.preference_terms.needs if self.preference_terms is not None else None
        if needs is None:
            return super().stock_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.output_recorder.recording() as outputs:
            result = super().stock_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, model_outputs = result if return_outputs else (result, None)
        loss = loss + self.preference_terms.loss(self._preference_record(outputs, inputs, columns, needs))
        return (loss, model_outputs) if return_outputs else loss

    def _preference_record(self, outputs: list, inputs: dict, columns: dict, needs: str) -> PreferenceRecord:
        # _compute_loss runs the policy forward first (L1299), then the reference (L1336 through self.model with
        # PEFT, L1338 through self.ref_model), unless the reference log-probs were precomputed into the batch.
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        n = input_ids.size(0) // 2
        logps = completion_token_logps(outputs[0], input_ids, completion_mask)
        mask = completion_mask[:, 1:].to(logps.dtype)
        ref_chosen = ref_rejected = None
        if needs == "policy+reference":
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = completion_token_logps(outputs[1], input_ids, completion_mask).sum(-1).chunk(2)
            ref_chosen, ref_rejected = ref_chosen.detach().to(logps.dtype), ref_rejected.detach().to(logps.dtype)
        return PreferenceRecord(
            chosen_logps=logps[:n],
            rejected_logps=logps[n:],
            chosen_mask=mask[:n],
            rejected_mask=mask[n:],
            chosen_lengths=inputs["attention_mask"][:n].sum(-1),
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            columns=columns,
        )
