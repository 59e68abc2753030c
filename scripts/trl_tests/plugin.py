"""Pytest plugin that runs TRL's own trainer tests offline, stock or with our classes swapped in.

Loaded with ``-p plugin`` (``scripts/trl_tests.sh`` does it). At configure time, before TRL's test modules import:

* tiny models for the hub names in :data:`tiny_hub.TINY_MODELS` are written into the Hugging Face cache layout of
  ``HF_HUB_CACHE`` (set by the script), so every ``from_pretrained("trl-internal-testing/...")`` resolves offline;
* names the tests import from ``trl.*`` that the installed release lacks get stand-ins (:func:`stub_missing_trl_names`);
* ``datasets.load_dataset`` answers the ``trl-internal-testing`` data sets from TRL's own generator scripts
  (``TRL_TESTS_SCRIPTS``: the ``scripts/`` folder of the same TRL checkout), run with ``push_to_hub`` captured;
* with ``--swap``, ``trl.DPOTrainer``/``trl.DPOConfig`` and the other pairs of :data:`swap.SWAPS` are replaced by
  ``trl_regularizers``' classes, so ``from trl import DPOTrainer`` in a test module gets ours.
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--swap", action="store_true", help="replace TRL's trainers and configs by trl_regularizers'")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    from swap import swap_trl_classes
    from tiny_hub import install_tiny_datasets, install_tiny_models

    missing = stub_missing_trl_names(Path(os.environ["TRL_TESTS_SCRIPTS"]).parent / "tests")
    config.stash[_STUBBED] = missing
    install_tiny_models(os.environ["HF_HUB_CACHE"])
    install_tiny_datasets(os.environ["TRL_TESTS_SCRIPTS"])
    if config.getoption("--swap"):
        swapped = swap_trl_classes()
        config.stash[_SWAPPED] = swapped


_SWAPPED = pytest.StashKey[list]()
_STUBBED = pytest.StashKey[list]()


class MissingInThisTRL:
    """Stands for a name TRL's tests import that the installed TRL lacks; using it fails the one test that does."""

    def __init__(self, qualified_name: str) -> None:
        self.qualified_name = qualified_name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self.qualified_name} is not in the installed TRL (trl_tests plugin stand-in)")


def stub_missing_trl_names(tests_folder: Path) -> list[str]:
    """Give TRL's modules the names the tests import from them but the installed release lacks; return them.

    TRL's tests at a given commit may import helpers or ``is_*_available`` checks that the installed release does
    not have; instead of failing a whole module at import, a missing check answers ``False`` (its tests skip) and
    any other name is a :class:`MissingInThisTRL` (only the tests that use it fail, stock and swapped alike).
    """
    wanted: set[tuple[str, str]] = set()
    for path in tests_folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("trl."):
                wanted.update((node.module, alias.name) for alias in node.names)
    missing = []
    for module_name, name in sorted(wanted):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            continue
        qualified_name = f"{module_name}.{name}"
        is_check = name.startswith("is_") and name.endswith("_available")
        setattr(module, name, (lambda: False) if is_check else MissingInThisTRL(qualified_name))
        missing.append(qualified_name)
    return missing


def pytest_report_header(config: pytest.Config) -> list[str]:
    swapped = config.stash.get(_SWAPPED, [])
    return [
        "trl_tests: " + ("swapped " + ", ".join(swapped) if swapped else "stock TRL classes"),
        "trl_tests: names the tests import that this TRL lacks (stand-ins): "
        + (", ".join(config.stash.get(_STUBBED, [])) or "none"),
    ]
