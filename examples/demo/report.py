"""Turn the demo's run records into ``results.json``, PNG figures and ``report.md``.

Every number is computed here from the records (``*/seed<k>/run.json``): per seed first, then the mean over seeds
with a 95% t-interval (``stats.mean_interval``), shown as ``mean [low, high]``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from examples.demo import overopt_report
from examples.demo.forget_report import forget_section, plot_forget, summarize_forget
from examples.demo.overopt import GOLD_KEY, PROXY_KEY, START_CHECKPOINT
from examples.demo.overopt_report import REFERENCE_VARIANT, study_variants
from examples.demo.margins import FLIP_RATES, MARGIN_SCALE
from examples.demo.plan import BEST_OF_N, PROXY
from examples.demo.runs import GRPO_SETTINGS, LABEL_NOISE, SCORE_NOISE, STRENGTH_LABELS, TARGET_CHAR, series
from examples.demo.stats import fmt, gao_rl_fit, mean_interval

PEAK_MARGIN = 0.1
"""Gold units by which a seed's best probe must exceed its start, and its last probe fall below that best, for the
reading to count the seed as having risen and then fallen (the over-optimization shape of one run)."""

KL_KEY = "drift/kl_reverse_sequence"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _setting(value) -> str:
    """A config value as set: no rounding (``5e-4`` stays ``0.0005``), ``-`` when unused."""
    return "-" if value is None else f"`{value}`" if isinstance(value, str) else f"{value:g}"


def _intervals(per_seed: list[dict]) -> dict[str, dict]:
    """Mean and interval over seeds of every finite-valued key of the per-seed dicts (NaN seeds are left out
    and counted by ``n``)."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    result = {}
    for key in keys:
        values = [run[key] for run in per_seed if math.isfinite(run[key])]
        result[key] = mean_interval(values) if values else {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    return result


def by_run(records: dict[str, dict], panel: str) -> dict[str, list[dict]]:
    """Records of ``panel`` grouped by run name, each list in seed order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in sorted(records.values(), key=lambda r: r["seed"]):
        if record["panel"] == panel:
            groups[record["name"]].append(record)
    return dict(groups)


def eval_series(log_history: list[dict], subset: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of TRL's ``eval_<key>`` in the evaluations of the ``subset`` eval dataset (TRL prefixes only
    the loss with the dataset's name, so its rows are told apart by ``eval_<subset>_loss``)."""
    rows = [(e["step"], float(e[f"eval_{key}"])) for e in log_history if f"eval_{subset}_loss" in e and f"eval_{key}" in e]
    return [s for s, _ in rows], [v for _, v in rows]


# ----------------------------------------------------------------------------------------------- the study
def study_curve(record: dict) -> dict[str, list[float]]:
    """A policy run's probes: steps, d = sqrt(sequence KL), and gold/proxy gains over the step-0 probe."""
    drift = record["drift"]
    return {
        "step": [h["step"] for h in drift],
        "d": [math.sqrt(max(h[KL_KEY], 0.0)) for h in drift],
        "gold_gain": [h[GOLD_KEY] - drift[0][GOLD_KEY] for h in drift],
        "proxy_gain": [h[PROXY_KEY] - drift[0][PROXY_KEY] for h in drift],
    }


def _safe_fit(d: list[float], gain: list[float]) -> dict[str, float]:
    try:
        return gao_rl_fit(d, gain)
    except ValueError:  # fewer than two probes with d > 0 (a run that never moved)
        return dict.fromkeys(("alpha", "beta", "d_star", "gain_star", "r2"), float("nan"))


def study_seed_numbers(record: dict, frontier: dict[str, float] | None) -> dict[str, float]:
    """One seed's numbers: final gains and d, the observed best gold gain and its d, the Gao fit, and the mean gap
    between its gold gains and the ``frontier`` fit (the unregularized runs') at the same d, within their range."""
    curve = study_curve(record)
    best = max(range(len(curve["d"])), key=lambda i: curve["gold_gain"][i])
    fit = _safe_fit(curve["d"], curve["gold_gain"])
    numbers = {
        "gold_start": record["drift"][0][GOLD_KEY],
        "gold_gain_end": curve["gold_gain"][-1],
        "proxy_gain_end": curve["proxy_gain"][-1],
        "d_end": curve["d"][-1],
        "best_gold_gain": curve["gold_gain"][best],
        "d_at_best": curve["d"][best],
        "nll_increase_end": record["drift"][-1]["forgetting/nll_increase"],
        **{f"fit_{k}": v for k, v in fit.items()},
    }
    gaps = []
    if frontier is not None and math.isfinite(frontier["alpha"]):
        gaps = [g - x * (frontier["alpha"] - frontier["beta"] * math.log(x)) for x, g in zip(curve["d"], curve["gold_gain"])
                if 0 < x <= frontier["d_max"]]
    numbers["gap_to_frontier"] = sum(gaps) / len(gaps) if gaps else float("nan")
    return numbers


def summarize_study(records: dict[str, dict]) -> dict:
    runs = by_run(records, "study")
    proxy = runs.pop(PROXY)
    summary = {
        "proxy": {**_intervals([{"heldout_accuracy": r["heldout_accuracy"], "train_label_agreement": r["train_label_agreement"]} for r in proxy]),
                  "train_pairs": proxy[0]["train_pairs"], "heldout_pairs": [r["heldout_pairs"] for r in proxy],
                  "rated_checkpoints": proxy[0]["rated_checkpoints"], "rater_temperature": proxy[0]["rater_temperature"]},
        "steps": max(r["log_history"][-1]["step"] for name, group in runs.items() if name != BEST_OF_N for r in group),
        "frontier": {},
        "runs": {},
    }
    for trainer, variants in study_variants(records).items():
        reference = runs[f"{trainer} {REFERENCE_VARIANT}"]
        points = [(x, g) for r in reference for x, g in zip(study_curve(r)["d"], study_curve(r)["gold_gain"])]
        frontier = {**_safe_fit([x for x, _ in points], [g for _, g in points]), "d_max": max(x for x, _ in points)}
        summary["frontier"][trainer] = frontier
        for variant in variants:
            name = f"{trainer} {variant}"
            per_seed = [study_seed_numbers(r, frontier) for r in runs[name]]
            summary["runs"][name] = {"trainer": trainer, "variant": variant, "settings": runs[name][0]["settings"],
                                     "per_seed": per_seed, **_intervals(per_seed)}
    return summary


def plot_study(records: dict[str, dict], summary: dict, path: Path) -> None:
    plt = _plt()
    runs, trainers = by_run(records, "study"), study_variants(records)
    fig, axes = plt.subplots(len(trainers), 2, figsize=(12, 4.5 * len(trainers)), squeeze=False)
    for row, trainer in enumerate(trainers):
        for col, (key, label) in enumerate((("gold_gain", "gold reward gain"), ("proxy_gain", "proxy reward gain"))):
            ax = axes[row, col]
            for variant in trainers[trainer]:
                curves = [study_curve(r) for r in runs[f"{trainer} {variant}"]]
                probes = min(len(c["d"]) for c in curves)
                d = [sum(c["d"][i] for c in curves) / len(curves) for i in range(probes)]
                values = [mean_interval([c[key][i] for c in curves]) for i in range(probes)]
                line = ax.plot(d, [v["mean"] for v in values], marker="o", ms=3, label=variant)[0]
                ax.fill_between(d, [v["low"] for v in values], [v["high"] for v in values], color=line.get_color(), alpha=0.15)
                if variant == REFERENCE_VARIANT and key == "gold_gain":  # each seed's own curve: where its peak is
                    for curve in curves:
                        ax.plot(curve["d"], curve[key], color=line.get_color(), lw=0.6, alpha=0.4)
            frontier = summary["frontier"][trainer]
            if key == "gold_gain" and math.isfinite(frontier["alpha"]):
                xs = [frontier["d_max"] * (i + 1) / 50 for i in range(50)]
                ax.plot(xs, [x * (frontier["alpha"] - frontier["beta"] * math.log(x)) for x in xs], "k--", lw=1,
                        label=f"fit to '{REFERENCE_VARIANT}': d({frontier['alpha']:.2f} - {frontier['beta']:.2f} log d)")
            ax.axhline(0, color="grey", lw=0.5)
            seeds_note = f"; thin: each seed, {REFERENCE_VARIANT}" if key == "gold_gain" else ""
            ax.set(xlabel="d = sqrt(KL(pi || pi_0)), sequence level", ylabel=label, title=f"{trainer}: {label} (mean over seeds, 95% band{seeds_note})")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- panels (a)-(e)
def summarize_dpo(records) -> dict:
    result = {}
    for name, seeds in by_run(records, "a_dpo").items():
        per_seed = []
        for run in seeds:
            _, chosen = series(run["log_history"], "eval_logps/chosen")
            _, rejected = series(run["log_history"], "eval_logps/rejected")
            per_seed.append({"chosen_logp_start": chosen[0], "chosen_logp_end": chosen[-1], "rejected_logp_end": rejected[-1]})
        result[name] = {"per_seed": per_seed, **_intervals(per_seed)}
    return result


def summarize_grpo(records) -> dict:
    result = {}
    for name, seeds in by_run(records, "b_grpo").items():
        per_seed = []
        for run in seeds:
            _, rewards = series(run["log_history"], "rewards/target_char_reward/mean")
            last = run["drift"][-1]
            per_seed.append({
                "reward_start": rewards[0],
                "reward_last_10": sum(rewards[-10:]) / len(rewards[-10:]),  # one step is 2 prompts x 8: noisy
                "kl_reverse_end": last["drift/kl_reverse"],
                "heldout_nll_increase": last["forgetting/nll_increase"],
                "distinct_2_end": last["samples/distinct_2"],
            })
        result[name] = {"settings": seeds[0]["settings"], "sample": seeds[0]["samples"][0] if seeds[0]["samples"] else "",
                        "per_seed": per_seed, **_intervals(per_seed)}
    return result


def summarize_forgetting(records) -> dict:
    """Eq. 15's fit per seed over every run of that seed with a drift probe (panels a, b and the study)."""
    from examples.demo.runs import drift_vs_forgetting

    probed: dict[int, list[dict]] = defaultdict(list)
    for record in sorted(records.values(), key=lambda r: (r["seed"], r["panel"], r["name"])):
        if record.get("drift"):
            probed[record["seed"]].append(record)
    per_seed = {seed: drift_vs_forgetting(runs) for seed, runs in probed.items()}
    numbers = [{"r2": fit["r2"], "slope": fit["slope"], "intercept": fit["intercept"]} for fit in per_seed.values()]
    return {"per_seed": per_seed, "runs_per_seed": len(next(iter(per_seed.values()))["points"]), **_intervals(numbers)}


def summarize_margins(records) -> dict:
    """Per run: held-out accuracy per strength; for the margin run also its paired gain over the plain run of the
    same seed and the share of swapped training pairs it ranks the swapped way."""
    accuracy: dict[str, list] = defaultdict(list)
    extra: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for record in sorted((r for r in records.values() if r["panel"] == "d_reward"), key=lambda r: r["seed"]):
        for run in record["runs"]:
            accuracy[run["name"]].append(run["accuracy"])
            extra[run["name"]]["memorized_swaps"].append({"memorized_swaps": run["memorized_swaps"]})
            if "accuracy_gain" in run:
                extra[run["name"]]["gain"].append(run["accuracy_gain"])
    result = {}
    for name, per_seed in accuracy.items():
        result[name] = {"per_seed": per_seed, **_intervals(per_seed), **_intervals(extra[name]["memorized_swaps"])}
        if extra[name]["gain"]:
            result[name]["gain"] = _intervals(extra[name]["gain"])
    return result


def summarize_reward_aware(records) -> dict:
    result = {}
    for name, seeds in by_run(records, "e_reward_aware").items():
        per_seed = []
        for run in seeds:
            log = run["log_history"]
            flipped, kept = eval_series(log, "flipped", "rewards/accuracies")[1], eval_series(log, "kept", "rewards/accuracies")[1]
            per_seed.append({"flipped_accuracy_end": flipped[-1], "kept_accuracy_end": kept[-1],
                             "flipped_margin_end": eval_series(log, "flipped", "rewards/margins")[1][-1],
                             "kept_margin_end": eval_series(log, "kept", "rewards/margins")[1][-1]})
        result[name] = {"settings": seeds[0]["settings"], "num_flipped": seeds[0]["num_flipped"], "num_kept": seeds[0]["num_kept"],
                        "per_seed": per_seed, **_intervals(per_seed)}
    return result


def _band(ax, xs_per_seed: list[list[float]], ys_per_seed: list[list[float]], **style) -> None:
    """Mean over seeds with a 95% band, at the points all seeds share."""
    count = min(len(ys) for ys in ys_per_seed)
    values = [mean_interval([ys[i] for ys in ys_per_seed]) for i in range(count)]
    line = ax.plot(xs_per_seed[0][:count], [v["mean"] for v in values], **style)[0]
    ax.fill_between(xs_per_seed[0][:count], [v["low"] for v in values], [v["high"] for v in values], color=line.get_color(), alpha=0.15)


def plot_panels(records, summary: dict, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, seeds), color in zip(by_run(records, "a_dpo").items(), ("tab:red", "tab:blue")):
        for key, ls in (("eval_logps/chosen", "-"), ("eval_logps/rejected", "--")):
            got = [series(r["log_history"], key) for r in seeds]
            _band(ax, [s for s, _ in got], [v for _, v in got], color=color, ls=ls, label=f"{name}: {key.split('/')[-1]}")
    ax.set(xlabel="step", ylabel="sequence log-prob", title="(a) DPO vs DPO+NLL (mean over seeds, 95% band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "a_dpo_chosen_logp.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("task reward", lambda r: series(r["log_history"], "rewards/target_char_reward/mean")),
        ("KL(pi || pi_0) per token, task prompts", lambda r: ([h["step"] for h in r["drift"]], [h["drift/kl_reverse"] for h in r["drift"]])),
        ("held-out NLL (nats/token)", lambda r: ([h["step"] for h in r["drift"]], [h["forgetting/nll"] for h in r["drift"]])),
        ("distinct-2 of samples", lambda r: ([h["step"] for h in r["drift"]], [h["samples/distinct_2"] for h in r["drift"]])),
    ]
    for ax, (title, get) in zip(axes.flat, panels):
        for name, seeds in by_run(records, "b_grpo").items():
            got = [get(r) for r in seeds]
            _band(ax, [s for s, _ in got], [v for _, v in got], label=name)
        ax.set(title=title, xlabel="step")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("(b) GRPO on an over-optimizable reward (mean over seeds, 95% band)")
    fig.tight_layout()
    fig.savefig(out / "b_grpo.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    fits = summary["drift_vs_forgetting"]["per_seed"]
    for seed, fit in fits.items():
        line = ax.scatter([k for _, k, _ in fit["points"]], [r for _, _, r in fit["points"]], s=12, label=f"seed {seed}: R^2 = {fit['r2']:.2f}")
        xs = [0.0, max(k for _, k, _ in fit["points"])]
        ax.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], ls="--", lw=1, color=line.get_facecolor()[0])
    ax.set(xlabel="final KL(pi_0 || pi) per token, task prompts", ylabel="rise in held-out NLL", title="(c) drift vs forgetting, one fit per seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "c_drift_vs_forgetting.png", dpi=100)
    plt.close(fig)

    labels = list(STRENGTH_LABELS.values())[::-1]
    margins = summary["reward"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(margins), 1)
    for i, (name, acc) in enumerate(margins.items()):
        means = [acc[label]["mean"] for label in labels]
        errors = [[m - acc[label]["low"] for m, label in zip(means, labels)], [acc[label]["high"] - m for m, label in zip(means, labels)]]
        ax.bar([j + i * width for j in range(len(labels))], means, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks([j + width * (len(margins) - 1) / 2 for j in range(len(labels))], labels)
    ax.set(ylabel="held-out accuracy", ylim=(0, 1.05), title="(d) reward model accuracy by preference strength")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "d_reward_margins.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, subset, title in ((axes[0], "flipped", "pairs with swapped labels"), (axes[1], "kept", "pairs with correct labels")):
        for name, seeds in by_run(records, "e_reward_aware").items():
            got = [eval_series(r["log_history"], subset, "rewards/accuracies") for r in seeds]
            _band(ax, [s for s, _ in got], [v for _, v in got], marker="o", ms=3, label=name)
        ax.set(title=title, xlabel="step", ylim=(-0.05, 1.05))
    axes[0].set_ylabel("implicit-reward accuracy on the true labels")
    axes[0].legend(fontsize=8)
    fig.suptitle("(e) reward-aware DPO under label noise (mean over seeds, 95% band)")
    fig.tight_layout()
    fig.savefig(out / "e_reward_aware.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- report
def summarize(records: dict[str, dict], base: str) -> dict:
    base_info = json.loads((Path(base) / "pretrain_info.json").read_text())
    seeds = sorted({r["seed"] for r in records.values()})
    return {
        "seeds": seeds,
        "base_model": base_info,
        "study": summarize_study(records),
        "proxy_quality": overopt_report.summarize_proxy_quality(records),
        "best_of_n": overopt_report.summarize_best_of_n(records),
        "examples": overopt_report.summarize_examples(records),
        "dpo": summarize_dpo(records),
        "grpo": summarize_grpo(records),
        "drift_vs_forgetting": summarize_forgetting(records),
        "reward": summarize_margins(records),
        "reward_aware": summarize_reward_aware(records),
        "forget": summarize_forget(records),
        "train_seconds": sum(r["seconds"] for r in records.values()),
    }


def reading(study: dict) -> list[str]:
    """The plain-language reading of the study, each sentence built from the numbers it states."""
    runs = study["runs"]
    lines = []
    for trainer in study["frontier"]:
        ref = runs[f"{trainer} {REFERENCE_VARIANT}"]
        direction = "rose" if ref["gold_gain_end"]["low"] > 0 else "fell" if ref["gold_gain_end"]["high"] < 0 else "did not change detectably"
        frontier = study["frontier"][trainer]
        shape = (f"peaks at d* = {frontier['d_star']:.3f} (gain {frontier['gain_star']:.3f})" if math.isfinite(frontier["d_star"])
                 else "has no peak: gold falls from the start" if frontier["alpha"] < 0 else "has no peak in range")
        lines.append(
            f"- **{trainer} without a KL term**: the proxy reward changed by {fmt(ref['proxy_gain_end'])} while the gold reward "
            f"{direction} ({fmt(ref['gold_gain_end'])}) at d = {fmt(ref['d_end'])}; its best probe was a gold gain of "
            f"{fmt(ref['best_gold_gain'])} at d = {fmt(ref['d_at_best'])}. Gao et al.'s form fitted to its pooled seeds, "
            f"d({frontier['alpha']:.3f} - {frontier['beta']:.3f} log d), {shape}. {rise_and_fall(ref['per_seed'])}"
        )
        for run in runs.values():
            if run["trainer"] != trainer or run["variant"] == REFERENCE_VARIANT:
                continue
            variant, gap = run["variant"], run["gap_to_frontier"]
            position = ("above" if gap["low"] > 0 else "below" if gap["high"] < 0 else "on (within the interval)") if gap["n"] else "not comparable with"
            lines.append(
                f"  - {variant}: ended at d = {fmt(run['d_end'])} (vs {ref['d_end']['mean']:.3f} without), proxy gain "
                f"{fmt(run['proxy_gain_end'])}, gold gain {fmt(run['gold_gain_end'])}; its points lie {position} the "
                f"unregularized frontier (mean gap {fmt(gap)})."
            )
    gaps = [r["gap_to_frontier"] for r in runs.values() if r["variant"] != REFERENCE_VARIANT and r["gap_to_frontier"]["n"]]
    above, below = sum(g["low"] > 0 for g in gaps), sum(g["high"] < 0 for g in gaps)
    lines.append(
        f"- **Frontier or early stop?** Of the {len(gaps)} regularized runs, {above} lie above the unregularized gold-vs-d "
        f"frontier (more gold at the same d: a better curve), {len(gaps) - above - below} on it within their 95% interval "
        f"(gold bought by stopping earlier on the same curve, Gao et al.'s finding) and {below} below it."
    )
    for trainer in study["frontier"]:
        k1 = [name for name, r in runs.items() if r["trainer"] == trainer and r["variant"].startswith("k1 in reward")]
        k3 = [name for name, r in runs.items() if r["trainer"] == trainer and r["variant"].startswith("k3 in loss")]
        if k1 and k3:
            described = "; ".join(f"{name}: gold gain {fmt(runs[name]['gold_gain_end'])} at d = {fmt(runs[name]['d_end'])}, gap {fmt(runs[name]['gap_to_frontier'])}"
                                  for name in k1 + k3)
            lines.append(f"- **k1 in the reward vs k3 in the loss ({trainer})**: {described}.")
    return lines


def rise_and_fall(per_seed: list[dict]) -> str:
    """The sentence on each seed's own curve: its best and last gold gains, and in how many seeds the gold rose and
    then fell (by ``PEAK_MARGIN`` or more each way)."""
    shaped = sum(s["best_gold_gain"] >= PEAK_MARGIN and s["best_gold_gain"] - s["gold_gain_end"] >= PEAK_MARGIN for s in per_seed)
    pairs = ", ".join(f"{s['best_gold_gain']:.2f}/{s['gold_gain_end']:.2f}" for s in per_seed)
    return (f"Per seed, best/last gold gain {pairs}: the gold rose by at least {PEAK_MARGIN:g} and then fell by at least "
            f"{PEAK_MARGIN:g} in {shaped} of {len(per_seed)} seeds.")


def write_report(out: Path, records: dict[str, dict], base: str, size: str, seconds: float) -> tuple[Path, dict]:
    """Write the figures, ``results.json`` and ``report.md`` of the ``size`` demo (one of ``plan.SIZES``) into
    ``out``; return the report path and the summary."""
    summary = summarize(records, base)
    plot_study(records, summary["study"], out / "overoptimization.png")
    overopt_report.plot_best_of_n(summary["best_of_n"], out / "best_of_n.png")
    plot_panels(records, summary, out)
    plot_forget(records, summary["forget"], out / "f_forget.png")
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    study, base_info, fit = summary["study"], summary["base_model"], summary["drift_vs_forgetting"]
    n = len(summary["seeds"])
    strengths = list(STRENGTH_LABELS.values())[::-1]
    proxy = study["proxy"]
    text = [
        "# trl-regularizers demo report",
        "",
        f"Size: {'quick (CI)' if size == 'quick' else size}, seeds {summary['seeds']}. Wall time {seconds:.0f} s "
        f"({summary['train_seconds']:.0f} s of training over all runs). Every number below is read from this run's logs "
        "(`results.json`, `<panel>/<run>/seed<k>/run.json`); `m [lo, hi]` is the mean over seeds and its 95% t-interval.",
        "",
        "## Over-optimization: a proxy reward model against the gold reward",
        f"The policy starts from a {START_CHECKPOINT}-step checkpoint of the tiny-world model and is optimized against a "
        f"**proxy** reward model trained on {proxy['train_pairs']} rated pairs of completions sampled from "
        + ("the start policy itself" if proxy["rated_checkpoints"] == [START_CHECKPOINT] else
           f"the {', '.join(map(str, proxy['rated_checkpoints']))}-step checkpoints")
        + ", labeled by a "
        f"simulated rater who prefers the higher gold score with Bradley-Terry noise (temperature {proxy['rater_temperature']:g}). Its held-out accuracy against "
        f"the gold order is {fmt(proxy['heldout_accuracy'])} (rater labels agree with the gold order on "
        f"{fmt(proxy['train_label_agreement'])} of its training pairs). The **gold** reward (`demo/gold.py`), never "
        "seen by the policy, counts the true minus the false facts stated and adds half the fully trained model's "
        f"per-token log-likelihood of the text. Each policy run trains {study['steps']} steps; every probe samples the 32 task prompts twice; "
        "d = sqrt(sequence-level KL(pi || pi_0)) on those samples (Gao et al. 2022).",
        "",
        "![over-optimization](overoptimization.png)",
        "",
        "### Reading",
        *reading(study),
        "",
        *overopt_report.study_sections(summary["proxy_quality"], summary["best_of_n"], summary["examples"]),
        "### Numbers per regularizer",
        "Gains are relative to the run's step-0 probe. Fit: R(d) = d (alpha - beta log d) to each seed's gold gains "
        "(Gao et al.'s RL form); its peak d* = exp(alpha/beta - 1) and gain R* = beta d* exist only where beta > 0 "
        "(`n` = seeds with a peak). Gap = mean gold gain minus the unregularized runs' pooled fit at the same d.",
        "",
        _table(
            ["run", "proxy gain end", "gold gain end", "d end", "best gold gain", "d at best", "fit alpha", "fit beta", "fit d* (n)", "fit R* (n)", "gap to frontier", "NLL rise"],
            [[name, fmt(r["proxy_gain_end"]), fmt(r["gold_gain_end"]), fmt(r["d_end"]), fmt(r["best_gold_gain"]), fmt(r["d_at_best"]),
              fmt(r["fit_alpha"]), fmt(r["fit_beta"]), f"{fmt(r['fit_d_star'])} ({r['fit_d_star']['n']})", f"{fmt(r['fit_gain_star'])} ({r['fit_gain_star']['n']})",
              fmt(r["gap_to_frontier"]), fmt(r["nll_increase_end"])] for name, r in study["runs"].items()],
        ),
        "",
        "Settings of each run (on top of the common ones in `demo/overopt.py`):",
        "",
        _table(["run", "options"], [[name, ", ".join(f"{k}={_setting(v)}" for k, v in r["settings"].items())] for name, r in study["runs"].items()]),
        "",
        "## The embedded tiny model",
        f"A {base_info['num_parameters']:,}-parameter Qwen2 with a byte tokenizer, pretrained by "
        f"`python -m examples.demo.pretrain` on the generated tiny-world corpus ({base_info['settings']['steps']} steps). "
        f"Held-out NLL: {base_info['heldout_nll_init']:.3f} nats/byte at random init, {base_info['heldout_nll']:.3f} after. "
        f"Facts completed correctly (greedy): {base_info['fact_accuracy_init']:.0%} at init, {base_info['fact_accuracy']:.0%} after.",
        "",
        "## (a) DPO vs DPO+NLL",
        "Chosen and rejected completion log-probs of the training pairs (true vs wrong fact), evaluated during training.",
        "",
        _table(["run", "chosen log-prob start", "chosen log-prob end", "rejected log-prob end"],
               [[name, fmt(r["chosen_logp_start"]), fmt(r["chosen_logp_end"]), fmt(r["rejected_logp_end"])] for name, r in summary["dpo"].items()]),
        "",
        "![DPO](a_dpo_chosen_logp.png)",
        "",
        "## (b) GRPO on an over-optimizable reward",
        f"Reward = fraction of `{TARGET_CHAR}` characters in the completion. KL and NLL come from `KLDriftCallback` (exact "
        "per-token KL on sampled completions of fixed task prompts; NLL on held-out corpus text). With the KL in the "
        "reward, `beta` multiplies the KL summed over the completion (TRL RLOO's convention), in the loss the per-token KL.",
        "",
        _table(["run", *GRPO_SETTINGS], [[name, *(_setting(r["settings"].get(key)) for key in GRPO_SETTINGS)] for name, r in summary["grpo"].items()]),
        "",
        _table(["run", "reward start", "reward, last 10 steps", "KL(pi ‖ pi_0)", "NLL rise", "distinct-2 end", "a sample (seed 0)"],
               [[name, fmt(r["reward_start"]), fmt(r["reward_last_10"]), fmt(r["kl_reverse_end"]), fmt(r["heldout_nll_increase"]),
                 fmt(r["distinct_2_end"]), "`" + r["sample"].replace("|", "/").replace("\n", " ") + "`"] for name, r in summary["grpo"].items()]),
        "",
        "![GRPO](b_grpo.png)",
        "",
        "## (c) Drift vs forgetting (eq. 15)",
        f"Per seed, across its {fit['runs_per_seed']} runs with a drift probe ((a), (b) and the study): held-out NLL rise = "
        "a + b * final E_x[KL(pi_0 || pi)] on task prompts (the forward KL of eq. 15).",
        "",
        f"**R^2 = {fmt(fit['r2'])}**, slope b = {fmt(fit['slope'])}, intercept a = {fmt(fit['intercept'])} over {n} seeds "
        "(RL's Razor reports R^2 = 0.96 on its toy task, 0.71 on LLMs).",
        "",
        "![fit](c_drift_vs_forgetting.png)",
        "",
        "## (d) Reward model with vs without margins",
        f"Training labels are swapped on {FLIP_RATES['slightly better']:.0%} / {FLIP_RATES['better']:.0%} / "
        f"{FLIP_RATES['significantly better']:.0%} of the slightly better / better / significantly better pairs (raters err "
        "most on weak pairs); accuracy is on the clean labels of unseen pairs. `RM+margin` uses `margin_source=\"label\"`, "
        f"`margin_label_map=\"llama2_large\"`, `margin_scale={MARGIN_SCALE:g}` (setting and what else was tried: "
        "`demo/margins.py`). Memorized swaps = share of the swapped training pairs the model ranks the swapped way.",
        "",
        _table(["run", *strengths, "all", "memorized swaps"],
               [[name, *[fmt(acc[s]) for s in strengths], fmt(acc["all"]), fmt(acc["memorized_swaps"])] for name, acc in summary["reward"].items()]),
        "",
        *[f"Paired gain of {name} over RM (same seed): " + ", ".join(f"{s} {fmt(acc['gain'][s])}" for s in [*strengths, "all"]) + "."
          for name, acc in summary["reward"].items() if "gain" in acc],
        "",
        "![RM](d_reward_margins.png)",
        "",
    ]
    ra = summary["reward_aware"]
    any_run = next(iter(ra.values()))
    text += [
        "## (e) Reward-aware DPO under label noise",
        f"The fact pairs of (a) with scores: true fact 1, wrong fact -1, plus Gaussian noise (sd {SCORE_NOISE:g}); for "
        f"training, a {LABEL_NOISE:.0%} share of the pairs (seed 0: {any_run['num_flipped']} of "
        f"{any_run['num_flipped'] + any_run['num_kept']}) has chosen and rejected swapped, their scores going with "
        "their texts. Accuracy = TRL's `rewards/accuracies` evaluated on the true labels, separately for the swapped "
        "and the untouched pairs.",
        "",
        _table(["run", "reward_aware_loss", "reward_weighting", "swapped: accuracy end", "swapped: margin end", "untouched: accuracy end", "untouched: margin end"],
               [[name, _setting(r["settings"]["reward_aware_loss"]), _setting(r["settings"]["reward_weighting"]), fmt(r["flipped_accuracy_end"]),
                 fmt(r["flipped_margin_end"]), fmt(r["kept_accuracy_end"]), fmt(r["kept_margin_end"])] for name, r in ra.items()]),
        "",
        "![reward-aware](e_reward_aware.png)",
        "",
        *forget_section(summary["forget"], "f_forget.png"),
    ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path, summary


def results_table(summary: dict) -> str:
    """The console's closing table: the study's headline numbers per run."""
    rows = [[name, fmt(r["proxy_gain_end"], 2), fmt(r["gold_gain_end"], 2), fmt(r["d_end"], 2)] for name, r in summary["study"]["runs"].items()]
    return _table(["study run", "proxy gain", "gold gain", "d = sqrt(KL)"], rows)
