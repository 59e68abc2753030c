"""``RegularizedDPOTrainer``: ``trl.DPOTrainer`` plus DPO+NLL (eq. 7-8), per-pair margins (ODPO), reward-aware losses
(RPO, REBEL, reward-weighted DPO) and pretraining mixing.

Nothing here runs a forward pass of its own during training (ptx apart): the adapter (``adapters/dpo.py``) records
the log-probs of the forwards DPO runs anyway into a ``PreferenceRecord``, and the terms below are computed from it.
A ``reward_model=`` scores every pair once, before training (``trl_regularizers.scoring``).
"""

from __future__ import annotations

import torch

from trl_regularizers.configs import RegularizedDPOConfig, regularized_config
from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.losses import length_normalized_nll, margin_preference_loss
from trl_regularizers.core.reward_aware import logratio_gap, rebel_loss, reward_weights, rpo_loss, weighted_dpo_loss
from trl_regularizers.data import MARGIN, add_margin_column, check_score_columns
from trl_regularizers.trainers.adapters.dpo import DPOAdapter
from trl_regularizers.trainers.ptx import PtxRegularizer
from trl_regularizers.trainers.records import PreferenceRecord


def sigmoid_term_problems(args: RegularizedDPOConfig) -> list[str]:
    """Settings under which TRL's ``"sigmoid"`` term is not ``-log sigmoid(beta * delta)``, which the margin and
    reward-aware terms rewrite exactly (empty when they can)."""
    problems = []
    if "sigmoid" not in args.loss_type:
        problems.append(f"loss_type={args.loss_type} (needs 'sigmoid' among the loss types)")
    if str(getattr(args.f_divergence_type, "value", args.f_divergence_type)) != "reverse_kl":
        problems.append(f"f_divergence_type={args.f_divergence_type!r} (needs 'reverse_kl')")
    if args.ld_alpha is not None:
        problems.append(f"ld_alpha={args.ld_alpha} (needs None)")
    if args.use_weighting:
        problems.append("use_weighting=True (needs False)")
    return problems


def check_margin_support(args: RegularizedDPOConfig) -> None:
    """Margins enter as ``-log sigmoid(beta * delta - m)``; refuse settings where that is not the loss TRL computes."""
    problems = sigmoid_term_problems(args) if args.margin_source is not None else []
    if problems:
        raise ValueError(f"margin_source={args.margin_source!r} is only supported for the sigmoid DPO loss; got {'; '.join(problems)}.")


def check_reward_aware_support(args: RegularizedDPOConfig) -> None:
    """RPO and REBEL replace TRL's sigmoid term and weighted DPO reweights it, through ``weight * (ours - TRL's)``:
    refuse settings where TRL's sigmoid term is not ``-log sigmoid(beta * delta)``, and margins where they mean nothing."""
    loss = args.reward_aware_loss
    if loss is None:
        return
    problems = sigmoid_term_problems(args)
    if args.margin_source is not None and loss != "weighted_dpo":
        problems.append(
            f"margin_source={args.margin_source!r} (margins only combine with 'weighted_dpo': in {loss!r} the reward gap "
            "already sets the target of the implicit gap; shift the scores instead)"
        )
    if problems:
        raise ValueError(f"reward_aware_loss={loss!r} cannot be applied exactly with {'; '.join(problems)}.")


class RegularizedDPOTrainer(PtxRegularizer, DPOAdapter):
    """Drop-in ``DPOTrainer`` configured by ``RegularizedDPOConfig``; identical to it at the new options' defaults.

    Extra keywords: ``pretrain_dataset=`` for ``ptx_coef > 0``; ``reward_model=`` (a sequence-classification model
    or a path) and ``reward_processing_class=`` (its tokenizer; default: the one saved with a path, else the
    policy's) to score every pair once before training for ``reward_aware_loss``."""

    def __init__(self, model, ref_model=None, args: RegularizedDPOConfig | None = None, *rest, reward_model=None,
                 reward_processing_class=None, **kwargs):
        args = regularized_config(args, RegularizedDPOConfig, model, "DPO")
        check_margin_support(args)
        check_reward_aware_support(args)
        self._reward_scorer = None
        self._reward_gap_scale: float | None = None  # mean |r_c - r_r| of the training pairs ("abs_normalized")
        if reward_model is not None:
            if args.reward_aware_loss is None:
                raise ValueError("reward_model= is given but reward_aware_loss=None, so its scores would not be used. Set reward_aware_loss.")
            from trl_regularizers.scoring import RewardScorer

            self._reward_scorer = RewardScorer.load(reward_model, reward_processing_class, kwargs.get("processing_class"))
        try:
            super().__init__(model, ref_model, args, *rest, **kwargs)
        finally:
            self._reward_scorer = None  # scored once: free the reward model

    def pair_columns(self) -> list[str]:
        columns = [MARGIN] if self.args.margin_source is not None else []
        if self.args.reward_aware_loss is not None:
            columns += [self.args.reward_chosen_score_field, self.args.reward_rejected_score_field]
        return columns

    def prepare_pairs(self, dataset, args, dataset_name: str):
        dataset = add_margin_column(dataset, args, dataset_name)
        if args.reward_aware_loss is None:
            return dataset
        chosen, rejected = args.reward_chosen_score_field, args.reward_rejected_score_field
        if self._reward_scorer is not None:
            dataset = self._reward_scorer.score(
                dataset, chosen, rejected, args.reward_model_batch_size, args.reward_model_max_length, dataset_name
            )
        dataset = check_score_columns(dataset, chosen, rejected, dataset_name)
        if args.reward_aware_loss == "weighted_dpo" and args.reward_weighting == "abs_normalized" and self._reward_gap_scale is None:
            self._reward_gap_scale = self._mean_abs_reward_gap(dataset, chosen, rejected, dataset_name)
        return dataset

    @staticmethod
    def _mean_abs_reward_gap(dataset, chosen: str, rejected: str, dataset_name: str) -> float:
        """The normalizer of ``"abs_normalized"`` weights, from the first dataset prepared (TRL prepares train first)."""
        if not hasattr(dataset, "__len__") or getattr(dataset, "column_names", None) is None:
            raise ValueError("reward_weighting='abs_normalized' needs a map-style training dataset to average |r_c - r_r| over; "
                             "use reward_weighting='abs' or 'sigmoid' with an IterableDataset.")
        gaps = [abs(float(c) - float(r)) for c, r in zip(dataset[chosen], dataset[rejected])]
        scale = sum(gaps) / len(gaps)
        if not scale > 0:
            raise ValueError(f"reward_weighting='abs_normalized': every pair of the {dataset_name} dataset has equal scores, "
                             "so every weight would be 0/0. Check the score columns.")
        return scale

    def record_needs(self) -> str | None:
        if self.args.margin_source is not None or self.args.reward_aware_loss is not None:
            return "policy+reference"
        return "policy" if self.args.nll_alpha > 0 else None

    def preference_loss(self, record: PreferenceRecord) -> torch.Tensor | float:
        return self._nll_term(record) + self._margin_term(record) + self._reward_aware_term(record)

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
        if MARGIN not in record.columns or self.args.reward_aware_loss is not None:
            return 0.0  # with a reward-aware loss, weighted DPO applies the margin (the others refuse margins)
        margin = record.columns[MARGIN]
        chosen_logratio = record.chosen_logps.sum(-1) - record.ref_chosen_logps
        rejected_logratio = record.rejected_logps.sum(-1) - record.ref_rejected_logps
        logits = self.beta * (chosen_logratio - rejected_logratio)
        shift = margin_preference_loss(logits, margin).mean() - margin_preference_loss(logits).mean()
        self.log_metric("margin/mean", margin)  # margins are checked finite per row; shift is finite iff TRL's loss is
        return self.loss_weight("sigmoid") * shift

    def _reward_aware_term(self, record: PreferenceRecord) -> torch.Tensor | float:
        """weight * [mean of the reward-aware loss - mean l(beta * delta)], l = -log sigmoid: turns TRL's sigmoid term
        (weight: its entry of ``loss_weights``) into RPO, REBEL or weighted DPO exactly; the other loss types stay."""
        args = self.args
        if args.reward_aware_loss is None:
            return 0.0
        reward_diff = record.columns[args.reward_chosen_score_field] - record.columns[args.reward_rejected_score_field]
        sums = (record.chosen_logps.sum(-1), record.rejected_logps.sum(-1), record.ref_chosen_logps, record.ref_rejected_logps)
        trl_gap = logratio_gap(*sums)  # the delta of TRL's sigmoid term: summed over the completion tokens
        gap = logratio_gap(*sums, record.chosen_mask.sum(-1), record.rejected_mask.sum(-1)) if args.reward_length_normalize else trl_gap
        eta = args.reward_eta
        if args.reward_aware_loss == "rebel":
            losses = rebel_loss(gap, reward_diff, eta)
            implicit, target = gap / eta, reward_diff
        elif args.reward_aware_loss == "weighted_dpo":
            weights = reward_weights(reward_diff, args.reward_weighting, eta, self._reward_gap_scale)
            losses = weighted_dpo_loss(gap, weights, self.beta, record.columns.get(MARGIN))
            implicit, target = self.beta * gap, eta * reward_diff
            self.log_metric("reward_aware/weight", weights)
            if MARGIN in record.columns:
                self.log_metric("margin/mean", record.columns[MARGIN])
        else:
            losses = rpo_loss(gap, reward_diff, self.beta, eta, args.reward_aware_loss.removeprefix("rpo_"))
            implicit, target = self.beta * gap, eta * reward_diff
        term = losses.mean()
        self.log_metric("reward_aware/reward_gap", target)
        self.log_metric("reward_aware/implicit_gap", implicit)
        # Check the gathered value, so that every process raises together.
        check_finite("reward_aware/loss", torch.tensor(self.log_metric("reward_aware/loss", term)))
        return self.loss_weight("sigmoid") * (term - margin_preference_loss(self.beta * trl_gap).mean())
