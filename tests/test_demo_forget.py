"""Panel (f) of the demo: the new task and its score, the per-run numbers and the statistics, by hand."""

from __future__ import annotations

import math

import pytest

from examples.demo.corpus import ANIMALS, world
from examples.demo.forget import MATCH_SCORE, friends, new_task, new_task_score, prior_task, score_reward
from examples.demo.forget_report import seed_numbers, summarize_forget, verdict
from examples.demo.stats import bootstrap_r2, linear_fit, mean_interval


def test_friends_is_a_derangement_and_the_tasks_do_not_overlap():
    pairs = friends()
    assert sorted(pairs) == sorted(ANIMALS) and sorted(pairs.values()) == sorted(ANIMALS)
    assert all(a != b for a, b in pairs.items())
    prompts, answers = new_task()
    prior_prompts, prior_answers = prior_task()
    assert len(prompts) == 16 and len(prior_prompts) == 64 and not set(prompts) & set(prior_prompts)
    facts = world()
    assert prior_answers[:4] == [facts[ANIMALS[0]][k] for k in ("color", "home", "food", "sound")]


def test_new_task_score_is_exact_on_the_first_word():
    assert new_task_score(" owl.", "owl") == 1.0
    assert new_task_score(" owl, who said hoot.", "owl") == 1.0
    assert new_task_score(" owls.", "owl") == 0.0  # whole word only
    assert new_task_score(" the owl.", "owl") == 0.0
    assert new_task_score("", "owl") == 0.0
    assert score_reward([" fox.", " cat."], answer=["fox", "dog"]) == [1.0, 0.0]


def _probe(step, new, prior, nll, kl):
    return {"step": step, "new/accuracy": new, "prior/accuracy": prior, "prior/nll": nll, "drift/kl_forward": kl, "forgetting/nll_increase": nll / 2}


def test_seed_numbers_read_the_end_and_the_first_matched_probe():
    below, above = MATCH_SCORE - 0.1, MATCH_SCORE + 0.05
    probes = [_probe(0, 0.0, 1.0, 0.1, 0.0), _probe(5, below, 0.9, 0.3, 1.0), _probe(10, above, 0.8, 0.5, 2.0), _probe(15, 1.0, 0.7, 0.6, 3.0)]
    numbers = seed_numbers(probes)
    assert numbers["prior_nll_rise_end"] == pytest.approx(0.5) and numbers["kl_forward_end"] == 3.0
    assert numbers["step_at_match"] == 10 and numbers["prior_nll_rise_at_match"] == pytest.approx(0.4)
    assert numbers["prior_accuracy_at_match"] == 0.8
    never = seed_numbers(probes[:2])
    assert math.isnan(never["step_at_match"]) and math.isnan(never["prior_nll_rise_at_match"])


def test_summary_pairs_seeds_and_fits_all_runs():
    def record(name, seed, rise, kl):
        return {"panel": "f_forget", "name": name, "seed": seed, "settings": {},
                "probes": [_probe(0, 0.0, 1.0, 0.1, 0.0), _probe(5, 0.9, 0.9, 0.1 + rise, kl)]}

    records = {}
    for name, rises in (("SFT", (0.5, 0.7)), ("GRPO", (0.1, 0.2)), ("SFT on filtered base samples", (0.3, 0.3))):
        for seed, rise in enumerate(rises):
            records[f"{name}{seed}"] = record(name, seed, rise, kl=2 * rise + 0.1 * seed)
    summary = summarize_forget(records)
    claim = summary["claims"][0]
    assert (claim["a"], claim["b"]) == ("SFT", "GRPO")
    assert claim["end_per_seed"] == pytest.approx([0.4, 0.5]) and claim["end"] == pytest.approx(mean_interval([0.4, 0.5]))
    fit = summary["drift_fit"]
    assert len(fit["points"]) == 6 and fit["slope"] > 0 and 0.9 < fit["r2"] <= 1.0 and fit["r2_low"] <= fit["r2"] <= fit["r2_high"] + 1e-9


def test_verdict_reads_the_interval():
    assert verdict({"mean": 1.0, "low": 0.5, "high": 1.5, "n": 3}) == "holds"
    assert verdict({"mean": -1.0, "low": -1.5, "high": -0.5, "n": 3}) == "is reversed"
    assert verdict({"mean": 0.1, "low": -0.5, "high": 0.7, "n": 3}).startswith("is not detectable")
    assert verdict({"mean": 0.1, "low": 0.1, "high": 0.1, "n": 1}).startswith("cannot be judged")


def test_linear_fit_by_hand():
    # Points (0,1), (1,0), (2,5): slope 2, intercept 0, SSE 6, SST 14 -> R^2 = 8/14.
    fit = linear_fit([0.0, 1.0, 2.0], [1.0, 0.0, 5.0])
    assert (fit["slope"], fit["intercept"], fit["r2"]) == pytest.approx((2.0, 0.0, 8 / 14))
    with pytest.raises(ValueError, match="all x are equal"):
        linear_fit([1.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        linear_fit([1.0], [1.0])


def test_bootstrap_r2_brackets_a_noisy_line_and_is_exact_on_a_perfect_one():
    xs = [float(i) for i in range(12)]
    exact = bootstrap_r2(xs, [3 * x + 1 for x in xs], resamples=200)
    assert exact["low"] == pytest.approx(1.0) and exact["high"] == pytest.approx(1.0)
    noisy = [x + (-1) ** i * 2.0 for i, x in enumerate(xs)]
    interval = bootstrap_r2(xs, noisy, resamples=500, seed=1)
    assert interval["low"] < linear_fit(xs, noisy)["r2"] < interval["high"]
    assert bootstrap_r2(xs, noisy, resamples=500, seed=1) == interval  # seeded
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_r2(xs, noisy, resamples=5)
