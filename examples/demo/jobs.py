"""Run the demo's training runs: one ``Job`` per (panel, run, seed), cached by its settings, on a process pool.

A job's record is saved to ``<out>/<panel>/<run>/seed<k>/run.json`` with the ``key`` of everything that
determined it (panel, run, seed, options, the demo size and model paths, the package's source); a later demo
with the same key reuses it instead of training again. Jobs whose ``needs`` (e.g. the seed's proxy reward
model) are not done yet wait for them. The console shows one bar for all jobs and one per running job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

_SLOT = 0
"""This process's bar row (the worker's index + 1; 1 in the main process)."""


@dataclass(frozen=True)
class Job:
    panel: str
    name: str
    seed: int
    options: dict = field(default_factory=dict, compare=False, hash=False)
    needs: tuple[str, ...] = ()
    """Folders (``Job.folder``) of the jobs that must finish first."""

    @property
    def folder(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.+=-]+", "_", self.name).strip("_")
        return f"{self.panel}/{slug}/seed{self.seed}"

    def key(self, context: dict) -> str:
        fields = {"panel": self.panel, "name": self.name, "seed": self.seed, "options": self.options, "context": context, "code": source_fingerprint()}
        return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint() -> str:
    """Hash of the library's and the demo's Python sources: a cached run is reused only by the code that made it."""
    import trl_regularizers

    digest = hashlib.sha1()
    for root in (Path(trl_regularizers.__file__).resolve().parent, Path(__file__).resolve().parent):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def quiet_trainer(trainer, description: str):
    """Swap the Trainer's printed log dictionaries (and its own bar) for one bar named ``description``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class RunBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=description, position=_SLOT, leave=False, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RunBar())
    return trainer


def _init_worker(threads: int, slots) -> None:
    global _SLOT
    _SLOT = slots.get() + 1
    quiet_process(threads)


def quiet_process(threads: int) -> None:
    """Offline, ``threads`` torch threads, no library progress bars or deprecation chatter."""
    import warnings

    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _execute(runner: Callable[[Job, Path, dict], dict], job: Job, out: Path, context: dict, key: str) -> dict:
    import torch

    torch.manual_seed(job.seed)
    started = time.time()
    record = runner(job, out / job.folder, context)
    record.update(key=key, seconds=time.time() - started, panel=job.panel, name=job.name, seed=job.seed)
    (out / job.folder).mkdir(parents=True, exist_ok=True)
    (out / job.folder / "run.json").write_text(json.dumps(record, indent=1))
    return record


def cached_record(job: Job, out: Path, key: str) -> dict | None:
    path = out / job.folder / "run.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key:
            return record
    return None


def run_jobs(jobs: list[Job], runner: Callable[[Job, Path, dict], dict], out: Path, context: dict, workers: int = 1,
             threads: int = 1, fresh: bool = False) -> dict[str, dict]:
    """Records by ``Job.folder`` of every job, from the cache or from ``runner(job, folder, context)`` (a
    module-level function, so that worker processes can import it)."""
    folders = [job.folder for job in jobs]
    if len(set(folders)) != len(folders):
        raise ValueError("two demo jobs share a folder: give them distinct names.")
    unknown = {need for job in jobs for need in job.needs} - set(folders)
    if unknown:
        raise ValueError(f"demo jobs need unknown jobs: {sorted(unknown)}")
    records: dict[str, dict] = {}
    keys = {job.folder: job.key(context) for job in jobs}
    for job in jobs:
        cached = None if fresh else cached_record(job, out, keys[job.folder])
        if cached is not None:
            records[job.folder] = cached
    pending = [job for job in jobs if job.folder not in records]
    overall = tqdm(total=len(jobs), initial=len(records), desc="demo runs", position=0, dynamic_ncols=True)
    if workers <= 1 or len(pending) <= 1:
        for job in pending:  # listed in dependency order
            records[job.folder] = _execute(runner, job, out, context, keys[job.folder])
            overall.update()
    else:
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        slots = spawn.Queue()
        for slot in range(workers):
            slots.put(slot)
        with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=(threads, slots)) as pool:
            running: dict = {}
            while pending or running:
                for job in [j for j in pending if all(need in records for need in j.needs)]:
                    pending.remove(job)
                    running[pool.submit(_execute, runner, job, out, context, keys[job.folder])] = job
                if not running:
                    raise RuntimeError(f"demo jobs wait on each other: {[j.folder for j in pending]}")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    records[running.pop(future).folder] = future.result()
                    overall.update()
    overall.close()
    return records
