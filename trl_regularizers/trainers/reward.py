"""``RegularizedRewardTrainer``: ``trl.RewardTrainer`` with the Llama 2 margin loss (eq. 9) fed from ratings.

TRL already computes ``-log sigmoid(r_c - r_r - margin)`` when the batch carries a ``margin`` column; this trainer
derives that column from ratings, Likert scores or strength labels, checks every row, and reports reward accuracy
per margin bucket in evaluation, as Llama 2 does per preference strength.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from trl_regularizers.configs import RegularizedRewardConfig, regularized_config
from trl_regularizers.data import MARGIN, add_margin_column, check_margin_column, column_names, margin_bucket_namer
from trl_regularizers.trainers.adapters.reward import RewardAdapter


class RegularizedRewardTrainer(RewardAdapter):
    """Drop-in ``RewardTrainer`` configured by ``RegularizedRewardConfig``; identical to it at the defaults.

    Eval logs ``accuracy/margin=<bucket>`` (the margin rounded to 2 decimals, or the strength label) beside TRL's
    ``accuracy``, and ``margin/mean`` whenever the batch has margins. Pretraining mixing (``ptx_coef``) is not
    supported: a sequence-classification reward model has no language-modeling head to take an NLL from.
    """

    def __init__(self, model, args: RegularizedRewardConfig | None = None, *rest, **kwargs):
        args = regularized_config(args, RegularizedRewardConfig, model, "Reward")
        if args.ptx_coef > 0:
            raise ValueError(
                f"ptx_coef={args.ptx_coef} is not supported by RegularizedRewardTrainer: a reward model has a "
                "sequence-classification head, not a language-modeling head, so there is no pretraining NLL. Set ptx_coef=0."
            )
        super().__init__(model, args, *rest, **kwargs)
        self._bucket_name = margin_bucket_namer(args)
        self._bucket_counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # bucket -> [correct, pairs]

    def prepare_pairs(self, dataset, args, dataset_name: str):
        dataset = add_margin_column(dataset, args, dataset_name)
        if args.margin_source is None and MARGIN in column_names(dataset):
            dataset = check_margin_column(dataset, dataset_name)  # stock TRL subtracts it as is
        return dataset

    def observe_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> None:
        if margin is None:
            return
        self.log_metric("margin/mean", margin)
        if not self.model.training:
            self._count_bucket_accuracy(chosen.detach(), rejected.detach(), margin)

    def _count_bucket_accuracy(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> None:
        correct = self.accelerator.gather_for_metrics((chosen > rejected).float())
        margins = self.accelerator.gather_for_metrics(margin.float())
        for value, hit in zip(margins.tolist(), correct.tolist()):
            counts = self._bucket_counts[self._bucket_name(value)]
            counts[0] += hit
            counts[1] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training and self._bucket_counts:  # pair-weighted over the whole eval set
            for bucket, (correct, pairs) in sorted(self._bucket_counts.items()):
                self.set_metric(f"accuracy/margin={bucket}", correct / pairs, "eval")
            self._bucket_counts.clear()
        super().log(logs, start_time)
