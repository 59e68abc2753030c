"""The demo's jobs (every panel x run x seed) and the function a worker calls to run one."""

from __future__ import annotations

from pathlib import Path

from examples.demo.jobs import Job

PROXY = "proxy reward model"
MARGIN_RUNS = "RM and RM+margin"
BEST_OF_N = "best-of-n"

SIZES = ("quick", "default", "full")
"""The demo's sizes (``runs.DemoSize.named``): ``quick`` for CI, ``default`` for one command under 10 minutes on 2
CPU cores, ``full`` for the whole over-optimization study. ``SELECTION`` says which runs each trains."""
SEEDS = {"quick": 2, "default": 3, "full": 3}
"""Seeds each size trains unless ``--seeds`` says otherwise."""
SELECTION = {
    "default": {
        "study": ("GRPO no KL", "GRPO k3 in loss, beta=0.5", "RLOO no KL", "PPO no KL"),
        "b_grpo": ("GRPO beta=0", "GRPO KL in loss", "GRPO KL in reward"),
    },
}
"""Size -> panel -> the runs it trains, where a size trains only some of a panel's runs (every other panel and size:
all of them). The default keeps each trainer's unregularized study run and GRPO's k3 penalty, and panel (b)'s
three placements; ``full`` adds the other regularizers and (b)'s two controls."""


def demo_jobs(size: str, seeds: int) -> list[Job]:
    """The jobs of ``size`` (one of ``SIZES``) for seeds ``0 .. seeds - 1``, in an order that runs each proxy
    reward model before the policies that need it."""
    from examples.demo.forget import FORGET_VARIANTS
    from examples.demo.overopt import STUDY_VARIANTS
    from examples.demo.runs import DPO_VARIANTS, GRPO_VARIANTS, REWARD_AWARE_VARIANTS

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}.")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    selected = SELECTION.get(size, {})

    def chosen(panel: str, names) -> list[str]:
        return [name for name in names if name in selected.get(panel, names)]

    study = {f"{trainer} {name}": {"trainer": trainer, "variant": name} for trainer, variants in STUDY_VARIANTS.items() for name in variants}
    jobs = []
    for seed in range(seeds):
        proxy = Job("study", PROXY, seed)
        jobs.append(proxy)
        jobs.append(Job("study", BEST_OF_N, seed, needs=(proxy.folder,)))
        jobs += [Job("study", run, seed, study[run], needs=(proxy.folder,)) for run in chosen("study", study)]
        jobs += [Job("a_dpo", name, seed) for name in DPO_VARIANTS]
        jobs += [Job("b_grpo", name, seed) for name in chosen("b_grpo", GRPO_VARIANTS)]
        jobs += [Job("d_reward", MARGIN_RUNS, seed)]
        jobs += [Job("e_reward_aware", name, seed) for name in REWARD_AWARE_VARIANTS]
        jobs += [Job("f_forget", name, seed) for name in FORGET_VARIANTS]
    return jobs


def run_job(job: Job, folder: Path, context: dict) -> dict:
    """Train ``job`` into ``folder``; ``context`` holds the model paths and the ``DemoSize`` fields."""
    from examples.demo import bestofn, forget, margins, overopt, runs

    size, base = runs.DemoSize(**context["size"]), context["base"]
    if job.panel == "study":
        if job.name == PROXY:
            return overopt.train_proxy(context["rated_sources"], base, folder, size, job.seed)
        proxy_dir = folder.parents[2] / Job("study", PROXY, job.seed).folder / "model"
        if job.name == BEST_OF_N:
            return bestofn.run_best_of_n(context["start"], base, proxy_dir, size, job.seed)
        return overopt.run_policy(context["start"], base, proxy_dir, folder, size, job.seed, job.options["trainer"], job.options["variant"])
    if job.panel == "d_reward":
        return {"runs": margins.run_margins(base, folder, size, job.seed)}
    run = {"a_dpo": runs.run_dpo, "b_grpo": runs.run_grpo, "e_reward_aware": runs.run_reward_aware, "f_forget": forget.run_forget}[job.panel]
    return run(base, folder, size, job.seed, job.name)
