"""The demo: the embedded model knows its corpus, and the quick demo writes a report whose numbers come
from the run (they match the saved training logs) and are finite."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from trl_regularizers.demo.corpus import corpus_lines, world
from trl_regularizers.demo.pretrain import PretrainSettings, base_model_path, pretrain
from trl_regularizers.demo.runs import distinct_n, drift_vs_forgetting


def test_corpus_is_deterministic_and_splits_differ():
    assert corpus_lines(50) == corpus_lines(50)
    assert corpus_lines(50, "train") != corpus_lines(50, "heldout")
    facts = world()
    assert all(f"eats {facts[a]['food']}" in line for line in corpus_lines(200) for a in facts if f"the {a} eats " in line)


def test_distinct_n_and_fit_by_hand():
    assert distinct_n(["abab"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n(["oooo"], 2) == pytest.approx(1 / 3)
    runs = [{"name": str(k), "drift": [{"drift/kl_forward": k, "forgetting/nll_increase": 2 * k + 1}]} for k in (0.0, 1.0, 2.0)]
    fit = drift_vs_forgetting(runs)
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0) and fit["r2"] == pytest.approx(1.0)
    runs[1]["drift"][0]["forgetting/nll_increase"] = 0.0
    runs[2]["drift"][0]["forgetting/nll_increase"] = 5.0
    # Points (0,1), (1,0), (2,5): slope 2, intercept 0, residuals (1,-2,1), SSE 6, SST 14 -> R^2 = 8/14.
    fit = drift_vs_forgetting(runs)
    assert (fit["slope"], fit["intercept"], fit["r2"]) == pytest.approx((2.0, 0.0, 8 / 14))


def test_pretraining_learns_the_corpus(tmp_path):
    """A 40-step, 1-layer run already cuts held-out NLL well below the random init (ln 259 = 5.56 nats)."""
    info = pretrain(tmp_path, PretrainSettings(hidden_size=64, num_layers=1, steps=40, train_lines=400, heldout_lines=40), log_every=0)
    assert info["heldout_nll_init"] == pytest.approx(math.log(259), abs=0.2)
    assert info["heldout_nll"] < info["heldout_nll_init"] - 1.5
    assert json.loads((tmp_path / "pretrain_info.json").read_text())["fingerprint"] == info["fingerprint"]


def test_embedded_model_knows_the_facts():
    """The model the demo uses (shipped asset or cache): most facts completed, corpus NLL far below init."""
    info = json.loads((Path(base_model_path()) / "pretrain_info.json").read_text())
    assert info["fact_accuracy"] >= 0.8 and info["fact_accuracy_init"] == 0.0
    assert info["heldout_nll"] < 0.5 * info["heldout_nll_init"]


@pytest.mark.slow
def test_quick_demo_report_numbers_come_from_the_run(tmp_path):
    from trl_regularizers.demo.__main__ import main

    report = main(["--quick", "--out", str(tmp_path)])
    text = report.read_text()
    for png in ("a_dpo_chosen_logp.png", "b_grpo.png", "c_drift_vs_forgetting.png", "d_reward_margins.png", "e_reward_aware.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    results = json.loads((tmp_path / "results.json").read_text())

    numbers = [float(x) for x in re.findall(r"-?\d+\.\d{3}", text)]
    assert numbers and all(math.isfinite(x) for x in numbers)
    # Each reported value is the one in that run's saved trainer logs.
    beta0 = json.loads((tmp_path / "b_grpo" / "GRPO_beta=0" / "run.json").read_text())
    rewards = [e["rewards/target_char_reward/mean"] for e in beta0["log_history"] if "rewards/target_char_reward/mean" in e]
    assert results["grpo"]["GRPO beta=0"]["reward_end"] == rewards[-1]
    assert results["grpo"]["GRPO beta=0"]["reward_last_10"] == pytest.approx(sum(rewards[-10:]) / len(rewards[-10:]))
    assert results["grpo"]["GRPO beta=0"]["kl_reverse_end"] == beta0["drift"][-1]["drift/kl_reverse"] > 0
    assert f"{rewards[-1]:.3f}" in text
    dpo = json.loads((tmp_path / "a_dpo" / "DPO+NLL" / "run.json").read_text())
    chosen = [e["eval_logps/chosen"] for e in dpo["log_history"] if "eval_logps/chosen" in e]
    assert [e["step"] for e in dpo["log_history"] if "eval_logps/chosen" in e][0] == 0
    assert results["dpo"]["DPO+NLL"]["chosen_logp_end"] == chosen[-1]
    # Both DPO runs start from the same model: identical step-0 evaluation.
    assert results["dpo"]["DPO"]["chosen_logp_start"] == pytest.approx(results["dpo"]["DPO+NLL"]["chosen_logp_start"], rel=1e-6)
    fit = results["drift_vs_forgetting"]
    assert len(fit["points"]) == len(results["dpo"]) + len(results["grpo"]) and math.isfinite(fit["r2"]) and f"{fit['r2']:.3f}" in text
    # The (b) settings shown are the ones each run was trained with.
    reward_run = json.loads((tmp_path / "b_grpo" / "GRPO_KL_in_reward" / "run.json").read_text())
    assert reward_run["settings"] == results["grpo"]["GRPO KL in reward"]["settings"]
    assert (reward_run["settings"]["kl_placement"], reward_run["settings"]["kl_estimator"]) == ("reward", "k1")
    assert f"| GRPO KL in reward | `k1` | `reward` | {reward_run['settings']['beta']:g} |" in text
    for run in results["reward"].values():
        assert set(run) == {"slightly better", "better", "significantly better", "all"}
        assert all(0.0 <= acc <= 1.0 for acc in run.values())
    # (e): the accuracies shown are TRL's eval rewards/accuracies of that run on each subset, and the settings its own.
    assert set(results["reward_aware"]) == {"DPO", "weighted DPO (sigmoid)", "RPO (bwd KL)"}
    rpo = json.loads((tmp_path / "e_reward_aware" / "RPO_bwd_KL" / "run.json").read_text())
    flipped = [e["eval_rewards/accuracies"] for e in rpo["log_history"] if "eval_flipped_loss" in e]
    kept = [e["eval_rewards/accuracies"] for e in rpo["log_history"] if "eval_kept_loss" in e]
    summary = results["reward_aware"]["RPO (bwd KL)"]
    assert (summary["flipped_accuracy_start"], summary["flipped_accuracy_end"]) == (flipped[0], flipped[-1])
    assert summary["kept_accuracy_end"] == kept[-1] and summary["eval_steps"][0] == 0 and len(flipped) >= 2
    assert rpo["settings"]["reward_aware_loss"] == "rpo_bwd_kl" and any("reward_aware/loss" in e for e in rpo["log_history"])
    assert f"| RPO (bwd KL) | `rpo_bwd_kl` | - | {rpo['settings']['beta']:g} | {rpo['settings']['reward_eta']:g} |" in text and f"{flipped[-1]:.3f}" in text
    assert summary["num_flipped"] > 0 and summary["num_kept"] > summary["num_flipped"]


def test_noisy_pairs_swap_labels_and_keep_scores_with_their_texts():
    from trl_regularizers.demo.runs import noisy_scored_pairs

    train, flipped, kept = noisy_scored_pairs(0)
    assert len(train) == len(flipped) + len(kept) and 0 < len(flipped) < len(kept)
    by_prompt = {row["prompt"]: row for row in train}
    for clean in flipped.to_list():  # swapped for training: the wrong fact is chosen, its score comes along
        row = by_prompt[clean["prompt"]]
        assert (row["chosen"], row["chosen_score"]) == (clean["rejected"], clean["rejected_score"])
    # the scores are informative: the true fact outscores the wrong one in most pairs, labels or not
    clean_rows = flipped.to_list() + kept.to_list()
    assert sum(r["chosen_score"] > r["rejected_score"] for r in clean_rows) / len(clean_rows) > 0.9
