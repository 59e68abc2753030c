"""RegularizedRLOOTrainer: parity with stock RLOO, every estimator x placement against hand-computed values,
k3 overflow, adaptive beta, PEFT + gradient accumulation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from trl import RLOOConfig, RLOOTrainer

from tests.trainers.test_grpo import (
    HAND_ESTIMATORS,
    drifted_policy,
    exact_full_kl,
    full_sequence,
    online_args,
    prompts,
    reward_distinct,
    train_logs,
)
from trl_regularizers.configs import RegularizedRLOOConfig
from trl_regularizers.trainers.rloo import RegularizedRLOOTrainer

BETA = 0.05  # RLOO's default


def completion_logps(trainer, model, batch) -> torch.Tensor:
    with torch.no_grad():
        return RLOOTrainer._get_per_token_logps_and_entropies(trainer, model, *full_sequence(batch))[0]


class RecordingRLOOTrainer(RegularizedRLOOTrainer):
    """Records rollouts with policy and reference log-probs, task rewards, and losses next to the KL-free loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts, self.rewards, self.losses = [], [], []

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        logps = completion_logps(self, self.model, batch)
        ref_logps = completion_logps(self, self.ref_model, batch)
        self.rollouts.append({**batch, "policy_logps": logps, "ref_logps": ref_logps, "full_kl": exact_full_kl(self, batch)})
        return batch

    def _calculate_rewards(self, *args, **kwargs):
        rewards = super()._calculate_rewards(*args, **kwargs)
        self.rewards.append(rewards.clone())
        return rewards

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        with torch.no_grad():
            without_kl = RLOOTrainer._compute_loss(self, model, inputs)
        inputs = dict(inputs, full_kl=exact_full_kl(self, inputs), ref_logps=completion_logps(self, self.ref_model, inputs))
        self.losses.append((loss.detach(), without_kl, inputs, completion_logps(self, self.model, inputs)))
        return loss


@pytest.mark.parametrize("beta, our_config", [(0.0, RegularizedRLOOConfig), (BETA, RegularizedRLOOConfig), (BETA, RLOOConfig)])
def test_defaults_match_stock_rloo_exactly(tiny_lm_path, tmp_path, beta, our_config):
    """Also with the stock config (only the trainer class swapped): it is upgraded with the new fields' defaults."""
    stock_logs = train_logs(
        RLOOTrainer(drifted_policy(tiny_lm_path), reward_distinct, online_args(RLOOConfig, tmp_path, beta=beta), prompts())
    )
    our_logs = train_logs(
        RegularizedRLOOTrainer(
            drifted_policy(tiny_lm_path), reward_distinct, online_args(our_config, tmp_path, beta=beta), prompts()
        )
    )
    keys = ["loss", "grad_norm", "reward", "entropy"] + (["kl"] if beta else [])
    assert [[log[k] for k in keys] for log in our_logs] == [[log[k] for k in keys] for log in stock_logs]
    if beta:
        assert our_logs[0]["kl"] != 0 and our_logs[0]["kl/coef"] == BETA and "kl/k3" in our_logs[0]


@pytest.mark.parametrize("estimator", sorted(HAND_ESTIMATORS))
def test_reward_placement_shapes_leave_one_out_advantages(tiny_lm_path, tmp_path, estimator):
    args = online_args(RegularizedRLOOConfig, tmp_path, kl_estimator=estimator)
    trainer = RecordingRLOOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    logs = train_logs(trainer)
    assert len(trainer.rollouts) == 2
    for rollout, rewards in zip(trainer.rollouts, trainer.rewards):
        mask = rollout["completion_mask"]
        kl = (HAND_ESTIMATORS[estimator](rollout["policy_logps"] - rollout["ref_logps"]) * mask).sum(-1)
        assert kl.abs().max() > 1e-3
        shaped = (rewards[:, 0] - BETA * kl).view(-1, 4)
        baseline = (shaped.sum(1, keepdim=True) - shaped) / 3
        torch.testing.assert_close(rollout["advantages"], (shaped - baseline).view(-1), rtol=1e-4, atol=1e-5)
        token_mean = (HAND_ESTIMATORS[estimator](rollout["policy_logps"] - rollout["ref_logps"]) * mask).sum() / mask.sum()
        assert "ref_per_token_logps" not in rollout
    assert logs[-1]["kl"] == pytest.approx(token_mean.item(), rel=1e-4)
    for loss, without_kl, _, _ in trainer.losses:
        assert torch.equal(loss, without_kl)


@pytest.mark.parametrize("estimator", sorted(HAND_ESTIMATORS))
def test_loss_placement_adds_hand_computed_term(tiny_lm_path, tmp_path, estimator):
    args = online_args(RegularizedRLOOConfig, tmp_path, kl_estimator=estimator, kl_placement="loss")
    trainer = RecordingRLOOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    logs = train_logs(trainer)
    for rollout, rewards in zip(trainer.rollouts, trainer.rewards):  # no KL in the reward any more
        grouped = rewards[:, 0].view(-1, 4)
        baseline = (grouped.sum(1, keepdim=True) - grouped) / 3
        torch.testing.assert_close(rollout["advantages"], (grouped - baseline).view(-1))
    assert len(trainer.losses) == 2
    for loss, without_kl, inputs, logps in trainer.losses:
        per_token = HAND_ESTIMATORS[estimator](logps - inputs["ref_logps"]) * inputs["completion_mask"]
        expected = BETA * per_token.sum(-1).mean()  # RLOO's loss is a mean over sequences; the Trainer scales GA
        assert expected.abs() > 1e-4
        torch.testing.assert_close(loss - without_kl, expected, rtol=1e-4, atol=1e-7)
    assert [len([k for k in log if k == "kl"]) for log in logs] == [1, 1] and logs[0]["kl"] != 0


def test_full_kl_in_both_placements_equals_exact_kl_from_logits(tiny_lm_path, tmp_path):
    args = online_args(RegularizedRLOOConfig, tmp_path, kl_estimator="full", temperature=0.7)
    with pytest.warns(UserWarning, match="kl_estimator='full' with kl_placement='reward' gives a biased"):
        trainer = RecordingRLOOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    train_logs(trainer)
    for rollout, rewards in zip(trainer.rollouts, trainer.rewards):
        kl = (rollout["full_kl"] * rollout["completion_mask"]).sum(-1)
        assert kl.min() > 0
        shaped = (rewards[:, 0] - BETA * kl).view(-1, 4)
        baseline = (shaped.sum(1, keepdim=True) - shaped) / 3
        torch.testing.assert_close(rollout["advantages"], (shaped - baseline).view(-1), rtol=1e-4, atol=1e-5)

    args = online_args(RegularizedRLOOConfig, tmp_path, kl_estimator="full", kl_placement="loss", temperature=0.7)
    trainer = RecordingRLOOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    train_logs(trainer)
    assert len(trainer.losses) == 2
    for loss, without_kl, inputs, _ in trainer.losses:
        expected = BETA * (inputs["full_kl"] * inputs["completion_mask"]).sum(-1).mean()
        assert expected > 1e-4
        torch.testing.assert_close(loss - without_kl, expected, rtol=1e-4, atol=1e-7)


def test_k3_with_huge_log_ratio_stays_finite(tiny_lm_path, tmp_path):
    class HugeRatio(RegularizedRLOOTrainer):
        def score_reference(self, call):  # the reference the loss placement scores: log pi - log pi_ref = -1e4
            reference = super().score_reference(call)
            return dataclasses.replace(reference, logps=reference.logps + 1e4)

    args = online_args(RegularizedRLOOConfig, tmp_path, kl_estimator="k3", kl_placement="loss", max_steps=1)
    (log,) = train_logs(HugeRatio(drifted_policy(tiny_lm_path), reward_distinct, args, prompts()))
    assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])
    assert log["kl"] == pytest.approx(math.exp(20.0) - 1 - 20.0, rel=1e-4)


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_adaptive_beta_updates_once_per_step_in_both_placements(tiny_lm_path, tmp_path, placement):
    args = online_args(RegularizedRLOOConfig, tmp_path, kl_placement=placement, kl_target=1e6, kl_horizon=10.0)
    trainer = RegularizedRLOOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    logs = train_logs(trainer)
    assert [log["kl/coef"] for log in logs] == [BETA, BETA * 0.98]  # KL far below target: error clips at -0.2
    assert trainer.kl_penalty.coef == BETA * 0.98 * 0.98 and trainer.beta == BETA  # TRL's own beta: the config's
