"""``RegularizedRLOOTrainer``: ``trl.RLOOTrainer`` with a choice of KL estimator, placement, direction and clamp,
adaptive beta and pretraining mixing.

Swap ``RLOOTrainer`` for ``RegularizedRLOOTrainer`` (and ``RLOOConfig`` for ``RegularizedRLOOConfig`` to set the new
options). At the defaults (k1 summed over the completion and subtracted from the reward) the run is TRL's, with
the log-ratio bounded by ``kl_clamp``. Another estimator in the reward goes through TRL's own reward shaping; in
the loss, ``beta * sum_t kl_t`` (mean over sequences) is added (``adapters/rloo.py``).
"""

from __future__ import annotations

from trl_regularizers.configs import RegularizedRLOOConfig, regularized_config
from trl_regularizers.trainers.adapters.rloo import RLOOAdapter
from trl_regularizers.trainers.kl import KLRegularizer
from trl_regularizers.trainers.ptx import PtxRegularizer


class RegularizedRLOOTrainer(KLRegularizer, PtxRegularizer, RLOOAdapter):
    """Drop-in ``RLOOTrainer`` configured by ``RegularizedRLOOConfig``; extra keyword ``pretrain_dataset=``."""

    def __init__(self, model, reward_funcs, args: RegularizedRLOOConfig | None = None, *rest, **kwargs):
        super().__init__(model, reward_funcs, regularized_config(args, RegularizedRLOOConfig, model, "RLOO"), *rest, **kwargs)
