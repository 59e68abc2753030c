"""Adapter of ``trl.RewardTrainer`` (docs/trl_internals.md §3). Line numbers are TRL 1.16's ``reward_trainer.py``.

TRL already computes ``-log sigmoid(r_c - r_r - margin)`` when the batch has a ``margin`` column (L778-817) and
keeps that column through ``_set_signature_columns_if_needed`` (L744). Insertion points:
* ``prepare_pairs(dataset, args, name)``: add or check the ``margin`` column before TRL tokenizes the dataset;
* ``observe_rewards(chosen, rejected, margin)``: the [B] rewards of each batch, after TRL's loss.
"""

from __future__ import annotations

import torch
from trl import RewardTrainer

from trl_regularizers.data import MARGIN
from trl_regularizers.trainers.adapters.base import TrainerAdapter


class RewardAdapter(TrainerAdapter, RewardTrainer):
    # text pairs, or tokenized ones (``*_input_ids`` is TRL's legacy name, L657-669)
    dataset_formats = [("chosen", "rejected"), ("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")]
    def prepare_pairs(self, dataset, args, dataset_name: str):
        """Runs inside TRL's ``__init__``, before ``self.args`` is set: read ``args``."""
        return dataset

    def observe_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> None:
        """Called once per batch with the chosen and rejected rewards [B] and the margins [B] (or None)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return super()._prepare_dataset(self.prepare_pairs(dataset, args, dataset_name), processing_class, args, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin = inputs.get(MARGIN)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        chosen, rejected = outputs.logits.squeeze(-1).chunk(2)  # TRL stacks [chosen; rejected] (L783-786)
        self.observe_rewards(chosen, rejected, margin)
        return (loss, outputs) if return_outputs else loss
