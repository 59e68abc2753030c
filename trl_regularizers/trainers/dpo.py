"""``RegularizedDPOTrainer``: ``trl.DPOTrainer`` plus DPO+NLL (eq. 7-8), per-pair margins (ODPO) and pretraining mixing.

Nothing here runs a forward pass of its own (ptx apart): the adapter (``adapters/dpo.py``) records the log-probs
of the forwards DPO runs anyway into a ``PreferenceRecord``, and the terms below are computed from it.
"""

from __future__ import annotations

import torch

from trl_regularizers.configs import RegularizedDPOConfig, regularized_config
from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.losses import length_normalized_nll, margin_preference_loss
from trl_regularizers.data import MARGIN, add_margin_column
from trl_regularizers.trainers.adapters.dpo import DPOAdapter
from trl_regularizers.trainers.ptx import PtxRegularizer
from trl_regularizers.trainers.records import PreferenceRecord


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
        raise ValueError(f"margin_source={args.margin_source!r} is only supported for the sigmoid DPO loss; got {'; '.join(problems)}.")


class RegularizedDPOTrainer(PtxRegularizer, DPOAdapter):
    """Drop-in ``DPOTrainer`` configured by ``RegularizedDPOConfig``; identical to it at the new options' defaults.
    Extra keyword ``pretrain_dataset=`` for ``ptx_coef > 0``."""

    def __init__(self, model, ref_model=None, args: RegularizedDPOConfig | None = None, *rest, **kwargs):
        args = regularized_config(args, RegularizedDPOConfig, model, "DPO")
        check_margin_support(args)
        super().__init__(model, ref_model, args, *rest, **kwargs)

    def pair_columns(self) -> list[str]:
        return [MARGIN] if self.args.margin_source is not None else []

    def prepare_pairs(self, dataset, args, dataset_name: str):
        return add_margin_column(dataset, args, dataset_name)

    def record_needs(self) -> str | None:
        if self.args.margin_source is not None:
            return "policy+reference"
        return "policy" if self.args.nll_alpha > 0 else None

    def preference_loss(self, record: PreferenceRecord) -> torch.Tensor | float:
        return self._nll_term(record) + self._margin_term(record)

    def _nll_term(self, record: PreferenceRecord) -> torch.Tensor | float:
        """alpha * mean over chosen sequences of the length-normalized NLL (eq. 8)."""
        if self.args.nll_alpha == 0:
            return 0.0
        lengths = record.chosen_lengths if self.args.nll_normalization == "sequence" else None
        nll = length_normalized_nll(record.chosen_logps, record.chosen_mask, lengths).mean()
        # Check the gathered value, so that every process raises together.
        check_finite("nll/chosen", torch.tensor(self.log_metric("nll/chosen", nll)))
        return self.args.nll_alpha * nll

    def _margin_term(self, record: PreferenceRecord) -> torch.Tensor | float:
        """weight * [mean l(beta*delta - m) - mean l(beta*delta)], l = -log sigmoid: turns TRL's sigmoid term into
        the margin loss exactly (ODPO)."""
        if MARGIN not in record.columns:
            return 0.0
        margin = record.columns[MARGIN]
        chosen_logratio = record.chosen_logps.sum(-1) - record.ref_chosen_logps
        rejected_logratio = record.rejected_logps.sum(-1) - record.ref_rejected_logps
        logits = self.beta * (chosen_logratio - rejected_logratio)
        shift = margin_preference_loss(logits, margin).mean() - margin_preference_loss(logits).mean()
        self.log_metric("margin/mean", margin)  # margins are checked finite per row; shift is finite iff TRL's loss is
        return self.loss_weight("sigmoid") * shift
