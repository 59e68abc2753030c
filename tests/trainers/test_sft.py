"""RegularizedSFTTrainer: stock SFT at the defaults (plain, packing, padding-free, completion-only), the KL term and its
gradient against a direct computation from both models' full logits in both directions (prompt positions excluded),
the anchor's work (one reference backbone forward, no LM head call beyond stock's), the PEFT reference, adaptive
coefficient and ptx across a resume, 2 processes against 1, and the drift probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from trl_regularizers import KLDriftCallback, RegularizedSFTConfig, RegularizedSFTTrainer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sft_ddp.py"
COMMON = dict(per_device_train_batch_size=2, max_steps=3, logging_steps=1, learning_rate=1e-2, bf16=False, report_to="none",
              save_strategy="no", seed=0, gradient_checkpointing=False)


def prompt_completion(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": ["the cat ", "a dog ", "one bird ", "my fish "] * (n // 4),
                              "completion": ["sat on the mat.", "ran far away.", "sang a song.", "swam in a bowl."] * (n // 4)})


def texts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"text": [f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(n)]})


def drifted(path: str, scale: float = 0.05):
    """The saved tiny LM with perturbed weights: the base the anchor pulls toward is the model as passed, so the
    test's reference for "the base" is this perturbed copy."""
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def move_away_from_the_base(trainer) -> None:
    """Perturb the policy after the trainer copied its base, so the KL is not 0 from the first step."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trainer.model.model.layers[-1].parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def losses(trainer) -> list[float]:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("options, data", [
    ({}, prompt_completion), (dict(packing=True), texts), (dict(padding_free=True, max_length=None), texts),
    (dict(completion_only_loss=False), prompt_completion),
], ids=["completion-only", "packing", "padding-free", "whole-sequence"])
def test_defaults_are_stock_sft_in_loss_and_weights(tiny_lm_path, tmp_path, options, data):
    stock = SFTTrainer(tiny_lm_path, args=SFTConfig(str(tmp_path / "stock"), **COMMON, **options), train_dataset=data())
    ours = RegularizedSFTTrainer(tiny_lm_path, args=RegularizedSFTConfig(str(tmp_path / "ours"), **COMMON, **options), train_dataset=data())
    assert losses(ours) == losses(stock)
    for mine, theirs in zip(ours.model.parameters(), stock.model.parameters()):
        assert torch.equal(mine, theirs)
    assert ours.reference_model is None and not any(key.startswith(("kl", "ptx")) for key in ours.state.log_history[0])


def direct_kl_term(policy, base, inputs, direction: str) -> torch.Tensor:
    """sum over the trained positions of the exact KL from both models' full logits, / the trained-token count."""
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    trained = inputs["labels"][:, 1:] != -100
    logp = policy(**forward).logits[:, :-1].float().log_softmax(-1)[trained]
    with torch.no_grad():
        logq = base(**forward).logits[:, :-1].float().log_softmax(-1)[trained]
    if direction == "forward":
        kl = (logq.exp() * (logq - logp)).sum(-1)
    else:
        kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl.sum() / trained.sum()


def one_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_term_and_gradient_equal_a_direct_computation_from_full_logits(tiny_lm_path, tmp_path, direction):
    base = drifted(tiny_lm_path)
    args = RegularizedSFTConfig(str(tmp_path), **COMMON, sft_kl_coef=0.7, sft_kl_direction=direction)
    trainer = RegularizedSFTTrainer(drifted(tiny_lm_path), args=args, train_dataset=prompt_completion())
    move_away_from_the_base(trainer)
    inputs = one_batch(trainer)
    assert (inputs["labels"][:, 1:] == -100).any() and (inputs["labels"][:, 1:] != -100).any()  # prompts are excluded
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    term = trainer.compute_loss(trainer.model, dict(inputs)) - SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    expected = 0.7 * direct_kl_term(trainer.model, base, inputs, direction)
    torch.testing.assert_close(term, expected, rtol=1e-4, atol=1e-6)
    assert expected > 1e-3
    for got, want in zip(torch.autograd.grad(term, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    everywhere = dict(inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
    assert not torch.isclose(direct_kl_term(trainer.model, base, everywhere, direction), expected / 0.7)  # the mask matters


def test_the_anchor_adds_one_reference_backbone_forward_and_no_logits(tiny_lm_path, tmp_path):
    """The cost target: per micro-batch one no-grad forward of the reference's backbone, and the KL from hidden states
    and head weights, so neither LM head module runs more than in stock SFT (no [B, T, V] logits beyond stock's;
    TRL 1.16's own loss does not call the head module either)."""
    calls = {}

    def count(name, module):
        calls[name] = 0

        def hook(*_):
            calls[name] += 1
        module.register_forward_hook(hook)

    stock = SFTTrainer(tiny_lm_path, args=SFTConfig(str(tmp_path / "stock"), **COMMON, gradient_accumulation_steps=2), train_dataset=prompt_completion())
    count("stock backbone", stock.model.model)
    count("stock head", stock.model.lm_head)
    stock.train()
    args = RegularizedSFTConfig(str(tmp_path / "ours"), **COMMON, sft_kl_coef=0.1, gradient_accumulation_steps=2)
    trainer = RegularizedSFTTrainer(tiny_lm_path, args=args, train_dataset=prompt_completion())
    for owner, model in (("policy", trainer.model), ("reference", trainer.reference_model)):
        count(f"{owner} backbone", model.model)
        count(f"{owner} head", model.lm_head)
    trainer.train()
    micro_batches = COMMON["max_steps"] * 2
    assert calls["stock backbone"] == calls["policy backbone"] == calls["reference backbone"] == micro_batches
    assert calls["policy head"] == calls["stock head"] and calls["reference head"] == 0


def test_peft_reference_is_the_policy_with_its_adapter_disabled(tiny_lm_path, tmp_path):
    from peft import LoraConfig

    args = RegularizedSFTConfig(str(tmp_path), **COMMON, sft_kl_coef=1.0)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", lora_dropout=0.0)
    trainer = RegularizedSFTTrainer(tiny_lm_path, args=args, train_dataset=prompt_completion(), peft_config=peft_config)
    assert trainer.reference_model is None  # no copy: the adapter is disabled for the reference
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    inputs = one_batch(trainer)
    trainer.model.train()
    term = trainer.compute_loss(trainer.model, dict(inputs)) - SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path)  # what the LoRA adapter sits on
    torch.testing.assert_close(term, direct_kl_term(trainer.model, base, inputs, "forward"), rtol=1e-4, atol=1e-6)
    assert term > 1e-4


def test_adaptive_coefficient_and_ptx_resume_bit_for_bit(tiny_lm_path, tmp_path):
    """The target far below the KL: every step multiplies the coefficient by (1 + 0.2 / horizon)."""
    options = dict(COMMON, max_steps=3, save_strategy="steps", save_steps=1, sft_kl_coef=0.5, sft_kl_target=1e-9,
                   sft_kl_horizon=10.0, ptx_coef=0.3, ptx_block_size=16)
    straight = RegularizedSFTTrainer(drifted(tiny_lm_path), args=RegularizedSFTConfig(str(tmp_path / "a"), **options),
                                     train_dataset=prompt_completion(), pretrain_dataset=texts(16))
    move_away_from_the_base(straight)
    losses(straight)
    logs = [log for log in straight.state.log_history if "loss" in log]
    assert [log["kl/coef"] for log in logs] == [0.5, 0.5 * 1.02, 0.5 * 1.02 * 1.02]
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / "trl_regularizers_state.json").read_text())
    assert saved["kl_controller"]["value"] == 0.5 * 1.02 * 1.02 and saved["ptx"]["block"] > 0
    resumed = RegularizedSFTTrainer(drifted(tiny_lm_path), args=RegularizedSFTConfig(str(tmp_path / "a"), **options),
                                    train_dataset=prompt_completion(), pretrain_dataset=texts(16))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    last = [log for log in resumed.state.log_history if "loss" in log][-1]
    assert last["step"] == 3 and {k: last[k] for k in ("loss", "kl/coef", "kl/forward", "ptx/nll")} == {k: logs[-1][k] for k in ("loss", "kl/coef", "kl/forward", "ptx/nll")}
    assert resumed.ptx_term.stream.state_dict() == straight.ptx_term.stream.state_dict()


def test_two_processes_agree_with_one_on_the_kl(tiny_lm_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), tiny_lm_path, str(tmp_path / "ddp")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from tests.scripts.sft_ddp import first_step_kl

    single = first_step_kl(tiny_lm_path, str(tmp_path / "single"), per_device_batch=4)
    for rank in range(2):
        facts = json.loads((tmp_path / "ddp" / f"rank{rank}.json").read_text())
        assert facts["num_processes"] == 2 and facts["kl"] == pytest.approx(single, rel=1e-5)
    assert single > 1e-3


def test_sampled_estimators_are_refused_and_the_drift_probe_works_unchanged(tiny_lm_path, tmp_path):
    with pytest.raises(ValueError, match="sft_kl_estimator='k3' estimates the KL from tokens sampled from the policy"):
        RegularizedSFTConfig(str(tmp_path), **COMMON, sft_kl_coef=0.1, sft_kl_estimator="k3")
    drift = KLDriftCallback(["the cat ", "a dog "], every_n_steps=1, max_new_tokens=4)
    trainer = RegularizedSFTTrainer(tiny_lm_path, args=RegularizedSFTConfig(str(tmp_path), **COMMON, sft_kl_coef=0.5),
                                    train_dataset=prompt_completion(), callbacks=[drift])
    trainer.train()
    assert len(drift.history) >= 3 and drift.history[0]["drift/kl_forward"] == pytest.approx(0.0, abs=1e-6)
    assert drift.history[-1]["drift/kl_forward"] > 0
