"""``PreferenceTerms``: what the DPO regularizers add to TRL's loss, from the ``PreferenceRecord`` of each micro-batch.

* DPO + NLL (eq. 7-8): ``nll_alpha`` times the length-normalized NLL of the chosen completions;
* margins (ODPO): TRL's sigmoid term becomes ``-log sigmoid(beta * delta - m)``;
* reward-aware losses (``core.reward_aware.REWARD_AWARE_LOSSES``: RPO, REBEL, reward-weighted DPO): TRL's sigmoid
  term is replaced (or reweighted) by the registered loss of each pair's score gap.

The margin and reward-aware terms are written as ``weight * (ours - TRL's sigmoid term)``, so that the sum with TRL's
loss is exactly the wanted loss (``weight``: the sigmoid term's entry of TRL's ``loss_weights``). No term runs a
forward pass: the record holds the log-probs of the forwards DPO runs anyway.
"""

from __future__ import annotations

import torch

from trl_regularizers.components.metrics import MetricSink
from trl_regularizers.core.checks import check_finite
from trl_regularizers.core.losses import length_normalized_nll, margin_preference_loss
from trl_regularizers.core.records import PreferenceRecord
from trl_regularizers.core.reward_aware import REWARD_AWARE_LOSSES, RewardAwareSettings, logratio_gap
from trl_regularizers.data import MARGIN


def sigmoid_term_problems(args) -> list[str]:
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


def check_preference_settings(args) -> None:
    """Refuse, before training, margins or a reward-aware loss under settings where they cannot be applied exactly."""
    if args.margin_source is not None:
        problems = sigmoid_term_problems(args)
        if problems:
            raise ValueError(f"margin_source={args.margin_source!r} is only supported for the sigmoid DPO loss; got {'; '.join(problems)}.")
    loss = args.reward_aware_loss
    if loss is None:
        return
    problems = sigmoid_term_problems(args)
    if args.margin_source is not None and not REWARD_AWARE_LOSSES[loss].takes_margin:
        takers = [name for name, entry in REWARD_AWARE_LOSSES.items() if entry.takes_margin]
        problems.append(
            f"margin_source={args.margin_source!r} (margins only combine with {', '.join(map(repr, takers))}: in {loss!r} the reward gap "
            "already sets the target of the implicit gap; shift the scores instead)"
        )
    if problems:
        raise ValueError(f"reward_aware_loss={loss!r} cannot be applied exactly with {'; '.join(problems)}.")


def pair_columns(args) -> list[str]:
    """The per-pair float columns the terms read from each batch (margins, reward scores)."""
    columns = [MARGIN] if args.margin_source is not None else []
    if args.reward_aware_loss is not None:
        columns += [args.reward_chosen_score_field, args.reward_rejected_score_field]
    return columns


class PreferenceTerms:
    """The NLL, margin and reward-aware terms of ``RegularizedDPOConfig``; ``needs`` says what the record must hold."""

    def __init__(self, args, beta: float, sigmoid_weight: float, metrics: MetricSink, reward_gap_scale: float | None = None):
        self.args, self.beta, self.sigmoid_weight, self.metrics = args, beta, sigmoid_weight, metrics
        self.reward_gap_scale = reward_gap_scale
        """Mean ``|r_c - r_r|`` of the training pairs (weighted DPO's ``"abs_normalized"`` weights)."""
        if args.margin_source is not None or args.reward_aware_loss is not None:
            self.needs = "policy+reference"
        else:
            self.needs = "policy" if args.nll_alpha > 0 else None

    def loss(self, record: PreferenceRecord) -> torch.Tensor | float:
        """The sum of the enabled terms, to add to TRL's loss (unscaled: the Trainer divides both by GA)."""
        return self._nll_term(record) + self._margin_term(record) + self._reward_aware_term(record)

    def _nll_term(self, record: PreferenceRecord) -> torch.Tensor | float:
        """alpha * mean over chosen sequences of the length-normalized NLL (eq. 8)."""
        if self.args.nll_alpha == 0:
            return 0.0
        lengths = record.chosen_lengths if self.args.nll_normalization == "sequence" else None
        nll = length_normalized_nll(record.chosen_logps, record.chosen_mask, lengths).mean()
        # Check the gathered value, so that every process raises together.
        check_finite("nll/chosen", torch.tensor(self.metrics.log_mean("nll/chosen", nll)))
        return self.args.nll_alpha * nll

    def _margin_term(self, record: PreferenceRecord) -> torch.Tensor | float:
        """weight * [mean l(beta*delta - m) - mean l(beta*delta)], l = -log sigmoid: turns TRL's sigmoid term into
        the margin loss exactly (ODPO)."""
        if MARGIN not in record.columns or self.args.reward_aware_loss is not None:
            return 0.0  # with a reward-aware loss, the loss applies the margin if it takes one (the others refuse them)
        margin = record.columns[MARGIN]
        chosen_logratio = record.chosen_logps.sum(-1) - record.ref_chosen_logps
        rejected_logratio = record.rejected_logps.sum(-1) - record.ref_rejected_logps
        logits = self.beta * (chosen_logratio - rejected_logratio)
        shift = margin_preference_loss(logits, margin).mean() - margin_preference_loss(logits).mean()
        self.metrics.log_mean("margin/mean", margin)  # margins are checked finite per row; shift is finite iff TRL's loss is
        return self.sigmoid_weight * shift

    def _reward_aware_term(self, record: PreferenceRecord) -> torch.Tensor | float:
        """weight * [mean of the reward-aware loss - mean l(beta * delta)], l = -log sigmoid: turns TRL's sigmoid term
        into the registered loss exactly; the other loss types stay."""
        args = self.args
        if args.reward_aware_loss is None:
            return 0.0
        reward_diff = record.columns[args.reward_chosen_score_field] - record.columns[args.reward_rejected_score_field]
        sums = (record.chosen_logps.sum(-1), record.rejected_logps.sum(-1), record.ref_chosen_logps, record.ref_rejected_logps)
        trl_gap = logratio_gap(*sums)  # the delta of TRL's sigmoid term: summed over the completion tokens
        gap = logratio_gap(*sums, record.chosen_mask.sum(-1), record.rejected_mask.sum(-1)) if args.reward_length_normalize else trl_gap
        settings = RewardAwareSettings(self.beta, args.reward_eta, args.reward_weighting, self.reward_gap_scale, record.columns.get(MARGIN))
        result = REWARD_AWARE_LOSSES[args.reward_aware_loss].fn(gap, reward_diff, settings)
        if result.weights is not None:
            self.metrics.log_mean("reward_aware/weight", result.weights)
        if settings.margin is not None:
            self.metrics.log_mean("margin/mean", settings.margin)
        term = result.losses.mean()
        self.metrics.log_mean("reward_aware/reward_gap", result.reward_gap)
        self.metrics.log_mean("reward_aware/implicit_gap", result.implicit_gap)
        # Check the gathered value, so that every process raises together.
        check_finite("reward_aware/loss", torch.tensor(self.metrics.log_mean("reward_aware/loss", term)))
        return self.sigmoid_weight * (term - margin_preference_loss(self.beta * trl_gap).mean())
