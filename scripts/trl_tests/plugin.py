"""Pytest plugin that runs TRL's own trainer tests offline, stock or with our classes swapped in.

Loaded with ``-p plugin`` (``scripts/trl_tests.sh`` does it). At configure time, before TRL's test modules import:

* tiny models for the hub names in :data:`tiny_hub.TINY_MODELS` are written into the Hugging Face cache layout of
  ``HF_HUB_CACHE`` (set by the script), so every ``from_pretrained("trl-internal-testing/...")`` resolves offline;
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

    missing = stub_missing_availability_checks(Path(os.environ["TRL_TESTS_SCRIPTS"]).parent / "tests")
    config.stash[_STUBBED] = missing
    install_tiny_models(os.environ["HF_HUB_CACHE"])
    install_tiny_datasets(os.environ["TRL_TESTS_SCRIPTS"])
    if config.getoption("--swap"):
        swapped = swap_trl_classes()
        config.stash[_SWAPPED] = swapped


_SWAPPED = pytest.StashKey[list]()
_STUBBED = pytest.StashKey[list]()


def stub_missing_availability_checks(tests_folder: Path) -> list[str]:
    """Give ``trl.import_utils`` the ``is_*_available`` names the tests import but this TRL lacks, as ``False``.

    TRL's test helpers at a given commit may import checks that the installed release does not have; answering
    ``False`` skips the tests that need them instead of failing the whole module at import.
    """
    import_utils = importlib.import_module("trl.import_utils")

    wanted = set()
    for path in tests_folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "trl.import_utils":
                wanted.update(alias.name for alias in node.names if alias.name.startswith("is_"))
    missing = sorted(name for name in wanted if not hasattr(import_utils, name))
    for name in missing:
        setattr(import_utils, name, lambda: False)
    return missing


def pytest_report_header(config: pytest.Config) -> list[str]:
    swapped = config.stash.get(_SWAPPED, [])
    return [
        "trl_tests: " + ("swapped " + ", ".join(swapped) if swapped else "stock TRL classes"),
        "trl_tests: availability checks missing from this TRL, answered False: "
        + (", ".join(config.stash.get(_STUBBED, [])) or "none"),
    ]
