"""The GPU figures in one device call: install the carried wheels, then five figures, each under its own time cap.

    python3 benchmarks/gpu_check.py                      # on the device: writes into $OUT
    python benchmarks/gpu_check.py --dry-run --out DIR   # anywhere: every step on tiny shapes on the CPU (CI's test)

Steps, in order (``STEPS``): install ``.whl/*.whl`` into ``/tmp/site`` (skipped in a dry run: nothing to install
there); ``gpu_wheels.py --verify`` (installed versions vs. the requirements); then the figures, each a process of
``full_kl_bench.py`` or ``trainer_bench.py`` writing one JSON into the output folder:

1. ``1_full_kl.json``: the Triton full-KL kernel, forward and forward+backward at 8 x 1024 x 151,936 bf16, dense and
   with masked entries, against the memory-bandwidth floor;
2. ``2_hidden_kl.json``: the hidden-state exact KL at 32,768 positions x 151,936 (value + gradients) against the
   LM-head compute floor, and its extra memory;
3. ``3_dpo_nll.json``: DPO+NLL vs stock DPO, step time and peak memory (Qwen2-0.5B shapes, random init), 5 rounds;
4. ``4_ptx.json``: DPO with ptx vs stock DPO, the added cost over the ptx batch's own forward+backward, and the
   memory of the chunked NLL vs the logits path;
5. ``5_grpo_full.json``: GRPO with the exact KL in the loss and in the reward vs stock GRPO (one shared stock side),
   generation included.

``--only 3_dpo_nll,5_grpo_full`` reruns some figures (after install and verify) in the sum of their plans.

Time: the whole run ends within ``--budget-s`` (480 s for every step). Each step has a planned cap (``plan_s``, summing to the
budget); a step may use what earlier steps left unused, never what later steps plan. A step still running at its cap
is killed (its process group); the trainer figures get ``--budget-s`` = their cap minus ``TRAINER_MARGIN_S`` and so
cut themselves to fewer rounds rather than be killed. Every figure rewrites its JSON as it goes, so a kill still
leaves what was done. Output: the five JSONs, ``summary.json`` (each step's status and the headline figures
against their targets, rewritten after every step) and ``gpu_check.log`` (everything the steps printed): 7 files,
no folders. The table of headline figures is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench_common import utc_now, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
SITE = "/tmp/site"
"""Where the carried wheels are installed on the device (its notes' recipe)."""
TRAINER_MARGIN_S = 25
"""Seconds of a trainer figure's cap kept from its round budget: the imports before the budget starts counting, a
round slower than the slowest before it, and writing the report."""
KILL_GRACE_S = 5


@dataclass
class Headline:
    """One figure judged against its target: the value (and its interval) at a path into the figure's JSON."""

    label: str
    path: tuple
    target: float | None  # None: reported, no target
    interval: tuple | None = None  # path of a [low, high] 95% interval of the value
    note: str = ""


@dataclass
class Step:
    name: str  # also the JSON's name: letters, digits, '_' only
    title: str
    plan_s: float
    script: str | None  # in benchmarks/; None: the install step
    device_args: list[str] = field(default_factory=list)
    dry_args: list[str] = field(default_factory=list)
    figure: bool = False  # writes <name>.json (gets --json)
    trainer: bool = False  # trainer_bench.py: also gets --model-dir and --budget-s
    headlines: list[Headline] = field(default_factory=list)


def _kernel_headlines(case: str) -> list[Headline]:
    return [
        Headline(f"kernel fwd, {case} (ms)", (case, "fwd", "ms"), 3.5, (case, "fwd", "ci95"), "issue 7's H100 target; floor: floor_fwd_ms"),
        Headline(f"kernel fwd / bandwidth floor, {case}", (case, "fwd_over_floor"), None),
        Headline(f"kernel fwd+bwd, {case} (ms)", (case, "fwd_bwd", "ms"), 8.0, (case, "fwd_bwd", "ci95"), "issue 7's H100 target"),
        Headline(f"kernel fwd+bwd / bandwidth floor, {case}", (case, "fwd_bwd_over_floor"), None),
        Headline(f"kernel fwd+bwd extra memory, {case} (GiB)", (case, "fwd_bwd_extra_GiB"), 0.1),
    ]


HIDDEN = "from_hidden (default chunk)"
STEPS = [
    Step("install", "install the carried wheels", 25, None),
    Step("verify", "installed versions vs requirements", 15, "gpu_wheels.py", ["--verify"], ["--verify"]),
    Step("1_full_kl", "Triton full-KL kernel, 8 x 1024 x 151,936 bf16", 40, "full_kl_bench.py",
         ["--figure", "kernel"], ["--profile", "dry", "--figure", "kernel"], figure=True,
         headlines=[*_kernel_headlines("dense"), *_kernel_headlines("masked")]),
    Step("2_hidden_kl", "hidden-state exact KL, 32,768 x 896 x 151,936", 40, "full_kl_bench.py",
         ["--figure", "hidden"], ["--profile", "dry", "--figure", "hidden"], figure=True,
         headlines=[Headline("hidden KL time / LM-head floor", (HIDDEN, "over_floor"), 1.3, (HIDDEN, "over_floor_ci95"), "floor: 8 N H V FLOPs at the measured bf16 rate"),
                    Headline("hidden KL time / the 4 LM-head products timed", (HIDDEN, "over_products"), None),
                    Headline("hidden KL extra memory (GiB)", (HIDDEN, "extra_GiB"), 0.5)]),
    Step("3_dpo_nll", "DPO+NLL vs stock DPO (Qwen2-0.5B shapes)", 125, "trainer_bench.py",
         ["--profile", "h100", "--specs", "dpo_nll", "--rounds", "5", "--steps", "16", "--warmup", "4"],
         ["--profile", "dry", "--specs", "dpo_nll"], figure=True, trainer=True,
         headlines=[Headline("DPO+NLL rounds done (of 5)", ("rounds_done", "dpo_nll"), None),
                    Headline("DPO+NLL / stock DPO, step time", ("results", "dpo_nll", "time_ratio_per_round", "median"), 1.02,
                             ("results", "dpo_nll", "time_ratio_per_round", "ci95")),
                    Headline("DPO+NLL / stock DPO, peak memory", ("results", "dpo_nll", "memory_ratio_per_round", "median"), 1.01,
                             ("results", "dpo_nll", "memory_ratio_per_round", "ci95"))]),
    Step("4_ptx", "DPO + ptx vs stock DPO, ptx batch alone", 120, "trainer_bench.py",
         ["--profile", "h100", "--specs", "dpo_ptx", "--rounds", "5", "--steps", "16", "--warmup", "4"],
         ["--profile", "dry", "--specs", "dpo_ptx"], figure=True, trainer=True,
         headlines=[Headline("ptx rounds done (of 5)", ("rounds_done", "dpo_ptx"), None),
                    Headline("ptx added step time / its own fwd+bwd", ("results", "dpo_ptx", "ptx_cost_ratio_per_round", "median"), 1.05,
                             ("results", "dpo_ptx", "ptx_cost_ratio_per_round", "ci95"), "own fwd+bwd: the logits path, ptx_alone.logits"),
                    Headline("ptx fwd+bwd memory, chunked / logits", ("ptx_alone", "chunked_over_logits_memory"), None),
                    Headline("DPO + ptx / stock DPO, peak memory", ("results", "dpo_ptx", "memory_ratio_per_round", "median"), None,
                             ("results", "dpo_ptx", "memory_ratio_per_round", "ci95"))]),
    Step("5_grpo_full", "GRPO, exact KL in the loss and in the reward, vs stock GRPO", 115, "trainer_bench.py",
         ["--profile", "h100", "--specs", "grpo_full,grpo_full_reward", "--share-stock", "--rounds", "5", "--steps", "5",
          "--warmup", "1", "--completion-len", "64"],
         ["--profile", "dry", "--specs", "grpo_full,grpo_full_reward", "--share-stock"], figure=True, trainer=True,
         headlines=[Headline("GRPO rounds done (of 5)", ("rounds_done", "grpo_full,grpo_full_reward"), None),
                    *(Headline(f"GRPO {where} / stock GRPO, step time", ("results", spec, "time_ratio_per_round", "median"), 1.10,
                               ("results", spec, "time_ratio_per_round", "ci95")) for where, spec in
                      (("full KL in the loss", "grpo_full"), ("full KL in the reward", "grpo_full_reward")))]),
]


def lookup(report: dict | None, path: tuple | None):
    """``report[path[0]][path[1]]...``, or None where the path is None or leads nowhere."""
    if path is None:
        return None
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def verdict(value, interval, target) -> str:
    """met / missed by the whole 95% interval, or by the median only when the interval straddles the target."""
    if value is None:
        return "not measured"
    if target is None:
        return ""
    if interval:
        low, high = interval
        if high <= target:
            return "met"
        if low > target:
            return "missed"
        return f"median {'met' if value <= target else 'missed'}, interval straddles"
    return "met" if value <= target else "missed"


def read_figure(out: str, step: Step) -> dict | None:
    """The step's JSON in ``out``, None if it wrote none."""
    path = os.path.join(out, f"{step.name}.json")
    if not (step.figure and os.path.exists(path)):
        return None
    with open(path) as f:
        return json.load(f)


def headline_rows(steps: list[Step], out: str) -> list[dict]:
    rows = []
    for step in steps:
        report = read_figure(out, step)
        for h in step.headlines:
            value, interval = lookup(report, h.path), lookup(report, h.interval)
            rows.append({"figure": step.name, "label": h.label, "value": value, "ci95": interval, "target": h.target,
                         "verdict": verdict(value, interval, h.target), "note": h.note,
                         "device": lookup(report, ("device",)), "date": lookup(report, ("date",))})
    return rows


def format_table(rows: list[dict]) -> str:
    def number(x):
        return "-" if x is None else f"{x:.4g}"

    lines = ["| figure | value | 95% interval | target | verdict |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        interval = "-" if not row["ci95"] else f"[{number(row['ci95'][0])}, {number(row['ci95'][1])}]"
        target = "-" if row["target"] is None else f"<= {row['target']:g}"
        lines.append(f"| {row['label']} | {number(row['value'])} | {interval} | {target} | {row['verdict']} |")
    return "\n".join(lines)


def run_capped(command: list[str], cap_s: float, log, env: dict) -> tuple[int | None, float]:
    """Run ``command`` in its own process group with output to ``log``; kill the group at ``cap_s``.
    Returns (exit code or None when killed, seconds)."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        code = process.wait(timeout=max(cap_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        code = None
    return code, time.monotonic() - start


def tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class Driver:
    def __init__(self, steps: list[Step], out: str, budget_s: float, dry_run: bool, python: str = sys.executable):
        self.steps, self.out, self.budget_s, self.dry_run, self.python = steps, out, budget_s, dry_run, python
        self.start = time.monotonic()
        self.log_path = os.path.join(out, "gpu_check.log")
        self.summary = {"date": utc_now(), "dry_run": dry_run, "budget_s": budget_s, "steps": {}, "headlines": []}

    def say(self, text: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def cap(self, index: int) -> float:
        """What is left of the budget minus what the later steps plan."""
        left = self.budget_s - (time.monotonic() - self.start)
        return left - sum(step.plan_s for step in self.steps[index + 1 :])

    def environment(self, site: str | None) -> dict:
        paths = [p for p in (site, REPO, os.environ.get("PYTHONPATH")) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", TRL_EXPERIMENTAL_SILENCE="1",
                   HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        if self.dry_run:
            # Tiny shapes on the CPU, also on a machine with a GPU; one thread: on a shared CPU, threads that wait for
            # each other made tiny products 100x slower.
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        return env

    def command(self, step: Step, cap_s: float, scratch: str) -> list[str] | None:
        if step.script is None:  # install
            wheels = sorted(os.path.join(REPO, ".whl", n) for n in os.listdir(os.path.join(REPO, ".whl"))
                            if n.endswith(".whl")) if os.path.isdir(os.path.join(REPO, ".whl")) else []
            if self.dry_run or not wheels:
                self.say(f"install: skipped ({'dry run: nothing is installed' if self.dry_run else 'no wheels in .whl/'}; "
                         f"{len(wheels)} wheels found)")
                return None
            return [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--upgrade", "--target", SITE, *wheels]
        args = list(step.dry_args if self.dry_run else step.device_args)
        if step.name == "verify" and self.dry_run:
            args += ["--dest", os.path.join(scratch, "no-wheels")]  # nothing was installed: the package's requirements only
        if step.figure:
            args += ["--json", os.path.join(self.out, f"{step.name}.json")]
        if step.trainer:
            args += ["--model-dir", os.path.join(scratch, "model"), "--budget-s", f"{max(cap_s - TRAINER_MARGIN_S, 1):.0f}"]
        return [self.python, os.path.join(BENCH, step.script), *args]

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = time.monotonic() - self.start
        self.summary["headlines"] = headline_rows(self.steps, self.out)
        write_json(os.path.join(self.out, "summary.json"), self.summary)

    def run(self) -> dict:
        self.say(f"{'dry run' if self.dry_run else 'device run'}: {len(self.steps)} steps in {self.budget_s:.0f} s, output in {self.out}")
        if shutil.which("nvidia-smi") and not self.dry_run:
            with open(self.log_path, "a") as log:
                run_capped(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total,temperature.gpu,power.draw",
                            "--format=csv"], 15, log, dict(os.environ))
            self.say("GPU: " + tail(self.log_path, 1).strip())
        site = None
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            for index, step in enumerate(self.steps):
                cap_s = self.cap(index)
                command = self.command(step, cap_s, scratch)
                if command is None:
                    self.summary["steps"][step.name] = {"status": "skipped"}
                    self.write_summary()
                    continue
                if cap_s < 1:
                    self.say(f"{step.name}: not started, no time left")
                    self.summary["steps"][step.name] = {"status": "no time left"}
                    self.write_summary()
                    continue
                self.say(f"{step.name}: {step.title} (cap {cap_s:.0f} s)")
                with open(self.log_path, "a") as log:
                    log.write("$ " + " ".join(command) + "\n")
                    log.flush()
                    code, seconds = run_capped(command, cap_s, log, self.environment(site))
                status = "ok" if code == 0 else ("killed at its cap" if code is None else f"failed (exit {code})")
                if step.script is None and code == 0:
                    site = SITE
                self.summary["steps"][step.name] = {"status": status, "seconds": round(seconds, 1), "cap_s": round(cap_s)}
                self.say(f"{step.name}: {status} in {seconds:.0f} s")
                note = lookup(read_figure(self.out, step), ("note",))
                if note:
                    self.say(f"{step.name}: {note}")
                if code != 0:
                    print(tail(self.log_path), flush=True)
                self.write_summary()
        self.say(f"done in {time.monotonic() - self.start:.0f} s")
        table = format_table(self.summary["headlines"])
        if self.dry_run:
            table = "dry run: tiny shapes on the CPU; these numbers test the script, not the package\n" + table
        with open(self.log_path, "a") as log:
            log.write(table + "\n")
        print(table, flush=True)
        return self.summary


def select(steps: list[Step], only: str | None) -> list[Step]:
    """The steps to run: all, or install, verify and the figures named in ``only`` (comma-separated)."""
    if not only:
        return steps
    names = only.split(",")
    figures = [step.name for step in steps if step.figure]
    unknown = [name for name in names if name not in figures]
    if unknown:
        raise ValueError(f"--only names {unknown}, not figures; valid: {', '.join(figures)}")
    return [step for step in steps if not step.figure or step.name in names]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no install")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--only", default=None, help="comma-separated figures to run (after install and verify), e.g. a rerun of 3_dpo_nll")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run's time, the install included (default: the steps' plans, 480 s for all)")
    args = parser.parse_args()
    if not args.out:
        parser.error("no output folder: pass --out or set OUT")
    try:
        steps = select(STEPS, args.only)
    except ValueError as error:
        parser.error(str(error))
    planned = sum(step.plan_s for step in steps)
    budget = planned if args.budget_s is None else args.budget_s
    if not (math.isfinite(budget) and budget >= planned):
        parser.error(f"--budget-s {args.budget_s} must be a finite number of seconds >= the steps' planned {planned:.0f}")
    os.makedirs(args.out, exist_ok=True)
    summary = Driver(steps, args.out, budget, args.dry_run).run()
    failed = [name for name, step in summary["steps"].items() if step["status"] not in ("ok", "skipped")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
