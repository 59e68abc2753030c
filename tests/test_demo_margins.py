"""The data of the demo's margin panel (d): label noise lands on the weak pairs at the configured rates, the held-out
pairs are clean, unseen and balanced, and the accuracy bookkeeping is right."""

from __future__ import annotations

import math
import re

import pytest
import torch

from examples.demo.corpus import world
from examples.demo.margins import (
    FLIP_RATES,
    accuracy_by_strength,
    heldout_rated_pairs,
    noisy_rated_pairs,
    paired_gain,
)
from examples.demo.runs import STRENGTH_LABELS, rated_pairs

DESCRIPTION = re.compile(r"the (\w+) (\w+) lives in the (\w+) and eats (\w+)\.")
STRENGTH = {label: k for k, label in STRENGTH_LABELS.items()}


def wrong_facts(text: str) -> int:
    """How many of the description's color, home and food contradict the world."""
    color, animal, home, food = DESCRIPTION.fullmatch(text).groups()
    facts = world()[animal]
    return (color != facts["color"]) + (home != facts["home"]) + (food != facts["food"])


def test_swaps_land_on_weak_pairs_at_the_configured_rates():
    clean, noisy = rated_pairs(3000, seed=0), noisy_rated_pairs(3000, seed=0)
    assert noisy["preference_strength"] == clean["preference_strength"]  # the rater's label stays
    for label, rate in FLIP_RATES.items():
        rows = [(c, n) for c, n in zip(clean, noisy) if c["preference_strength"] == label]
        swapped = [n["swapped"] for _, n in rows]
        observed, sd = sum(swapped) / len(rows), math.sqrt(rate * (1 - rate) / len(rows))
        assert abs(observed - rate) < 4 * sd + 1e-9, (label, observed, rate)
        for c, n in rows:  # a swap exchanges the texts, nothing else
            expected = (c["rejected"], c["chosen"]) if n["swapped"] else (c["chosen"], c["rejected"])
            assert (n["chosen"], n["rejected"]) == expected
            assert wrong_facts(n["chosen" if n["swapped"] else "rejected"]) == STRENGTH[label]
    # the noise is concentrated on the weak pairs
    assert FLIP_RATES["slightly better"] > FLIP_RATES["better"] > FLIP_RATES["significantly better"]


def test_swaps_are_reproducible_per_seed_and_follow_custom_rates():
    assert noisy_rated_pairs(64, seed=3).to_list() == noisy_rated_pairs(64, seed=3).to_list()
    assert noisy_rated_pairs(64, seed=3)["chosen"] != noisy_rated_pairs(64, seed=4)["chosen"]
    labels = list(STRENGTH_LABELS.values())
    none = noisy_rated_pairs(64, seed=0, flip_rates=dict.fromkeys(labels, 0.0))
    assert not any(none["swapped"]) and none["chosen"] == rated_pairs(64, seed=0)["chosen"]
    only_weak = noisy_rated_pairs(200, seed=0, flip_rates={**dict.fromkeys(labels, 0.0), "slightly better": 1.0})
    assert only_weak["swapped"] == [label == "slightly better" for label in only_weak["preference_strength"]]
    with pytest.raises(ValueError, match="flip_rates"):
        noisy_rated_pairs(8, seed=0, flip_rates={"better": 0.1})


def test_heldout_pairs_are_clean_unseen_distinct_and_balanced():
    train = noisy_rated_pairs(192, seed=1)
    heldout = heldout_rated_pairs(100, seed=1, exclude=train)
    counts = {label: heldout["preference_strength"].count(label) for label in STRENGTH_LABELS.values()}
    assert counts == dict.fromkeys(STRENGTH_LABELS.values(), 100)
    for row in heldout:  # true description chosen; the rejected one has as many wrong facts as the label says
        assert wrong_facts(row["chosen"]) == 0 and wrong_facts(row["rejected"]) == STRENGTH[row["preference_strength"]]
    pairs = [frozenset((r["chosen"], r["rejected"])) for r in heldout]
    assert len(set(pairs)) == len(pairs)
    assert not set(pairs) & {frozenset((r["chosen"], r["rejected"])) for r in train}


def test_heldout_pairs_refuse_more_weak_pairs_than_the_world_has():
    # 16 animals x 3 facts x 7 wrong values = 336 distinct one-fact pairs
    with pytest.raises(ValueError, match="unseen pairs"):
        heldout_rated_pairs(340, seed=0, exclude=noisy_rated_pairs(8, seed=0))


def test_accuracy_by_strength_and_paired_gain_by_hand():
    labels = ["slightly better", "slightly better", "better", "significantly better", "significantly better", "better"]
    chosen = torch.tensor([1.0, 0.0, 2.0, 3.0, -1.0, 0.5])
    rejected = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.5])  # ties count as wrong
    acc = accuracy_by_strength(chosen, rejected, labels)
    assert acc == pytest.approx({"slightly better": 0.5, "better": 0.5, "significantly better": 0.5, "all": 0.5})
    acc2 = accuracy_by_strength(chosen + torch.tensor([0, 2, 0, 0, 2, 0.0]), rejected, labels)
    assert acc2 == pytest.approx({"slightly better": 1.0, "better": 0.5, "significantly better": 1.0, "all": 5 / 6})
    gain = paired_gain([{"name": "RM", "accuracy": acc}, {"name": "RM+margin", "accuracy": acc2}])
    assert gain == pytest.approx({"slightly better": 0.5, "better": 0.0, "significantly better": 0.5, "all": 1 / 3})
