"""AdaptiveKLCallback and KLPenalty's controller: one coefficient update per optimizer step from the KL the penalty
reported during that step, summed over processes; the penalty, not the callback, owns the coefficient."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trl_regularizers.callbacks import AdaptiveKLCallback
from trl_regularizers.components.kl import KLPenalty, KLPlan
from trl_regularizers.core.control import AdaptiveKLController, make_kl_controller
from trl_regularizers.core.kl import kl_estimator_info
from trl_regularizers.core.records import KLRecord


class Sink:
    """A MetricSink of 2 processes whose other process reports ``other`` (a [2] window: sum, count)."""

    def __init__(self, other=(0.0, 0.0), training=True):
        self.other, self.training, self.logged = torch.tensor(other, dtype=torch.float64), training, {}

    def reduce_sum(self, value):
        return value + self.other.to(value.dtype) if value.shape == (2,) else value

    def log_value(self, name, value):
        self.logged.setdefault(name, []).append(value)

    def log_mean(self, name, value):
        self.log_value(name, float(value))
        return float(value)


def penalty(coef=0.1, target=2.0, horizon=4.0, sink=None):
    plan = KLPlan(kl_estimator_info("k1"), "reverse", "loss", None, native=False)
    return KLPenalty(plan, make_kl_controller(coef, target, horizon), sink or Sink())


def test_update_uses_the_mean_sequence_kl_of_the_step():
    kl = penalty()
    callback = AdaptiveKLCallback(kl)
    kl.observe(torch.tensor([1.0, 2.0]))  # two micro-batches of one step
    kl.observe(torch.tensor([4.0, 3.0, 2.5]))
    callback.on_step_end(None, None, None)
    # mean KL 12.5 / 5 = 2.5: error 2.5 / 2 - 1 = 0.25, clipped to 0.2; beta *= 1 + 0.2 / 4
    assert kl.coef == pytest.approx(0.1 * 1.05, rel=1e-12)
    kl.observe(torch.tensor([1.8], dtype=torch.float64))  # the window was reset: only this step's KL counts
    callback.on_step_end(None, None, None)
    assert kl.coef == pytest.approx(0.1 * 1.05 * (1 + (1.8 / 2 - 1) / 4), rel=1e-12)


def test_every_process_reports_into_the_same_update():
    """The other process saw sequences of KL 0 and 0: the mean over both is (3 + 0) / 3 = 1 -> error -0.5, clipped."""
    kl = penalty(sink=Sink(other=(0.0, 2.0)))
    kl.observe(torch.tensor([3.0]))
    kl.end_step()
    assert kl.coef == pytest.approx(0.1 * (1 - 0.2 / 4), rel=1e-12)


def test_step_without_observation_keeps_the_coefficient_and_a_loaded_state_wins():
    kl = penalty(0.3, target=1.0)
    kl.end_step()
    assert kl.coef == 0.3
    kl.controller.load_state_dict({**kl.controller.state_dict(), "value": 0.123456789012345})  # a resume
    assert kl.coef == 0.123456789012345


def test_penalty_observes_in_training_only_and_logs_its_estimate():
    sink = Sink(training=False)
    kl = penalty(sink=sink)
    logps = torch.tensor([[-1.0, -2.0]])
    record = KLRecord(logps, logps - 0.5, torch.ones(1, 2))
    torch.testing.assert_close(kl.penalty(record), torch.tensor([[0.5, 0.5]]))
    kl.end_step()
    assert kl.coef == 0.1  # eval values never move the coefficient
    assert sink.logged["kl"] == [0.5] and sink.logged["kl/k1"] == [0.5] and sink.logged["kl/coef"] == [0.1]
    sink.training = True
    kl.penalty(record)
    kl.end_step()  # per-sequence KL 1.0 against the target 2.0
    assert kl.coef == pytest.approx(0.1 * (1 - 0.2 / 4), rel=1e-12)


def test_zero_beta_cannot_adapt():
    with pytest.raises(ValueError, match="init_coef.*> 0"):
        AdaptiveKLController(0.0, target=1.0, horizon=4.0)
    assert not penalty(0.0, target=None).enabled
