"""``RegularizedGRPOTrainer``: ``trl.GRPOTrainer`` with a choice of KL estimator, placement, direction and clamp,
adaptive beta and pretraining mixing.

Swap ``GRPOTrainer`` for ``RegularizedGRPOTrainer`` (and ``GRPOConfig`` for ``RegularizedGRPOConfig`` to set the new
options). At the defaults (k3 in the loss, reverse) TRL computes its own KL from reference log-probs bounded to
``|r| <= kl_clamp``: the same numbers as TRL unless the bound is active. Where other choices go is the adapter's
business (``adapters/grpo.py``): another estimator in the loss replaces TRL's k3, reduced like ``loss_type``; in the
reward it is a ``kl_penalty`` column summed into the reward before the group normalization.
"""

from __future__ import annotations

from trl_regularizers.configs import RegularizedGRPOConfig, regularized_config
from trl_regularizers.trainers.adapters.grpo import GRPOAdapter
from trl_regularizers.trainers.kl import KLRegularizer
from trl_regularizers.trainers.ptx import PtxRegularizer


class RegularizedGRPOTrainer(KLRegularizer, PtxRegularizer, GRPOAdapter):
    """Drop-in ``GRPOTrainer`` configured by ``RegularizedGRPOConfig``; extra keyword ``pretrain_dataset=``."""

    def __init__(self, model, reward_funcs, args: RegularizedGRPOConfig | None = None, *rest, **kwargs):
        super().__init__(model, reward_funcs, regularized_config(args, RegularizedGRPOConfig, model, "GRPO"), *rest, **kwargs)
