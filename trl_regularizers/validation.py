"""One validation system for every ``Regularized*Config``: field rules declared beside the fields, checked in one place.

Each argument group (``configs.PtxArguments``, ...) declares ``RULES``, a class-level mapping from field name to
a rule below, and may define ``cross_check(self)`` for rules that read several fields. ``ValidatedConfig``, mixed in
first, runs in ``__post_init__``: every float finite, TRL's own ``__post_init__``, then every ``RULES`` entry and
every ``cross_check`` found along the class's MRO. A rule raises ``ValueError`` naming the field, the value found
and what is allowed. Choices read their registry when they run, so a name registered later is accepted (and
``RegistryChoices`` gives the command line the same live list).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import Any


class Rule:
    """A check of one field's value; ``allow_none`` lets ``None`` pass (the command line spells it ``"None"``)."""

    allow_none: bool = False

    def __call__(self, name: str, value: Any) -> None:
        if value is None and self.allow_none:
            return
        if not self.holds(value):
            raise ValueError(f"{name} {self.allowed(value)}, got {value!r}.")

    def holds(self, value: Any) -> bool:
        raise NotImplementedError

    def allowed(self, value: Any) -> str:
        raise NotImplementedError


class Choice(Rule):
    """One of the names ``names()`` returns (a registry read at check time)."""

    def __init__(self, names: Callable[[], Iterable[str]] | Iterable[str], allow_none: bool = False):
        self.names = names if callable(names) else (lambda: tuple(names))
        self.allow_none = allow_none

    def holds(self, value: Any) -> bool:
        return value in tuple(self.names())

    def __call__(self, name: str, value: Any) -> None:
        if value is None and self.allow_none:
            return
        if not self.holds(value):
            allowed = [*(["None"] if self.allow_none else []), *map(str, self.names())]
            raise ValueError(f"{name}={value!r} is not valid. Allowed values: {', '.join(allowed)}.")


class Bound(Rule):
    """A real number (not a bool) within ``[low, high]``; ``open_low`` makes it ``(low, high]``."""

    def __init__(self, low: float, high: float = math.inf, open_low: bool = False, allow_none: bool = False):
        self.low, self.high, self.open_low, self.allow_none = low, high, open_low, allow_none

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def allowed(self, value: Any) -> str:
        low = f"> {self.low:g}" if self.open_low else f">= {self.low:g}"
        text = f"must be {low}" if self.high == math.inf else f"must be in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"
        return text + (" or None" if self.allow_none else "")


def at_least(low: float, allow_none: bool = False) -> Bound:
    return Bound(low, allow_none=allow_none)


def positive(allow_none: bool = False) -> Bound:
    return Bound(0.0, open_low=True, allow_none=allow_none)


def in_range(low: float, high: float, open_low: bool = False, allow_none: bool = False) -> Bound:
    return Bound(low, high, open_low=open_low, allow_none=allow_none)


class RegistryChoices:
    """A live view of a registry's names for ``field(metadata={"choices": ...})``: argparse checks command-line values
    against it and lists it in ``--help``, and an entry registered later is part of it."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self.names = names

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self.names()))

    def __contains__(self, value: object) -> bool:
        return value in tuple(self.names())

    def __len__(self) -> int:
        return len(tuple(self.names()))

    def __repr__(self) -> str:
        return repr(list(self))


def check_finite_numbers(config) -> None:
    """Every float of every field of ``config`` (also inside lists, e.g. ``loss_weights``) is finite: a NaN or inf
    coefficient trains on NaN weights while the Trainer logs the dropped loss as 0."""
    for config_field in fields(config):
        value = getattr(config, config_field.name, None)
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ValueError(f"{config_field.name} must be a finite number, got {value!r}.")


def validate(config) -> None:
    """Run the ``RULES`` and ``cross_check`` of every class in ``type(config).__mro__`` on ``config``."""
    check_finite_numbers(config)
    classes = type(config).__mro__
    for cls in classes:
        for name, rule in vars(cls).get("RULES", {}).items():
            if getattr(rule, "allow_none", False) and getattr(config, name) == "None":  # the command line's None
                setattr(config, name, None)
            rule(name, getattr(config, name))
    for cls in classes:
        if "cross_check" in vars(cls):
            vars(cls)["cross_check"](config)


class ValidatedConfig:
    """Mixed in first by every ``Regularized*Config``: finite numbers, TRL's ``__post_init__``, then ``validate``."""

    def __post_init__(self):
        check_finite_numbers(self)
        super().__post_init__()
        validate(self)
