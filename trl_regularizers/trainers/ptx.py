"""Pretraining NLL mixing (PPO-ptx, eq. 6; Ouyang et al. 2022) for every trainer.

``PtxRegularizer`` is mixed in before an adapter: it takes ``pretrain_dataset=``, builds the sharded ``PtxStream``
(registered in the checkpointed ``regularizer_state``) and adds ``ptx_coef * NLL`` of the next ptx batch to the
loss, through the same backward, gradient-accumulation scaling and DDP sync as the parent's loss. It reads
``PtxArguments`` (``ptx_coef``, ``ptx_batch_size``, ``ptx_block_size``, ``ptx_text_field``).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.losses import ptx_nll
from trl_regularizers.ptx import PtxStream


class PtxRegularizer:
    """Extra keyword argument: ``pretrain_dataset`` (raw text or ``input_ids`` rows) for ``ptx_coef > 0``."""

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ptx_stream = self._make_ptx_stream(pretrain_dataset)
        if self.ptx_stream is not None:
            self.regularizer_state.register("ptx", self.ptx_stream)

    def _make_ptx_stream(self, pretrain_dataset) -> PtxStream | None:
        """The sharded stream, or None when mixing is off; errors before training on bad input."""
        coef, name = self.args.ptx_coef, type(self).__name__
        if pretrain_dataset is None:
            if coef > 0:
                raise ValueError(f"ptx_coef={coef} > 0 needs pretraining data: pass pretrain_dataset= to {name}.")
            return None
        if coef == 0:
            warnings.warn("pretrain_dataset is given but ptx_coef=0.0, so it is not used. Set ptx_coef > 0 to mix it in.", stacklevel=3)
            return None
        language_model = self.language_model()
        if language_model.get_output_embeddings() is None:
            raise ValueError(f"ptx_coef={coef} > 0 needs a model with a language-modeling head; {type(language_model).__name__} has none.")
        max_positions = getattr(language_model.config, "max_position_embeddings", None)
        if max_positions is not None and self.args.ptx_block_size > max_positions:
            raise ValueError(f"ptx_block_size={self.args.ptx_block_size} exceeds the model's max_position_embeddings={max_positions}.")
        # A Dataset backed by cache files is tokenized once, by the main process; in-memory data by all at once.
        cached = bool(getattr(pretrain_dataset, "cache_files", None))
        with self.accelerator.main_process_first() if cached else contextlib.nullcontext():
            return PtxStream(
                pretrain_dataset,
                getattr(self.processing_class, "tokenizer", self.processing_class),
                block_size=self.args.ptx_block_size,
                batch_size=self.args.ptx_batch_size or self.args.per_device_train_batch_size,
                text_field=self.args.ptx_text_field,
                process_index=self.accelerator.process_index,
                num_processes=self.accelerator.num_processes,
                seed=self.args.seed,
                vocab_size=language_model.get_input_embeddings().num_embeddings,
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ptx = self.ptx_loss(model)  # after the parent's loss: its forward is not one the adapters record
        if ptx is None:
            return result
        return (result[0] + ptx, result[1]) if return_outputs else result + ptx

    def ptx_loss(self, model) -> torch.Tensor | None:
        """``ptx_coef * NLL`` of the next ptx batch through ``model`` (the accelerate-wrapped one, so DDP syncs it),
        scaled like the parent's loss; None in eval or when mixing is off."""
        if self.ptx_stream is None or not self.model.training:
            return None
        batch = {k: v.to(self.accelerator.device) for k, v in self.ptx_stream.next_batch().items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll = ptx_nll(logits, batch["labels"])
        # The gathered mean is non-finite if any process's NLL is, so every process raises together.
        check_finite("ptx", torch.tensor(self.log_metric("ptx/nll", nll)))
        return self.scale_like_parent_loss(self.args.ptx_coef * nll)
