"""Panel (f) of the report, "SFT forgets, RL forgets less": numbers, figure and text, all from the run records.

Forgetting is the rise of the prior facts' NLL over the run's step-0 probe (``prior/nll``); retention is the prior
facts' greedy accuracy. Runs are compared at the end and at their first probe with new-task accuracy >=
``MATCH_SCORE`` ("at matched score"), and each claim by the paired per-seed difference of two methods.
"""

from __future__ import annotations

import math

from examples.demo.forget import FORGET_VARIANTS, MATCH_SCORE
from examples.demo.stats import bootstrap_r2, fmt, linear_fit, mean_interval

PANEL = "f_forget"
CLAIMS = (
    ("SFT forgets more than on-policy RL", "SFT", "GRPO"),
    ("SFT on data close to the base forgets less", "SFT", "SFT on filtered base samples"),
)
"""(claim, method A, method B): the claim holds where A's forgetting minus B's is positive."""
EXPLICIT = tuple(name for name, options in FORGET_VARIANTS.items() if options.get("sft_kl_coef") or options.get("ptx_coef"))
"""Methods with an explicit regularizer (a KL anchor on the new-task prompts, replay of the prior corpus): they act on
one side of the drift-forgetting relation directly, so ``drift_fit_implicit`` leaves them out."""
NAN = float("nan")


def seed_numbers(probes: list[dict]) -> dict[str, float]:
    """One run's numbers from its probes (the first one is step 0, before training)."""
    start, end = probes[0], probes[-1]
    match = next((h for h in probes if h["new/accuracy"] >= MATCH_SCORE), None)

    def at(h, key):
        return NAN if h is None else float(h[key])

    return {
        "new_accuracy_start": start["new/accuracy"],
        "new_accuracy_end": end["new/accuracy"],
        "prior_accuracy_start": start["prior/accuracy"],
        "prior_accuracy_end": end["prior/accuracy"],
        "prior_nll_rise_end": end["prior/nll"] - start["prior/nll"],
        "heldout_nll_rise_end": end["forgetting/nll_increase"],
        "kl_forward_end": end["drift/kl_forward"],
        "step_at_match": at(match, "step"),
        "prior_accuracy_at_match": at(match, "prior/accuracy"),
        "prior_nll_rise_at_match": NAN if match is None else match["prior/nll"] - start["prior/nll"],
        "kl_forward_at_match": at(match, "drift/kl_forward"),
    }


def _interval(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    return mean_interval(finite) if finite else {"mean": NAN, "low": NAN, "high": NAN, "n": 0}


def _cell(interval: dict[str, float]) -> str:
    return fmt(interval) if interval["n"] else "not reached"


def verdict(diff: dict[str, float]) -> str:
    """The reading of a paired difference's 95% interval."""
    if diff["n"] < 2:
        return "cannot be judged (fewer than 2 seeds with both values)"
    return "holds" if diff["low"] > 0 else "is reversed" if diff["high"] < 0 else "is not detectable (the interval spans 0)"


def summarize_forget(records: dict[str, dict]) -> dict:
    """Per method: per-seed numbers and their intervals; per claim: paired differences; the drift fit over all runs."""
    runs: dict[str, list[dict]] = {}
    for record in sorted((r for r in records.values() if r["panel"] == PANEL), key=lambda r: (list(FORGET_VARIANTS).index(r["name"]), r["seed"])):
        runs.setdefault(record["name"], []).append(record)
    methods = {}
    for name, seeds in runs.items():
        per_seed = [seed_numbers(r["probes"]) for r in seeds]
        methods[name] = {"settings": seeds[0]["settings"], "seeds": [r["seed"] for r in seeds], "per_seed": per_seed,
                         **{key: _interval([s[key] for s in per_seed]) for key in per_seed[0]}}
        if "filtered_examples" in seeds[0]:
            methods[name]["filtered_examples"] = [r["filtered_examples"] for r in seeds]
            methods[name]["filtered_prompts_without_sample"] = [r["filtered_prompts_without_sample"] for r in seeds]
    claims = []
    for claim, a, b in CLAIMS:
        entry = {"claim": claim, "a": a, "b": b}
        for when in ("end", "at_match"):
            key = f"prior_nll_rise_{when}"
            diffs = [x[key] - y[key] for x, y in zip(methods[a]["per_seed"], methods[b]["per_seed"])]
            entry[when] = _interval(diffs)
            entry[f"{when}_per_seed"] = diffs
        claims.append(entry)
    fits = {which: drift_fit({name: seeds for name, seeds in runs.items() if which == "all" or name not in EXPLICIT})
            for which in ("all", "implicit")}
    return {"methods": methods, "claims": claims, "drift_fit": fits["all"], "drift_fit_implicit": fits["implicit"]}


def drift_fit(runs: dict[str, list[dict]]) -> dict:
    """Forgetting (final prior NLL rise) = intercept + slope * final KL(pi_0 || pi) over every run of ``runs``, with
    the R^2's bootstrap interval (NaN where the points do not determine a line, e.g. a quick run)."""
    points = [{"name": name, "seed": r["seed"], "kl_forward": n["kl_forward_end"], "prior_nll_rise": n["prior_nll_rise_end"]}
              for name, seeds in runs.items() for r in seeds for n in [seed_numbers(r["probes"])]]
    kl, rise = [p["kl_forward"] for p in points], [p["prior_nll_rise"] for p in points]
    try:
        fit = {**linear_fit(kl, rise), **{f"r2_{k}": v for k, v in bootstrap_r2(kl, rise).items()}}
    except ValueError:
        fit = {"slope": NAN, "intercept": NAN, "r2": NAN, "r2_low": NAN, "r2_high": NAN, "r2_resamples": 0}
    return {**fit, "points": points}


def plot_forget(records: dict[str, dict], summary: dict, path) -> None:
    from examples.demo.report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in summary["methods"]:
        probes = [r["probes"] for r in records.values() if r["panel"] == PANEL and r["name"] == name]
        count = min(len(p) for p in probes)
        x = [sum(p[i]["new/accuracy"] for p in probes) / len(probes) for i in range(count)]
        for ax, get in ((axes[0], lambda p, i: p[i]["prior/accuracy"]), (axes[1], lambda p, i: p[i]["prior/nll"] - p[0]["prior/nll"])):
            values = [mean_interval([get(p, i) for p in probes]) for i in range(count)]
            ax.errorbar(x, [v["mean"] for v in values], yerr=[[v["mean"] - v["low"] for v in values], [v["high"] - v["mean"] for v in values]],
                        marker="o", ms=3, capsize=2, label=name)
    for ax, label, title in ((axes[0], "prior facts: greedy accuracy", "retention"), (axes[1], "prior facts: NLL rise (nats/token)", "forgetting")):
        ax.axvline(MATCH_SCORE, color="grey", lw=0.5, ls=":")
        ax.set(xlabel="new task: greedy accuracy (mean over seeds)", ylabel=label, title=f"{title} vs new-task score (95% bars)")
    axes[0].legend(fontsize=7)
    fit = summary["drift_fit"]
    for name in summary["methods"]:
        pts = [p for p in fit["points"] if p["name"] == name]
        axes[2].scatter([p["kl_forward"] for p in pts], [p["prior_nll_rise"] for p in pts], s=14)  # colors as in the first panel
    for line, which, label in (("k--", fit, "all runs"), ("k:", summary["drift_fit_implicit"], "without KL anchor / replay")):
        if math.isfinite(which["slope"]):
            xs = [0.0, max(p["kl_forward"] for p in which["points"])]
            axes[2].plot(xs, [which["intercept"] + which["slope"] * v for v in xs], line, lw=1,
                         label=f"{label}: R^2 = {which['r2']:.2f} [{which['r2_low']:.2f}, {which['r2_high']:.2f}]")
    axes[2].legend(fontsize=7)
    axes[2].set(xlabel="final KL(pi_0 || pi) per token, new-task prompts", ylabel="prior facts: NLL rise", title="forgetting vs drift, every run")
    fig.suptitle("(f) SFT forgets, RL forgets less? (mean over seeds; R^2 with 95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def forget_section(summary: dict, figure: str) -> list[str]:
    """The report's (f) section: setup, table, the three claims as the data read, and the figure."""
    from examples.demo.forget import BATCH_SIZE, FILTER_KEEP, FILTER_SAMPLES, GRPO_LEARNING_RATE, NUM_GENERATIONS, SFT_LEARNING_RATE
    from examples.demo.report import _table

    methods = summary["methods"]
    columns = ["new_accuracy_end", "prior_accuracy_end", "prior_nll_rise_end", "kl_forward_end", "step_at_match", "prior_nll_rise_at_match",
               "prior_accuracy_at_match", "kl_forward_at_match", "heldout_nll_rise_end"]
    lines = [
        "## (f) SFT forgets, RL forgets less (Implicit Regularization, eq. 15)",
        "New task: a fact family the base never saw, whom each animal meets (\"the fox met the\" -> its friend; 16 facts), "
        "scored exactly (1 if the first word is the friend). Prior task: the 64 facts the base knows (greedy accuracy, and "
        f"the NLL of their true completions). SFT runs: lr {SFT_LEARNING_RATE:g}, {BATCH_SIZE} examples a step; GRPO: lr "
        f"{GRPO_LEARNING_RATE:g}, beta 0, {BATCH_SIZE} prompts x {NUM_GENERATIONS} samples a step, reward = the score. The filtered "
        f"run's data: {FILTER_SAMPLES} base samples per prompt, up to {FILTER_KEEP} distinct correct ones kept "
        f"(examples per seed: {next((m['filtered_examples'] for m in methods.values() if 'filtered_examples' in m), '-')}; prompts "
        f"with none: {next((m['filtered_prompts_without_sample'] for m in methods.values() if 'filtered_prompts_without_sample' in m), '-')}). "
        f"\"At match\" = the first probe whose new-task accuracy is >= {MATCH_SCORE:g} (`n` = seeds that reached it). "
        "Forgetting = rise of the prior facts' NLL over the step-0 probe; KL = E_x[KL(pi_0 || pi)] per token on the new-task prompts.",
        "",
        _table(["run", "new acc end", "prior acc end", "prior NLL rise end", "KL end", "step at match (n)", "NLL rise at match",
                "prior acc at match", "KL at match", "held-out text NLL rise end"],
               [[name, *[_cell(m[c]) + (f" ({m[c]['n']})" if c == "step_at_match" else "") for c in columns]] for name, m in methods.items()]),
        "",
        "### The three claims, as this run reads them",
    ]
    for claim in summary["claims"]:
        a, b = methods[claim["a"]], methods[claim["b"]]
        lines.append(
            f"- **{claim['claim']}**: {verdict(claim['at_match'])} at matched score and {verdict(claim['end'])} at the end. "
            f"Paired difference {claim['a']} - {claim['b']} of the prior NLL rise: {fmt(claim['at_match'])} at match (n = "
            f"{claim['at_match']['n']}), {fmt(claim['end'])} at the end. {claim['a']}: new acc {fmt(a['new_accuracy_end'])}, NLL rise "
            f"{fmt(a['prior_nll_rise_end'])}, KL {fmt(a['kl_forward_end'])}; {claim['b']}: new acc {fmt(b['new_accuracy_end'])}, "
            f"NLL rise {fmt(b['prior_nll_rise_end'])}, KL {fmt(b['kl_forward_end'])}."
        )
    for label, fit in (("over all", summary["drift_fit"]), ("without the explicitly regularized methods (" + ", ".join(EXPLICIT) + "), over", summary["drift_fit_implicit"])):
        tracks = "tracks" if math.isfinite(fit["r2_low"]) and fit["r2_low"] > 0.5 else "does not clearly track"
        lines.append(
            f"- **Forgetting tracks drift KL(pi_0 || pi) on new-task prompts**, {label} {len(fit['points'])} runs (each method and seed, "
            f"final probes): prior NLL rise = {fit['intercept']:.3f} + {fit['slope']:.3f} KL, **R^2 = {fit['r2']:.3f} "
            f"[{fit['r2_low']:.3f}, {fit['r2_high']:.3f}]** (95% bootstrap over runs, {fit['r2_resamples']} resamples): forgetting "
            f"{tracks} the drift here (\"tracks\" = the interval's low end above 0.5)."
        )
    sft = methods["SFT"]
    lines.append(
        "- **What each explicit regularizer did to the two sides of that relation** (final probes, vs SFT's KL "
        f"{fmt(sft['kl_forward_end'])} and NLL rise {fmt(sft['prior_nll_rise_end'])}): "
        + "; ".join(f"{name}: KL {fmt(methods[name]['kl_forward_end'])}, NLL rise {fmt(methods[name]['prior_nll_rise_end'])}"
                    for name in EXPLICIT if name in methods)
        + ". The KL anchor acts on the new-task prompts, where the drift is measured; replay acts on the prior corpus, "
        "where the forgetting is: a method can move one without the other."
    )
    return [*lines, "", f"![forgetting]({figure})", ""]
