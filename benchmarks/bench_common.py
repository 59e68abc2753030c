"""Helpers shared by the benchmark scripts (standard library only): intervals, deadlines, partial JSON files."""

from __future__ import annotations

import json
import os
import random
import statistics
import time


def spread(values: list[float], resamples: int = 2000) -> dict:
    """Median of ``values`` and a 95% bootstrap interval of that median (``values``: one number per round or call)."""
    if not values:
        raise ValueError("spread() needs at least one value")
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return {"median": statistics.median(values), "ci95": [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]],
            "values": list(values)}


class Deadline:
    """Seconds left of a budget that starts now; ``fits(seconds)``: whether that much work still ends within it."""

    def __init__(self, budget_s: float | None):
        if budget_s is not None and not (budget_s > 0 and budget_s < float("inf")):
            raise ValueError(f"budget_s must be a finite number of seconds > 0, got {budget_s!r}")
        self.budget_s = budget_s
        self.start = time.monotonic()

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (time.monotonic() - self.start)

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()


def write_json(path: str | None, report: dict) -> None:
    """Write ``report`` to ``path`` (if given) through a temporary file, so that a kill leaves the last full version."""
    if not path:
        return
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(partial, path)


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
