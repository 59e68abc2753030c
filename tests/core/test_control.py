"""KL coefficient controllers (Ziegler et al. 2019)."""

import json

import pytest

from trl_regularizers.core.control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_adaptive_coefficient_follows_the_proportional_rule():
    controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=100)
    # KL = 9 -> error 0.5 clipped to 0.2 -> beta * (1 + 0.2 * 1 / 100)
    assert controller.update(9.0) == pytest.approx(0.1 * 1.002)
    # KL = 5.4 -> error -0.1 -> beta * (1 - 0.1 * 2 / 100)
    assert controller.update(5.4, n_steps=2) == pytest.approx(0.1 * 1.002 * 0.998)


def test_adaptive_coefficient_rises_above_target_and_falls_below():
    up = AdaptiveKLController(0.1, target=1.0, horizon=10)
    down = AdaptiveKLController(0.1, target=1.0, horizon=10)
    for _ in range(5):
        up.update(3.0)
        down.update(0.2)
    assert up.value > 0.1 > down.value
    steady = AdaptiveKLController(0.1, target=1.0, horizon=10)
    steady.update(1.0)
    assert steady.value == 0.1


def test_state_dict_round_trip_is_bit_exact_through_json():
    controller = AdaptiveKLController(0.05, target=2.0, horizon=37)
    for kl in (0.3, 7.1, 2.2, 1.9):
        controller.update(kl)
    restored = AdaptiveKLController(1.0, target=9.0, horizon=1)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.value == controller.value and restored.state_dict() == controller.state_dict()
    assert restored.update(4.0) == controller.update(4.0)


def test_fixed_controller_never_moves_and_rejects_foreign_state():
    fixed = FixedKLController(0.04)
    assert fixed.update(100.0) == 0.04
    with pytest.raises(ValueError, match="cannot load a 'adaptive'"):
        fixed.load_state_dict(AdaptiveKLController(0.1, 1.0, 1.0).state_dict())


def test_factory_and_validation():
    assert isinstance(make_kl_controller(0.1), FixedKLController)
    assert isinstance(make_kl_controller(0.1, target=3.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="init_coef > 0"):
        AdaptiveKLController(0.0, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=-1.0, horizon=10)
    with pytest.raises(ValueError, match=">= 0"):
        FixedKLController(-0.1)
    with pytest.raises(ValueError, match="refusing"):
        AdaptiveKLController(0.1, 1.0, 10).update(float("nan"))
