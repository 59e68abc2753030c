"""RegularizedRewardTrainer: TRL's RewardTrainer with the Llama 2 margin loss (eq. 9) fed from ratings.

TRL already computes ``-log sigmoid(r_c - r_r - margin)`` when the batch carries a ``margin`` column
(TRL_NOTES 3); this subclass derives that column from ratings, Likert scores or strength labels, checks every
row, and reports reward accuracy per margin bucket in evaluation, as Llama 2 does per preference strength.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from trl import RewardTrainer

from trl_regularizers.configs import RegularizedRewardConfig
from trl_regularizers.data import MARGIN, add_margin_column, check_margin_column, column_names, margin_bucket_namer
from trl_regularizers.trainers.common import log_metric


class RegularizedRewardTrainer(RewardTrainer):
    """[`~trl.RewardTrainer`] with the options of [`RegularizedRewardConfig`]; identical to it at their defaults.

    Eval logs ``accuracy/margin=<bucket>`` (the margin rounded to 2 decimals, or the strength label) beside
    TRL's ``accuracy``, and ``margin/mean`` whenever the batch has margins. Pretraining mixing (``ptx_coef``)
    is not supported: a sequence-classification reward model has no language-modeling head to take an NLL from.
    """

    def __init__(self, model, args: RegularizedRewardConfig | None = None, *parent_args, **kwargs):
        if args is None:
            args = RegularizedRewardConfig(output_dir="trainer_output")
        if not isinstance(args, RegularizedRewardConfig):
            raise TypeError(f"RegularizedRewardTrainer needs a RegularizedRewardConfig, got {type(args).__name__}.")
        if args.ptx_coef > 0:
            raise ValueError(
                f"ptx_coef={args.ptx_coef} is not supported by RegularizedRewardTrainer: a reward model has a "
                "sequence-classification head, not a language-modeling head, so there is no pretraining NLL. Set ptx_coef=0."
            )
        super().__init__(model, args, *parent_args, **kwargs)
        self._bucket_name = margin_bucket_namer(args)
        self._bucket_counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # bucket -> [correct, pairs]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = add_margin_column(dataset, args, dataset_name)
        if args.margin_source is None and MARGIN in column_names(dataset):
            dataset = check_margin_column(dataset, dataset_name)  # stock TRL subtracts it as is
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin = inputs.get(MARGIN)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if margin is not None:
            log_metric(self, "margin/mean", margin)
            if not self.model.training:
                self._count_bucket_accuracy(outputs.logits, margin)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _count_bucket_accuracy(self, logits: torch.Tensor, margin: torch.Tensor) -> None:
        rewards_chosen, rewards_rejected = logits.squeeze(-1).chunk(2)
        correct = self.accelerator.gather_for_metrics((rewards_chosen > rewards_rejected).float())
        margins = self.accelerator.gather_for_metrics(margin.float())
        for value, hit in zip(margins.tolist(), correct.tolist()):
            counts = self._bucket_counts[self._bucket_name(value)]
            counts[0] += hit
            counts[1] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training and self._bucket_counts:  # pair-weighted over the whole eval set
            for bucket, (correct, pairs) in sorted(self._bucket_counts.items()):
                self._metrics["eval"][f"accuracy/margin={bucket}"] = [correct / pairs]
            self._bucket_counts.clear()
        super().log(logs, start_time)
