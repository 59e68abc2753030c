"""``RegularizedGRPOTrainer``: ``trl.GRPOTrainer`` with a choice of KL estimator, placement, direction and clamp,
adaptive beta and pretraining mixing.

Swap ``GRPOTrainer`` for ``RegularizedGRPOTrainer`` (and ``GRPOConfig`` for ``RegularizedGRPOConfig`` to set the new
options); the constructor is TRL's, plus the keyword ``pretrain_dataset=``. At the defaults (k3 in the loss,
reverse) TRL computes its own KL from reference log-probs bounded to ``|r| <= kl_clamp``: the same numbers as TRL
unless the bound is active. Where other choices go is the adapter's business (``adapters/grpo.py``).
"""

from __future__ import annotations

from trl import GRPOTrainer

from trl_regularizers.configs import RegularizedGRPOConfig, regularized_config
from trl_regularizers.trainers.adapters.base import mirror_signature, trl_arguments
from trl_regularizers.trainers.adapters.grpo import GRPOAdapter
from trl_regularizers.trainers.build import kl_penalty, ptx_term


class RegularizedGRPOTrainer(GRPOAdapter):
    """Drop-in ``GRPOTrainer`` configured by ``RegularizedGRPOConfig``; extra keyword ``pretrain_dataset=``."""

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        arguments = trl_arguments(GRPOTrainer.__init__, args, kwargs)
        config = arguments["args"] = regularized_config(arguments.get("args"), RegularizedGRPOConfig, arguments["model"], "GRPO")
        super().__init__(**arguments)
        self.attach(kl=kl_penalty(self, config, config.beta), ptx=ptx_term(self, config, pretrain_dataset))


mirror_signature(RegularizedGRPOTrainer, GRPOTrainer.__init__, pretrain_dataset=None)
