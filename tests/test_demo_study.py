"""The over-optimization study's pieces: the gold reward's parser and fluency term, the statistics of the report,
and the job cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from examples.demo.corpus import world
from examples.demo.gold import FLUENCY_FLOOR, FLUENCY_WEIGHT, GoldReward, claims, fact_score
from examples.demo.jobs import Job, run_jobs
from examples.demo.stats import gao_rl_fit, mean_interval

FACTS = world()


def test_claims_in_every_corpus_form_and_only_whole_words():
    fox = FACTS["fox"]
    text = (f"the {fox['color']} fox lives in the {fox['home']} and eats {fox['food']}. the owl is red. "
            f"it met the cat, who said {FACTS['cat']['sound']}. the bee ate nuts.")
    assert claims(text) == {("fox", "color", fox["color"]), ("fox", "home", fox["home"]), ("fox", "food", fox["food"]),
                            ("owl", "color", "red"), ("cat", "sound", FACTS["cat"]["sound"]), ("bee", "food", "nuts")}
    assert claims("the fox eats berr") == set()  # cut off by the length limit: states nothing
    assert claims("the fox eats berries") == set() and claims("the fox eats berries.") == {("fox", "food", "berries")}


def test_fact_score_counts_new_claims_true_and_false():
    wrong = next(food for food in ("berries", "fish", "seeds") if food != FACTS["fox"]["food"])
    completion = f" eats {FACTS['fox']['food']}. the fox eats {wrong}. the fox eats {wrong}."
    assert fact_score("the fox", completion) == (1, 1)  # distinct claims: the repeated false one counts once
    assert fact_score(f"the fox eats {FACTS['fox']['food']}.", " the fox is.") == (0, 0)  # the prompt's own claim is not the completion's


def test_gold_is_facts_plus_weighted_fluency_by_hand(tiny_lm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_lm_path), AutoTokenizer.from_pretrained(tiny_lm_path)
    gold = GoldReward(model, tok)
    prompts, completions = ["the fox", "the cat"], [f" eats {FACTS['fox']['food']}.", " is"]
    parts = gold.components(prompts, completions)
    for prompt, completion, fluency in zip(prompts, completions, parts["fluency"]):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        by_hand = logps[len(prompt_ids) - 1 :].gather(-1, targets[len(prompt_ids) - 1 :, None]).mean().item()
        assert fluency == pytest.approx(max(by_hand, FLUENCY_FLOOR), abs=1e-5)
    assert parts["true"] == [1.0, 0.0] and parts["false"] == [0.0, 0.0]
    assert gold(prompts, completions) == pytest.approx([1 + FLUENCY_WEIGHT * parts["fluency"][0], FLUENCY_WEIGHT * parts["fluency"][1]])


def test_mean_interval_by_hand():
    result = mean_interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert (result["mean"], result["n"]) == (2.0, 3)
    assert (result["low"], result["high"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert mean_interval([5.0]) == {"mean": 5.0, "low": 5.0, "high": 5.0, "n": 1}
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_gao_fit_recovers_the_curve_and_its_peak():
    alpha, beta = 0.8, 0.5
    d = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0]
    fit = gao_rl_fit(d, [x * (alpha - beta * math.log(x)) if x > 0 else 0.0 for x in d])
    assert (fit["alpha"], fit["beta"], fit["r2"]) == pytest.approx((alpha, beta, 1.0))
    d_star = math.exp(alpha / beta - 1)  # dR/dd = alpha - beta (log d + 1) = 0
    assert fit["d_star"] == pytest.approx(d_star) and fit["gain_star"] == pytest.approx(d_star * (alpha - beta * math.log(d_star)))
    falling = gao_rl_fit([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0])  # alpha = -1, beta = 0: no peak
    assert falling["alpha"] == pytest.approx(-1.0) and math.isnan(falling["d_star"])
    with pytest.raises(ValueError, match="two points"):
        gao_rl_fit([0.0, 1.0], [0.0, 1.0])


def counting_runner(job, folder, context):
    """A stand-in for training: records what it saw; a job with needs checks they were saved first."""
    for need in job.needs:
        assert (folder.parents[2] / need / "run.json").is_file()
    calls = folder.parents[2] / "calls.txt"
    with calls.open("a") as handle:
        handle.write(job.folder + "\n")
    return {"value": job.options.get("value", 0) * 2, "context": context["tag"]}


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_are_cached_by_settings_and_wait_for_their_needs(tmp_path, workers):
    first = Job("p", "first run", 0, {"value": 1})
    jobs = [first, Job("p", "second", 0, {"value": 2}, needs=(first.folder,)), Job("q", "third", 1, {"value": 3}, needs=(first.folder,))]
    records = run_jobs(jobs, counting_runner, tmp_path, {"tag": "a"}, workers=workers)
    assert [records[j.folder]["value"] for j in jobs] == [2, 4, 6] and records[first.folder]["seed"] == 0
    assert json.loads((tmp_path / first.folder / "run.json").read_text())["value"] == 2
    assert len((tmp_path / "calls.txt").read_text().split()) == 3

    changed = [jobs[0], Job("p", "second", 0, {"value": 5}, needs=(first.folder,)), jobs[2]]
    records = run_jobs(changed, counting_runner, tmp_path, {"tag": "a"}, workers=workers)
    assert records[changed[1].folder]["value"] == 10
    assert (tmp_path / "calls.txt").read_text().split()[3:] == [changed[1].folder]  # only the changed job ran again
    run_jobs(changed, counting_runner, tmp_path, {"tag": "b"}, workers=workers)  # another context: all again
    assert len((tmp_path / "calls.txt").read_text().split()) == 7


def test_jobs_refuse_unknown_needs_and_shared_folders(tmp_path):
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([Job("p", "a", 0, needs=("p/b/seed0",))], counting_runner, tmp_path, {"tag": "a"})
    with pytest.raises(ValueError, match="share a folder"):
        run_jobs([Job("p", "a b", 0), Job("p", "a_b", 0)], counting_runner, tmp_path, {"tag": "a"})


def test_spearman_by_hand_with_ties_and_its_bootstrap():
    from examples.demo.stats import bootstrap_spearman, ranks, spearman

    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1,2,3,4; y (ties averaged): 1.5,1.5,4,3 -> Pearson of the ranks
    rx, ry = [1, 2, 3, 4], [1.5, 1.5, 4, 3]
    mx, my = 2.5, 2.5
    by_hand = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([1, 2, 3, 4], [0, 0, 5, 2]) == pytest.approx(by_hand)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=rng)
    noisy = (x + torch.randn(400, generator=rng)).tolist()
    result = bootstrap_spearman([(x.tolist(), noisy), (x.tolist(), x.tolist())], draws=300)
    assert result["mean"] == pytest.approx((spearman(x.tolist(), noisy) + 1.0) / 2) and result["n"] == 2
    assert result["low"] < result["mean"] < result["high"] < 1.0 and result["high"] - result["low"] < 0.1
    with pytest.raises(ValueError, match="equally long"):
        spearman([1.0], [1.0])


def test_best_of_n_estimator_matches_enumerating_every_subset():
    from itertools import combinations

    from examples.demo.stats import best_of_n_kl, best_of_n_means

    proxy, gold = [0.3, -1.0, 2.0, 0.7, 1.1], [1.0, 0.0, -2.0, 0.5, 3.0]
    means = best_of_n_means(proxy, gold, [1, 2, 3, 5])
    for n, p, g in zip([1, 2, 3, 5], means["proxy"], means["gold"]):
        subsets = list(combinations(range(5), n))
        best = [max(s, key=lambda i: proxy[i]) for s in subsets]
        assert p == pytest.approx(sum(proxy[i] for i in best) / len(best))
        assert g == pytest.approx(sum(gold[i] for i in best) / len(best))
    assert means["gold"][0] == pytest.approx(sum(gold) / 5) and means["gold"][-1] == -2.0  # n = N: the proxy's top sample
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError, match="1 <= n"):
        best_of_n_means(proxy, gold, [6])


def test_gao_bon_fit_recovers_the_curve_and_its_peak():
    from examples.demo.bestofn import bon_sizes
    from examples.demo.stats import gao_bon_fit

    alpha, beta = 0.6, 0.4
    d = [0.0, 0.3, 0.8, 1.2, 1.7, 2.1]
    fit = gao_bon_fit(d, [x * (alpha - beta * x) for x in d])
    assert (fit["alpha"], fit["beta"], fit["r2"]) == pytest.approx((alpha, beta, 1.0))
    assert fit["d_star"] == pytest.approx(0.75) and fit["gain_star"] == pytest.approx(0.75 * (alpha - beta * 0.75))
    assert math.isnan(gao_bon_fit([1.0, 2.0], [-1.0, -2.0])["d_star"])  # falls from the start: no peak
    assert bon_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256] and bon_sizes(6) == [1, 2, 4]


def check_study_sections(out, results: dict, text: str) -> None:
    """The quick demo's start-policy Spearman, best-of-n and examples sections, recomputed from the saved runs
    (called by ``test_demo.test_quick_demo_report_numbers_come_from_the_run`` on its output)."""
    from examples.demo.stats import best_of_n_kl, best_of_n_means, fmt, gao_bon_fit, mean_interval, spearman

    seeds = results["seeds"]
    bon = [json.loads((out / "study" / "best-of-n" / f"seed{s}" / "run.json").read_text()) for s in seeds]
    assert (out / "best_of_n.png").stat().st_size > 1000
    per, prompts = bon[0]["samples_per_prompt"], len(bon[0]["prompts"])
    assert all(len(r["proxy"]) == len(r["gold"]) == len(r["completions"]) == per * prompts for r in bon)
    start = results["proxy_quality"]["start_policy"]
    assert start["mean"] == pytest.approx(sum(spearman(r["proxy"], r["gold"]) for r in bon) / len(bon))
    assert start["low"] <= start["mean"] <= start["high"] and fmt(start) in text
    verdicts = {"The interval lies above 0.5": start["low"] >= 0.5, "The interval lies below 0.5": start["high"] < 0.5}
    verdicts["The interval holds 0.5"] = not any(verdicts.values())
    assert {v for v in verdicts if v in text} == {v for v, holds in verdicts.items() if holds}
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= per]
    assert results["best_of_n"]["n"] == ns and results["best_of_n"]["kl"] == pytest.approx([best_of_n_kl(n) for n in ns])
    gains = []
    for r in bon:  # mean over prompts of the proxy's best-of-n gold, minus n = 1
        gold = [sum(best_of_n_means(r["proxy"][p * per:(p + 1) * per], r["gold"][p * per:(p + 1) * per], ns)["gold"][i] for p in range(prompts)) / prompts
                for i in range(len(ns))]
        assert gold[0] == pytest.approx(sum(r["gold"]) / len(r["gold"]))
        gains.append([g - gold[0] for g in gold])
    for i, interval in enumerate(results["best_of_n"]["gold_gain"]):
        assert interval == pytest.approx(mean_interval([g[i] for g in gains]))
    assert f"| {ns[-1]} | {best_of_n_kl(ns[-1]):.3f} | {math.sqrt(best_of_n_kl(ns[-1])):.3f} |" in text and fmt(results["best_of_n"]["gold_gain"][-1]) in text
    pooled = gao_bon_fit([math.sqrt(best_of_n_kl(n)) for _ in gains for n in ns], [x for g in gains for x in g])
    assert results["best_of_n"]["fit_pooled"]["alpha"] == pytest.approx(pooled["alpha"]) and f"d({pooled['alpha']:.3f} - {pooled['beta']:.3f} d)" in text
    # The probes' per-sample scores are the logged means, and the examples table quotes them.
    plain = [json.loads((out / "study" / "GRPO_no_KL" / f"seed{s}" / "run.json").read_text()) for s in seeds]
    for record in plain:
        assert [e["step"] for e in record["probe_samples"]] == [h["step"] for h in record["drift"]]
        assert [sum(e["gold"]) / len(e["gold"]) for e in record["probe_samples"]] == pytest.approx([h["probe/gold"] for h in record["drift"]])
        assert [sum(e["proxy"]) / len(e["proxy"]) for e in record["probe_samples"]] == pytest.approx([h["probe/proxy"] for h in record["drift"]])
    last = [spearman(r["probe_samples"][-1]["proxy"], r["probe_samples"][-1]["gold"]) for r in plain]
    assert results["proxy_quality"]["runs"]["GRPO"]["last_probe"]["mean"] == pytest.approx(sum(last) / len(last))
    first_row = results["examples"]["GRPO"][0]
    assert first_row["stage"] == "start" and first_row["completion"] == plain[0]["probe_samples"][0]["completions"][0]
    assert first_row["gold"] == plain[0]["probe_samples"][0]["gold"][0] and f"| {first_row['proxy']:.3f} | {first_row['gold']:.3f} |" in text
