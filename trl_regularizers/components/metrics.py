"""What a component logs through: the trainer's own metric lists, behind a small interface its adapter implements."""

from __future__ import annotations

from typing import Protocol

import torch


class MetricSink(Protocol):
    """Metrics go where the TRL trainer keeps its own, averaged and logged with them (docs/trl_internals.md §1.2)."""

    @property
    def training(self) -> bool:
        """True in a training step, False in evaluation."""

    def log_mean(self, name: str, value: torch.Tensor | float) -> float:
        """Log the mean of ``value`` over all processes and return it. Collective: every rank calls it."""

    def log_value(self, name: str, value: float) -> None:
        """Log a value that is already the same on every process."""

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over all processes. Collective."""
