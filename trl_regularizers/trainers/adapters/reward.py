"""Adapter of ``trl.RewardTrainer`` (docs/trl_internals.md §3). Line numbers are TRL 1.16's ``reward_trainer.py``.

TRL already computes ``-log sigmoid(r_c - r_r - margin)`` when the batch has a ``margin`` column (L778-817) and
keeps that column through ``_set_signature_columns_if_needed`` (L744), so the regularized trainer only prepares the
column. The adapter hands the [B] rewards of each batch, and their margins, to an attached observer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from trl import RewardTrainer

from trl_regularizers.data import MARGIN
from trl_regularizers.trainers.adapters.base import TrainerAdapter

RewardObserver = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]
"""Called once per batch with the chosen and rejected rewards [B] and the margins [B] (or None)."""


class RewardAdapter(TrainerAdapter, RewardTrainer):
    TRL_CLASSES = ("Trainer", "RewardTrainer")
    dataset_kind = "reward"

    def __init__(self, *args, **kwargs):
        self.reward_observer: RewardObserver | None = None
        super().__init__(*args, **kwargs)

    def attach(self, observer: RewardObserver | None = None, ptx=None) -> None:
        super().attach(ptx=ptx)
        self.reward_observer = observer

    def stock_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        observer = self.reward_observer
        if observer is None:
            return super().stock_loss(model, inputs, return_outputs, num_items_in_batch)
        margin = inputs.get(MARGIN)
        loss, outputs = super().stock_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        chosen, rejected = outputs.logits.squeeze(-1).chunk(2)  # TRL stacks [chosen; rejected] (L783-786)
        observer(chosen, rejected, margin)
        return (loss, outputs) if return_outputs else loss
