"""The demo's jobs (every panel x run x seed) and the function a worker calls to run one."""

from __future__ import annotations

from pathlib import Path

from examples.demo.jobs import Job

PROXY = "proxy reward model"
MARGIN_RUNS = "RM and RM+margin"
BEST_OF_N = "best-of-n"


def demo_jobs(seeds: int) -> list[Job]:
    """All jobs, in an order that runs each proxy reward model before the policies that need it."""
    from examples.demo.forget import FORGET_VARIANTS
    from examples.demo.overopt import STUDY_VARIANTS
    from examples.demo.runs import DPO_VARIANTS, GRPO_VARIANTS, REWARD_AWARE_VARIANTS

    jobs = []
    for seed in range(seeds):
        proxy = Job("study", PROXY, seed)
        jobs.append(proxy)
        jobs.append(Job("study", BEST_OF_N, seed, needs=(proxy.folder,)))
        jobs += [Job("study", f"{trainer} {name}", seed, {"trainer": trainer, "variant": name}, needs=(proxy.folder,))
                 for trainer, variants in STUDY_VARIANTS.items() for name in variants]
        jobs += [Job("a_dpo", name, seed) for name in DPO_VARIANTS]
        jobs += [Job("b_grpo", name, seed) for name in GRPO_VARIANTS]
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
