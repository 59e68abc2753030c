"""Wiring shared by the trainer subclasses: GA scaling, metrics, NaN checks, checkpointed state."""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

STATE_FILE = "trl_regularizers_state.json"
TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA = hasattr(Trainer, "loss_is_scaled_for_ga")
"""transformers >= 5.19 reads ``Trainer.loss_is_scaled_for_ga``; older versions ignore the attribute."""


def trainer_divides_by_ga(trainer) -> bool:
    """True when the HF Trainer divides ``compute_loss``'s return value by the GA steps (TRL_NOTES 1.1).

    DPO/Reward/RLOO: yes, so added terms go in unscaled. GRPO: no (it scales itself), so added terms
    must be divided by ``current_gradient_accumulation_steps`` in training.
    """
    already_scaled = getattr(trainer, "loss_is_scaled_for_ga", None) if TRAINER_HONORS_LOSS_IS_SCALED_FOR_GA else None
    if already_scaled is None:
        already_scaled = bool(getattr(trainer, "model_accepts_loss_kwargs", False)) or trainer.compute_loss_func is not None
    return not already_scaled


def scale_like_parent_loss(trainer, term: torch.Tensor) -> torch.Tensor:
    """Scale an added loss term the way the parent's loss is scaled, so GA sums it correctly."""
    if trainer.model.training and not trainer_divides_by_ga(trainer):
        return term / trainer.current_gradient_accumulation_steps
    return term


def mode_of(trainer) -> str:
    return "train" if trainer.model.training else "eval"


def log_metric(trainer, name: str, value: torch.Tensor | float) -> None:
    """Append the mean of ``value`` over all processes to ``trainer._metrics[mode][name]``.

    Collective: call it on every rank, unconditionally.
    """
    if not torch.is_tensor(value):
        value = torch.tensor(float(value))
    value = value.detach().float().mean().reshape(1).to(trainer.accelerator.device)
    trainer._metrics[mode_of(trainer)][name].append(trainer.accelerator.gather_for_metrics(value).mean().item())


def check_finite(term: str, value: torch.Tensor) -> torch.Tensor:
    """Raise a clear error naming the regularizer term if ``value`` holds NaN or inf."""
    if not torch.isfinite(value.detach()).all():
        raise FloatingPointError(
            f"trl_regularizers: the {term} term is not finite ({value.detach().flatten()[:8].tolist()}). "
            "Lower the coefficient or the learning rate, or bound the log-ratio with kl_clamp."
        )
    return value


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointedStateMixin:
    """Saves ``self._regularizer_state`` (name -> object with state_dict) in every checkpoint and
    restores it on ``train(resume_from_checkpoint=...)``, so controllers and data streams resume exactly.

    The state is identical on every rank (controllers see gathered values; the ptx stream advances in
    lockstep), so the main process writes one JSON file.
    """

    _regularizer_state: dict[str, Stateful]

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        states = getattr(self, "_regularizer_state", {})
        if states and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as handle:
                json.dump({name: obj.state_dict() for name, obj in states.items()}, handle, indent=2)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self._load_regularizer_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_regularizer_state(self, checkpoint: str) -> None:
        states = getattr(self, "_regularizer_state", {})
        path = os.path.join(checkpoint, STATE_FILE)
        if not states:
            return
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was not written by a trl_regularizers trainer with "
                f"the same regularizers ({', '.join(states)}), so their state cannot be restored."
            )
        with open(path) as handle:
            saved = json.load(handle)
        for name, obj in states.items():
            if name not in saved:
                raise KeyError(f"{path} has no state for {name!r} (it has: {', '.join(saved) or 'nothing'})")
            obj.load_state_dict(saved[name])
