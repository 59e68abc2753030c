"""(d) Reward model with vs without Llama 2 margins, on labels whose noise sits on the weak pairs: a negative result.

Llama 2 (Touvron et al. 2023, Table 28) puts the rater's preference strength into the reward-model loss as a
margin, ``-log sigmoid(r_c - r_r - m)``, and reports higher held-out accuracy, most on clearly separable pairs. On
clean labels this demo's task saturates (both reward models ~0.97-0.99, no difference), so the setting here is
the one where the rater's confidence should carry information: raters often wrong on weak pairs, rarely on clear
ones.

Setting (``run_margins``): the pairs of ``runs.rated_pairs``, a true description vs one with k = 1, 2, 3 wrong
facts, labeled "slightly better", "better", "significantly better". Training: ``TRAIN_PAIRS`` pairs, each with
chosen and rejected swapped with the probability ``FLIP_RATES`` of its label (40% / 15% / 5%; the label stays: a
rater who picked the wrong side, as sure as they felt). Both reward models fine-tune the whole base model for
``margin_steps(size)`` steps (80 at the full size, ~7 epochs: room to memorize the swaps); ``RM`` with the
Bradley-Terry loss, ``RM+margin`` with ``margin_source="label"``, ``margin_label_map="llama2_large"`` (Llama 2's
{3, 2, 1}, not tuned). Evaluation: accuracy on the clean labels of ``HELDOUT_PER_STRENGTH`` unseen pairs per
label. The seed draws the pairs, the swaps and the held-out pairs and seeds the trainer (same initial score head
in both runs), so the runs of a seed differ only by the margin and ``accuracy_gain`` is a paired difference.

Result (seeds 0-2, ~20 s per seed on one core; seeds 3-5 run beside as a check): the margin does not measurably
change held-out accuracy: gain +0.009 [-0.061, 0.080] over seeds 0-2 (+0.010 [-0.015, 0.035] over seeds 0-5), alike
on every strength, not largest on the separable pairs (~0.90 for both models). What it does change is how much of
the noise is learned: the RM ends up ranking 60% of its swapped training pairs the swapped way, the RM+margin 43%
(``memorized_swaps``, seeds 0-2; over seeds 0-5 54% vs 37%, difference -0.17 [-0.27, -0.07]). Why that does not
reach the accuracy:

* the labels are right more often than not in every strength, and then both losses, per pair, are minimized by
  a gap of the right sign (for a swap rate p < 1/2 the minimum of ``(1-p) l(d - m) + p l(-d - m)`` is at d > 0):
  the margin moves how far each pair is pushed, and accuracy reads only the sign;
* only ~20% of the training pairs are swapped and a memorized swap mostly misleads that one pair, which the
  held-out set does not contain;
* two runs that differ in their loss diverge within a few epochs: the paired gain varies by 0.02-0.04 (sd) from
  seed to seed, more than the point or two Llama 2 reports from a far larger evaluation: 3 seeds cannot resolve it.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from datasets import Dataset

from examples.demo.jobs import quiet_trainer
from examples.demo.runs import STRENGTH_LABELS, DemoSize, common_args, rated_pairs

FLIP_RATES = {"slightly better": 0.4, "better": 0.15, "significantly better": 0.05}
"""Probability that a training pair of each strength has chosen and rejected swapped (its label kept)."""
TRAIN_PAIRS = 192
HELDOUT_PER_STRENGTH = 200
"""Held-out pairs per strength label (fewer at the quick size: ``size.heldout_pairs`` if smaller)."""
LEARNING_RATE = 1e-3
BATCH_SIZE = 16
MARGIN_SCALE = 1.0
"""Margins ``MARGIN_SCALE * {3, 2, 1}``: Llama 2's "margin large" as it is.

Tried (gain RM+margin - RM on clean held-out labels, slightly better / better / significantly better / all, mean
of 3 seeds; whole model fine-tuned, lr 1e-3, batch 16, 192 pairs, flip rates 40/15/5% unless said; all but the
last two with an exploration script whose seeds draw other data than this module's):

* 48 steps: +0.024 / +0.011 / +0.011 / +0.016; flips 30/10/2%: -0.026 / 0.000 / -0.008 / -0.009.
* 96 steps: +0.042 / +0.052 / +0.027 / +0.040 (all: +0.02, +0.07, +0.02). Scale 2: +0.062 / +0.055 / +0.029 /
  +0.048, positive on every seed, but -0.09 and -0.06 on two of this module's draws (+0.01 on the third); scale 3:
  +0.031 overall. Scale 2 on clean labels: -0.004 (both ~0.97).
* 384 pairs, lr 5e-4, 96 steps: -0.013 (noisy), 0.000 (clean). 48 pairs, 48 steps: +0.007 (clean), +0.004 (noisy).
* Smaller reward models: the first 2 of the 4 layers +0.027, the first 1 -0.021, only the last layer trained
  -0.002 (per-seed spread ~0.05 each).
* Frozen backbone, only the score head trained (a linear reward on fixed features, accuracy ~0.75): the margin
  lowers accuracy on every seed, -0.03 overall, with or without noise.
* Train on 12 animals, test on 4: neither model generalizes (~0.5).
* This module, 96 steps, 250 held-out pairs per label, seeds 0-5: +0.018 / +0.030 / +0.015 / +0.021
  [-0.020, 0.063]. At 80 steps (kept, for the time budget): +0.012 / +0.011 / +0.008 / +0.010 [-0.015, 0.035].
"""
VARIANTS = {"RM": dict(margin_source=None), "RM+margin": dict(margin_source="label")}
"""Each run's options on top of the common ones (``margin_label_map`` and ``margin_scale`` are unused without a source)."""


def margin_steps(size: DemoSize) -> int:
    """Training steps of each run: ``5/3 * size.reward_steps`` (80 at the full size: ~7 epochs of ``TRAIN_PAIRS``)."""
    return size.reward_steps * 5 // 3


# ----------------------------------------------------------------------------------------------- data
def noisy_rated_pairs(num_pairs: int, seed: int, flip_rates: dict[str, float] = FLIP_RATES) -> Dataset:
    """``rated_pairs(num_pairs, seed)`` with chosen and rejected swapped with probability ``flip_rates[label]``;
    the label is kept and ``swapped`` marks the swapped rows."""
    unknown = set(flip_rates) ^ set(STRENGTH_LABELS.values())
    if unknown:
        raise ValueError(f"flip_rates must have exactly the labels {sorted(STRENGTH_LABELS.values())}, got {sorted(flip_rates)}.")
    rng = random.Random(10_000 + seed)
    rows = []
    for row in rated_pairs(num_pairs, seed):
        swap = rng.random() < flip_rates[row["preference_strength"]]
        chosen, rejected = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
        rows.append({"chosen": chosen, "rejected": rejected, "preference_strength": row["preference_strength"], "swapped": swap})
    return Dataset.from_list(rows)


def heldout_rated_pairs(per_strength: int, seed: int, exclude: Dataset) -> Dataset:
    """``per_strength`` distinct pairs of each label with clean labels (true description chosen), none of which is
    a pair of ``exclude`` in either order; drawn by ``rated_pairs`` from a seed of its own."""
    seen = {frozenset((row["chosen"], row["rejected"])) for row in exclude}
    counts = dict.fromkeys(STRENGTH_LABELS.values(), 0)
    rows = []
    for row in rated_pairs(40 * per_strength, seed=20_000 + seed):
        key = frozenset((row["chosen"], row["rejected"]))
        if key in seen or counts[row["preference_strength"]] >= per_strength:
            continue
        seen.add(key)
        counts[row["preference_strength"]] += 1
        rows.append(row)
    if min(counts.values()) < per_strength:  # there are 336 distinct one-fact pairs in the world
        raise ValueError(f"only {counts} unseen pairs found, {per_strength} per label wanted: lower per_strength.")
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Reward of each text, scored as ``RewardTrainer`` trains (EOS appended, right padding)."""
    model.eval()
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = [t + tokenizer.eos_token for t in texts[start : start + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="right")
        scores.append(model(**enc.to(model.device)).logits[:, 0].float().cpu())
    return torch.cat(scores)


def accuracy_by_strength(chosen: torch.Tensor, rejected: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Fraction of pairs with ``chosen > rejected``, per strength label (``STRENGTH_LABELS`` order) and ``"all"``."""
    correct = (chosen > rejected).float()
    result = {}
    for label in STRENGTH_LABELS.values():
        rows = [i for i, value in enumerate(labels) if value == label]
        result[label] = correct[rows].mean().item() if rows else float("nan")
    result["all"] = correct.mean().item()
    return result


def paired_gain(runs: list[dict], treated: str = "RM+margin", control: str = "RM") -> dict[str, float]:
    """``accuracy[treated] - accuracy[control]`` per key, for the runs of one seed."""
    by_name = {run["name"]: run["accuracy"] for run in runs}
    return {key: by_name[treated][key] - by_name[control][key] for key in by_name[control]}


# ----------------------------------------------------------------------------------------------- run
def run_margins(base: str, out: Path, size: DemoSize, seed: int) -> list[dict]:
    """``RM`` and ``RM+margin`` (``VARIANTS``) on the noisy pairs of ``seed``, each trained in ``out/<name>``; one
    record per run (the demo saves them together in the job's ``run.json``). ``accuracy``: clean held-out labels
    per strength and ``"all"``; ``RM+margin`` also has ``accuracy_gain`` (minus ``RM`` of the same seed);
    ``memorized_swaps``: share of the swapped training pairs the final model ranks the swapped (wrong) way."""
    from trl_regularizers import RegularizedRewardConfig, RegularizedRewardTrainer

    train = noisy_rated_pairs(TRAIN_PAIRS, seed)
    heldout = heldout_rated_pairs(min(HELDOUT_PER_STRENGTH, size.heldout_pairs), seed, exclude=train)
    swapped = train.filter(lambda row: row["swapped"])
    runs = []
    for name, options in VARIANTS.items():
        args = RegularizedRewardConfig(
            **common_args(out / name, margin_steps(size), seed),
            **options,
            margin_label_map="llama2_large",
            margin_scale=MARGIN_SCALE,
            learning_rate=LEARNING_RATE,
            per_device_train_batch_size=BATCH_SIZE,
        )
        trainer = RegularizedRewardTrainer(model=base, args=args, train_dataset=train)
        quiet_trainer(trainer, f"(d) {name} seed {seed}")
        trainer.train()
        model, tokenizer = trainer.model, trainer.processing_class
        accuracy = accuracy_by_strength(score_texts(model, tokenizer, heldout["chosen"]), score_texts(model, tokenizer, heldout["rejected"]),
                                        heldout["preference_strength"])
        # a swapped pair's training "chosen" is the wrong text: ranking it first means the swap was learned
        memorized = float("nan")
        if len(swapped):
            memorized = (score_texts(model, tokenizer, swapped["chosen"]) > score_texts(model, tokenizer, swapped["rejected"])).float().mean().item()
        record = {
            "name": name,
            "settings": {**options, "margin_label_map": "llama2_large" if options["margin_source"] else None,
                         "margin_scale": MARGIN_SCALE if options["margin_source"] else None, "learning_rate": LEARNING_RATE,
                         "steps": margin_steps(size), "train_pairs": TRAIN_PAIRS, "flip_rates": FLIP_RATES},
            "log_history": trainer.state.log_history,
            "accuracy": accuracy,
            "memorized_swaps": memorized,
            "swapped_train_pairs": len(swapped),
            "heldout_pairs": {label: heldout["preference_strength"].count(label) for label in STRENGTH_LABELS.values()},
        }
        runs.append(record)
    runs[-1]["accuracy_gain"] = paired_gain(runs)
    return runs
