"""``RegularizedDPOTrainer``: ``trl.DPOTrainer`` plus DPO+NLL (eq. 7-8), per-pair margins (ODPO), reward-aware losses
(RPO, REBEL, reward-weighted DPO) and pretraining mixing.

Nothing here runs a forward pass of its own during training (ptx apart): the adapter (``adapters/dpo.py``) records
the log-probs of the forwards DPO runs anyway into a ``PreferenceRecord``, and ``PreferenceTerms`` computes the
terms from it. The per-pair columns (margins, reward scores) are added and checked before TRL reads the datasets;
a ``reward_model=`` scores every pair once, then (``trl_regularizers.scoring``).
"""

from __future__ import annotations

from trl import DPOTrainer

from trl_regularizers.components.preference import PreferenceTerms, check_preference_settings, pair_columns
from trl_regularizers.configs import RegularizedDPOConfig, regularized_config
from trl_regularizers.data import add_margin_column, check_score_columns, mean_abs_score_gap
from trl_regularizers.trainers.adapters.base import mirror_signature, trl_arguments
from trl_regularizers.trainers.adapters.dpo import DPOAdapter
from trl_regularizers.trainers.build import ptx_term


def prepare_pairs(dataset, args: RegularizedDPOConfig, dataset_name: str, scorer=None):
    """``dataset`` (or a dict of them) with the per-pair columns its config needs: the margin column, and the reward
    scores (from ``scorer`` when given), every row checked."""
    if isinstance(dataset, dict):
        return {name: prepare_pairs(part, args, f"{dataset_name} ({name})", scorer) for name, part in dataset.items()}
    if dataset is None or isinstance(dataset, str):
        return dataset
    dataset = add_margin_column(dataset, args, dataset_name)
    if args.reward_aware_loss is None:
        return dataset
    chosen, rejected = args.reward_chosen_score_field, args.reward_rejected_score_field
    if scorer is not None:
        dataset = scorer.score(dataset, chosen, rejected, args.reward_model_batch_size, args.reward_model_max_length, dataset_name)
    return check_score_columns(dataset, chosen, rejected, dataset_name)


class RegularizedDPOTrainer(DPOAdapter):
    """Drop-in ``DPOTrainer`` configured by ``RegularizedDPOConfig``; identical to it at the new options' defaults.

    Extra keywords: ``pretrain_dataset=`` for ``ptx_coef > 0``; ``reward_model=`` (a sequence-classification model
    or a path) and ``reward_processing_class=`` (its tokenizer; default: the one saved with a path, else the
    policy's) to score every pair once before training for ``reward_aware_loss``."""

    def __init__(self, *args, pretrain_dataset=None, reward_model=None, reward_processing_class=None, **kwargs):
        arguments = trl_arguments(DPOTrainer.__init__, args, kwargs)
        config = arguments["args"] = regularized_config(arguments.get("args"), RegularizedDPOConfig, arguments["model"], "DPO")
        check_preference_settings(config)
        scorer = None
        if reward_model is not None:
            if config.reward_aware_loss is None:
                raise ValueError("reward_model= is given but reward_aware_loss=None, so its scores would not be used. Set reward_aware_loss.")
            from trl_regularizers.scoring import RewardScorer

            scorer = RewardScorer.load(reward_model, reward_processing_class, arguments.get("processing_class"))
        self.check_datasets(arguments)
        for split in ("train", "eval"):
            arguments[f"{split}_dataset"] = prepare_pairs(arguments.get(f"{split}_dataset"), config, split, scorer)
        del scorer  # scored once: free the reward model
        gap_scale = None  # mean |r_c - r_r| of the training pairs: the normalizer of "abs_normalized" weights
        if config.reward_aware_loss == "weighted_dpo" and config.reward_weighting == "abs_normalized" and arguments.get("train_dataset") is not None:
            gap_scale = mean_abs_score_gap(arguments["train_dataset"], config.reward_chosen_score_field, config.reward_rejected_score_field)
        super().__init__(**arguments)
        terms = PreferenceTerms(config, self.beta, self.loss_weight("sigmoid") if "sigmoid" in self.loss_types else 0.0, self, gap_scale)
        self.attach(preference=terms, pair_columns=pair_columns(config), ptx=ptx_term(self, config, pretrain_dataset))

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        """TRL's ``evaluate``; a dataset passed here gets the per-pair columns first, as the init's datasets did."""
        return super().evaluate(prepare_pairs(eval_dataset, self.args, "eval"), *args, **kwargs)


mirror_signature(RegularizedDPOTrainer, DPOTrainer.__init__, pretrain_dataset=None, reward_model=None, reward_processing_class=None)
