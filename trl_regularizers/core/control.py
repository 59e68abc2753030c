"""KL coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al. 2019, sec. 2.2).

The adaptive rule: e_t = clip(KL_t / KL_target - 1, -clip, clip);  beta_{t+1} = beta_t (1 + K_beta e_t)
with K_beta = n_steps / horizon and clip = 0.2. ``state_dict``/``load_state_dict`` round-trip bit for bit, so
a resumed run continues with the coefficient it had (verl #2653 lost it).

Every number is checked on the way in (constructor, ``update``, ``load_state_dict``): a ValueError names
the argument, its value and the allowed range.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Protocol


class KLController(Protocol):
    """What trainers need from a controller."""

    value: float

    def update(self, observed_kl: float, n_steps: int = 1) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """A constant coefficient (a finite number >= 0); ``update`` is a no-op that returns it."""

    def __init__(self, coef: float):
        self.value = _number("coef", coef, minimum=0.0)

    def update(self, observed_kl: float, n_steps: int = 1) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "fixed")
        self.value = _number("state['value']", state["value"], minimum=0.0)


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".

    Args:
        init_coef: starting beta, finite and > 0 (a zero coefficient can never grow multiplicatively).
        target: target KL per sequence/sample, in the same units as the observed KL; finite and > 0.
        horizon: number of steps over which an error of 20% moves beta by 20%; finite and > 0.
        clip: bound on the proportional error (0.2 in the paper); finite and > 0.
    """

    def __init__(self, init_coef: float, target: float, horizon: float, clip: float = 0.2):
        self.value = _number("init_coef", init_coef, positive=True)
        self.target = _number("target", target, positive=True)
        self.horizon = _number("horizon", horizon, positive=True)
        self.clip = _number("clip", clip, positive=True)

    def update(self, observed_kl: float, n_steps: int = 1) -> float:
        """Move beta toward the target given the KL measured over the last ``n_steps`` steps.

        ``observed_kl`` must be finite (any sign: k1 estimates can be negative); ``n_steps`` an integer in
        ``[1, horizon / clip)``, so that the factor ``1 + n_steps / horizon * e`` stays > 0.
        """
        if not _is_real(observed_kl) or not math.isfinite(observed_kl):
            raise ValueError(f"observed KL is {observed_kl!r}; refusing to update the KL coefficient (it must be finite)")
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or not 1 <= n_steps < self.horizon / self.clip:
            raise ValueError(
                f"n_steps must be an integer in [1, horizon / clip) = [1, {self.horizon / self.clip:g}), got {n_steps!r}: "
                f"a longer step could make beta <= 0"
            )
        error = min(max(float(observed_kl) / self.target - 1.0, -self.clip), self.clip)
        value = self.value * (1.0 + error * (int(n_steps) / self.horizon))
        if not (0.0 < value < math.inf):
            raise ValueError(f"the KL coefficient left (0, inf): {self.value!r} -> {value!r} (observed KL {observed_kl!r})")
        self.value = value
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon, "clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "adaptive")
        checked = {name: _number(f"state[{name!r}]", state[name], positive=True) for name in ("value", "target", "horizon", "clip")}
        self.value, self.target, self.horizon, self.clip = checked.values()


def make_kl_controller(coef: float, target: float | None = None, horizon: float = 10_000.0) -> KLController:
    """Fixed controller when ``target`` is None, else adaptive toward ``target``."""
    _number("horizon", horizon, positive=True)
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)


def _is_real(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    return getattr(value, "numel", lambda: 0)() == 1 and not getattr(value, "is_complex", lambda: True)()  # 1-element tensor


def _number(name: str, value: Any, positive: bool = False, minimum: float | None = None) -> float:
    """``float(value)`` after checking it is a finite real number, > 0 (``positive``) or >= ``minimum``."""
    allowed = "a finite number " + ("> 0" if positive else f">= {minimum:g}" if minimum is not None else "")
    if not _is_real(value):
        raise ValueError(f"{name} must be {allowed.strip()}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (positive and not number > 0) or (minimum is not None and not number >= minimum):
        raise ValueError(f"{name} must be {allowed.strip()}, got {value!r}")
    return number


def _check_state(state: dict[str, Any], expected: str) -> None:
    if state.get("type") != expected:
        raise ValueError(f"cannot load a {state.get('type')!r} KL controller state into a {expected!r} controller")
