"""The components of a public trainer, built from its config once TRL's ``__init__`` has run."""

from __future__ import annotations

import torch

from trl_regularizers.components.kl import KLPenalty, check_distribution_setup
from trl_regularizers.components.ptx import PtxTerm


def kl_penalty(trainer, config, coef: float) -> KLPenalty:
    """The ``KLArguments`` penalty of an online trainer (its TRL KL: ``trainer.TRL_KL``), checked against its models."""
    name = type(trainer).__name__
    penalty = KLPenalty.from_config(config, coef, trainer.TRL_KL, trainer, name)
    models = [model for model in (trainer.model, getattr(trainer, "ref_model", None)) if model is not None]
    check_distribution_setup(penalty, name, trainer.accelerator, models)
    return penalty


def ptx_term(trainer, config, pretrain_dataset, language_model: torch.nn.Module | None = None) -> PtxTerm | None:
    """The ``PtxArguments`` term (None when mixing is off) on ``language_model`` (default: the trainer's model)."""
    model = trainer.model if language_model is None else language_model
    return PtxTerm.from_config(config, pretrain_dataset, model, trainer.processing_class, trainer.accelerator, trainer, type(trainer).__name__)
