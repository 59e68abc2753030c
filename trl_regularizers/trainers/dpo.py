"""RegularizedDPOTrainer: TRL's DPOTrainer plus DPO+NLL (eq. 7-8), per-pair margins and pretraining mixing.

Nothing here runs a forward pass of its own (ptx apart): a forward hook captures the outputs of the policy
and reference forwards that ``DPOTrainer._compute_loss`` runs anyway, in call order (policy first, then the
reference, through ``self.model`` with PEFT or through ``self.ref_model``), and the extra terms are computed
from them. The batch is ``[chosen; rejected]`` along dim 0 (TRL_NOTES 2).
"""

from __future__ import annotations

import torch
from trl import DPOTrainer
from trl.trainer.utils import selective_log_softmax

from trl_regularizers.configs import RegularizedDPOConfig
from trl_regularizers.core.losses import length_normalized_nll, margin_preference_loss
from trl_regularizers.data import MARGIN, add_margin_column
from trl_regularizers.ptx import PtxMixin
from trl_regularizers.trainers.common import check_finite, log_metric, mode_of


def completion_token_logps(output, input_ids: torch.Tensor, completion_mask: torch.Tensor, rows: int | None = None):
    """[rows, T-1] log-probs of the completion tokens (0 elsewhere) of the first ``rows`` sequences (all if None)
    from a captured causal-LM output. TRL >= 1.15 returns them from its fused LM head (``.log_probs``); older
    TRL returns ``.logits``."""
    input_ids, shift_mask = input_ids[:rows], completion_mask[:rows, 1:]
    log_probs = getattr(output, "log_probs", None)
    if log_probs is None:
        log_probs = selective_log_softmax(output.logits[:rows, :-1], input_ids[:, 1:])
    return log_probs[:rows, -shift_mask.size(1) :] * shift_mask.to(log_probs.dtype)


def check_margin_support(args: RegularizedDPOConfig) -> None:
    """Margins enter as ``-log sigmoid(beta * delta - m)``; refuse settings where that is not the loss TRL computes."""
    if args.margin_source is None:
        return
    problems = []
    if "sigmoid" not in args.loss_type:
        problems.append(f"loss_type={args.loss_type} (needs 'sigmoid' among the loss types)")
    if str(getattr(args.f_divergence_type, "value", args.f_divergence_type)) != "reverse_kl":
        problems.append(f"f_divergence_type={args.f_divergence_type!r} (needs 'reverse_kl')")
    if args.ld_alpha is not None:
        problems.append(f"ld_alpha={args.ld_alpha} (needs None)")
    if args.use_weighting:
        problems.append("use_weighting=True (needs False)")
    if problems:
        raise ValueError(
            f"margin_source={args.margin_source!r} is only supported for the sigmoid DPO loss; got {'; '.join(problems)}."
        )


class _MarginCollator:
    """Wraps the parent's collator and adds the float ``margin`` column as a [B] tensor."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        batch[MARGIN] = torch.tensor([float(example[MARGIN]) for example in examples], dtype=torch.float32)
        return batch


class RegularizedDPOTrainer(PtxMixin, DPOTrainer):
    """[`~trl.DPOTrainer`] with the options of [`RegularizedDPOConfig`]; identical to it at their defaults.

    Extra keyword argument: ``pretrain_dataset`` (a `datasets.Dataset` or iterable with a text column, or
    tokenized ``input_ids``) for pretraining mixing with ``ptx_coef > 0``.
    """

    def __init__(
        self, model, ref_model=None, args: RegularizedDPOConfig | None = None, *parent_args, pretrain_dataset=None, **kwargs
    ):
        if args is None:
            args = RegularizedDPOConfig(output_dir="trainer_output")
        if not isinstance(args, RegularizedDPOConfig):
            raise TypeError(f"RegularizedDPOTrainer needs a RegularizedDPOConfig, got {type(args).__name__}.")
        check_margin_support(args)
        super().__init__(model, ref_model, args, *parent_args, **kwargs)
        self._captured: list | None = None
        if args.nll_alpha > 0 or args.margin_source is not None:
            for module in (self.model, self.ref_model):
                if module is not None:
                    self.accelerator.unwrap_model(module).register_forward_hook(self._capture_output)
        if args.margin_source is not None:
            self.data_collator = _MarginCollator(self.data_collator)
        self._setup_ptx(pretrain_dataset)

    def _capture_output(self, module, module_args, output):
        if self._captured is not None:
            self._captured.append(output)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = add_margin_column(dataset, args, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.margin_source is not None and MARGIN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, MARGIN]

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != MARGIN})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin = inputs.pop(MARGIN) if self.args.margin_source is not None else None
        hooked = self.args.nll_alpha > 0 or margin is not None
        self._captured = [] if hooked else None
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            captured, self._captured = self._captured, None
        loss, outputs = result if return_outputs else (result, None)
        if hooked:
            loss = loss + self._nll_term(captured[0], inputs) + self._margin_term(captured, inputs, margin)
        ptx = self._ptx_loss(model)  # after the capture is closed: its forward is not the policy's
        if ptx is not None:
            loss = loss + ptx
        return (loss, outputs) if return_outputs else loss

    def _nll_term(self, policy_output, inputs) -> torch.Tensor | float:
        """alpha * mean over chosen sequences of the length-normalized NLL (eq. 8)."""
        if self.args.nll_alpha == 0:
            return 0.0
        n = inputs["input_ids"].size(0) // 2
        chosen_logps = completion_token_logps(policy_output, inputs["input_ids"], inputs["completion_mask"], rows=n)
        lengths = inputs["attention_mask"][:n].sum(-1) if self.args.nll_normalization == "sequence" else None
        nll = length_normalized_nll(chosen_logps, inputs["completion_mask"][:n, 1:], lengths).mean()
        log_metric(self, "nll/chosen", nll)
        # Check the gathered value, so that every process raises together.
        check_finite("nll/chosen", torch.tensor(self._metrics[mode_of(self)]["nll/chosen"][-1]))
        return self.args.nll_alpha * nll

    def _margin_term(self, captured, inputs, margin) -> torch.Tensor | float:
        """weight * [mean l(beta*delta - m) - mean l(beta*delta)], l = -log sigmoid: turns TRL's sigmoid term
        into the margin loss exactly (ODPO)."""
        if margin is None:
            return 0.0
        logps = completion_token_logps(captured[0], inputs["input_ids"], inputs["completion_mask"]).sum(-1)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref_logps = completion_token_logps(captured[1], inputs["input_ids"], inputs["completion_mask"]).sum(-1)
        chosen_logratio, rejected_logratio = (logps - ref_logps.detach().to(logps.dtype)).chunk(2)
        logits = self.beta * (chosen_logratio - rejected_logratio)
        weight = self.loss_weights[self.loss_types.index("sigmoid")]
        shift = margin_preference_loss(logits, margin).mean() - margin_preference_loss(logits).mean()
        log_metric(self, "margin/mean", margin)  # margins are checked finite per row; shift is finite iff TRL's loss is
        return weight * shift
