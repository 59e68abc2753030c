"""The demo: the embedded model knows its corpus, and the quick demo writes a report whose numbers come
from the run (they match the saved training logs) and are finite."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from examples.demo.corpus import corpus_lines, world
from examples.demo.pretrain import PretrainSettings, base_model_path, pretrain
from examples.demo.runs import distinct_n, drift_vs_forgetting


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


def test_study_checkpoints_are_shipped_and_weaker_than_the_judge():
    """The over-optimization study's checkpoints load from the package (no pretraining on first use), and the
    policy's starting point knows less than the fully trained model that judges fluency."""
    from examples.demo.overopt import START_CHECKPOINT
    from examples.demo.plan import SIZES
    from examples.demo.pretrain import ASSET_DIR
    from examples.demo.runs import DemoSize

    info = {}
    for steps in {START_CHECKPOINT, *(steps for size in SIZES for steps in DemoSize.named(size).rated_checkpoints)}:
        path = Path(base_model_path(PretrainSettings(steps=steps)))
        assert path.parent == ASSET_DIR.parent, steps
        info[steps] = json.loads((path / "pretrain_info.json").read_text())
    assert info[START_CHECKPOINT]["heldout_nll"] > info[max(info)]["heldout_nll"]
    assert info[START_CHECKPOINT]["fact_accuracy"] < info[max(info)]["fact_accuracy"]


@pytest.mark.slow
def test_quick_demo_report_numbers_come_from_the_run(tmp_path):
    from examples.demo.__main__ import main
    from examples.demo.overopt import STUDY_VARIANTS
    from examples.demo.stats import fmt, mean_interval

    report = main(["--quick", "--out", str(tmp_path)])
    text = report.read_text()
    for png in ("overoptimization.png", "a_dpo_chosen_logp.png", "b_grpo.png", "c_drift_vs_forgetting.png", "d_reward_margins.png", "e_reward_aware.png", "f_forget.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    # The report leads with the study, and has every section.
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0].startswith("## Over-optimization") and len(headings) == 8
    assert text.index("![over-optimization](overoptimization.png)") < text.index("## The embedded tiny model")
    numbers = [float(x) for x in re.findall(r"-?\d+\.\d{3}", text)]
    assert numbers and all(math.isfinite(x) for x in numbers)

    def run(folder):
        return [json.loads((tmp_path / folder / f"seed{seed}" / "run.json").read_text()) for seed in results["seeds"]]

    # The study: every run of every trainer, each number recomputed from the saved probes.
    study = results["study"]["runs"]
    assert results["study"]["steps"] == 4 and "Each policy run trains 4 steps;" in text
    assert set(study) == {f"{t} {v}" for t, variants in STUDY_VARIANTS.items() for v in variants}
    grpo = run("study/GRPO_no_KL")
    gains = [r["drift"][-1]["probe/gold"] - r["drift"][0]["probe/gold"] for r in grpo]
    assert [s["gold_gain_end"] for s in study["GRPO no KL"]["per_seed"]] == pytest.approx(gains)
    assert study["GRPO no KL"]["gold_gain_end"] == pytest.approx(mean_interval(gains))
    d_end = [math.sqrt(r["drift"][-1]["drift/kl_reverse_sequence"]) for r in grpo]
    assert study["GRPO no KL"]["d_end"]["mean"] == pytest.approx(sum(d_end) / len(d_end)) and all(d > 0 for d in d_end)
    assert fmt(study["GRPO no KL"]["gold_gain_end"]) in text and fmt(study["GRPO no KL"]["proxy_gain_end"]) in text
    # Each seed's own rise and fall, from its probes: best and last gold gain, and the count of seeds that did both.
    from examples.demo.report import PEAK_MARGIN

    best = [max(h["probe/gold"] for h in r["drift"]) - r["drift"][0]["probe/gold"] for r in grpo]
    shaped = sum(b >= PEAK_MARGIN and b - g >= PEAK_MARGIN for b, g in zip(best, gains))
    assert (f"Per seed, best/last gold gain {', '.join(f'{b:.2f}/{g:.2f}' for b, g in zip(best, gains))}: the gold rose by at least "
            f"{PEAK_MARGIN:g} and then fell by at least {PEAK_MARGIN:g} in {shaped} of 2 seeds.") in text
    assert all(r["settings"] == STUDY_VARIANTS["RLOO"]["k1 in reward, beta=0.05"] for r in run("study/RLOO_k1_in_reward_beta=0.05"))
    gaps = [r["gap_to_frontier"] for r in study.values() if r["variant"] != "no KL" and r["gap_to_frontier"]["n"]]
    above, below = sum(g["low"] > 0 for g in gaps), sum(g["high"] < 0 for g in gaps)
    assert (f"Of the {len(gaps)} regularized runs, {above} lie above the unregularized gold-vs-d frontier (more gold at the same d: "
            f"a better curve), {len(gaps) - above - below} on it") in text and f"finding) and {below} below it." in text
    proxy = run("study/proxy_reward_model")
    assert results["study"]["proxy"]["heldout_accuracy"] == pytest.approx(mean_interval([r["heldout_accuracy"] for r in proxy]))
    assert fmt(results["study"]["proxy"]["heldout_accuracy"]) in text
    # (a) and (b): means over seeds of the trainer logs.
    dpo = run("a_dpo/DPO+NLL")
    chosen_end = [[e["eval_logps/chosen"] for e in r["log_history"] if "eval_logps/chosen" in e][-1] for r in dpo]
    assert results["dpo"]["DPO+NLL"]["chosen_logp_end"] == pytest.approx(mean_interval(chosen_end))
    assert all([e["step"] for e in r["log_history"] if "eval_logps/chosen" in e][0] == 0 for r in dpo)
    beta0 = run("b_grpo/GRPO_beta=0")
    last_10 = [sum(v[-10:]) / len(v[-10:]) for v in ([e["rewards/target_char_reward/mean"] for e in r["log_history"] if "rewards/target_char_reward/mean" in e] for r in beta0)]
    assert results["grpo"]["GRPO beta=0"]["reward_last_10"] == pytest.approx(mean_interval(last_10))
    assert f"| GRPO KL in reward | `k1` | `reward` | {run('b_grpo/GRPO_KL_in_reward')[0]['settings']['beta']:g} |" in text
    # (c): one fit per seed over every run with a drift probe ((a), (b) and the study).
    fit = results["drift_vs_forgetting"]
    assert fit["runs_per_seed"] == len(results["dpo"]) + len(results["grpo"]) + len(study)
    assert fit["r2"]["n"] == 2 and fmt(fit["r2"]) in text
    # (d) and (e): accuracies per seed from each run's record.
    margins = json.loads((tmp_path / "d_reward" / "RM_and_RM+margin" / "seed1" / "run.json").read_text())["runs"]
    for record in margins:
        assert results["reward"][record["name"]]["per_seed"][1] == record["accuracy"]
    rpo = run("e_reward_aware/RPO_bwd_KL")
    flipped = [[e["eval_rewards/accuracies"] for e in r["log_history"] if "eval_flipped_loss" in e][-1] for r in rpo]
    assert results["reward_aware"]["RPO (bwd KL)"]["flipped_accuracy_end"] == pytest.approx(mean_interval(flipped))
    assert rpo[0]["settings"]["reward_aware_loss"] == "rpo_bwd_kl" and any("reward_aware/loss" in e for e in rpo[0]["log_history"])
    # (f): forgetting (prior-fact NLL rise over the step-0 probe), the paired claims and the drift fit, from the probes.
    from examples.demo.forget import FORGET_VARIANTS

    forget = results["forget"]
    assert set(forget["methods"]) == set(FORGET_VARIANTS)
    sft, grpo_f = run("f_forget/SFT"), run("f_forget/GRPO")
    rise = {name: [r["probes"][-1]["prior/nll"] - r["probes"][0]["prior/nll"] for r in rs] for name, rs in (("SFT", sft), ("GRPO", grpo_f))}
    assert forget["methods"]["SFT"]["prior_nll_rise_end"] == pytest.approx(mean_interval(rise["SFT"]))
    assert fmt(forget["methods"]["SFT"]["prior_nll_rise_end"]) in text
    assert all(r["probes"][0]["step"] == 0 and r["settings"]["sft_kl_coef"] == 0.0 for r in sft)
    claim = next(c for c in forget["claims"] if (c["a"], c["b"]) == ("SFT", "GRPO"))
    assert claim["end_per_seed"] == pytest.approx([a - b for a, b in zip(rise["SFT"], rise["GRPO"])])
    assert fmt(claim["end"]) in text
    points = {(p["name"], p["seed"]): p for p in forget["drift_fit"]["points"]}
    assert len(points) == len(FORGET_VARIANTS) * len(results["seeds"])
    assert points[("GRPO", 1)]["kl_forward"] == grpo_f[1]["probes"][-1]["drift/kl_forward"]
    assert f"R^2 = {forget['drift_fit']['r2']:.3f}" in text
    filtered = run("f_forget/SFT_on_filtered_base_samples")
    assert forget["methods"]["SFT on filtered base samples"]["filtered_examples"] == [len(r["filtered_data"]) for r in filtered]
    from tests.test_demo_study import check_study_sections

    check_study_sections(tmp_path, results, text)  # start-policy Spearman, best-of-n, examples

    # A second run reuses every saved run (same settings, same code) and writes the same numbers.
    started = json.loads((tmp_path / "study" / "GRPO_no_KL" / "seed0" / "run.json").read_text())["key"]
    main(["--quick", "--out", str(tmp_path), "--workers", "1"])
    assert json.loads((tmp_path / "results.json").read_text())["study"] == results["study"]
    assert json.loads((tmp_path / "study" / "GRPO_no_KL" / "seed0" / "run.json").read_text())["key"] == started

    # The default size trains only some study and (b) runs: its report is written from those alone.
    from examples.demo.plan import SELECTION, demo_jobs
    from examples.demo.pretrain import base_model_path
    from examples.demo.report import write_report

    default = tmp_path / "default"
    default.mkdir()
    records = {job.folder: json.loads((tmp_path / job.folder / "run.json").read_text()) for job in demo_jobs("default", 2)}
    text = write_report(default, records, base_model_path(), "default", 0.0)[0].read_text()
    summary = json.loads((default / "results.json").read_text())
    assert list(summary["study"]["runs"]) == list(SELECTION["default"]["study"]) and list(summary["grpo"]) == list(SELECTION["default"]["b_grpo"])
    assert summary["study"]["runs"]["GRPO no KL"] == results["study"]["runs"]["GRPO no KL"]
    assert [r["stage"] for r in summary["examples"]["RLOO"]][::2] == ["start", "gold peak", "end"]
    assert [r["stage"] for r in summary["examples"]["GRPO"]][-1] == "end, k3 in loss, beta=0.5"
    assert text.startswith("# trl-regularizers demo report\n\nSize: default, seeds [0, 1].") and "RLOO k3" not in text
    assert summary["drift_vs_forgetting"]["runs_per_seed"] == 2 + 3 + 4


def test_sizes_select_runs_and_seeds_keep_their_cache_keys():
    from examples.demo.forget import FORGET_VARIANTS
    from examples.demo.overopt import STUDY_VARIANTS
    from examples.demo.plan import BEST_OF_N, PROXY, SELECTION, SIZES, demo_jobs
    from examples.demo.runs import GRPO_VARIANTS, DemoSize

    full = demo_jobs("full", 3)
    names = {(job.panel, job.name) for job in full}
    assert {f"{t} {v}" for t, variants in STUDY_VARIANTS.items() for v in variants} | {PROXY, BEST_OF_N} == {n for p, n in names if p == "study"}
    assert set(GRPO_VARIANTS) == {n for p, n in names if p == "b_grpo"} and set(FORGET_VARIANTS) == {n for p, n in names if p == "f_forget"}
    assert demo_jobs("quick", 3) == full  # the same runs, at another DemoSize
    for size, panels in SELECTION.items():
        assert all((panel, name) in names for panel, selected in panels.items() for name in selected), size
    default = demo_jobs("default", 3)
    assert set(default) < set(full) and {job.panel for job in default} == {job.panel for job in full}
    assert {job.name for job in default if job.panel == "study"} >= {f"{t} no KL" for t in STUDY_VARIANTS}
    # Each run waits for its seed's proxy, which is listed before it.
    order = [job.folder for job in default]
    assert all(order.index(need) < order.index(job.folder) for job in default for need in job.needs)
    # More seeds add jobs and leave the others' cache keys alone.
    context = {"size": {"study_steps": 24}, "base": "b"}
    keys = {job.folder: job.key(context) for job in full}
    assert {job.folder: job.key(context) for job in demo_jobs("full", 5) if job.seed < 3} == keys
    # The default size has a cheaper proxy and shortens the study and best-of-n of the full one, nothing else.
    changed = {k for k, v in vars(DemoSize.named("default")).items() if vars(DemoSize.named("full"))[k] != v}
    assert changed == {"study_steps", "study_probe_every", "bon_samples", "rated_pairs", "proxy_steps", "proxy_batch_size", "rated_checkpoints", "rater_temperature"}
    for bad in (("medium", 3), ("full", 0)):
        with pytest.raises(ValueError, match="size|seeds"):
            demo_jobs(*bad)
    with pytest.raises(ValueError, match="size must be one of"):
        DemoSize.named("medium")
    # --study-steps lengthens only the study's policy runs, probed about 12 times.
    longer = DemoSize.named("default").with_study_steps(64)
    assert (longer.study_steps, longer.study_probe_every) == (64, 5) and DemoSize.named("quick").with_study_steps(3).study_probe_every == 1
    assert {k for k, v in vars(longer).items() if vars(DemoSize.named("default"))[k] != v} == {"study_steps", "study_probe_every"}
    assert DemoSize.named("full").with_study_steps(256) == DemoSize.named("full")
    with pytest.raises(ValueError, match="study steps must be >= 1"):
        DemoSize.named("full").with_study_steps(0)
    from examples.demo.__main__ import main

    with pytest.raises(SystemExit):
        main(["--quick", "--study-steps", "0"])
    assert SIZES == ("quick", "default", "full")


def test_noisy_pairs_swap_labels_and_keep_scores_with_their_texts():
    from examples.demo.runs import noisy_scored_pairs

    train, flipped, kept = noisy_scored_pairs(0)
    assert len(train) == len(flipped) + len(kept) and 0 < len(flipped) < len(kept)
    by_prompt = {row["prompt"]: row for row in train}
    for clean in flipped.to_list():  # swapped for training: the wrong fact is chosen, its score comes along
        row = by_prompt[clean["prompt"]]
        assert (row["chosen"], row["chosen_score"]) == (clean["rejected"], clean["rejected_score"])
    # the scores are informative: the true fact outscores the wrong one in most pairs, labels or not
    clean_rows = flipped.to_list() + kept.to_list()
    assert sum(r["chosen_score"] > r["rejected_score"] for r in clean_rows) / len(clean_rows) > 0.9
