"""Per-pair margin column for preference datasets, derived from ratings (eq. 9), shared by DPO and Reward.

    dataset = add_margin_column(dataset, config)   # config: any MarginArguments (RegularizedDPOConfig, ...)

adds a float ``margin`` column (the name TRL's RewardTrainer reads) according to ``config.margin_source``:
each source of the ``trl_regularizers.core.margins.MARGIN_SOURCES`` registry names its columns and its row
function. Every row is checked (a missing or non-finite margin is an error naming
the row, never a silently dropped term). Missing columns are an error naming them and listing the dataset's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from trl_regularizers.arguments import MarginArguments
from trl_regularizers.core.margins import MARGIN_SOURCES, finite_margin, normalize_label

MARGIN = "margin"


def column_names(dataset) -> list[str]:
    """Columns of a ``Dataset`` or ``IterableDataset`` (the first example's keys when the schema is unknown)."""
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else list(next(iter(dataset)).keys())


def _checked_rows(dataset, row_margin: Callable[[dict], float], dataset_name: str):
    def add_margin(row, index):
        try:
            return {MARGIN: row_margin(row)}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{dataset_name} dataset, row {index}: {err}") from None

    return dataset.map(add_margin, with_indices=True)


def check_margin_column(dataset, dataset_name: str = "train"):
    """Check that every row of an existing ``margin`` column is a finite number (TRL would train on NaN or
    fail mid-run on None). Returns the dataset (re-mapped lazily for an ``IterableDataset``)."""
    if getattr(dataset, "column_names", None) is None:
        return _checked_rows(dataset, lambda row: finite_margin(row[MARGIN]), dataset_name)
    for index, value in enumerate(dataset[MARGIN]):
        try:
            finite_margin(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{dataset_name} dataset, row {index}: {err}") from None
    return dataset


def add_margin_column(dataset, args: MarginArguments, dataset_name: str = "train"):
    """Return ``dataset`` with a float ``margin`` column derived as ``args.margin_source`` says.

    ``margin_source=None`` returns the dataset unchanged. An existing ``margin`` column is replaced by the
    derived one. For an ``IterableDataset`` the rows are checked as they stream.

    Raises:
        ValueError: a column the source needs is missing (the message lists the dataset's columns), or a row
            has a missing, non-finite or out-of-range rating/label (the message names the row).
    """
    if args.margin_source is None:
        return dataset
    available = column_names(dataset)
    source = MARGIN_SOURCES[args.margin_source]
    missing = [name for name in source.columns(args) if name not in available]
    if missing:
        raise ValueError(
            f"margin_source={args.margin_source!r} needs the column(s) {missing} in the {dataset_name} dataset, "
            f"which has the columns {available}. Set {' / '.join(source.column_fields)} to the right column name."
        )
    return _checked_rows(dataset, lambda row: source.row_margin(row, args), dataset_name)


def _score(value, column: str) -> float:
    """A reward score as a float; None, text, booleans and non-finite numbers raise naming ``column``."""
    if value is None or isinstance(value, (str, bytes, bool)):
        raise ValueError(f"column {column!r} must hold a finite number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"column {column!r} must hold a finite number, got {value!r:.80}") from None
    if not math.isfinite(number):
        raise ValueError(f"column {column!r} must hold a finite number, got {value!r}")
    return number


def check_score_columns(dataset, chosen_field: str, rejected_field: str, dataset_name: str = "train"):
    """Check, before training, that the two reward-score columns exist and hold a finite number in every row.

    Returns the dataset (for an ``IterableDataset``, re-mapped so that rows are checked as they stream).

    Raises:
        ValueError: a column is missing (the message lists the dataset's columns and the config fields naming
            them), or a row holds a missing, NaN, infinite or non-numeric score (the message names row and column).
    """
    available = column_names(dataset)
    missing = [name for name in (chosen_field, rejected_field) if name not in available]
    if missing:
        raise ValueError(
            f"reward_aware_loss needs the score column(s) {missing} in the {dataset_name} dataset, which has the columns "
            f"{available}. Set reward_chosen_score_field / reward_rejected_score_field to the right names, or pass "
            "reward_model= to the trainer to score the pairs."
        )

    def check(row, index):
        try:
            return {name: _score(row[name], name) for name in (chosen_field, rejected_field)}
        except ValueError as err:
            raise ValueError(f"{dataset_name} dataset, row {index}: {err}") from None

    if getattr(dataset, "column_names", None) is None:
        return dataset.map(check, with_indices=True)
    for name in (chosen_field, rejected_field):
        for index, value in enumerate(dataset[name]):
            try:
                _score(value, name)
            except ValueError as err:
                raise ValueError(f"{dataset_name} dataset, row {index}: {err}") from None
    return dataset


def margin_bucket_namer(args: MarginArguments) -> Callable[[float], str]:
    """Name of the accuracy bucket of a margin value: the value rounded to 2 decimals (``"0.33"``), or, with
    ``margin_source="label"``, the label(s) mapping to it (``"slightly_better"``)."""
    by_value: dict[float, list[str]] = {}
    if args.margin_source == "label":
        for label, value in args.margin_labels().items():
            slug = re.sub(r"[^0-9a-z]+", "_", normalize_label(label)).strip("_")
            by_value.setdefault(round(args.margin_scale * value, 6), []).append(slug)

    def name(value: float) -> str:
        labels = by_value.get(round(value, 6))
        return "|".join(labels) if labels else format(round(value, 2) + 0.0, "g")

    return name


DATASET_FORMATS: dict[str, list[tuple[str, ...]]] = {
    "preference": [("chosen", "rejected")],  # text pairs; DPO extracts a missing prompt from them
    "reward": [("chosen", "rejected"), ("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")],
    "prompt": [("prompt",)],
    "language_modeling": [("text",), ("messages",), ("conversations",), ("prompt", "completion"), ("input_ids",)],
}
"""Column sets a kind of dataset must hold one of (``*_input_ids`` is TRL's legacy tokenized name; ``conversations``
holds ShareGPT-style ``{"from", "value"}`` messages, which SFT converts to ``{"role", "content"}``)."""


def check_dataset(dataset, formats: list[tuple[str, ...]], dataset_name: str, trainer_name: str) -> None:
    """Refuse, before training, a dataset the trainer cannot use, with one error naming what is wrong.

    ``formats``: the column sets the trainer reads (``DATASET_FORMATS[kind]``, adapted by the trainer's options);
    the dataset must hold one of them. Map-style datasets must not be empty, and their text columns (those not
    ending in ``_ids``) must hold, in every row, a string (JSON-encoded messages included) or a list of chat
    messages: dicts with a ``role`` (or ShareGPT's ``from``). Anything else a message holds (``tool_calls``,
    ``reasoning_content``, multimodal content parts, no ``content`` at all) is the chat template's business.
    """
    if dataset is None:
        return
    if isinstance(dataset, dict):  # TRL accepts a dict of eval datasets
        for name, part in dataset.items():
            check_dataset(part, formats, f"{dataset_name} ({name})", trainer_name)
        return
    sized = hasattr(dataset, "__len__")
    if (len(dataset) == 0) if sized else next(iter(dataset), None) is None:
        raise ValueError(f"The {dataset_name} dataset given to {trainer_name} is empty: it would train on nothing.")
    available = column_names(dataset)
    matching = [columns for columns in formats if all(name in available for name in columns)]
    if not matching:
        wanted = " or ".join("(" + ", ".join(map(repr, columns)) + ")" for columns in formats)
        raise ValueError(f"{trainer_name} needs the columns {wanted} in the {dataset_name} dataset, which has the columns {available}.")
    if not sized:
        return  # an IterableDataset is checked by TRL as it streams
    for column in (name for name in matching[0] if not name.endswith("_ids")):
        for index, value in enumerate(dataset[column]):
            if not _is_text(value):
                raise ValueError(
                    f"{dataset_name} dataset, row {index}, column {column!r}: {trainer_name} needs text (a string or a "
                    f"list of chat messages, each a dict with a 'role'), got {type(value).__name__} {value!r:.80}."
                )


def _is_text(value) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(
        isinstance(message, dict) and (message.get("role") or message.get("from")) is not None for message in value
    )


def mean_abs_score_gap(dataset, chosen: str, rejected: str, dataset_name: str = "train") -> float:
    """Mean ``|r_c - r_r|`` over the pairs of a map-style dataset (weighted DPO's ``"abs_normalized"`` normalizer)."""
    if not hasattr(dataset, "__len__") or getattr(dataset, "column_names", None) is None:
        raise ValueError("reward_weighting='abs_normalized' needs a map-style training dataset to average |r_c - r_r| over; "
                         "use reward_weighting='abs' or 'sigmoid' with an IterableDataset.")
    gaps = [abs(float(c) - float(r)) for c, r in zip(dataset[chosen], dataset[rejected])]
    scale = sum(gaps) / len(gaps)
    if not scale > 0:
        raise ValueError(f"reward_weighting='abs_normalized': every pair of the {dataset_name} dataset has equal scores, "
                         "so every weight would be 0/0. Check the score columns.")
    return scale
