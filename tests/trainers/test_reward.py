"""RegularizedRewardTrainer: parity with stock RewardTrainer, margins from ratings, errors, accuracy per margin bucket."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from trl_regularizers import RegularizedRewardConfig, RegularizedRewardTrainer

ROWS = [  # chosen, rejected, chosen rating, rejected rating (1..5 Likert), strength label
    ("The sky is blue.", "The sky is green.", 5, 1, "significantly better"),
    ("Two plus two is four.", "Two plus two is five.", 4, 2, "better"),
    ("Water is wet.", "Water is dry.", 3, 2, "slightly better"),
    ("Fire is hot.", "Fire is cold.", 5, 2, "Significantly  Better"),
    ("Ice is cold.", "Ice is warm.", 3, 3, "negligibly better / unsure"),
    ("Cats meow.", "Cats bark.", 4, 1, "better"),
    ("Birds fly.", "Birds swim only.", 2, 1, "slightly better"),
]
LARGE = {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better / unsure": 0.0}


def ratings_dataset(rows=ROWS) -> Dataset:
    chosen, rejected, chosen_rating, rejected_rating, strength = map(list, zip(*rows))
    return Dataset.from_dict(
        {"chosen": chosen, "rejected": rejected, "chosen_rating": chosen_rating, "rejected_rating": rejected_rating, "strength": strength}
    )


def config(tmp_path, cls=RegularizedRewardConfig, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=3,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        train_sampling_strategy="sequential",  # pairs in dataset order, so steps can be matched to rows
    )
    values.update(overrides)
    return cls(**values)


def train(trainer_cls, args, model_path, dataset):
    torch.manual_seed(0)
    trainer = trainer_cls(model=AutoModelForSequenceClassification.from_pretrained(model_path), args=args, train_dataset=dataset)
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize("with_margin_column", [False, True])
def test_defaults_match_stock_reward_trainer(tiny_rm_path, tmp_path, with_margin_column):
    data = ratings_dataset()
    if with_margin_column:  # stock TRL subtracts it; so must we, unchanged
        data = data.add_column("margin", [0.5, 1.0, 0.0, 2.0, 0.25, 1.5, 0.75])
    stock = train(RewardTrainer, config(tmp_path / "stock", cls=RewardConfig), tiny_rm_path, data)
    ours = train(RegularizedRewardTrainer, config(tmp_path / "ours"), tiny_rm_path, data)
    assert len(ours) == len(stock) == 3
    for step_stock, step_ours in zip(stock, ours):
        assert step_ours["loss"] == step_stock["loss"]
        assert step_ours["grad_norm"] == step_stock["grad_norm"]
    assert stock[0]["loss"] != stock[2]["loss"]


@pytest.mark.parametrize(
    "options, margins",
    [
        ({"margin_source": "rating", "margin_scale": 0.5}, [0.5 * (c - r) for _, _, c, r, _ in ROWS]),
        ({"margin_source": "likert", "margin_likert_points": 5}, [(c - r) / 4 for _, _, c, r, _ in ROWS]),
        ({"margin_source": "label", "margin_label_field": "strength", "margin_label_map": "llama2_large"},
         [LARGE[" ".join(label.lower().split())] for *_, label in ROWS]),
    ],
    ids=["rating", "likert", "label"],
)
def test_derived_margins_equal_stock_with_hand_margins(tiny_rm_path, tmp_path, options, margins):
    ours = train(RegularizedRewardTrainer, config(tmp_path / "ours", **options), tiny_rm_path, ratings_dataset())
    by_hand = ratings_dataset().add_column("margin", margins)
    stock = train(RewardTrainer, config(tmp_path / "stock", cls=RewardConfig), tiny_rm_path, by_hand)
    plain = train(RewardTrainer, config(tmp_path / "plain", cls=RewardConfig), tiny_rm_path, ratings_dataset())
    assert len(ours) == len(stock) == 3
    for index, (step_stock, step_ours) in enumerate(zip(stock, ours)):
        assert step_ours["loss"] == pytest.approx(step_stock["loss"], rel=1e-6)
        assert step_ours["margin/mean"] == pytest.approx(sum(margins[2 * index : 2 * index + 2]) / 2, rel=1e-6)
    assert ours[0]["loss"] > plain[0]["loss"]  # positive margins make the same batch's loss larger


def test_missing_rating_column_fails_before_training(tiny_rm_path, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_path)
    args = config(tmp_path, margin_source="rating", margin_chosen_rating_field="score_chosen")
    with pytest.raises(ValueError, match=r"'score_chosen'.*\['chosen', 'rejected', 'chosen_rating', 'rejected_rating', 'strength'\]"):
        RegularizedRewardTrainer(model=model, args=args, train_dataset=ratings_dataset())


def test_non_finite_margin_column_fails_before_training(tiny_rm_path, tmp_path):
    data = ratings_dataset().add_column("margin", [0.5, 1.0, float("nan"), 2.0, 0.25, 1.5, 0.75])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_path)
    with pytest.raises(ValueError, match="train dataset, row 2: margin must be a finite number"):
        RegularizedRewardTrainer(model=model, args=config(tmp_path), train_dataset=data)


def test_reward_config_has_no_ptx_fields():
    """A sequence-classification reward model has no LM head to take a pretraining NLL from: no field offers it."""
    assert not [f.name for f in dataclasses.fields(RegularizedRewardConfig) if f.name.startswith("ptx_")]
    with pytest.raises(TypeError, match="ptx_coef"):
        RegularizedRewardConfig(output_dir="o", bf16=False, ptx_coef=0.5)


def hand_accuracy_per_label(model_path) -> dict[str, float]:
    """Score each sequence alone (no padding) and count chosen > rejected per normalized label."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()

    def reward(text: str) -> float:
        ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(input_ids=ids).logits.item()

    hits: dict[str, list[int]] = {}
    for chosen, rejected, _, _, label in ROWS:
        slug = "_".join("".join(ch if ch.isalnum() else " " for ch in label.lower()).split())
        hits.setdefault(slug, []).append(int(reward(chosen) > reward(rejected)))
    return {slug: sum(values) / len(values) for slug, values in hits.items()}


def test_eval_reports_accuracy_per_margin_bucket(tiny_rm_path, tmp_path):
    args = config(tmp_path, margin_source="label", margin_label_field="strength")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_path)
    trainer = RegularizedRewardTrainer(model=model, args=args, train_dataset=ratings_dataset(), eval_dataset=ratings_dataset())
    metrics = trainer.evaluate()
    expected = hand_accuracy_per_label(tiny_rm_path)
    assert set(expected) == {"significantly_better", "better", "slightly_better", "negligibly_better_unsure"}
    buckets = {key.removeprefix("eval_accuracy/margin="): value for key, value in metrics.items() if key.startswith("eval_accuracy/margin=")}
    assert buckets == pytest.approx(expected)
    # a second evaluation starts from empty counts (no carry-over)
    assert {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_accuracy/margin=")} == {
        f"eval_accuracy/margin={slug}": value for slug, value in buckets.items()
    }


def test_eval_buckets_by_rounded_margin_value(tiny_rm_path, tmp_path):
    args = config(tmp_path, margin_source="likert", margin_likert_points=5)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_path)
    trainer = RegularizedRewardTrainer(model=model, args=args, train_dataset=ratings_dataset(), eval_dataset=ratings_dataset())
    names = sorted(key for key in trainer.evaluate() if key.startswith("eval_accuracy/margin="))
    assert names == [f"eval_accuracy/margin={value}" for value in ("0", "0.25", "0.5", "0.75", "1")]
