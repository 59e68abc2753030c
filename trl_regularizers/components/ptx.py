"""``PtxTerm``: pretraining NLL mixing (PPO-ptx, eq. 6; Ouyang et al. 2022), built once from ``PtxArguments``.

``ptx_coef * NLL`` of the next batch of the sharded, checkpointed ``PtxStream``, through the same backward and DDP
sync as the parent's loss (the adapter scales it for gradient accumulation like the parent's loss). The NLL comes
from the final hidden states and the LM-head weight, chunk by chunk (``core.losses.chunked_nll_from_hidden``), so
the [B, T, V] logits of the ptx batch never exist; the backbone and the NLL run as the forward of the
accelerate-wrapped model (``models.run_inside_forward``), so DDP syncs the gradient and FSDP2 unshards the weights as
for any forward. Where the logits are not ``hidden @ W.T`` (``models.why_logits_are_not_a_product``), the LM-head
weight is no plain tensor inside the forward (FSDP1's flat parameters, DeepSpeed ZeRO-3's partitions), or PEFT
prompt learning adds virtual tokens in its own forward, the NLL comes from the model's logits instead.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from accelerate.utils import DistributedType

from trl_regularizers.components.metrics import MetricSink
from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.losses import chunked_nll_from_hidden, ptx_nll
from trl_regularizers.models import causal_lm, lm_head_weight, run_inside_forward, why_logits_are_not_a_product
from trl_regularizers.ptx import PtxStream


class PtxTerm:
    """``ptx_coef`` times the NLL of the next ptx batch; ``stream`` is registered in the trainer's checkpointed state."""

    def __init__(self, stream: PtxStream, coef: float, from_hidden_states: bool, accelerator, metrics: MetricSink):
        self.stream, self.coef, self.accelerator, self.metrics = stream, coef, accelerator, metrics
        self.from_hidden_states = from_hidden_states
        """Whether the NLL comes from hidden states in chunks (else from the model's [B, T, V] logits)."""

    @classmethod
    def from_config(cls, args, pretrain_dataset, language_model, tokenizer, accelerator, metrics: MetricSink, trainer_name: str) -> PtxTerm | None:
        """The term for ``args.ptx_coef > 0`` (None when mixing is off); errors before training on bad input."""
        coef = args.ptx_coef
        if pretrain_dataset is None:
            if coef > 0:
                raise ValueError(f"ptx_coef={coef} > 0 needs pretraining data: pass pretrain_dataset= to {trainer_name}.")
            return None
        if coef == 0:
            warnings.warn("pretrain_dataset is given but ptx_coef=0.0, so it is not used. Set ptx_coef > 0 to mix it in.", stacklevel=4)
            return None
        if language_model.get_output_embeddings() is None:
            raise ValueError(f"ptx_coef={coef} > 0 needs a model with a language-modeling head; {type(language_model).__name__} has none.")
        max_positions = getattr(language_model.config, "max_position_embeddings", None)
        if max_positions is not None and args.ptx_block_size > max_positions:
            raise ValueError(f"ptx_block_size={args.ptx_block_size} exceeds the model's max_position_embeddings={max_positions}.")
        # A Dataset backed by cache files is tokenized once, by the main process; in-memory data by all at once.
        cached = bool(getattr(pretrain_dataset, "cache_files", None))
        with accelerator.main_process_first() if cached else contextlib.nullcontext():
            stream = PtxStream(
                pretrain_dataset,
                getattr(tokenizer, "tokenizer", tokenizer),
                block_size=args.ptx_block_size,
                batch_size=args.ptx_batch_size or args.per_device_train_batch_size,
                text_field=args.ptx_text_field,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                seed=args.seed,
                vocab_size=language_model.get_input_embeddings().num_embeddings,
            )
        return cls(stream, coef, _hidden_states_give_the_logits(accelerator.unwrap_model(language_model), accelerator), accelerator, metrics)

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        """``ptx_coef * NLL`` [] of the next ptx batch through ``model`` (the accelerate-wrapped model, so DDP syncs it),
        unscaled. Collective: the NLL is logged (``ptx/nll``) and checked finite over all processes."""
        batch = {k: v.to(self.accelerator.device) for k, v in self.stream.next_batch().items()}
        if self.from_hidden_states:
            unwrapped = self.accelerator.unwrap_model(model)
            nll_from_hidden = functools.partial(self._nll_from_hidden, causal_lm(unwrapped))
            nll = run_inside_forward(model, unwrapped, nll_from_hidden, batch["input_ids"], batch["attention_mask"], batch["labels"])
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            nll = ptx_nll(logits, batch["labels"])
        # The gathered mean is non-finite if any process's NLL is, so every process raises together.
        check_finite("ptx", torch.tensor(self.metrics.log_mean("ptx/nll", nll)))
        return self.coef * nll

    def _nll_from_hidden(self, language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean NLL [] of the ptx batch ([B, T] each) from the backbone's last hidden state; runs as the wrapped
        model's forward, under the autocast accelerate would have put around that forward."""
        with self.accelerator.autocast():
            hidden = language_model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            weight = lm_head_weight(language_model)
            return chunked_nll_from_hidden(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, labels[:, 1:].reshape(-1))


def _hidden_states_give_the_logits(model: torch.nn.Module, accelerator) -> bool:
    """True when the chunked NLL from the backbone's hidden states equals the NLL of the model's own logits."""
    state = accelerator.state
    peft_config = getattr(model, "active_peft_config", None)
    language_model = causal_lm(model)
    return not (
        why_logits_are_not_a_product(language_model) is not None
        or language_model.base_model is language_model  # no separate backbone to run
        or getattr(peft_config, "is_prompt_learning", False)  # virtual tokens come from the PEFT forward
        or (state.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2)
        or (state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin.zero_stage == 3)
    )
