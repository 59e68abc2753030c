"""RegularizedDPOTrainer with reward-aware losses (RPO, REBEL, reward-weighted DPO): values read back from TRL's own
logs, no extra forward, PEFT / precompute / GA, margins, ptx, score checks, and reward-model scoring."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from tests.trainers.test_dpo import PAIRS, PRETRAIN_TEXTS, ForwardCounter, config, preference_dataset, train
from trl_regularizers import RegularizedDPOTrainer
from trl_regularizers.scoring import RewardScorer, pair_texts

SCORES = dict(reward_chosen_score_field="chosen_rating", reward_rejected_score_field="rejected_rating")
"""The test pairs' ratings serve as reward scores (chosen 7, 6, 5, ... vs rejected 2, 3, 4, ...)."""
ETA = 0.5


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def kl_bern(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def dpo(z: float) -> float:
    return math.log1p(math.exp(-z))


MEAN_ABS_GAP = sum(abs(c - r) for *_, c, r in PAIRS) / len(PAIRS)


def expected(loss: str, implicit: float, diff: float, beta: float, weighting: str | None = None) -> float:
    """The loss of one pair from TRL's logged implicit gap beta * delta (rewards/margins) and its score gap."""
    target = ETA * diff
    if loss == "rpo_sq":
        return (implicit - target) ** 2
    if loss == "rpo_bwd_kl":
        return kl_bern(sig(target), sig(implicit))
    if loss == "rpo_fwd_kl":
        return kl_bern(sig(implicit), sig(target))
    if loss == "rebel":
        return (implicit / beta / ETA - diff) ** 2
    weight = {"abs": abs(target), "abs_normalized": abs(diff) / MEAN_ABS_GAP, "sigmoid": sig(target)}[weighting]
    return weight * dpo(implicit)


CASES = [("rpo_sq", None), ("rpo_bwd_kl", None), ("rpo_fwd_kl", None), ("rebel", None),
         ("weighted_dpo", "abs"), ("weighted_dpo", "abs_normalized"), ("weighted_dpo", "sigmoid")]


@pytest.mark.parametrize("loss, weighting", CASES, ids=[f"{a}-{b}" if b else a for a, b in CASES])
def test_loss_equals_the_formula_at_each_step(tiny_lm_path, tmp_path, loss, weighting):
    beta = 0.5
    extra = {"reward_weighting": weighting} if weighting else {}
    args = config(tmp_path, beta=beta, per_device_train_batch_size=1, reward_aware_loss=loss, reward_eta=ETA, **SCORES, **extra)
    _, steps = train(RegularizedDPOTrainer, args, tiny_lm_path)
    assert len(steps) == 3 and steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    for step, (*_, c, r) in zip(steps, PAIRS):
        implicit = step["rewards/margins"]  # TRL's beta * delta for this one pair
        assert step["loss"] == pytest.approx(expected(loss, implicit, c - r, beta, weighting), rel=1e-5, abs=1e-6)
        assert step["reward_aware/loss"] == pytest.approx(step["loss"], rel=1e-6, abs=1e-7)
        if loss == "rebel":
            assert step["reward_aware/implicit_gap"] == pytest.approx(implicit / beta / ETA, rel=1e-5, abs=1e-6)
            assert step["reward_aware/reward_gap"] == c - r
        else:
            assert step["reward_aware/implicit_gap"] == pytest.approx(implicit, rel=1e-5, abs=1e-6)
            assert step["reward_aware/reward_gap"] == pytest.approx(ETA * (c - r))
    assert steps[1]["rewards/margins"] != 0.0  # the policy moved, so later steps test a non-trivial gap


def test_per_token_log_ratios_when_asked(tiny_lm_path, tmp_path):
    args = config(tmp_path, per_device_train_batch_size=1, reward_aware_loss="rpo_sq", reward_eta=ETA, reward_length_normalize=True, **SCORES)
    _, steps = train(RegularizedDPOTrainer, args, tiny_lm_path)
    for step, (_, chosen, rejected, c, r) in zip(steps[1:], PAIRS[1:]):
        # beta * per-token mean log-ratio; the byte tokenizer has one token per byte, plus the EOS TRL appends
        implicit = step["rewards/chosen"] / (len(chosen) + 1) - step["rewards/rejected"] / (len(rejected) + 1)
        assert step["reward_aware/implicit_gap"] == pytest.approx(implicit, rel=1e-4)
        assert step["loss"] == pytest.approx((implicit - ETA * (c - r)) ** 2, rel=1e-4)


@pytest.mark.parametrize("loss", ["rpo_bwd_kl", "weighted_dpo"])
def test_no_additional_forward_pass(tiny_lm_path, tmp_path, loss):
    counts = []
    for cls, extra in ((DPOConfig, {}), (None, {"reward_aware_loss": loss, "nll_alpha": 0.3, **SCORES})):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
        trainer_cls = DPOTrainer if cls is DPOConfig else RegularizedDPOTrainer
        args = config(tmp_path / str(len(counts)), **({"cls": DPOConfig} if cls else {}), **extra)
        trainer = trainer_cls(model=model, args=args, train_dataset=preference_dataset())
        counter = ForwardCounter(trainer.model, trainer.ref_model)
        trainer.train()
        counts.append(counter.calls)
    assert counts == [6, 6]  # 3 steps x (policy + reference), with or without the reward-aware term


@pytest.mark.parametrize(
    "setup",
    [{"precompute_ref_log_probs": True}, {"peft": True}, {"peft": True, "precompute_ref_log_probs": True}],
    ids=["precompute", "peft", "peft+precompute"],
)
def test_values_with_peft_and_precomputed_reference(tiny_lm_path, tmp_path, setup):
    setup = dict(setup)
    kwargs = {}
    if setup.pop("peft", False):
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    alpha = 0.3
    args = config(tmp_path, per_device_train_batch_size=1, reward_aware_loss="rpo_bwd_kl", reward_eta=ETA, nll_alpha=alpha, **SCORES, **setup)
    _, steps = train(RegularizedDPOTrainer, args, tiny_lm_path, **kwargs)
    for step, (_, chosen, _, c, r) in zip(steps, PAIRS):
        nll = -step["logps/chosen"] / (len(chosen) + 1)
        want = expected("rpo_bwd_kl", step["rewards/margins"], c - r, 0.5) + alpha * nll
        assert step["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert steps[2]["rewards/margins"] != 0.0


def test_gradient_accumulation_gives_the_same_step(tiny_lm_path, tmp_path):
    options = dict(max_steps=1, reward_aware_loss="rpo_fwd_kl", reward_eta=ETA, **SCORES)
    _, accumulated = train(RegularizedDPOTrainer, config(tmp_path / "ga2", per_device_train_batch_size=1, gradient_accumulation_steps=2, **options), tiny_lm_path)
    _, single = train(RegularizedDPOTrainer, config(tmp_path / "ga1", per_device_train_batch_size=2, **options), tiny_lm_path)
    assert accumulated[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-5)
    assert accumulated[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)


def test_weighted_dpo_with_margins_and_ptx(tiny_lm_path, tmp_path):
    gamma, scale = 0.5, 2.0
    args = config(
        tmp_path, per_device_train_batch_size=1, max_steps=2, reward_aware_loss="weighted_dpo", reward_weighting="sigmoid",
        reward_eta=ETA, margin_source="likert", margin_scale=scale, ptx_coef=gamma, ptx_block_size=16, **SCORES,
    )
    torch.manual_seed(0)
    trainer = RegularizedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm_path), args=args, train_dataset=preference_dataset(),
        pretrain_dataset=Dataset.from_dict({"text": PRETRAIN_TEXTS}),
    )
    trainer.train()
    steps = [row for row in trainer.state.log_history if "loss" in row]
    for step, (*_, c, r) in zip(steps, PAIRS):
        margin = scale * (c - r) / 6
        assert step["margin/mean"] == pytest.approx(margin)
        want = sig(ETA * (c - r)) * dpo(step["rewards/margins"] - margin) + gamma * step["ptx/nll"]
        assert step["loss"] == pytest.approx(want, rel=1e-5)


def test_loss_types_other_than_sigmoid_stay(tiny_lm_path, tmp_path):
    """loss_type=["sigmoid", "hinge"]: the sigmoid term becomes RPO, TRL's hinge term is kept."""
    args = config(tmp_path, per_device_train_batch_size=1, max_steps=2, loss_type=["sigmoid", "hinge"], loss_weights=[0.7, 0.3],
                  reward_aware_loss="rpo_sq", reward_eta=ETA, **SCORES)
    _, steps = train(RegularizedDPOTrainer, args, tiny_lm_path)
    for step, (*_, c, r) in zip(steps, PAIRS):
        m = step["rewards/margins"]
        assert step["loss"] == pytest.approx(0.7 * (m - ETA * (c - r)) ** 2 + 0.3 * max(0.0, 1 - m), rel=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": ["ipo"]}, r"loss_type=\['ipo'\] \(needs 'sigmoid'"),
        ({"ld_alpha": 0.5}, "ld_alpha=0.5"),
        ({"margin_source": "likert"}, "margins only combine with 'weighted_dpo'"),
        ({"reward_chosen_score_field": "score_a"}, r"score column\(s\) \['score_a'\].*Set reward_chosen_score_field"),
    ],
)
def test_bad_setups_fail_before_training(tiny_lm_path, tmp_path, overrides, message):
    args = config(tmp_path, **{"reward_aware_loss": "rpo_sq", **SCORES, **overrides})
    with pytest.raises(ValueError, match=message):
        RegularizedDPOTrainer(model=tiny_lm_path, args=args, train_dataset=preference_dataset())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "high", True])
def test_bad_score_rows_are_named(tiny_lm_path, tmp_path, bad):
    # Arrow keeps a column of one type: text and booleans fill the whole column (refused from row 0)
    scores, row = ([bad] * 6, 0) if isinstance(bad, (str, bool)) else ([1.0, 2.0, 0.5, bad, 1.0, 3.0], 3)
    data = preference_dataset().add_column("chosen_score", scores).add_column("rejected_score", [0.0] * 6)
    args = config(tmp_path, reward_aware_loss="rebel")
    with pytest.raises(ValueError, match=rf"train dataset, row {row}: column 'chosen_score' must hold a finite number"):
        RegularizedDPOTrainer(model=tiny_lm_path, args=args, train_dataset=data)


def test_equal_scores_everywhere_are_refused_for_normalized_weights(tiny_lm_path, tmp_path):
    data = preference_dataset().add_column("chosen_score", [1.0] * 6).add_column("rejected_score", [1.0] * 6)
    args = config(tmp_path, reward_aware_loss="weighted_dpo")
    with pytest.raises(ValueError, match="every pair of the train dataset has equal scores"):
        RegularizedDPOTrainer(model=tiny_lm_path, args=args, train_dataset=data)


def test_reward_model_without_reward_aware_loss_is_refused(tiny_lm_path, tiny_rm_path, tmp_path):
    with pytest.raises(ValueError, match="reward_model= is given but reward_aware_loss=None"):
        RegularizedDPOTrainer(model=tiny_lm_path, args=config(tmp_path), train_dataset=preference_dataset(), reward_model=tiny_rm_path)


def test_reward_model_scores_each_pair_once_in_eval_mode(tiny_lm_path, tiny_rm_path, tmp_path):
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_path)
    reward_model.train()
    calls = []
    reward_model.register_forward_hook(lambda module, args, kwargs, output: calls.append((kwargs["input_ids"].shape[0], module.training)), with_kwargs=True)
    args = config(tmp_path, reward_aware_loss="rpo_bwd_kl", reward_model_batch_size=4)
    trainer, steps = train(RegularizedDPOTrainer, args, tiny_lm_path, reward_model=reward_model)
    assert calls == [(8, False), (4, False)]  # 6 pairs in batches of 4 pairs = 2 texts each, all before training
    assert reward_model.training  # its mode is restored
    scores = trainer.train_dataset
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_path)
    scorer = RewardScorer(AutoModelForSequenceClassification.from_pretrained(tiny_rm_path).eval(), tokenizer)
    for i, (prompt, chosen, rejected, *_) in enumerate(PAIRS):
        texts = pair_texts({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer)
        assert texts == (prompt + chosen + "<|im_end|>", prompt + rejected + "<|im_end|>")
        assert scores["chosen_score"][i] == pytest.approx(scorer.score_texts([texts[0]])[0], rel=1e-4, abs=1e-6)
        assert scores["rejected_score"][i] == pytest.approx(scorer.score_texts([texts[1]])[0], rel=1e-4, abs=1e-6)
    for step, i in zip(steps, range(0, 6, 2)):  # the loss reads the cached scores
        gap = [scores["chosen_score"][j] - scores["rejected_score"][j] for j in (i, i + 1)]
        assert step["reward_aware/reward_gap"] == pytest.approx(sum(gap) / 2, rel=1e-5, abs=1e-7)


def test_conversational_pairs_are_scored_through_the_chat_template(tiny_rm_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_path)
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go"}]}
    chosen, rejected = pair_texts(row, tokenizer)
    assert chosen == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert rejected.endswith("assistant\ngo<|im_end|>\n")
