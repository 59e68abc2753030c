"""KL coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al. 2019, sec. 2.2).

The adaptive rule: e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);  beta_{t+1} = beta_t (1 + K_beta e_t)
with K_beta = n_steps / horizon. ``state_dict``/``load_state_dict`` round-trip bit for bit, so a resumed
run continues with the coefficient it had (verl #2653 lost it).
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class KLController(Protocol):
    """What trainers need from a controller."""

    value: float

    def update(self, observed_kl: float, n_steps: int = 1) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """A constant coefficient; ``update`` is a no-op that returns it."""

    def __init__(self, coef: float):
        _check_coef(coef)
        self.value = float(coef)

    def update(self, observed_kl: float, n_steps: int = 1) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "fixed")
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".

    Args:
        init_coef: starting beta (> 0: a zero coefficient can never grow multiplicatively).
        target: target KL per sequence/sample, in the same units as the observed KL.
        horizon: number of steps over which an error of 20% moves beta by 20%.
        clip: bound on the proportional error (0.2 in the paper).
    """

    def __init__(self, init_coef: float, target: float, horizon: float, clip: float = 0.2):
        if not init_coef > 0:
            raise ValueError(f"adaptive KL control needs init_coef > 0, got {init_coef}")
        if not target > 0:
            raise ValueError(f"adaptive KL control needs target > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"adaptive KL control needs horizon > 0, got {horizon}")
        if not clip > 0:
            raise ValueError(f"adaptive KL control needs clip > 0, got {clip}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.clip = float(clip)

    def update(self, observed_kl: float, n_steps: int = 1) -> float:
        """Move beta toward the target given the KL measured over the last ``n_steps`` steps."""
        if not math.isfinite(observed_kl):
            raise ValueError(f"observed KL is {observed_kl}; refusing to update the KL coefficient")
        error = min(max(observed_kl / self.target - 1.0, -self.clip), self.clip)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon, "clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "adaptive")
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
        self.clip = float(state["clip"])


def make_kl_controller(coef: float, target: float | None = None, horizon: float = 10_000.0) -> KLController:
    """Fixed controller when ``target`` is None, else adaptive toward ``target``."""
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)


def _check_coef(coef: float) -> None:
    if not (coef >= 0 and math.isfinite(coef)):
        raise ValueError(f"KL coefficient must be a finite number >= 0, got {coef}")


def _check_state(state: dict[str, Any], expected: str) -> None:
    if state.get("type") != expected:
        raise ValueError(f"cannot load a {state.get('type')!r} KL controller state into a {expected!r} controller")
