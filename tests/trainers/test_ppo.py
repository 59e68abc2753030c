"""RegularizedPPOTrainer (TRL 1.12 only): parity with stock PPOTrainer, KL options, adaptive control + resume, ptx.

Tiny local policy/value/reward models, 2-3 PPO updates of 4 episodes each.
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from tests.trl_versions import HAS_PPO, TRL_VERSION, requires_trl_ppo

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(tokenizer, n=16):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [tokenizer(f"q{i} " + "ab" * (i % 3))["input_ids"] for i in range(n)]})


def _config(config_cls, output_dir, **overrides):
    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, total_episodes=8,
        num_ppo_epochs=2, response_length=8, local_rollout_forward_batch_size=4, num_sample_generations=0,
        learning_rate=1e-3, bf16=False, report_to="none", seed=0, save_strategy="no", stop_token="eos",
        missing_eos_penalty=1.0, gradient_checkpointing=False, disable_tqdm=True,
    )
    options.update(overrides)
    return config_cls(**options)


def _trainer(trainer_cls, args, lm_path, rm_path, **extra):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    tokenizer.padding_side = "left"
    return trainer_cls(
        args=args, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(lm_path), ref_model=None,
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm_path), train_dataset=_prompts(tokenizer),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm_path), **extra,
    )


def _regularized(tmp_path, lm_path, rm_path, **overrides):
    from trl_regularizers.trainers.ppo import RegularizedPPOConfig, RegularizedPPOTrainer

    return _trainer(RegularizedPPOTrainer, _config(RegularizedPPOConfig, tmp_path, **overrides), lm_path, rm_path)


@requires_trl_ppo
def test_parity_with_stock_ppo_trainer(tmp_path, tiny_lm_path, tiny_rm_path):
    """k1, fixed kl_coef, no ptx, same seed: every logged metric of both updates equals stock PPOTrainer's."""
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    stock = _trainer(PPOTrainer, _config(PPOConfig, tmp_path / "stock"), tiny_lm_path, tiny_rm_path)
    stock.train()
    ours = _regularized(tmp_path / "ours", tiny_lm_path, tiny_rm_path)
    ours.train()

    assert len(stock.state.log_history) == len(ours.state.log_history) == 2
    for expected, got in zip(stock.state.log_history, ours.state.log_history):
        for name, value in expected.items():
            if name != "eps":  # episodes per second: wall-clock
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
        assert got["kl"] == pytest.approx(expected["objective/kl"], rel=1e-6, abs=1e-7)
        assert got["kl/coef"] == pytest.approx(0.05)
    assert ours.state.log_history[1]["loss/policy_avg"] != ours.state.log_history[0]["loss/policy_avg"]
