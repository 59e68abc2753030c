"""RegularizedGRPOTrainer: parity with stock GRPO, every estimator x placement against hand-computed values,
k3 overflow, adaptive beta with resume, bias warnings, PEFT + gradient accumulation, ptx."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig

from trl_regularizers.core.kl import MAX_CLAMP
from trl_regularizers.configs import RegularizedGRPOConfig
from trl_regularizers.trainers.grpo import RegularizedGRPOTrainer
from trl_regularizers.core.records import KLRecord

BETA = 0.04
HAND_ESTIMATORS = {  # per-token formulas written out here, independent of trl_regularizers.core
    "k1": lambda r: r,
    "k2": lambda r: 0.5 * r**2,
    "k3": lambda r: torch.exp(-r) - 1 + r,
    "abs": lambda r: r.abs(),
}


def reward_distinct(completions, **kwargs):
    """A Python reward with spread within groups: distinct characters per completion."""
    return [len(set(c)) / 8 for c in completions]


def prompts() -> Dataset:
    return Dataset.from_dict({"prompt": ["hello", "abc", "xyz", "the cat"] * 4})


def drifted_policy(path: str):
    """The saved tiny LM with its weights perturbed in memory: TRL reloads the reference from disk, so the
    policy differs from the reference from step 0 and every KL value is nonzero. Also seeds torch: TRL 1.12
    initializes a LoRA adapter before the Trainer seeds the RNG."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def online_args(config_cls, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        seed=0,
        save_strategy="no",
    )
    values.update(overrides)
    return config_cls(**values)


def train_logs(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def full_sequence(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompt + completion ids and attention mask of a rollout batch, and the completion length."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].size(1)


def completion_logps(trainer, batch) -> torch.Tensor:
    """Policy log-probs of the completion tokens of ``batch``, recomputed without grad."""
    with torch.no_grad():
        return GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, *full_sequence(batch))[0]


def completion_log_softmax(trainer, model, batch) -> torch.Tensor:
    """[B, T, V] log-probabilities at the completion positions from the model's own logits (not TRL's fused
    head), at the sampling temperature."""
    input_ids, attention_mask, length = full_sequence(batch)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length - 1 : -1]
    return (logits / trainer.temperature).log_softmax(-1)


def exact_full_kl(trainer, batch, direction="reverse", with_grad=False) -> torch.Tensor:
    """Per-token KL over the whole vocabulary between the policy and the reference, computed naively."""
    with torch.no_grad():
        if trainer.ref_model is None:  # PEFT: the reference is the model with its adapter disabled
            with trainer.model.disable_adapter():
                ref_logp = completion_log_softmax(trainer, trainer.model, batch)
        else:
            ref_logp = completion_log_softmax(trainer, trainer.ref_model, batch)
    with torch.set_grad_enabled(with_grad):
        logp = completion_log_softmax(trainer, trainer.model, batch)
    if direction == "forward":
        logp, ref_logp = ref_logp, logp
    return (logp.exp() * (logp - ref_logp)).sum(-1)


class RecordingGRPOTrainer(RegularizedGRPOTrainer):
    """Records rollouts, reward columns, and each loss next to the parent's loss without any KL (with the exact
    full-vocabulary KL of each batch under ``full_kl``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts, self.rewards, self.losses = [], [], []

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        self.rollouts.append({**batch, "policy_logps": completion_logps(self, batch), "full_kl": exact_full_kl(self, batch)})
        return batch

    def _calculate_rewards(self, *args, **kwargs):
        rewards = super()._calculate_rewards(*args, **kwargs)
        self.rewards.append(rewards.clone())
        return rewards

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        beta, self.beta = self.beta, 0.0
        try:
            with torch.no_grad():
                without_kl = GRPOTrainer._compute_loss(self, model, inputs)
        finally:
            self.beta = beta
        full_kl = {direction: exact_full_kl(self, inputs, direction) for direction in ("reverse", "forward")}
        self.losses.append((loss.detach(), without_kl, dict(inputs, full_kl=full_kl), completion_logps(self, inputs)))
        return loss


@pytest.mark.parametrize("beta, our_config", [(0.0, RegularizedGRPOConfig), (BETA, RegularizedGRPOConfig), (BETA, GRPOConfig)])
def test_defaults_match_stock_grpo_exactly(tiny_lm_path, tmp_path, beta, our_config):
    """Also with the stock config (only the trainer class swapped): it is upgraded with the new fields' defaults."""
    stock_logs = train_logs(  # each trainer is trained right after it is built: __init__ seeds the RNG
        GRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, online_args(GRPOConfig, tmp_path, beta=beta), prompts())
    )
    our_logs = train_logs(
        RegularizedGRPOTrainer(
            drifted_policy(tiny_lm_path), reward_distinct, online_args(our_config, tmp_path, beta=beta), prompts()
        )
    )
    keys = ["loss", "grad_norm", "reward", "entropy"] + (["kl"] if beta else [])
    assert [[log[k] for k in keys] for log in our_logs] == [[log[k] for k in keys] for log in stock_logs]
    if beta:
        assert our_logs[0]["kl"] > 1e-3 and our_logs[0]["kl/coef"] == BETA


@pytest.mark.parametrize("estimator", sorted(HAND_ESTIMATORS))
def test_loss_placement_adds_hand_computed_term(tiny_lm_path, tmp_path, estimator):
    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_estimator=estimator)
    trainer = RecordingGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    logs = train_logs(trainer)
    assert len(trainer.losses) == 2
    for loss, without_kl, inputs, logps in trainer.losses:
        mask = inputs["completion_mask"]
        per_token = HAND_ESTIMATORS[estimator](logps - inputs["ref_per_token_logps"]) * mask
        normalizer = inputs["num_items_in_batch"]  # loss_type="dapo", one process, GA = steps_per_generation = 1
        expected = BETA * per_token.sum() / normalizer
        assert expected.abs() > 1e-4
        torch.testing.assert_close(loss - without_kl, expected, rtol=1e-4, atol=1e-7)
    assert all(math.isfinite(log["kl"]) and log["kl/coef"] == BETA for log in logs)
    assert {"kl/k1", "kl/k3"} <= set(logs[0])


@pytest.mark.parametrize("estimator", sorted(HAND_ESTIMATORS))
def test_reward_placement_changes_rewards_and_advantages(tiny_lm_path, tmp_path, estimator):
    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_placement="reward", kl_estimator=estimator)
    trainer = RecordingGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    logs = train_logs(trainer)
    assert len(trainer.rollouts) == 2 and trainer.reward_func_names == ["reward_distinct", "kl_penalty"]
    for rollout, rewards in zip(trainer.rollouts, trainer.rewards):
        mask = rollout["completion_mask"]
        kl = (HAND_ESTIMATORS[estimator](rollout["policy_logps"] - rollout["ref_per_token_logps"]) * mask).sum(-1)
        torch.testing.assert_close(rewards[:, 1], -BETA * kl, rtol=1e-4, atol=1e-6)

        def group_advantages(total):
            grouped = total.view(-1, 4)
            return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

        with_kl, task_only = group_advantages(rewards[:, 0] - BETA * kl), group_advantages(rewards[:, 0])
        torch.testing.assert_close(rollout["advantages"], with_kl, rtol=1e-4, atol=1e-5)
        assert (rollout["advantages"] - task_only).abs().max() > 1e-3  # the advantage estimator sees the KL
    for (loss, without_kl, _, _) in trainer.losses:  # nothing is added to the loss
        assert torch.equal(loss, without_kl)
    assert logs[0]["rewards/kl_penalty/mean"] < 0 or estimator == "k1"


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_kl_in_loss_equals_exact_kl_from_logits(tiny_lm_path, tmp_path, direction):
    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_estimator="full", kl_direction=direction, temperature=0.7)
    trainer = RecordingGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    logs = train_logs(trainer)
    assert len(trainer.losses) == 2
    for loss, without_kl, inputs, _ in trainer.losses:
        mask = inputs["completion_mask"]
        expected = BETA * (inputs["full_kl"][direction] * mask).sum() / inputs["num_items_in_batch"]
        assert expected.abs() > 1e-4
        torch.testing.assert_close(loss - without_kl, expected, rtol=1e-4, atol=1e-7)
        # the reference is scored with its hidden states in the loss: TRL's own pass was skipped, no [B, T, H] rides along
        assert inputs.get("ref_per_token_logps") is None and all(v.dim() < 3 for v in inputs.values() if torch.is_tensor(v))
    assert all(math.isfinite(log["kl"]) and log["kl"] > 0 for log in logs)


def test_full_kl_gradient_is_the_exact_kl_gradient(tiny_lm_path, tmp_path):
    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_estimator="full", max_steps=1)
    trainer = RecordingGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    train_logs(trainer)
    _, _, inputs, _ = trainer.losses[0]
    mask = inputs["completion_mask"]

    def gradient(kl: torch.Tensor) -> list[torch.Tensor]:
        trainer.model.zero_grad()
        (kl * mask).sum().backward()
        return [parameter.grad.clone() for parameter in trainer.model.parameters()]

    with trainer.logp_recorder.recording() as calls:  # the policy call with grad, as in the loss
        trainer._get_per_token_logps_and_entropies(trainer.model, *full_sequence(inputs))
    reference = trainer.score_reference(calls[0])
    record = KLRecord(calls[0].logps, reference.logps, mask, calls[0].states, reference.states)
    ours = gradient(trainer.kl_penalty.estimate(record))
    exact = gradient(exact_full_kl(trainer, inputs, with_grad=True))
    for ours_grad, exact_grad in zip(ours, exact):
        torch.testing.assert_close(ours_grad, exact_grad, rtol=1e-4, atol=1e-6)


def test_full_kl_in_reward_equals_exact_kl_from_logits(tiny_lm_path, tmp_path):
    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_estimator="full", kl_placement="reward")
    with pytest.warns(UserWarning, match="kl_estimator='full' with kl_placement='reward' gives a biased"):
        trainer = RecordingGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    train_logs(trainer)
    for rollout, rewards in zip(trainer.rollouts, trainer.rewards):
        kl = (rollout["full_kl"] * rollout["completion_mask"]).sum(-1)
        assert kl.min() > 0
        torch.testing.assert_close(rewards[:, 1], -BETA * kl, rtol=1e-4, atol=1e-6)
    for loss, without_kl, _, _ in trainer.losses:
        assert torch.equal(loss, without_kl)


@pytest.mark.parametrize("kl_clamp", [20.0, None])
def test_k3_with_huge_log_ratio(tiny_lm_path, tmp_path, kl_clamp):
    """Unbounded, k3 at r = -1e4 overflows (trl #3015); the clamp, or without it the largest bound (50), keeps the
    KL at k3 of the bound. At 50 the loss is finite but its gradient's norm overflows float32 in the backward through
    the model, so the clipped step changes nothing (why the default is 20)."""
    class HugeRatio(RegularizedGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            batch["ref_per_token_logps"] = batch["ref_per_token_logps"] + 1e4  # log pi - log pi_ref = -1e4
            return batch

    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_clamp=kl_clamp, max_steps=1)
    trainer = HugeRatio(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    (log,) = train_logs(trainer)
    bound = 20.0 if kl_clamp else MAX_CLAMP
    assert math.isfinite(log["loss"]) and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert log["grad_norm"] > 0 if kl_clamp else log["grad_norm"] == 0
    assert log["kl"] == pytest.approx(math.exp(bound) - 1 - bound, rel=1e-4)  # k3 at the bound


def test_adaptive_beta_updates_per_step_and_resumes_bit_for_bit(tiny_lm_path, tmp_path):
    # target far below the KL: the error clips at +0.2, so each step multiplies beta by (1 + 0.2 / horizon)
    args = online_args(
        RegularizedGRPOConfig, tmp_path, beta=BETA, kl_target=1e-6, kl_horizon=10.0, max_steps=3,
        save_strategy="steps", save_steps=1,
    )
    full = RegularizedGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    logs = train_logs(full)
    assert [log["kl/coef"] for log in logs] == [BETA, BETA * 1.02, BETA * 1.02 * 1.02]
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "trl_regularizers_state.json").read_text())
    assert saved["kl_controller"]["value"] == BETA * 1.02 * 1.02

    resumed = RegularizedGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    last = [log for log in resumed.state.log_history if "loss" in log][-1]
    assert last["step"] == 3 and last["kl/coef"] == logs[-1]["kl/coef"]  # bit for bit, not reset to the config's beta
    assert resumed.kl_penalty.coef == full.kl_penalty.coef and resumed.beta == full.beta == BETA  # TRL's own beta: the config's


def test_bias_warnings(tiny_lm_path, tmp_path, recwarn):
    def build(**kl):
        return RegularizedGRPOTrainer(tiny_lm_path, reward_distinct, online_args(RegularizedGRPOConfig, tmp_path, **kl), prompts())

    build(beta=BETA)  # k3 x importance ratio in the loss: unbiased (TRL's default); k3 in reward: biased
    build(beta=BETA, kl_estimator="k1", kl_placement="reward")
    assert not [w for w in recwarn if "biased" in str(w.message)]
    with pytest.warns(UserWarning, match=r"kl_estimator='k2' with kl_placement='reward' gives a biased.*\['k1'\]"):
        build(beta=BETA, kl_estimator="k2", kl_placement="reward")
    with pytest.warns(UserWarning, match=r"kl_estimator='k3' with kl_placement='loss'.*\['full', 'k2'\]"):
        build(beta=BETA, use_bias_correction_kl=False)


def test_invalid_combinations_fail_before_training(tiny_lm_path, tmp_path):
    softcapped = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    softcapped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="kl_estimator='full' in RegularizedGRPOTrainer recomputes the logits as hidden @ W.T, but its config sets final_logit_softcapping=30.0"):
        RegularizedGRPOTrainer(
            softcapped, reward_distinct, online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_estimator="full"), prompts()
        )
    with pytest.raises(TypeError, match="args must be a RegularizedGRPOConfig or a GRPOConfig, got RLOOConfig"):
        RegularizedGRPOTrainer(tiny_lm_path, reward_distinct, online_args(RLOOConfig, tmp_path, beta=BETA), prompts())
    with pytest.raises(ValueError, match="multi_objective_aggregation='sum_then_normalize'"):
        RegularizedGRPOTrainer(
            tiny_lm_path, reward_distinct,
            online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_placement="reward", multi_objective_aggregation="normalize_then_sum"),
            prompts(),
        )


def test_peft_and_gradient_accumulation_keep_parity_and_the_term(tiny_lm_path, tmp_path):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    overrides = dict(beta=BETA, gradient_accumulation_steps=2, per_device_train_batch_size=2, num_generations=4)
    stock_logs = train_logs(
        GRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, online_args(GRPOConfig, tmp_path, **overrides), prompts(), peft_config=lora())
    )
    our_logs = train_logs(
        RegularizedGRPOTrainer(
            drifted_policy(tiny_lm_path), reward_distinct, online_args(RegularizedGRPOConfig, tmp_path, **overrides), prompts(), peft_config=lora()
        )
    )
    assert [[log[k] for k in ("loss", "grad_norm", "kl")] for log in our_logs] == [[log[k] for k in ("loss", "grad_norm", "kl")] for log in stock_logs]
    assert our_logs[1]["kl"] > 0  # the adapter moved away from the reference (adapter disabled)

    args = online_args(RegularizedGRPOConfig, tmp_path, kl_estimator="k2", **overrides)
    trainer = RecordingGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts(), peft_config=lora())
    train_logs(trainer)
    assert len(trainer.losses) == 4  # 2 optimizer steps x 2 micro-batches
    for loss, without_kl, inputs, logps in trainer.losses:
        per_token = HAND_ESTIMATORS["k2"](logps - inputs["ref_per_token_logps"]) * inputs["completion_mask"]
        # dapo: tokens of the generation batch (2 micro-batches) x GA / steps_per_generation (= GA)
        torch.testing.assert_close(loss - without_kl, BETA * per_token.sum() / inputs["num_items_in_batch"], rtol=1e-4, atol=1e-8)

    args = online_args(RegularizedGRPOConfig, tmp_path, kl_estimator="full", **overrides)
    trainer = RecordingGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts(), peft_config=lora())
    train_logs(trainer)
    for loss, without_kl, inputs, _ in trainer.losses[2:]:  # the adapter has moved: the KL is nonzero
        expected = BETA * (inputs["full_kl"]["reverse"] * inputs["completion_mask"]).sum() / inputs["num_items_in_batch"]
        assert expected > 1e-6
        torch.testing.assert_close(loss - without_kl, expected, rtol=1e-4, atol=1e-8)


def test_ptx_adds_coef_times_logged_nll(tiny_lm_path, tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog " * 4] * 8
    without = train_logs(
        RegularizedGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, max_steps=1), prompts())
    )
    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, max_steps=1, ptx_coef=0.5, ptx_block_size=32)
    (with_ptx,) = train_logs(RegularizedGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts(), pretrain_dataset=corpus))
    assert with_ptx["ptx/nll"] > 1.0
    assert with_ptx["loss"] == pytest.approx(without[0]["loss"] + 0.5 * with_ptx["ptx/nll"], rel=1e-5)


@pytest.mark.parametrize("placement, factors", [("loss", [1, 2, 3, 4]), ("reward", [1, 1, 2, 2])])
def test_adaptive_beta_cadence_with_several_steps_per_generation(tiny_lm_path, tmp_path, placement, factors):
    """In the loss, beta adapts after every optimizer step; in the reward, once per generation: the penalty is
    fixed into a rollout's rewards when it is scored, so steps that reuse the rollout have nothing new to adapt to."""
    betas = []

    class RecordBeta(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            betas.append(trainer.kl_penalty.coef)

    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_estimator="k1" if placement == "reward" else "k3",
                       kl_placement=placement, kl_target=1e-6, kl_horizon=10.0, max_steps=4, steps_per_generation=2)
    trainer = RegularizedGRPOTrainer(drifted_policy(tiny_lm_path), reward_distinct, args, prompts())
    trainer.add_callback(RecordBeta())  # after the trainer's AdaptiveKLCallback: sees the step's update
    trainer.train()
    assert betas == [pytest.approx(BETA * 1.02**n, rel=1e-12) for n in factors]


@pytest.mark.skipif(not hasattr(GRPOTrainer, "compute_liger_loss"), reason="only TRL 1.12-1.13 reroute GRPO's loss to Liger (TRL 1.12 run)")
def test_liger_loss_that_would_ignore_the_kl_options_is_refused(tiny_lm_path, tmp_path, monkeypatch):
    # liger-kernel needs Triton (not on a CPU machine): stand in for it, TRL then builds its Liger loss
    monkeypatch.setattr("trl.trainer.grpo_trainer.is_liger_kernel_available", lambda: True)
    monkeypatch.setattr("trl.trainer.grpo_trainer.LigerFusedLinearGRPOLoss", lambda **kwargs: None, raising=False)
    args = online_args(RegularizedGRPOConfig, tmp_path, beta=BETA, kl_estimator="k2", use_liger_kernel=True)
    with pytest.raises(ValueError, match="use_liger_kernel=True replaces GRPO's loss with Liger's"):
        RegularizedGRPOTrainer(tiny_lm_path, reward_distinct, args, prompts())
