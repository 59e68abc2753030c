"""TRL defaults the docs quote, checked on every TRL release CI installs: a release that changes one fails here,
naming the page to update."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from trl import GRPOConfig, RLOOConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def default(config_cls, name: str):
    return next(f.default for f in dataclasses.fields(config_cls) if f.name == name)


FACTS = [  # (page, what the page says, the TRL config, field, the value it says)
    ("online_rl.md", "With GRPO's `use_bias_correction_kl=True` (the default)", GRPOConfig, "use_bias_correction_kl", True),
    ("trl_internals.md", "Defaults that matter: `beta=0.0`", GRPOConfig, "beta", 0.0),
    ("trl_internals.md", '`loss_type="dapo"`', GRPOConfig, "loss_type", "dapo"),
    ("trl_internals.md", "`use_bias_correction_kl=True`", GRPOConfig, "use_bias_correction_kl", True),
    ("trl_internals.md", '`multi_objective_aggregation="sum_then_normalize"`', GRPOConfig, "multi_objective_aggregation", "sum_then_normalize"),
    ("trl_internals.md", "`self.beta` (default 0.05", RLOOConfig, "beta", 0.05),
]


@pytest.mark.parametrize("page, text, config_cls, name, value", FACTS, ids=lambda v: str(v)[:40])
def test_trl_defaults_the_docs_quote(page, text, config_cls, name, value):
    assert text in (DOCS / page).read_text(), f"docs/{page} no longer says {text!r}: update FACTS"
    assert default(config_cls, name) == value, f"TRL changed {config_cls.__name__}.{name}: update docs/{page} ({text!r})"
