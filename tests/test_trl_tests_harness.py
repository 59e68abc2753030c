"""The swap of scripts/trl_tests (TRL's own tests with our classes), on a copy of trl's namespace."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import trl

import trl_regularizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "trl_tests"))
from swap import SWAPS, swap_trl_classes  # noqa: E402


def namespace_copy() -> ModuleType:
    """A stand-in ``trl`` module holding TRL's real classes under their public names, with a ``trainer`` namespace."""
    fake = ModuleType("fake_trl")
    fake.trainer = ModuleType("fake_trl.trainer")
    for trl_name in SWAPS:
        setattr(fake, trl_name, getattr(trl, trl_name))
        setattr(fake.trainer, trl_name, getattr(trl, trl_name))
    return fake


def test_swap_replaces_every_pair_by_our_subclass():
    fake = namespace_copy()
    swapped = swap_trl_classes(fake)
    assert swapped == list(SWAPS)
    for trl_name, our_name in SWAPS.items():
        ours = getattr(trl_regularizers, our_name)
        assert getattr(fake, trl_name) is ours and getattr(fake.trainer, trl_name) is ours
        assert issubclass(ours, getattr(trl, trl_name)) and ours is not getattr(trl, trl_name)
    assert trl.DPOTrainer is not trl_regularizers.RegularizedDPOTrainer  # the real namespace is untouched


def test_swap_refuses_a_class_that_does_not_subclass_trl():
    package = SimpleNamespace(**{our: getattr(trl_regularizers, our) for our in SWAPS.values()})
    package.RegularizedRLOOTrainer = trl_regularizers.RegularizedGRPOTrainer
    with pytest.raises(TypeError, match="RegularizedRLOOTrainer is not a subclass of trl.RLOOTrainer"):
        swap_trl_classes(namespace_copy(), package=package)
