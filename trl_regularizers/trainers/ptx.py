"""Pretraining NLL mixing (PPO-ptx, eq. 6; Ouyang et al. 2022) for every trainer.

``PtxRegularizer`` is mixed in before an adapter: it takes ``pretrain_dataset=``, builds the sharded ``PtxStream``
(registered in the checkpointed ``regularizer_state``) and adds ``ptx_coef * NLL`` of the next ptx batch to the
loss, through the same backward, gradient-accumulation scaling and DDP sync as the parent's loss. It reads
``PtxArguments`` (``ptx_coef``, ``ptx_batch_size``, ``ptx_block_size``, ``ptx_text_field``).

The NLL comes from the final hidden states and the LM-head weight, chunk by chunk (``core.losses.
chunked_nll_from_hidden``), so the [B, T, V] logits of the ptx batch never exist; the backbone and the NLL run as
the forward of the accelerate-wrapped model (``run_inside_forward``), so DDP syncs the gradient and FSDP2 unshards
the weights as for any forward. Where the logits are not ``hidden @ W.T`` (``why_logits_are_not_a_product``), or
the LM-head weight is no plain tensor inside the forward (FSDP1's flat parameters, DeepSpeed ZeRO-3's partitions),
or PEFT prompt learning adds virtual tokens in its own forward, the NLL comes from the model's logits instead.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from accelerate.utils import DistributedType

from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.losses import chunked_nll_from_hidden, ptx_nll
from trl_regularizers.ptx import PtxStream
from trl_regularizers.trainers.adapters.base import causal_lm, run_inside_forward, why_logits_are_not_a_product


class PtxRegularizer:
    """Extra keyword argument: ``pretrain_dataset`` (raw text or ``input_ids`` rows) for ``ptx_coef > 0``."""

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ptx_stream = self._make_ptx_stream(pretrain_dataset)
        self.ptx_from_hidden_states = False
        """Whether the ptx NLL is computed from hidden states (else from the model's [B, T, V] logits)."""
        if self.ptx_stream is not None:
            self.regularizer_state.register("ptx", self.ptx_stream)
            self.ptx_from_hidden_states = self._hidden_states_give_the_logits()

    def _hidden_states_give_the_logits(self) -> bool:
        """True when the chunked NLL from the backbone's hidden states equals the NLL of the model's own logits."""
        model, state = self.accelerator.unwrap_model(self.language_model()), self.accelerator.state
        peft_config = getattr(model, "active_peft_config", None)
        language_model = causal_lm(model)
        return not (
            why_logits_are_not_a_product(language_model) is not None
            or language_model.base_model is language_model  # no separate backbone to run
            or getattr(peft_config, "is_prompt_learning", False)  # virtual tokens come from the PEFT forward
            or (state.distributed_type == DistributedType.FSDP and not self.accelerator.is_fsdp2)
            or (state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin.zero_stage == 3)
        )

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
        if self.ptx_from_hidden_states:
            unwrapped = self.accelerator.unwrap_model(model)
            nll_from_hidden = functools.partial(self._ptx_nll_from_hidden, causal_lm(unwrapped))
            nll = run_inside_forward(model, unwrapped, nll_from_hidden, batch["input_ids"], batch["attention_mask"], batch["labels"])
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            nll = ptx_nll(logits, batch["labels"])
        # The gathered mean is non-finite if any process's NLL is, so every process raises together.
        check_finite("ptx", torch.tensor(self.log_metric("ptx/nll", nll)))
        return self.scale_like_parent_loss(self.args.ptx_coef * nll)

    def _ptx_nll_from_hidden(self, language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean NLL [] of the ptx batch ([B, T] each) from the backbone's last hidden state; runs as the wrapped
        model's forward, under the autocast accelerate would have put around that forward."""
        with self.accelerator.autocast():
            hidden = language_model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            weight = self.lm_head_weight(language_model)
            return chunked_nll_from_hidden(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, labels[:, 1:].reshape(-1))
