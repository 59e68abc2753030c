"""``python -m examples.demo``: run the over-optimization study and panels (a)-(f) over several seeds, and
write the report folder."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from examples.demo.plan import SEEDS, SIZES


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--out", default="reports/demo", help="Report folder (created). Its runs are reused when their settings and code match.")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size", choices=SIZES, default="default",
                       help="default: every panel, the study's unregularized runs and GRPO's k3 penalty (under 10 minutes on 2 CPU cores); "
                       "full: every regularizer of the study, 256 steps each, and a proxy trained on 8192 comparisons of the start policy's samples (about an hour there; the README has the measured times); quick: CI-sized runs (a few steps each, 2 seeds).")
    sizes.add_argument("--quick", dest="size", action="store_const", const="quick", help="Same as --size quick.")
    sizes.add_argument("--full", dest="size", action="store_const", const="full", help="Same as --size full.")
    parser.add_argument("--study-steps", type=int,
                        help="Train the study's policy runs this many steps instead of the size's (full 256, default 16), probed about 12 "
                        "times (docs/overoptimization.md).")
    parser.add_argument("--seeds", type=int, help=f"Seeds per run (default: {', '.join(f'{k} {v}' for k, v in SEEDS.items())}). Adding seeds reuses the runs of the others.")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="Runs trained at once, one process each (default: 2, or 1 on one core).")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads per run (default 1: the tiny model's ops are too small to split, and on a loaded 2-core "
        "machine two threads made the GRPO runs several times slower). The numbers can differ slightly with it.",
    )
    parser.add_argument("--fresh", action="store_true", help="Retrain every run instead of reusing the ones saved in --out.")
    args = parser.parse_args(argv)
    seeds = SEEDS[args.size] if args.seeds is None else args.seeds
    for name, value in (("workers", args.workers), ("threads", args.threads), ("seeds", seeds), ("study-steps", 1 if args.study_steps is None else args.study_steps)):
        if value < 1:
            parser.error(f"--{name} must be >= 1, got {value}.")

    from examples.demo.jobs import quiet_process, run_jobs
    from examples.demo.overopt import START_CHECKPOINT
    from examples.demo.plan import demo_jobs, run_job
    from examples.demo.pretrain import PretrainSettings, base_model_path
    from examples.demo.report import results_table, write_report
    from examples.demo.runs import DemoSize

    import torch

    threads = torch.get_num_threads()
    with warnings.catch_warnings():  # quiet_process filters warnings: restore the caller's filters after
        quiet_process(args.threads)
        try:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            size = DemoSize.named(args.size)
            if args.study_steps is not None:
                size = size.with_study_steps(args.study_steps)
            started = time.time()
            checkpoint = {steps: base_model_path(PretrainSettings(steps=steps)) for steps in {*size.rated_checkpoints, START_CHECKPOINT}}
            base = base_model_path()
            context = {"size": asdict(size), "base": base, "start": checkpoint[START_CHECKPOINT],
                       "rated_sources": [checkpoint[steps] for steps in size.rated_checkpoints]}
            records = run_jobs(demo_jobs(args.size, seeds), run_job, out, context, workers=args.workers, threads=args.threads, fresh=args.fresh)
            report, summary = write_report(out, records, base, args.size, time.time() - started)
            print(results_table(summary), flush=True)
            print(f"[demo] report: {report}  ({time.time() - started:.0f} s)", flush=True)
        finally:
            torch.set_num_threads(threads)  # main() is also called in-process (tests)
    return report


if __name__ == "__main__":
    main()
