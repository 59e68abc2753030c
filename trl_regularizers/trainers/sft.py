"""``RegularizedSFTTrainer``: ``trl.SFTTrainer`` anchored to its base model by the exact KL on the trained positions,
plus replay of prior data (ptx).

Swap ``SFTTrainer`` for ``RegularizedSFTTrainer`` (and ``SFTConfig`` for ``RegularizedSFTConfig`` to set the new
options); the constructor is TRL's, plus the keyword ``pretrain_dataset=``. At the defaults (``sft_kl_coef=0``, no
ptx) the run is stock SFT. With ``sft_kl_coef > 0`` the loss gains ``coef * sum_t KL_t / N`` over the tokens the SFT
loss trains, normalized like the NLL (``N``: TRL's token count), where KL_t is the exact KL over the vocabulary
between the policy and the base model at that position (``sft_kl_direction``; computed in chunks from the final hidden
states and the LM heads). The base model is a frozen copy taken at construction, or the policy with its PEFT adapter
disabled. See docs/sft.md.
"""

from __future__ import annotations

from trl import SFTTrainer

from trl_regularizers.components.kl import KLAnchor, check_distribution_setup
from trl_regularizers.configs import RegularizedSFTConfig, regularized_config
from trl_regularizers.models import causal_lm, frozen_copy
from trl_regularizers.trainers.adapters.base import mirror_signature, trl_arguments
from trl_regularizers.trainers.adapters.sft import SFTAdapter
from trl_regularizers.trainers.build import ptx_term


class RegularizedSFTTrainer(SFTAdapter):
    """Drop-in ``SFTTrainer`` configured by ``RegularizedSFTConfig``; extra keyword ``pretrain_dataset=``."""

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        arguments = trl_arguments(SFTTrainer.__init__, args, kwargs)
        config = arguments["args"] = regularized_config(
            arguments.get("args"), RegularizedSFTConfig, arguments["model"], "SFT", from_training_arguments=True
        )
        super().__init__(**arguments)
        anchor, reference = KLAnchor.from_config(config, self), None
        if anchor.enabled:
            policy = self.accelerator.unwrap_model(self.model)
            check_distribution_setup(anchor, type(self).__name__, self.accelerator, [policy])
            if not hasattr(policy, "disable_adapter"):  # PEFT: the base is the policy with its adapter disabled
                reference = frozen_copy(causal_lm(policy))
        self.attach(anchor=anchor, reference=reference, ptx=ptx_term(self, config, pretrain_dataset))


mirror_signature(RegularizedSFTTrainer, SFTTrainer.__init__, pretrain_dataset=None)
