"""The over-optimization study's added report sections, computed from the saved records: the proxy's rank
correlation with gold where the policy starts and after the unregularized runs, best-of-n from the start policy
with Gao et al.'s fit, and example completions at the start, the gold peak and the end of a run."""

from __future__ import annotations

import math

from examples.demo.bestofn import bon_sizes
from examples.demo.overopt import GOLD_KEY, STUDY_VARIANTS
from examples.demo.plan import BEST_OF_N
from examples.demo.stats import best_of_n_kl, best_of_n_means, bootstrap_spearman, fmt, gao_bon_fit, mean_interval

REFERENCE_VARIANT = "no KL"
"""Each trainer's unregularized run: its pooled gold curve is the frontier the other runs are compared with."""
EXAMPLE_REGULARIZED = {"GRPO": "k3 in loss, beta=0.5", "RLOO": "k3 in loss, beta=0.5", "PPO": "k1 in reward, kl_coef=0.05"}
"""The regularized run whose final completions the examples table shows next to the unregularized run's (where the
size trains it)."""
EXAMPLE_PROMPTS = 2
"""Probe prompts (the first ones) shown per stage in the examples table."""
EXAMPLE_SEED = 0
INFORMATIVE_SPEARMAN = 0.5
"""Start-policy Spearman(proxy, gold) from which the report calls the proxy informative where the policy starts."""


def study_variants(records: dict[str, dict]) -> dict[str, list[str]]:
    """Trainer -> the ``STUDY_VARIANTS`` runs (in that order) that ``records`` holds, for the trainers whose
    unregularized run it holds (a size may train only some of them)."""
    names = {r["name"] for r in records.values() if r["panel"] == "study"}
    return {trainer: [v for v in variants if f"{trainer} {v}" in names] for trainer, variants in STUDY_VARIANTS.items()
            if f"{trainer} {REFERENCE_VARIANT}" in names}


def _study(records: dict[str, dict], name: str) -> list[dict]:
    return sorted((r for r in records.values() if r["panel"] == "study" and r["name"] == name), key=lambda r: r["seed"])


def _safe_bon_fit(d: list[float], gain: list[float]) -> dict[str, float]:
    try:
        return gao_bon_fit(d, gain)
    except ValueError:  # fewer than two n > 1 (the quick size can have only a few)
        return dict.fromkeys(("alpha", "beta", "d_star", "gain_star", "r2"), float("nan"))


def _interval(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    return mean_interval(finite) if finite else {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}


def bon_seed_curve(record: dict) -> dict[str, list[float]]:
    """One seed's best-of-n curve: n, KL_bon, d = sqrt(KL_bon), and the mean over prompts of the proxy's best-of-n
    proxy and gold scores, as gains over n = 1 (the start policy's mean)."""
    ns, per = bon_sizes(record["samples_per_prompt"]), record["samples_per_prompt"]
    proxy, gold = [0.0] * len(ns), [0.0] * len(ns)
    for index in range(len(record["prompts"])):
        rows = slice(index * per, (index + 1) * per)
        means = best_of_n_means(record["proxy"][rows], record["gold"][rows], ns)
        proxy = [a + b / len(record["prompts"]) for a, b in zip(proxy, means["proxy"])]
        gold = [a + b / len(record["prompts"]) for a, b in zip(gold, means["gold"])]
    kl = [best_of_n_kl(n) for n in ns]
    return {"n": ns, "kl": kl, "d": [math.sqrt(k) for k in kl], "proxy_gain": [p - proxy[0] for p in proxy],
            "gold_gain": [g - gold[0] for g in gold], "gold_start": gold[0]}


def summarize_proxy_quality(records: dict[str, dict]) -> dict:
    """Spearman(proxy, gold) with a 95% bootstrap interval (mean over seeds): on the best-of-n job's start-policy
    samples, and on the step-0 and last probes of each trainer's unregularized runs."""
    bon = _study(records, BEST_OF_N)
    result = {"start_policy": {**bootstrap_spearman([(r["proxy"], r["gold"]) for r in bon]), "samples_per_seed": len(bon[0]["proxy"])},
              "runs": {}}
    for trainer in study_variants(records):
        runs = _study(records, f"{trainer} {REFERENCE_VARIANT}")
        result["runs"][trainer] = {
            stage: {**bootstrap_spearman([(r["probe_samples"][i]["proxy"], r["probe_samples"][i]["gold"]) for r in runs]),
                    "step": runs[0]["probe_samples"][i]["step"]}
            for stage, i in (("first_probe", 0), ("last_probe", -1))
        }
    result["samples_per_probe"] = len(runs[0]["probe_samples"][0]["proxy"])
    return result


def summarize_best_of_n(records: dict[str, dict]) -> dict:
    """Per n: the proxy and gold gains over n = 1 (mean over seeds, 95% t-interval); Gao et al.'s best-of-n fit per
    seed (its peak) and to the pooled seeds."""
    curves = [bon_seed_curve(r) for r in _study(records, BEST_OF_N)]
    fits = [_safe_bon_fit(c["d"], c["gold_gain"]) for c in curves]
    pooled = _safe_bon_fit([x for c in curves for x in c["d"]], [g for c in curves for g in c["gold_gain"]])
    best = [max(range(len(c["n"])), key=lambda i: c["gold_gain"][i]) for c in curves]
    return {
        "samples_per_prompt": _study(records, BEST_OF_N)[0]["samples_per_prompt"],
        "prompts": len(_study(records, BEST_OF_N)[0]["prompts"]),
        "per_seed": curves,
        "n": curves[0]["n"], "kl": curves[0]["kl"], "d": curves[0]["d"],
        "gold_start": _interval([c["gold_start"] for c in curves]),
        "proxy_gain": [mean_interval([c["proxy_gain"][i] for c in curves]) for i in range(len(curves[0]["n"]))],
        "gold_gain": [mean_interval([c["gold_gain"][i] for c in curves]) for i in range(len(curves[0]["n"]))],
        "best_n": [c["n"][i] for c, i in zip(curves, best)],
        "best_gold_gain": mean_interval([c["gold_gain"][i] for c, i in zip(curves, best)]),
        "fit_per_seed": fits,
        "fit": {key: _interval([f[key] for f in fits]) for key in ("alpha", "beta", "d_star", "gain_star", "r2")},
        "fit_pooled": pooled,
    }


def summarize_examples(records: dict[str, dict]) -> dict:
    """Per trainer (seed ``EXAMPLE_SEED``): the first ``EXAMPLE_PROMPTS`` probe prompts' completions with their
    proxy and gold scores at the unregularized run's first probe, its best-gold probe and its last probe, and at
    the last probe of ``EXAMPLE_REGULARIZED``'s run where it was trained."""
    result = {}
    for trainer, variants in study_variants(records).items():
        plain = _study(records, f"{trainer} {REFERENCE_VARIANT}")[EXAMPLE_SEED]
        peak = max(range(len(plain["drift"])), key=lambda i: plain["drift"][i][GOLD_KEY])
        stages = [("start", plain, 0), ("gold peak", plain, peak), ("end", plain, -1)]
        if EXAMPLE_REGULARIZED[trainer] in variants:
            stages.append((f"end, {EXAMPLE_REGULARIZED[trainer]}", _study(records, f"{trainer} {EXAMPLE_REGULARIZED[trainer]}")[EXAMPLE_SEED], -1))
        result[trainer] = [
            {"stage": stage, "step": run["probe_samples"][i]["step"], "prompt": run["probe_prompts"][p],
             "completion": run["probe_samples"][i]["completions"][p], "proxy": run["probe_samples"][i]["proxy"][p],
             "gold": run["probe_samples"][i]["gold"][p]}
            for stage, run, i in stages for p in range(EXAMPLE_PROMPTS)
        ]
    return result


def plot_best_of_n(bon: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label in (("gold_gain", "gold gain"), ("proxy_gain", "proxy gain")):
        values = bon[key]
        line = ax.plot(bon["d"], [v["mean"] for v in values], marker="o", ms=3, label=label)[0]
        ax.fill_between(bon["d"], [v["low"] for v in values], [v["high"] for v in values], color=line.get_color(), alpha=0.15)
    fit = bon["fit_pooled"]
    if math.isfinite(fit["alpha"]):
        xs = [bon["d"][-1] * (i + 1) / 50 for i in range(50)]
        ax.plot(xs, [x * (fit["alpha"] - fit["beta"] * x) for x in xs], "k--", lw=1,
                label=f"gold fit: d({fit['alpha']:.2f} - {fit['beta']:.2f} d)")
    for x, n in zip(bon["d"], bon["n"]):
        ax.annotate(str(n), (x, 0), fontsize=6, ha="center", va="bottom", color="grey")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="d = sqrt(KL_bon), KL_bon = log n - (n-1)/n", ylabel="gain over n = 1",
           title="best-of-n from the start policy (mean over seeds, 95% band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(text: str) -> str:
    return "`" + text.replace("|", "/").replace("`", "'").replace("\n", " ") + "`"


def bon_reading(bon: dict) -> str:
    """One sentence on the best-of-n curve's shape, from the mean gold gains it quotes."""
    gains = [g["mean"] for g in bon["gold_gain"]]
    peak = max(range(len(gains)), key=lambda i: gains[i])
    if peak == 0:
        shape = f"the proxy's best of n never beat the start policy's gold (gain at n = {bon['n'][-1]}: {fmt(bon['gold_gain'][-1])})"
    elif peak == len(gains) - 1:
        shape = f"the gold gain still rose at the largest n ({fmt(bon['gold_gain'][-1])} at n = {bon['n'][-1]}): no over-optimization in range"
    else:
        shape = (f"the mean gold gain rose to {fmt(bon['gold_gain'][peak])} at n = {bon['n'][peak]} and fell to "
                 f"{fmt(bon['gold_gain'][-1])} at n = {bon['n'][-1]} while the proxy gain kept rising to {fmt(bon['proxy_gain'][-1])}: "
                 + ("the proxy helps before it hurts" if bon["gold_gain"][peak]["low"] > 0 and bon["gold_gain"][-1]["mean"] < gains[peak]
                    else "the shape of a proxy that helps before it hurts, though the peak's interval over seeds includes 0"))
    return f"**Reading**: {shape}."


def study_sections(quality: dict, bon: dict, examples: dict) -> list[str]:
    """Markdown lines of the three sections, every number read from the summaries."""
    start = quality["start_policy"]
    lines = [
        "### Does the proxy rank the start policy's samples?",
        f"Spearman rank correlation of proxy and gold over {start['samples_per_seed']} start-policy samples per seed "
        f"(the best-of-n samples below): **{fmt(start)}** (mean over {start['n']} seeds; 95% bootstrap interval, samples "
        f"resampled within each seed). "
        + (f"The interval lies above {INFORMATIVE_SPEARMAN:g}: the proxy is informative where the policy starts."
           if start["low"] >= INFORMATIVE_SPEARMAN else
           f"The interval lies below {INFORMATIVE_SPEARMAN:g}, the target for a proxy that ranks what the first RL steps "
           "change; the proxy settings tried to raise it are listed in `docs/overoptimization.md` (\"Proxy settings tried\")."
           if start["high"] < INFORMATIVE_SPEARMAN else f"The interval holds {INFORMATIVE_SPEARMAN:g}.")
        + f" On the unregularized runs' probe samples ({quality['samples_per_probe']} per seed):",
        "",
        "| trainer | Spearman at the first probe (step) | Spearman at the last probe (step) |",
        "|---|---|---|",
        *[f"| {trainer} | {fmt(r['first_probe'])} ({r['first_probe']['step']}) | {fmt(r['last_probe'])} ({r['last_probe']['step']}) |"
          for trainer, r in quality["runs"].items()],
        "",
        "### Best-of-n from the start policy",
        f"{bon['samples_per_prompt']} samples of each of the {bon['prompts']} task prompts from the start policy, scored once; "
        "for each n the expected proxy and gold scores of the proxy's best of n (the unbiased estimator over all "
        "n-subsets of those samples, so no resampling noise), as gains over n = 1 (gold at n = 1: "
        f"{fmt(bon['gold_start'])}). KL_bon = log n - (n-1)/n, d = sqrt(KL_bon). Fit R(d) = d (alpha - beta d) to the gold "
        "gains (Gao et al.'s best-of-n form); its peak d* = alpha / (2 beta), R* = alpha^2 / (4 beta) exist where alpha, beta > 0.",
        "",
        "| n | KL_bon | d | proxy gain | gold gain |",
        "|---|---|---|---|---|",
        *[f"| {n} | {kl:.3f} | {d:.3f} | {fmt(p)} | {fmt(g)} |" for n, kl, d, p, g in zip(bon["n"], bon["kl"], bon["d"], bon["proxy_gain"], bon["gold_gain"])],
        "",
        f"Best n per seed (highest gold gain): {bon['best_n']}, gold gain there {fmt(bon['best_gold_gain'])}. Fit per seed: "
        f"alpha {fmt(bon['fit']['alpha'])}, beta {fmt(bon['fit']['beta'])}, d* {fmt(bon['fit']['d_star'])} (n = {bon['fit']['d_star']['n']}), "
        f"R* {fmt(bon['fit']['gain_star'])}; to the pooled seeds: d({bon['fit_pooled']['alpha']:.3f} - {bon['fit_pooled']['beta']:.3f} d), "
        + (f"peak d* = {bon['fit_pooled']['d_star']:.3f} (KL {bon['fit_pooled']['d_star'] ** 2:.3f} nats) with R* = {bon['fit_pooled']['gain_star']:.3f}."
           if math.isfinite(bon["fit_pooled"]["d_star"]) else "no peak (the fitted curve does not rise, then turn down)."),
        "",
        bon_reading(bon),
        "",
        "![best-of-n](best_of_n.png)",
        "",
        f"### What over-optimization looks like (seed {EXAMPLE_SEED})",
        "The same probe prompts' sampled completions at the unregularized run's first probe, at its best-gold probe "
        "(mean over the probe's samples) and at its end, next to a regularized run's end where this size trained one; proxy "
        "and gold of each completion.",
        "",
    ]
    for trainer, rows in examples.items():
        lines += [f"**{trainer}**", "", "| stage (step) | prompt | completion | proxy | gold |", "|---|---|---|---|---|"]
        lines += [f"| {r['stage']} ({r['step']}) | {_cell(r['prompt'])} | {_cell(r['completion'])} | {r['proxy']:.3f} | {r['gold']:.3f} |" for r in rows]
        lines.append("")
    return lines
