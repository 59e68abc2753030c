"""``RegularizedRLOOTrainer``: ``trl.RLOOTrainer`` with a choice of KL estimator, placement, direction and clamp,
adaptive beta and pretraining mixing.

Swap ``RLOOTrainer`` for ``RegularizedRLOOTrainer`` (and ``RLOOConfig`` for ``RegularizedRLOOConfig`` to set the new
options); the constructor is TRL's, plus the keyword ``pretrain_dataset=``. At the defaults (k1 summed over the
completion and subtracted from the reward) the run is TRL's, with the log-ratio bounded by ``kl_clamp``. Another
estimator in the reward goes through TRL's own reward shaping; in the loss, ``beta * sum_t kl_t`` (mean over
sequences) is added (``adapters/rloo.py``).
"""

from __future__ import annotations

from trl import RLOOTrainer

from trl_regularizers.configs import RegularizedRLOOConfig, regularized_config
from trl_regularizers.trainers.adapters.base import mirror_signature, trl_arguments
from trl_regularizers.trainers.adapters.rloo import RLOOAdapter
from trl_regularizers.trainers.build import kl_penalty, ptx_term


class RegularizedRLOOTrainer(RLOOAdapter):
    """Drop-in ``RLOOTrainer`` configured by ``RegularizedRLOOConfig``; extra keyword ``pretrain_dataset=``."""

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        arguments = trl_arguments(RLOOTrainer.__init__, args, kwargs)
        config = arguments["args"] = regularized_config(arguments.get("args"), RegularizedRLOOConfig, arguments["model"], "RLOO")
        super().__init__(**arguments)
        self.attach(kl=kl_penalty(self, config, config.beta), ptx=ptx_term(self, config, pretrain_dataset))


mirror_signature(RegularizedRLOOTrainer, RLOOTrainer.__init__, pretrain_dataset=None)
