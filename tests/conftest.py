"""Shared fixtures: tiny local models saved to a temp folder (no hub access anywhere)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory) -> str:
    """A random-init Qwen2 causal LM + byte tokenizer, saved and loadable with from_pretrained."""
    from trl_regularizers.testing import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_rm_path(tmp_path_factory) -> str:
    """A random-init Qwen2 sequence-classification model (num_labels=1) + tokenizer."""
    from trl_regularizers.testing import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny_rm"))
