"""AdaptiveKLCallback: one controller update per optimizer step from the KL reported during that step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from trl_regularizers.trainers.state import RegularizerState
from trl_regularizers.callbacks import AdaptiveKLCallback


def fake_trainer(beta: float = 0.1):
    return SimpleNamespace(beta=beta, accelerator=Accelerator(cpu=True), regularizer_state=RegularizerState())


def test_update_uses_the_mean_sequence_kl_of_the_step():
    trainer = fake_trainer()
    callback = AdaptiveKLCallback(trainer, target=2.0, horizon=4.0)
    assert trainer.regularizer_state["kl_controller"] is callback.controller
    callback.observe(torch.tensor([1.0, 2.0]))  # two micro-batches of one step
    callback.observe(torch.tensor([4.0, 3.0, 2.5]))
    callback.on_step_end(None, None, None)
    # mean KL 12.5 / 5 = 2.5: error 2.5 / 2 - 1 = 0.25, clipped to 0.2; beta *= 1 + 0.2 / 4
    assert trainer.beta == pytest.approx(0.1 * 1.05, rel=1e-12)
    callback.observe(torch.tensor([1.8], dtype=torch.float64))  # the window was reset: only this step's KL counts
    callback.on_step_end(None, None, None)
    assert trainer.beta == pytest.approx(0.1 * 1.05 * (1 + (1.8 / 2 - 1) / 4), rel=1e-12)


def test_step_without_observation_keeps_beta_and_train_begin_restores_the_controller():
    trainer = fake_trainer(0.3)
    callback = AdaptiveKLCallback(trainer, target=1.0)
    callback.on_step_end(None, None, None)
    assert trainer.beta == 0.3
    callback.controller.load_state_dict({**callback.controller.state_dict(), "value": 0.123456789012345})
    callback.on_train_begin(None, None, None)  # after a resume the checkpointed value wins
    assert trainer.beta == 0.123456789012345


def test_zero_beta_cannot_adapt():
    with pytest.raises(ValueError, match="init_coef.*> 0"):
        AdaptiveKLCallback(fake_trainer(0.0), target=1.0)
