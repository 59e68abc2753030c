"""Margins m(y_c, y_r) for the margin losses (eq. 9) from annotator ratings, and the registry of margin sources.

Scalar functions applied per row (``datasets.map`` friendly):

* ``rating_margin``: numeric rating delta, ``scale * (chosen - rejected)``.
* ``likert_margin``: Likert ratings on 1..K, delta normalized to [0, 1] by ``K - 1``, times ``scale``.
* ``label_margin``: a preference-strength label mapped to a number (Llama 2, Touvron et al. 2023,
  Table 28: "margin small" {1, 2/3, 1/3, 0} and "margin large" {3, 2, 1, 0}), times ``scale``.

``MARGIN_SOURCES`` maps each ``margin_source`` name to the config fields naming the columns it reads and its
row function ``(row, config) -> margin``; the config validation, the data module and the docs read it.
Adding a source is one decorated function.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

LLAMA2_MARGIN_SMALL: dict[str, float] = {
    "significantly better": 1.0,
    "better": 2.0 / 3.0,
    "slightly better": 1.0 / 3.0,
    "negligibly better / unsure": 0.0,
}
LLAMA2_MARGIN_LARGE: dict[str, float] = {
    "significantly better": 3.0,
    "better": 2.0,
    "slightly better": 1.0,
    "negligibly better / unsure": 0.0,
}


def _finite(value: float, what: str) -> float:
    """``value`` as a float; booleans (read as 0/1, a mislabeled column), None, text and non-finite numbers raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {type(value).__name__} {value!r:.80}")
    return float(value)


def rating_margin(chosen: float, rejected: float, scale: float = 1.0) -> float:
    """``scale * (chosen - rejected)`` for numeric ratings (any scale, any sign)."""
    return scale * (_finite(chosen, "chosen rating") - _finite(rejected, "rejected rating"))


def likert_margin(chosen: int, rejected: int, num_points: int, scale: float = 1.0) -> float:
    """``scale * (chosen - rejected) / (num_points - 1)`` for ratings on a 1..num_points Likert scale."""
    if num_points < 2:
        raise ValueError(f"a Likert scale needs at least 2 points, got {num_points}")
    for name, rating in (("chosen", chosen), ("rejected", rejected)):
        number = _finite(rating, f"{name} Likert rating")
        if number != int(number) or not 1 <= number <= num_points:
            raise ValueError(f"{name} Likert rating {rating!r} is not an integer in 1..{num_points}")
    return scale * (int(chosen) - int(rejected)) / (num_points - 1)


def normalize_label(label: str) -> str:
    """Case- and whitespace-insensitive form of a strength label."""
    return " ".join(str(label).lower().split())


def label_margin(label: str, mapping: Mapping[str, float] = LLAMA2_MARGIN_SMALL, scale: float = 1.0) -> float:
    """Margin of a preference-strength label (case and spacing ignored); unknown labels raise."""
    table = {normalize_label(key): float(value) for key, value in mapping.items()}
    key = normalize_label(label)
    if key not in table:
        raise ValueError(f"Unknown preference-strength label {label!r}. Allowed labels: {sorted(mapping)}.")
    return scale * table[key]


@dataclass(frozen=True)
class MarginSource:
    """A registered ``margin_source``."""

    name: str
    column_fields: tuple[str, ...]
    """Config fields whose values name the dataset columns the source reads."""
    row_margin: Callable[[Mapping, Any], float]
    """``(row, config) -> margin``; raises ValueError/TypeError on a bad row."""

    def columns(self, config) -> list[str]:
        return [getattr(config, name) for name in self.column_fields]


MARGIN_SOURCES: dict[str, MarginSource] = {}
"""Where a margin comes from: a ready column, a rating delta, Likert ratings, or strength labels."""


def register_margin_source(name: str, *column_fields: str):
    """Register ``fn(row, config) -> margin`` as ``margin_source=name``, reading the columns named by ``column_fields``."""

    def decorator(fn: Callable[[Mapping, Any], float]) -> Callable[[Mapping, Any], float]:
        if name in MARGIN_SOURCES:
            raise ValueError(f"margin source {name!r} is already registered")
        MARGIN_SOURCES[name] = MarginSource(name, column_fields, fn)
        return fn

    return decorator


def finite_margin(value) -> float:
    """A ready-made margin value as a float; None, booleans, text and non-finite numbers raise."""
    return _finite(value, "margin")


@register_margin_source("column", "margin_column")
def column_source(row: Mapping, config) -> float:
    return finite_margin(row[config.margin_column])


@register_margin_source("rating", "margin_chosen_rating_field", "margin_rejected_rating_field")
def rating_source(row: Mapping, config) -> float:
    return rating_margin(row[config.margin_chosen_rating_field], row[config.margin_rejected_rating_field], config.margin_scale)


@register_margin_source("likert", "margin_chosen_rating_field", "margin_rejected_rating_field")
def likert_source(row: Mapping, config) -> float:
    chosen, rejected = row[config.margin_chosen_rating_field], row[config.margin_rejected_rating_field]
    return likert_margin(chosen, rejected, config.margin_likert_points, config.margin_scale)


@register_margin_source("label", "margin_label_field")
def label_source(row: Mapping, config) -> float:
    return label_margin(row[config.margin_label_field], config.margin_labels(), config.margin_scale)
