"""Trainer callbacks for regularizers.

``AdaptiveKLCallback`` is *the* adaptive-KL mechanism of the online trainers: ``RegularizedGRPOTrainer`` and
``RegularizedRLOOTrainer`` create it when ``kl_target`` is set, so users normally only set that field.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from trl_regularizers.core.control import AdaptiveKLController


class AdaptiveKLCallback(TrainerCallback):
    """Adapts a trainer's KL coefficient ``beta`` toward a target KL after each optimizer step that saw KL values.

    With the KL in the loss every step does; with the KL in the reward only the steps that generate (and score) a
    rollout do, so with ``steps_per_generation > 1`` beta changes once per generation: the later steps reuse the
    rollout's already-penalized rewards, which a new beta could not change.

    Rule of [Ziegler et al. 2019](https://huggingface.co/papers/1909.08593) (``AdaptiveKLController``):
    ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) / horizon)``.

    The trainer reports the KL of every sequence it penalizes with ``observe`` (train mode only). At each
    optimizer step end the callback sums those reports over all processes (a collective call: every rank runs
    ``on_step_end``), so ``beta`` is identical everywhere, updates the controller and writes ``trainer.beta``.
    The controller is registered in ``trainer.regularizer_state`` as ``"kl_controller"``, so checkpoints hold it
    and ``train(resume_from_checkpoint=...)`` restores ``beta`` bit for bit.

    Args:
        trainer: a trainer with a ``beta`` attribute, an ``accelerator`` and a ``regularizer_state``
            (``trainers.state.RegularizerState``).
        target: target KL per sequence (sum over completion tokens of the chosen estimator), in nats.
        horizon: controller horizon K (steps for a 20% error to move beta by 20%).
    """

    def __init__(self, trainer, target: float, horizon: float = 10_000.0):
        self.trainer = trainer
        self.controller = AdaptiveKLController(trainer.beta, target, horizon)
        self._window = torch.zeros(2, dtype=torch.float64)  # (sum of per-sequence KL, number of sequences)
        trainer.regularizer_state.register("kl_controller", self.controller)

    def observe(self, kl_per_sequence: torch.Tensor) -> None:
        """Record this process's per-sequence KL values ([B]) for the current optimizer step."""
        values = kl_per_sequence.detach().to(torch.float64).cpu()
        self._window += torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64)])

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume the controller holds the checkpointed value: make the trainer use it.
        self.trainer.beta = self.controller.value

    def on_step_end(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        totals = accelerator.reduce(self._window.to(accelerator.device), reduction="sum").cpu()
        self._window.zero_()
        if totals[1] > 0:
            self.trainer.beta = self.controller.update((totals[0] / totals[1]).item())
