"""RegularizedDPOTrainer: parity with stock DPOTrainer, no extra forward, NLL and margin values, PEFT, precompute."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from trl_regularizers import RegularizedDPOConfig, RegularizedDPOTrainer

PAIRS = [
    ("What is 2+2?", " 4", " five", 7, 2),
    ("Name a color.", " blue", " table", 6, 3),
    ("Say hi.", " hi", " bye now", 5, 4),
    ("Opposite of up?", " down", " up", 7, 1),
    ("Capital of France?", " Paris", " Rome", 6, 2),
    ("A fruit?", " apple", " rock", 4, 3),
]
LIKERT_POINTS = 7


def preference_dataset() -> Dataset:
    prompts, chosen, rejected, chosen_rating, rejected_rating = map(list, zip(*PAIRS))
    return Dataset.from_dict(
        {"prompt": prompts, "chosen": chosen, "rejected": rejected, "chosen_rating": chosen_rating, "rejected_rating": rejected_rating}
    )


def config(tmp_path, cls=RegularizedDPOConfig, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        beta=0.5,
        train_sampling_strategy="sequential",  # pairs in dataset order, so steps can be matched to rows
    )
    values.update(overrides)
    return cls(**values)


def train(trainer_cls, args, model_path, **kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    trainer = trainer_cls(model=model, args=args, train_dataset=kwargs.pop("train_dataset", preference_dataset()), **kwargs)
    trainer.train()
    return trainer, [row for row in trainer.state.log_history if "loss" in row]


def test_defaults_match_stock_dpo_step_by_step(tiny_lm_path, tmp_path):
    _, stock = train(DPOTrainer, config(tmp_path / "stock", cls=DPOConfig), tiny_lm_path)
    _, ours = train(RegularizedDPOTrainer, config(tmp_path / "ours"), tiny_lm_path)
    assert len(ours) == len(stock) == 3
    for step_stock, step_ours in zip(stock, ours):
        assert step_ours["loss"] == step_stock["loss"]
        assert step_ours["grad_norm"] == step_stock["grad_norm"]
        assert step_ours["logps/chosen"] == step_stock["logps/chosen"]
        assert not any(key.startswith(("nll/", "margin/", "ptx/")) for key in step_ours)
    assert stock[0]["loss"] != stock[2]["loss"]  # the model did train, so equality above is not trivial


class ForwardCounter:
    def __init__(self, *modules):
        self.calls = 0
        for module in modules:
            module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


@pytest.mark.parametrize("options", [{"nll_alpha": 0.7}, {"nll_alpha": 0.7, "margin_source": "likert"}])
def test_nll_and_margin_add_no_forward_pass(tiny_lm_path, tmp_path, options):
    counts = []
    for cls, extra in ((DPOConfig, {}), (RegularizedDPOConfig, options)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
        trainer_cls = DPOTrainer if cls is DPOConfig else RegularizedDPOTrainer
        trainer = trainer_cls(model=model, args=config(tmp_path / cls.__name__, cls=cls, **extra), train_dataset=preference_dataset())
        counter = ForwardCounter(trainer.model, trainer.ref_model)
        trainer.train()
        counts.append(counter.calls)
    assert counts[0] == 6  # 3 steps x (policy + reference)
    assert counts[1] == counts[0]


def completion_lengths(normalization: str, rows) -> list[int]:
    """Tokens the NLL is divided by; the byte tokenizer has one token per byte, plus the EOS TRL appends."""
    return [len(chosen) + 1 + (len(prompt) if normalization == "sequence" else 0) for prompt, chosen, *_ in rows]


@pytest.mark.parametrize("normalization", ["completion", "sequence"])
def test_nll_value_matches_hand_computation(tiny_lm_path, tmp_path, normalization):
    alpha = 0.7
    args = config(tmp_path, per_device_train_batch_size=1, max_steps=2, nll_alpha=alpha, nll_normalization=normalization)
    _, ours = train(RegularizedDPOTrainer, args, tiny_lm_path, train_dataset=preference_dataset().select([0, 1]))
    _, stock = train(DPOTrainer, config(tmp_path / "s", cls=DPOConfig, per_device_train_batch_size=1, max_steps=1), tiny_lm_path,
                     train_dataset=preference_dataset().select([0]))
    lengths = completion_lengths(normalization, PAIRS[:2])
    for step, length in zip(ours, lengths):  # batch of one pair: nll = -(sum of chosen logps) / length
        assert step["nll/chosen"] == pytest.approx(-step["logps/chosen"] / length, rel=1e-5)
    assert ours[0]["loss"] == pytest.approx(stock[0]["loss"] + alpha * ours[0]["nll/chosen"], rel=1e-5)


def odpo_loss(reward_margin: float, margin: float) -> float:
    """-log sigmoid(beta * delta - m) for one pair; beta * delta is TRL's rewards/margins metric."""
    return math.log1p(math.exp(-(reward_margin - margin)))


@pytest.mark.parametrize(
    "setup",
    [
        {},
        {"precompute_ref_log_probs": True},
        {"peft": True},
        {"peft": True, "precompute_ref_log_probs": True},
    ],
    ids=["ref-model", "precompute", "peft", "peft+precompute"],
)
def test_margin_and_nll_values(tiny_lm_path, tmp_path, setup):
    setup = dict(setup)
    kwargs = {}
    if setup.pop("peft", False):
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    alpha, scale = 0.3, 2.0
    args = config(
        tmp_path, per_device_train_batch_size=1, max_steps=3, nll_alpha=alpha, margin_source="likert",
        margin_likert_points=LIKERT_POINTS, margin_scale=scale, **setup,
    )
    trainer, steps = train(RegularizedDPOTrainer, args, tiny_lm_path, train_dataset=preference_dataset().select([0, 1, 2]), **kwargs)
    for step, (prompt, chosen, _, c_rating, r_rating) in zip(steps, PAIRS):
        margin = scale * (c_rating - r_rating) / (LIKERT_POINTS - 1)
        nll = -step["logps/chosen"] / (len(chosen) + 1)
        assert step["margin/mean"] == pytest.approx(margin, rel=1e-6)
        assert step["nll/chosen"] == pytest.approx(nll, rel=1e-5)
        assert step["loss"] == pytest.approx(odpo_loss(step["rewards/margins"], margin) + alpha * nll, rel=1e-5, abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference in every setup


def test_margin_from_column_equals_shifted_reference(tiny_lm_path, tmp_path):
    """An ODPO margin m is the same objective as stock DPO with ref_chosen_logps raised by m / beta."""
    beta, margins = 0.5, [0.4, 1.5, -0.2, 0.0, 2.0, 1.0]
    data = preference_dataset().add_column("offset", margins)
    args = config(tmp_path / "ours", beta=beta, precompute_ref_log_probs=True, margin_source="column", margin_column="offset")
    _, ours = train(RegularizedDPOTrainer, args, tiny_lm_path, train_dataset=data)

    torch.manual_seed(0)
    stock = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm_path),
        args=config(tmp_path / "stock", cls=DPOConfig, beta=beta, precompute_ref_log_probs=True),
        train_dataset=preference_dataset(),
    )
    stock.train_dataset = stock.train_dataset.map(
        lambda row, index: {"ref_chosen_logps": row["ref_chosen_logps"] + margins[index] / beta}, with_indices=True
    )
    stock.train()
    stock_steps = [row for row in stock.state.log_history if "loss" in row]
    assert len(stock_steps) == len(ours) == 3
    for step_stock, step_ours in zip(stock_steps, ours):
        assert step_ours["loss"] == pytest.approx(step_stock["loss"], rel=1e-5)
        assert step_ours["grad_norm"] == pytest.approx(step_stock["grad_norm"], rel=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"margin_source": "likert", "loss_type": ["ipo"]}, "loss_type"),
        ({"margin_source": "likert", "ld_alpha": 0.5}, "ld_alpha"),
        ({"margin_source": "rating", "margin_chosen_rating_field": "score_a"}, "'score_a'"),
    ],
)
def test_bad_margin_setup_fails_before_training(tiny_lm_path, tmp_path, overrides, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    with pytest.raises(ValueError, match=message) as error:
        RegularizedDPOTrainer(model=model, args=config(tmp_path, **overrides), train_dataset=preference_dataset())
    if "score_a" in message:
        assert "chosen_rating" in str(error.value)  # lists the dataset's columns


def test_stock_dpo_config_is_upgraded_and_trains_like_stock(tiny_lm_path, tmp_path):
    _, stock = train(DPOTrainer, config(tmp_path / "stock", cls=DPOConfig), tiny_lm_path)
    trainer, ours = train(RegularizedDPOTrainer, config(tmp_path / "ours", cls=DPOConfig), tiny_lm_path)
    assert isinstance(trainer.args, RegularizedDPOConfig) and trainer.args.nll_alpha == 0.0 and trainer.args.beta == 0.5
    assert [(s["loss"], s["grad_norm"]) for s in ours] == [(s["loss"], s["grad_norm"]) for s in stock]
    with pytest.raises(TypeError, match="args must be a RegularizedDPOConfig or a DPOConfig, got dict"):
        RegularizedDPOTrainer(model=tiny_lm_path, args={"beta": 0.1}, train_dataset=preference_dataset())


PRETRAIN_TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(12)]


def test_ptx_adds_gamma_times_nll_and_one_forward(tiny_lm_path, tmp_path):
    gamma = 0.5
    args = config(tmp_path / "ours", max_steps=2, ptx_coef=gamma, ptx_block_size=16)
    torch.manual_seed(0)
    trainer = RegularizedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm_path), args=args, train_dataset=preference_dataset(),
        pretrain_dataset=Dataset.from_dict({"text": PRETRAIN_TEXTS}),
    )
    counter = ForwardCounter(trainer.model, trainer.ref_model)
    trainer.train()
    ours = [row for row in trainer.state.log_history if "loss" in row]
    _, stock = train(DPOTrainer, config(tmp_path / "stock", cls=DPOConfig, max_steps=1), tiny_lm_path)
    assert counter.calls == 2 * 3  # policy + reference + ptx per step
    assert ours[0]["ptx/nll"] > 0
    assert ours[0]["loss"] == pytest.approx(stock[0]["loss"] + gamma * ours[0]["ptx/nll"], rel=1e-5)


def test_ptx_coef_without_pretrain_dataset_fails_before_training(tiny_lm_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    with pytest.raises(ValueError, match="pass pretrain_dataset="):
        RegularizedDPOTrainer(model=model, args=config(tmp_path, ptx_coef=0.1), train_dataset=preference_dataset())


def test_eval_applies_margins_to_a_dataset_passed_to_evaluate(tiny_lm_path, tmp_path):
    args = config(tmp_path, per_device_eval_batch_size=2, margin_source="rating", margin_scale=0.25)
    trainer = RegularizedDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_lm_path), args=args, train_dataset=preference_dataset())
    metrics = trainer.evaluate(preference_dataset())  # before training policy == reference, so beta * delta = 0
    margins = [0.25 * (c - r) for *_, c, r in PAIRS]
    assert metrics["eval_loss"] == pytest.approx(sum(odpo_loss(0.0, m) for m in margins) / len(margins), rel=1e-5)
    assert metrics["eval_margin/mean"] == pytest.approx(sum(margins) / len(margins), rel=1e-5)


def test_gradient_accumulation_gives_the_same_step(tiny_lm_path, tmp_path):
    """NLL and margin terms are added unscaled, so GA=2 x 1 pair and GA=1 x 2 pairs give the same gradient."""
    options = dict(max_steps=1, nll_alpha=0.5, margin_source="likert", margin_scale=3.0)
    _, accumulated = train(RegularizedDPOTrainer, config(tmp_path / "ga2", per_device_train_batch_size=1, gradient_accumulation_steps=2, **options), tiny_lm_path)
    _, single = train(RegularizedDPOTrainer, config(tmp_path / "ga1", per_device_train_batch_size=2, **options), tiny_lm_path)
    assert accumulated[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-5)
    assert accumulated[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)


def test_resume_continues_the_ptx_stream_exactly(tiny_lm_path, tmp_path):
    def run(output_dir, max_steps, resume=None):
        args = config(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=1, nll_alpha=0.3, ptx_coef=0.5, ptx_block_size=16)
        torch.manual_seed(0)
        trainer = RegularizedDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_lm_path), args=args, train_dataset=preference_dataset(),
            pretrain_dataset=Dataset.from_dict({"text": PRETRAIN_TEXTS}),
        )
        trainer.train(resume_from_checkpoint=resume)
        return [row for row in trainer.state.log_history if "loss" in row]

    full = run(tmp_path / "full", 3)
    resumed = run(tmp_path / "full", 3, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed[-1]["step"] == 3
    assert resumed[-1]["ptx/nll"] == pytest.approx(full[-1]["ptx/nll"], rel=1e-5)
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)


def test_non_finite_nll_is_caught_and_named(tiny_lm_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    trainer = RegularizedDPOTrainer(model=model, args=config(tmp_path, nll_alpha=0.1), train_dataset=preference_dataset())
    with torch.no_grad():
        trainer.model.get_input_embeddings().weight[:, 0] = float("nan")  # stock DPO would log a NaN loss and go on
    with pytest.raises(FloatingPointError, match="nll/chosen term is not finite"):
        trainer.train()


@pytest.mark.skipif(not hasattr(DPOTrainer, "_compute_loss_liger"), reason="only TRL 1.12-1.13 reroute DPO's loss to Liger (TRL 1.12 run)")
def test_liger_loss_that_would_bypass_the_regularizers_is_refused(tiny_lm_path, tmp_path, monkeypatch):
    # liger-kernel needs Triton (not on a CPU machine): stand in for it, TRL then builds its Liger loss
    monkeypatch.setattr("trl.trainer.dpo_trainer.is_liger_kernel_available", lambda: True)
    monkeypatch.setattr("trl.trainer.dpo_trainer.LigerFusedLinearDPOLoss", lambda **kwargs: None, raising=False)
    with pytest.raises(ValueError, match="use_liger_kernel=True replaces DPO's loss with Liger's"):
        RegularizedDPOTrainer(tiny_lm_path, args=config(tmp_path, nll_alpha=0.1, use_liger_kernel=True), train_dataset=preference_dataset())
