"""KLDriftCallback: 0 before training, the exact KL afterwards (checked against a naive per-prompt
computation without padding), PEFT base = adapters disabled, beta = 0, and no effect on training."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from trl_regularizers.drift import KLDriftCallback

PROMPTS = ["the fox", "a cat sat", "one day", "hello there, the"]
HELDOUT = ["the owl says hoot.", "one cold day the bear ate honey and felt calm."]


def byte_sum(completions, **kwargs):
    """Any reward with spread across a group; a random-init model rarely emits a given character."""
    return [sum(c.encode()) / 2040 for c in completions]


def grpo_trainer(model, tmp_path, callbacks, steps=3, peft_config=None, beta=0.0, seed=0):
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=steps,
        learning_rate=0.05,
        beta=beta,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
    )
    dataset = Dataset.from_dict({"prompt": PROMPTS * 4})
    return GRPOTrainer(model=model, reward_funcs=byte_sum, args=args, train_dataset=dataset, callbacks=callbacks, peft_config=peft_config)


def naive_drift(callback, model, base_forward) -> dict[str, float]:
    """Re-sample with the callback's seed, then KL per prompt on the *unpadded* sequence with log_softmax."""
    tok = callback.tokenizer
    torch.manual_seed(callback.seed)
    sequences, mask, prompt_len = callback.sample(model)
    reverse, forward, reverse_sum = [], [], []
    for row in range(len(sequences)):
        ids = sequences[row][mask[row].bool()][None]  # drop left padding and everything after EOS
        n_prompt = len(tok(callback.prompts[row], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, n_prompt - 1 : -1].float(), -1)
            logq = torch.log_softmax(base_forward(ids)[0, n_prompt - 1 : -1].float(), -1)
        reverse.append((logp.exp() * (logp - logq)).sum(-1).mean().item())
        reverse_sum.append((logp.exp() * (logp - logq)).sum().item())
        forward.append((logq.exp() * (logq - logp)).sum(-1).mean().item())
    return {"drift/kl_reverse": sum(reverse) / len(reverse), "drift/kl_forward": sum(forward) / len(forward),
            "drift/kl_reverse_sequence": sum(reverse_sum) / len(reverse_sum)}


def naive_nll(tok, model, texts) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


@pytest.mark.slow
def test_zero_at_start_then_exact_kl_with_beta_zero(tiny_lm_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    drift = KLDriftCallback(PROMPTS, every_n_steps=3, max_new_tokens=8, heldout_texts=HELDOUT, batch_size=3)
    trainer = grpo_trainer(model, tmp_path, [drift], steps=3, beta=0.0)
    trainer.train()

    start, end = drift.history[0], drift.history[-1]
    assert [h["step"] for h in drift.history] == [0, 3]
    assert start["drift/kl_reverse"] == 0.0 and start["drift/kl_forward"] == 0.0
    assert start["forgetting/nll_increase"] == 0.0
    assert start["forgetting/nll"] == pytest.approx(naive_nll(drift.tokenizer, drift.base_model, HELDOUT), rel=1e-5)

    expected = naive_drift(drift, trainer.model.eval(), lambda ids: drift.base_model(input_ids=ids).logits)
    assert end["drift/kl_reverse"] > 1e-3 and end["drift/kl_forward"] > 1e-3
    assert end["drift/kl_reverse"] == pytest.approx(expected["drift/kl_reverse"], rel=1e-4)
    assert end["drift/kl_forward"] == pytest.approx(expected["drift/kl_forward"], rel=1e-4)
    assert end["drift/kl_reverse_sequence"] == pytest.approx(expected["drift/kl_reverse_sequence"], rel=1e-4)
    assert end["drift/kl_reverse_sequence"] > end["drift/kl_reverse"]  # completions are longer than one token
    nll_now = naive_nll(drift.tokenizer, trainer.model, HELDOUT)
    assert end["forgetting/nll"] == pytest.approx(nll_now, rel=1e-5)
    assert end["forgetting/nll_increase"] == pytest.approx(nll_now - start["forgetting/nll"], rel=1e-4, abs=1e-6)
    # Logged like any metric: step 0 entry and the step-3 log line carry the values.
    logged = [entry for entry in trainer.state.log_history if "drift/kl_reverse" in entry]
    assert [entry["step"] for entry in logged] == [0, 3]
    assert logged[-1]["drift/kl_reverse"] == end["drift/kl_reverse"]


@pytest.mark.slow
def test_peft_base_is_adapter_disabled(tiny_lm_path, tmp_path):
    from peft import LoraConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    drift = KLDriftCallback(PROMPTS, every_n_steps=3, max_new_tokens=8)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    trainer = grpo_trainer(model, tmp_path, [drift], steps=3, peft_config=peft_config, beta=0.0)
    trainer.train()

    assert drift.base_model is None  # no copy: the base is the same weights with the adapter off
    assert drift.history[0]["drift/kl_reverse"] == 0.0
    policy = trainer.model.eval()

    def base_forward(ids):
        with policy.disable_adapter():
            return policy(input_ids=ids).logits

    expected = naive_drift(drift, policy, base_forward)
    assert drift.history[-1]["drift/kl_reverse"] > 1e-4
    assert drift.history[-1]["drift/kl_reverse"] == pytest.approx(expected["drift/kl_reverse"], rel=1e-4)
    assert drift.history[-1]["drift/kl_forward"] == pytest.approx(expected["drift/kl_forward"], rel=1e-4)


@pytest.mark.slow
def test_probing_does_not_change_training(tiny_lm_path, tmp_path):
    """The probe samples under a forked RNG: losses with and without the callback are identical."""
    losses = []
    for callbacks in ([], [KLDriftCallback(PROMPTS, every_n_steps=1, max_new_tokens=8)]):
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
        trainer = grpo_trainer(model, tmp_path / str(len(callbacks)), callbacks, steps=2, beta=0.04)
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[0]) == 2
    assert losses[0] == losses[1]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="every_n_steps"):
        KLDriftCallback(PROMPTS, every_n_steps=0)
    with pytest.raises(ValueError, match="prompt"):
        KLDriftCallback([])
