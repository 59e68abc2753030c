"""Turn the demo's run records into ``report.md``, ``results.json`` and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from trl_regularizers.demo.runs import GRPO_SETTINGS, LABEL_NOISE, SCORE_NOISE, STRENGTH_LABELS, TARGET_CHAR, series


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


def _drift(run: dict, key: str) -> tuple[list[int], list[float]]:
    return [h["step"] for h in run["drift"]], [h[key] for h in run["drift"]]


def eval_series(log_history: list[dict], subset: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of TRL's ``eval_<key>`` in the evaluations of the ``subset`` eval dataset (TRL prefixes only
    the loss with the dataset's name, so its rows are told apart by ``eval_<subset>_loss``)."""
    rows = [(e["step"], float(e[f"eval_{key}"])) for e in log_history if f"eval_{subset}_loss" in e and f"eval_{key}" in e]
    return [s for s, _ in rows], [v for _, v in rows]


def summarize(base_info: dict, dpo: list[dict], grpo: list[dict], fit: dict, reward: list[dict], timings: dict,
              reward_aware: list[dict] = ()) -> dict:
    """The numbers the report shows, all read from the run records."""
    summary = {"base_model": base_info, "timings_s": timings, "dpo": {}, "grpo": {}, "drift_vs_forgetting": fit, "reward": {}, "reward_aware": {}}
    for run in dpo:
        steps, chosen = series(run["log_history"], "eval_logps/chosen")
        _, rejected = series(run["log_history"], "eval_logps/rejected")
        summary["dpo"][run["name"]] = {
            "chosen_logp_start": chosen[0],
            "chosen_logp_end": chosen[-1],
            "rejected_logp_end": rejected[-1],
            "eval_steps": steps,
        }
    for run in grpo:
        _, reward_values = series(run["log_history"], "rewards/target_char_reward/mean")
        last = run["drift"][-1]
        summary["grpo"][run["name"]] = {
            "reward_start": reward_values[0],
            "reward_end": reward_values[-1],
            "reward_last_10": sum(reward_values[-10:]) / len(reward_values[-10:]),  # one step is 2 prompts x 8: noisy
            "kl_reverse_end": last["drift/kl_reverse"],
            "kl_forward_end": last["drift/kl_forward"],
            "heldout_nll_end": last["forgetting/nll"],
            "heldout_nll_increase": last["forgetting/nll_increase"],
            "distinct_2_start": run["drift"][0]["samples/distinct_2"],
            "distinct_2_end": last["samples/distinct_2"],
            "sample": run["samples"][0] if run["samples"] else "",
            "settings": run["settings"],
        }
    for run in reward:
        summary["reward"][run["name"]] = run["accuracy"]
    for run in reward_aware:
        log = run["log_history"]
        flipped = eval_series(log, "flipped", "rewards/accuracies")[1]
        kept = eval_series(log, "kept", "rewards/accuracies")[1]
        summary["reward_aware"][run["name"]] = {
            "settings": run["settings"],
            "num_flipped": run["num_flipped"],
            "num_kept": run["num_kept"],
            "flipped_accuracy_start": flipped[0],
            "flipped_accuracy_end": flipped[-1],
            "kept_accuracy_start": kept[0],
            "kept_accuracy_end": kept[-1],
            "flipped_margin_end": eval_series(log, "flipped", "rewards/margins")[1][-1],
            "kept_margin_end": eval_series(log, "kept", "rewards/margins")[1][-1],
            "eval_steps": eval_series(log, "flipped", "rewards/accuracies")[0],
        }
    return summary


def plot_dpo(dpo: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, color in zip(dpo, ("tab:red", "tab:blue")):
        ax.plot(*series(run["log_history"], "eval_logps/chosen"), color=color, marker="o", label=f"{run['name']}: chosen")
        ax.plot(*series(run["log_history"], "eval_logps/rejected"), color=color, ls="--", label=f"{run['name']}: rejected")
    ax.set(xlabel="step", ylabel="sequence log-prob (sum over completion)", title="(a) DPO vs DPO+NLL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grpo(grpo: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("task reward", lambda r: series(r["log_history"], "rewards/target_char_reward/mean")),
        ("KL(pi || pi_0) on task prompts", lambda r: _drift(r, "drift/kl_reverse")),
        ("held-out NLL (nats/token)", lambda r: _drift(r, "forgetting/nll")),
        ("distinct-2 of samples", lambda r: _drift(r, "samples/distinct_2")),
    ]
    for ax, (title, get) in zip(axes.flat, panels):
        for run in grpo:
            ax.plot(*get(run), label=run["name"])
        ax.set(title=title, xlabel="step")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("(b) GRPO on an over-optimizable reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_fit(fit: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, kl, rise in fit["points"]:
        ax.scatter(kl, rise)
        ax.annotate(name, (kl, rise), fontsize=7)
    xs = [0.0, max(p[1] for p in fit["points"])]
    ax.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], "k--", label=f"fit, R^2 = {fit['r2']:.2f}")
    ax.set(xlabel="final KL(pi_0 || pi) on task prompts", ylabel="rise in held-out NLL", title="(c) drift vs forgetting")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reward(reward: list[dict], path: Path) -> None:
    plt = _plt()
    labels = list(STRENGTH_LABELS.values())[::-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(reward)
    for i, run in enumerate(reward):
        ax.bar([j + i * width for j in range(len(labels))], [run["accuracy"][label] for label in labels], width, label=run["name"])
    ax.set_xticks([j + width * (len(reward) - 1) / 2 for j in range(len(labels))], labels)
    ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="(d) reward model accuracy by preference strength")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reward_aware(runs: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, subset, title in ((axes[0], "flipped", "pairs with swapped labels"), (axes[1], "kept", "pairs with correct labels")):
        for run in runs:
            ax.plot(*eval_series(run["log_history"], subset, "rewards/accuracies"), marker="o", label=run["name"])
        ax.set(title=title, xlabel="step", ylim=(-0.05, 1.05))
    axes[0].set_ylabel("implicit-reward accuracy on the true labels")
    axes[0].legend(fontsize=8)
    fig.suptitle("(e) reward-aware DPO under label noise")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, summary: dict, dpo, grpo, reward, quick: bool, reward_aware=()) -> Path:
    """Write plots, ``results.json`` and ``report.md`` into ``out``; return the report path."""
    plot_dpo(dpo, out / "a_dpo_chosen_logp.png")
    plot_grpo(grpo, out / "b_grpo.png")
    plot_fit(summary["drift_vs_forgetting"], out / "c_drift_vs_forgetting.png")
    plot_reward(reward, out / "d_reward_margins.png")
    if reward_aware:
        plot_reward_aware(list(reward_aware), out / "e_reward_aware.png")
    (out / "results.json").write_text(json.dumps(summary, indent=2))

    base, fit = summary["base_model"], summary["drift_vs_forgetting"]
    strengths = list(STRENGTH_LABELS.values())[::-1]
    text = [
        "# trl-regularizers demo report",
        "",
        f"Size: {'quick (CI)' if quick else 'full'}. Wall time per part (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items())
        + ". Every number below is read from this run's logs (`results.json`, `*/run.json`).",
        "",
        "## The embedded tiny model",
        f"A {base['num_parameters']:,}-parameter Qwen2 with a byte tokenizer, pretrained by "
        f"`python -m trl_regularizers.demo.pretrain` on the generated tiny-world corpus "
        f"({base['settings']['steps']} steps). Held-out NLL: {base['heldout_nll_init']:.3f} nats/byte at random init, "
        f"{base['heldout_nll']:.3f} after pretraining. Facts completed correctly (greedy): "
        f"{base['fact_accuracy_init']:.0%} at init, {base['fact_accuracy']:.0%} after.",
        "",
        "## (a) DPO vs DPO+NLL",
        "Chosen and rejected completion log-probs of the training pairs (true vs wrong fact), evaluated during training.",
        "",
        _table(
            ["run", "chosen log-prob start", "chosen log-prob end", "rejected log-prob end"],
            [[name, r["chosen_logp_start"], r["chosen_logp_end"], r["rejected_logp_end"]] for name, r in summary["dpo"].items()],
        ),
        "",
        "![DPO](a_dpo_chosen_logp.png)",
        "",
        "## (b) GRPO on an over-optimizable reward",
        f"Reward = fraction of `{TARGET_CHAR}` characters "
        "in the completion. KL and NLL come from `KLDriftCallback` (exact per-token KL on sampled completions of "
        "fixed task prompts; NLL on held-out corpus text). The runs differ only in these settings (read from each "
        "run's trainer config); with the KL in the reward, `beta` multiplies the KL summed over the completion "
        "(TRL RLOO's convention), in the loss it multiplies the per-token KL.",
        "",
        _table(
            ["run", *GRPO_SETTINGS],  # the config field names
            [[name, *(_setting(r["settings"].get(key)) for key in GRPO_SETTINGS)] for name, r in summary["grpo"].items()],
        ),
        "",
        _table(
            ["run", "reward start", "reward end", "reward, mean of last 10 steps", "KL(pi ‖ pi_0)", "KL(pi_0 ‖ pi)", "held-out NLL", "NLL rise", "distinct-2 start", "distinct-2 end", "a sample"],
            [
                [name, r["reward_start"], r["reward_end"], r["reward_last_10"], r["kl_reverse_end"], r["kl_forward_end"], r["heldout_nll_end"],
                 r["heldout_nll_increase"], r["distinct_2_start"], r["distinct_2_end"], "`" + r["sample"].replace("|", "/").replace("\n", " ") + "`"]
                for name, r in summary["grpo"].items()
            ],
        ),
        "",
        "![GRPO](b_grpo.png)",
        "",
        "## (c) Drift vs forgetting (eq. 15)",
        "Across all runs above: held-out NLL rise = a + b * final E_x[KL(pi_0 || pi)] on task prompts (the forward KL of eq. 15).",
        "",
        _table(["run", "final KL(pi_0 ‖ pi)", "NLL rise"], [[n, k, r] for n, k, r in fit["points"]]),
        "",
        f"Fit: slope b = {fit['slope']:.3f}, intercept a = {fit['intercept']:.3f}, **R^2 = {fit['r2']:.3f}** "
        f"over {len(fit['points'])} runs.",
        "",
        "![fit](c_drift_vs_forgetting.png)",
        "",
        "## (d) Reward model with vs without margins",
        "Held-out pairs: a true description vs one with 1/2/3 wrong facts (slightly better / better / significantly "
        "better). `RM+margin` uses `margin_source=\"label\"`, `margin_label_map=\"llama2_large\"`.",
        "",
        _table(["run", *strengths, "all"], [[name, *[acc[s] for s in strengths], acc["all"]] for name, acc in summary["reward"].items()]),
        "",
        "![RM](d_reward_margins.png)",
        "",
    ]
    if summary["reward_aware"]:
        ra = summary["reward_aware"]
        any_run = next(iter(ra.values()))
        text += [
            "## (e) Reward-aware DPO under label noise",
            f"The fact pairs of (a) with scores: true fact 1, wrong fact -1, plus Gaussian noise (sd {SCORE_NOISE:g}); for "
            f"training, a {LABEL_NOISE:.0%} share of the pairs ({any_run['num_flipped']} of "
            f"{any_run['num_flipped'] + any_run['num_kept']}) has chosen and rejected swapped, their scores going with "
            "their texts. Accuracy = TRL's `rewards/accuracies` (implicit reward of the true fact above the wrong one) "
            "evaluated on the true labels, separately for the swapped and the untouched pairs (0 at step 0, where "
            "policy = reference and a tie counts as wrong). Settings below are each run's config. RPO's loss does not "
            "depend on which completion is labelled chosen, only on the scores; weighted DPO still follows the label, "
            "with weight sigmoid(r_c - r_r), below 1/2 on a swapped pair whose scores rank it correctly.",
            "",
            _table(
                ["run", "reward_aware_loss", "reward_weighting", "beta", "reward_eta", "swapped: accuracy start", "swapped: accuracy end",
                 "swapped: margin end", "untouched: accuracy start", "untouched: accuracy end", "untouched: margin end"],
                [[name, _setting(r["settings"]["reward_aware_loss"]), _setting(r["settings"]["reward_weighting"]),
                  _setting(r["settings"]["beta"]), _setting(r["settings"]["reward_eta"]), r["flipped_accuracy_start"], r["flipped_accuracy_end"], r["flipped_margin_end"],
                  r["kept_accuracy_start"], r["kept_accuracy_end"], r["kept_margin_end"]] for name, r in ra.items()],
            ),
            "",
            "![reward-aware](e_reward_aware.png)",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path
