"""``RegularizedRewardTrainer``: ``trl.RewardTrainer`` with the Llama 2 margin loss (eq. 9) fed from ratings.

TRL already computes ``-log sigmoid(r_c - r_r - margin)`` when the batch carries a ``margin`` column; this trainer
derives that column from ratings, Likert scores or strength labels before TRL reads the datasets, checks every row,
and reports reward accuracy per margin bucket in evaluation, as Llama 2 does per preference strength.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from trl import RewardTrainer

from trl_regularizers.configs import RegularizedRewardConfig, regularized_config
from trl_regularizers.data import MARGIN, add_margin_column, check_margin_column, column_names, margin_bucket_namer
from trl_regularizers.trainers.adapters.base import mirror_signature, trl_arguments
from trl_regularizers.trainers.adapters.reward import RewardAdapter


def prepare_margins(dataset, args: RegularizedRewardConfig, dataset_name: str):
    """``dataset`` (or a dict of them) with the margin column derived as ``args`` says, or TRL's own one checked."""
    if isinstance(dataset, dict):
        return {name: prepare_margins(part, args, f"{dataset_name} ({name})") for name, part in dataset.items()}
    if dataset is None or isinstance(dataset, str):
        return dataset
    dataset = add_margin_column(dataset, args, dataset_name)
    if args.margin_source is None and MARGIN in column_names(dataset):
        dataset = check_margin_column(dataset, dataset_name)  # stock TRL subtracts it as is
    return dataset


class MarginAccuracy:
    """Margins and reward accuracy per margin bucket: ``margin/mean`` whenever a batch has margins, and in evaluation
    ``accuracy/margin=<bucket>`` (the margin rounded to 2 decimals, or the strength label), pair-weighted over the
    whole eval set."""

    def __init__(self, trainer: RewardAdapter, args: RegularizedRewardConfig):
        self.trainer = trainer
        self.bucket_name = margin_bucket_namer(args)
        self.counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # bucket -> [correct, pairs]

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> None:
        if margin is None:
            return
        trainer = self.trainer
        trainer.log_mean("margin/mean", margin)
        if trainer.training:
            return
        correct = trainer.accelerator.gather_for_metrics((chosen.detach() > rejected.detach()).float())
        margins = trainer.accelerator.gather_for_metrics(margin.float())
        for value, hit in zip(margins.tolist(), correct.tolist()):
            counts = self.counts[self.bucket_name(value)]
            counts[0] += hit
            counts[1] += 1

    def flush(self) -> None:
        """Replace the eval metrics by the whole eval set's accuracies (called before an eval log)."""
        for bucket, (correct, pairs) in sorted(self.counts.items()):
            self.trainer.set_metric(f"accuracy/margin={bucket}", correct / pairs, "eval")
        self.counts.clear()


class RegularizedRewardTrainer(RewardAdapter):
    """Drop-in ``RewardTrainer`` configured by ``RegularizedRewardConfig``; identical to it at the defaults."""

    def __init__(self, *args, **kwargs):
        arguments = trl_arguments(RewardTrainer.__init__, args, kwargs)
        config = arguments["args"] = regularized_config(arguments.get("args"), RegularizedRewardConfig, arguments["model"], "Reward")
        self.check_datasets(arguments)
        for split in ("train", "eval"):
            arguments[f"{split}_dataset"] = prepare_margins(arguments.get(f"{split}_dataset"), config, split)
        super().__init__(**arguments)
        self.margin_accuracy = MarginAccuracy(self, config)
        self.attach(observer=self.margin_accuracy)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        """TRL's ``evaluate``; a dataset passed here gets its margin column first, as the init's datasets did."""
        return super().evaluate(prepare_margins(eval_dataset, self.args, "eval"), *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training:
            self.margin_accuracy.flush()
        super().log(logs, start_time)


mirror_signature(RegularizedRewardTrainer, RewardTrainer.__init__)
