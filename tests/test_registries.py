"""Registries are the one source of their names: an estimator registered here (one decorated function, of either
kind) is accepted by the configs and the command line, named by the warnings, listed in the generated doc table and
used by the trainers; unregistered, it is gone from all of them. The same for reward-aware losses."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from trl import TrlParser

from trl_regularizers import RegularizedDPOConfig, RegularizedGRPOConfig, RegularizedGRPOTrainer
from trl_regularizers.core.full_kl import full_vocab_kl_from_hidden
from trl_regularizers.core.kl import KL_ESTIMATORS, estimator_table, register_kl_estimator, unregister_kl_estimator
from trl_regularizers.core.reward_aware import REWARD_AWARE_LOSSES, RewardAwareResult, register_reward_aware_loss

CPU = dict(bf16=False, report_to="none", gradient_checkpointing=False, save_strategy="no")


@pytest.fixture
def toy_estimators():
    @register_kl_estimator("toy_half_k2", unbiased={("reverse", "loss")})
    def toy_half_k2(log_ratio: torch.Tensor) -> torch.Tensor:
        """r^2 / 4: half of k2 (a toy)."""
        return 0.25 * log_ratio.square()

    seen = []

    @register_kl_estimator("toy_exact", needs="distribution")
    def toy_exact(record, direction: str) -> torch.Tensor:
        """The exact KL from hidden states, counting the records it saw (a toy)."""
        seen.append(record)
        policy, ref = record.policy_states, record.ref_states
        return full_vocab_kl_from_hidden(policy.hidden / policy.temperature, ref.hidden / ref.temperature, policy.weight, ref.weight,
                                         mask=record.mask, direction=direction)

    yield seen
    for name in ("toy_half_k2", "toy_exact"):
        if name in KL_ESTIMATORS:
            unregister_kl_estimator(name)


def grpo(tiny_lm_path, tmp_path, **kl):
    args = RegularizedGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                                 max_steps=1, beta=0.1, logging_steps=1, **CPU, **kl)
    return RegularizedGRPOTrainer(tiny_lm_path, lambda completions, **_: [len(c) / 8 for c in completions], args,
                                  train_dataset=Dataset.from_dict({"prompt": ["hi", "abc"] * 4}))


def test_a_registered_estimator_is_everywhere_and_an_unregistered_one_nowhere(toy_estimators, tiny_lm_path, tmp_path):
    assert RegularizedGRPOConfig(output_dir="o", **CPU, kl_estimator="toy_half_k2").kl_estimator == "toy_half_k2"
    (parsed,) = TrlParser((RegularizedGRPOConfig,)).parse_args_and_config(["--output_dir", "o", "--bf16", "False", "--kl_estimator", "toy_half_k2"])
    assert parsed.kl_estimator == "toy_half_k2"
    assert "| `toy_half_k2` | log-ratio | `loss` | none | biased | r^2 / 4: half of k2 (a toy). |" in estimator_table()
    with pytest.warns(UserWarning, match=r"kl_estimator='k2' with kl_placement='reward'.*\['full', 'k2', 'toy_half_k2'\] with the other one"):
        grpo(tiny_lm_path, tmp_path, kl_estimator="k2", kl_placement="reward", use_bias_correction_kl=False)
    trainer = grpo(tiny_lm_path, tmp_path, kl_estimator="toy_half_k2")
    trainer.train()
    assert "kl" in trainer.state.log_history[0]

    trainer = grpo(tiny_lm_path, tmp_path, kl_estimator="toy_exact")  # a distribution estimator: hidden states recorded
    trainer.train()
    assert toy_estimators and all(record.policy_states is not None and record.ref_states is not None for record in toy_estimators)

    unregister_kl_estimator("toy_half_k2")
    with pytest.raises(ValueError, match="kl_estimator='toy_half_k2' is not valid. Allowed values: k1, k2, k3, abs, full, toy_exact"):
        RegularizedGRPOConfig(output_dir="o", **CPU, kl_estimator="toy_half_k2")
    assert "toy_half_k2" not in estimator_table()


def test_reward_aware_losses_come_from_their_registry():
    @register_reward_aware_loss("toy_gap_sq")
    def toy_gap_sq(gap, reward_diff, settings):
        """(beta * gap - eta * reward_diff)^2 (a toy)."""
        return RewardAwareResult((settings.beta * gap - settings.eta * reward_diff) ** 2, settings.beta * gap, settings.eta * reward_diff)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert RegularizedDPOConfig(output_dir="o", **CPU, reward_aware_loss="toy_gap_sq").reward_aware_loss == "toy_gap_sq"
    finally:
        del REWARD_AWARE_LOSSES["toy_gap_sq"]
    with pytest.raises(ValueError, match="reward_aware_loss='toy_gap_sq' is not valid. Allowed values: None, rpo_sq, rpo_bwd_kl, rpo_fwd_kl, rebel, weighted_dpo"):
        RegularizedDPOConfig(output_dir="o", **CPU, reward_aware_loss="toy_gap_sq")
