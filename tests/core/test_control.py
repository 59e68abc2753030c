"""KL coefficient controllers (Ziegler et al. 2019)."""

import json

import pytest
import torch

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
    with pytest.raises(ValueError, match="init_coef must be a finite number > 0, got 0.0"):
        AdaptiveKLController(0.0, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="target must be a finite number > 0, got -1.0"):
        AdaptiveKLController(0.1, target=-1.0, horizon=10)
    with pytest.raises(ValueError, match="coef must be a finite number >= 0, got -0.1"):
        FixedKLController(-0.1)
    with pytest.raises(ValueError, match="refusing"):
        AdaptiveKLController(0.1, 1.0, 10).update(float("nan"))


@pytest.mark.parametrize("name", ["init_coef", "target", "horizon", "clip"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), True, "0.1"])
def test_adaptive_numbers_must_be_finite_and_positive(name, bad):
    """``not x > 0`` let inf and True through (an inf coefficient, or a horizon of True) and raised TypeError on strings."""
    kwargs = dict(init_coef=0.1, target=1.0, horizon=10.0, clip=0.2)
    kwargs[name] = bad
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0, got {bad!r}"):
        AdaptiveKLController(**kwargs)


def test_fixed_coefficient_must_be_a_finite_number():
    for bad in (float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match=f"coef must be a finite number >= 0, got {bad!r}"):
            FixedKLController(bad)
    assert FixedKLController(0).value == 0.0
    with pytest.raises(ValueError, match="horizon must be a finite number > 0, got -5"):
        make_kl_controller(0.1, horizon=-5)


def test_a_long_step_below_target_could_make_beta_negative_and_is_refused():
    """K_beta = n_steps / horizon = 10 with error -0.2 gave beta * (1 - 2) < 0: the penalty flipped sign."""
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100.0)
    with pytest.raises(ValueError, match=r"n_steps must be an integer in \[1, horizon / clip\) = \[1, 500\), got 1000"):
        controller.update(0.0, n_steps=1000)
    assert controller.value == 0.1
    assert controller.update(0.0, n_steps=499) == pytest.approx(0.1 * (1 - 0.2 * 499 / 100))
    assert controller.value > 0
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"n_steps must be an integer .* got {bad!r}"):
            controller.update(1.0, n_steps=bad)


def test_observed_kl_must_be_a_finite_number():
    controller = AdaptiveKLController(0.1, 1.0, 10)
    for bad in (float("inf"), float("-inf"), None, "1.0", True):
        with pytest.raises(ValueError, match="refusing to update the KL coefficient"):
            controller.update(bad)
    assert controller.value == 0.1
    assert controller.update(torch.tensor(3.0)) == pytest.approx(0.1 * 1.02)  # a one-element tensor is a number


def test_beta_that_would_overflow_is_refused():
    controller = AdaptiveKLController(1.79e308, target=1.0, horizon=10.0)
    with pytest.raises(ValueError, match=r"the KL coefficient left \(0, inf\)"):
        controller.update(5.0)
    assert controller.value == 1.79e308


@pytest.mark.parametrize("field, bad", [("value", float("nan")), ("target", 0.0), ("horizon", float("inf")), ("clip", -0.2)])
def test_loaded_state_is_checked(field, bad):
    """A corrupted checkpoint (NaN beta) was loaded silently and every later step multiplied NaN."""
    state = AdaptiveKLController(0.1, 1.0, 10).state_dict()
    state[field] = bad
    controller = AdaptiveKLController(0.5, 2.0, 20)
    with pytest.raises(ValueError, match=f"state\\['{field}'\\] must be a finite number > 0, got {bad!r}"):
        controller.load_state_dict(state)
    assert controller.state_dict() == AdaptiveKLController(0.5, 2.0, 20).state_dict()
    with pytest.raises(ValueError, match=r"state\['value'\] must be a finite number >= 0, got nan"):
        FixedKLController(0.1).load_state_dict({"type": "fixed", "value": float("nan")})
