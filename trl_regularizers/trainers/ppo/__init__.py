"""PPO with KL options, adaptive KL control and PPO-ptx, on every supported TRL (1.12 through the newest).

The setup is picked once, here, by TRL version: on TRL 1.12 ``RegularizedPPOTrainer`` subclasses
``trl.experimental.ppo.PPOTrainer`` (``adapters/ppo.py``: the stock constructor, a drop-in and ``isinstance`` of
it); on TRL >= 1.13, which has no PPO, it stands on the package's own setup (``standalone.py`` on ``setup.py``:
the config fields, constructor and metric names of TRL 1.12's, written from the algorithm). Both feed the same
loop (``loop.py``), whose batches are typed ``Rollout`` records (``rollout.py``); checkpoints are ``checkpoint.py``'s,
the configs ``config.py``'s, the models and tensor helpers ``policy.py``'s.
"""

from __future__ import annotations

from trl_regularizers.components.kl import KLPenalty
from trl_regularizers.configs import regularized_config
from trl_regularizers.trainers.adapters.base import mirror_signature, trl_arguments
from trl_regularizers.trainers.build import ptx_term
from trl_regularizers.trainers.ppo.config import STOCK_PPO, PPOConfig, RegularizedPPOConfig
from trl_regularizers.trainers.ppo.loop import RegularizedPPOLoop

if STOCK_PPO:
    from trl.experimental.ppo import PPOTrainer as ParentTrainer

    from trl_regularizers.trainers.adapters.ppo import PPOAdapter
else:
    from trl_regularizers.trainers.ppo.setup import StandalonePPOTrainer as ParentTrainer
    from trl_regularizers.trainers.ppo.standalone import StandalonePPOAdapter as PPOAdapter

__all__ = ["STOCK_PPO", "PPOConfig", "RegularizedPPOConfig", "RegularizedPPOTrainer"]


class RegularizedPPOTrainer(RegularizedPPOLoop, PPOAdapter):
    """Drop-in ``trl.experimental.ppo.PPOTrainer`` (TRL 1.12's constructor) with KL options, adaptive KL control and
    PPO-ptx, on every supported TRL.

    Takes the stock arguments plus ``pretrain_dataset=`` for ``ptx_coef > 0``. ``train(resume_from_checkpoint=...)``
    restores policy, value model, optimizer, scheduler, step, RNG, KL controller and ptx stream.
    """

    TRL_KL = ("k1", "reward")

    def __init__(self, *args, pretrain_dataset=None, **kwargs):
        arguments = trl_arguments(ParentTrainer.__init__, args, kwargs)
        given = arguments.get("args")
        if given is not None and not isinstance(given, RegularizedPPOConfig) and not STOCK_PPO:
            raise TypeError(f"args must be a RegularizedPPOConfig, got {type(given).__name__}.")
        config = arguments["args"] = regularized_config(given, RegularizedPPOConfig, arguments["model"], "PPO")
        tokenizer = arguments["processing_class"]
        padding_side = getattr(getattr(tokenizer, "tokenizer", tokenizer), "padding_side", "left")
        if arguments.get("data_collator") is None and padding_side != "left":
            # Responses are generated after the padded prompt: right padding puts pad tokens before them.
            raise ValueError(
                f"PPO pads the prompts with the tokenizer and generates after them, so they must be left-padded; got "
                f"padding_side={padding_side!r}. Load it with padding_side=\"left\" (as TRL's PPO examples do) or pass a data_collator."
            )
        super().__init__(**arguments)
        kl = KLPenalty.from_config(config, config.kl_coef, self.TRL_KL, self, type(self).__name__)
        self.attach(kl=kl, ptx=ptx_term(self, config, pretrain_dataset, self.language_model()))


mirror_signature(RegularizedPPOTrainer, ParentTrainer.__init__, pretrain_dataset=None)
