"""core.reward_aware: hand-computed values, analytic gradients, limits, argument checks, and a property test
(finite values and gradients that agree with float64 for float16, bfloat16 and float32 inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trl_regularizers.core.reward_aware import (
    MAX_ABS_GAP,
    RPO_DISTANCES,
    bernoulli_kl,
    logratio_gap,
    rebel_loss,
    reward_weights,
    rpo_loss,
    weighted_dpo_loss,
)

GAP = [1.0, -2.0, 0.0]
REWARD_DIFF = [0.5, 1.0, -3.0]
BETA, ETA = 0.5, 2.0


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def kl_bern(p: float, q: float) -> float:
    """KL(Bern(p) || Bern(q)) from probabilities, the textbook way."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def grad_of(per_pair_losses: torch.Tensor, wrt: torch.Tensor) -> list[float]:
    (grad,) = torch.autograd.grad(per_pair_losses.sum(), wrt)
    return grad.tolist()


# ------------------------------------------------------------------------------------------- values by hand
def test_rpo_values_and_gradients_by_hand():
    gap = leaf(GAP)
    a = [BETA * g for g in GAP]  # 0.5, -1.0, 0.0
    b = [ETA * r for r in REWARD_DIFF]  # 1.0, 2.0, -6.0
    want = {
        "sq": [(x - y) ** 2 for x, y in zip(a, b)],  # 0.25, 9, 36
        "bwd_kl": [kl_bern(sig(y), sig(x)) for x, y in zip(a, b)],
        "fwd_kl": [kl_bern(sig(x), sig(y)) for x, y in zip(a, b)],
    }
    assert want["sq"] == [0.25, 9.0, 36.0]
    grads = {
        "sq": [2 * BETA * (x - y) for x, y in zip(a, b)],
        "bwd_kl": [BETA * (sig(x) - sig(y)) for x, y in zip(a, b)],
        "fwd_kl": [BETA * sig(x) * sig(-x) * (x - y) for x, y in zip(a, b)],
    }
    for distance in RPO_DISTANCES:
        loss = rpo_loss(gap, torch.tensor(REWARD_DIFF, dtype=torch.float64), BETA, ETA, distance)
        assert loss.tolist() == pytest.approx(want[distance], rel=1e-12), distance
        assert grad_of(loss, gap) == pytest.approx(grads[distance], rel=1e-10, abs=1e-15), distance


def test_rebel_value_and_gradient_by_hand():
    gap = leaf(GAP)
    loss = rebel_loss(gap, torch.tensor(REWARD_DIFF, dtype=torch.float64), eta=ETA)
    # (gap / eta - reward_diff)^2: (0.5 - 0.5)^2, (-1 - 1)^2, (0 + 3)^2
    assert loss.tolist() == pytest.approx([0.0, 4.0, 9.0], abs=1e-15)
    assert grad_of(loss, gap) == pytest.approx([0.0, (2 / ETA) * -2.0, (2 / ETA) * 3.0], abs=1e-15)


def test_weighted_dpo_values_and_gradients_by_hand():
    gap, diff = leaf(GAP), torch.tensor(REWARD_DIFF, dtype=torch.float64)
    mean_abs = (0.5 + 1.0 + 3.0) / 3
    weights = {
        "abs": [abs(ETA * r) for r in REWARD_DIFF],
        "abs_normalized": [abs(r) / mean_abs for r in REWARD_DIFF],
        "sigmoid": [sig(ETA * r) for r in REWARD_DIFF],
    }
    margin = torch.tensor([0.2, 0.0, -1.0], dtype=torch.float64)
    for weighting, want_w in weights.items():
        w = reward_weights(diff, weighting, ETA, normalizer=mean_abs)
        assert w.tolist() == pytest.approx(want_w, rel=1e-12)
        for m in (None, margin):
            offsets = [0.0] * 3 if m is None else m.tolist()
            logits = [BETA * g - o for g, o in zip(GAP, offsets)]
            loss = weighted_dpo_loss(gap, w, BETA, m)
            assert loss.tolist() == pytest.approx([wi * math.log1p(math.exp(-z)) for wi, z in zip(want_w, logits)], rel=1e-12)
            assert grad_of(loss, gap) == pytest.approx([-wi * BETA * sig(-z) for wi, z in zip(want_w, logits)], rel=1e-10)
    assert sum(weights["abs_normalized"]) / 3 == pytest.approx(1.0)  # normalized by the data's mean: average 1


def test_weights_at_equal_rewards_are_defined():
    equal = torch.zeros(4)
    assert reward_weights(equal, "abs", 3.0).tolist() == [0.0] * 4
    assert reward_weights(equal, "abs_normalized", 3.0, normalizer=0.5).tolist() == [0.0] * 4
    assert reward_weights(equal, "sigmoid", 3.0).tolist() == [0.5] * 4
    with pytest.raises(ValueError, match="normalizer must be > 0.0, got 0.0"):
        reward_weights(equal, "abs_normalized", 1.0, normalizer=0.0)  # all-equal data: refused, not 0/0


def test_gradient_through_logratio_gap_to_the_policy_log_probs():
    """d loss / d (chosen log-prob sum) = d loss / d gap (/ tokens when averaged), and minus that for rejected."""
    chosen, rejected = leaf([-3.0, -5.0]), leaf([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0], dtype=torch.float64), torch.tensor([-4.0, -3.0], dtype=torch.float64)
    tokens_c, tokens_r = torch.tensor([2, 4]), torch.tensor([5, 1])
    diff = torch.tensor([1.0, -0.5], dtype=torch.float64)
    for tokens in (None, (tokens_c, tokens_r)):
        gap = logratio_gap(chosen, rejected, ref_chosen, ref_rejected, *(tokens or (None, None)))
        if tokens is None:
            assert gap.tolist() == pytest.approx([0.5 - 0.0, -1.0 - 1.0])
            n_c, n_r = [1, 1], [1, 1]
        else:
            assert gap.tolist() == pytest.approx([0.5 / 2 - 0.0 / 5, -1.0 / 4 - 1.0 / 1])
            n_c, n_r = tokens_c.tolist(), tokens_r.tolist()
        a = [BETA * g for g in gap.tolist()]
        b = [ETA * r for r in diff.tolist()]
        loss = rpo_loss(gap, diff, BETA, ETA, "bwd_kl")
        d_gap = [BETA * (sig(x) - sig(y)) for x, y in zip(a, b)]
        got_c, got_r = torch.autograd.grad(loss.sum(), (chosen, rejected))
        assert got_c.tolist() == pytest.approx([d / n for d, n in zip(d_gap, n_c)], rel=1e-10)
        assert got_r.tolist() == pytest.approx([-d / n for d, n in zip(d_gap, n_r)], rel=1e-10)


# ------------------------------------------------------------------------------------------------- limits
def test_eta_zero_rpo_sq_pulls_the_gap_to_zero_and_rebel_tends_to_the_reference():
    gap, diff = leaf(GAP), torch.tensor(REWARD_DIFF, dtype=torch.float64)
    loss = rpo_loss(gap, diff, BETA, 0.0, "sq")  # the rewards drop out: (beta * gap)^2
    assert loss.tolist() == pytest.approx([(BETA * g) ** 2 for g in GAP])
    assert grad_of(loss, gap) == pytest.approx([2 * BETA**2 * g for g in GAP])
    # REBEL's eta is a step size: 0 is refused; eta^2 * loss = (gap - eta * reward_diff)^2 -> gap^2 as eta -> 0.
    with pytest.raises(ValueError, match="eta must be > 0.0, got 0.0"):
        rebel_loss(gap, diff, 0.0)
    for eta in (1e-2, 1e-4):
        scaled = (eta**2 * rebel_loss(gap, diff, eta)).tolist()
        assert scaled == pytest.approx([(g - eta * r) ** 2 for g, r in zip(GAP, REWARD_DIFF)], rel=1e-9)
    assert (1e-6**2 * rebel_loss(gap, diff, 1e-6)).tolist() == pytest.approx([g**2 for g in GAP], abs=1e-5)
    # ... and REBEL is RPO-sq with beta = 1 / eta on unscaled rewards.
    assert rebel_loss(gap, diff, ETA).tolist() == pytest.approx(rpo_loss(gap, diff, 1 / ETA, 1.0, "sq").tolist())


def test_rpo_bwd_kl_tends_to_dpo_for_decisive_rewards_and_vanishes_where_the_gaps_agree():
    gap = torch.tensor(GAP, dtype=torch.float64)
    dpo = -torch.nn.functional.logsigmoid(BETA * gap)
    assert rpo_loss(gap, torch.full((3,), 40.0, dtype=torch.float64), BETA, 1.0, "bwd_kl").tolist() == pytest.approx(dpo.tolist(), rel=1e-12)
    diff = BETA * gap / ETA  # eta * diff == beta * gap
    for distance in RPO_DISTANCES:
        assert rpo_loss(gap, diff, BETA, ETA, distance).abs().max().item() < 1e-15


def test_rpo_ignores_which_completion_is_labelled_chosen():
    gap, diff = torch.tensor(GAP), torch.tensor(REWARD_DIFF)
    for distance in RPO_DISTANCES:
        assert torch.allclose(rpo_loss(gap, diff, BETA, ETA, distance), rpo_loss(-gap, -diff, BETA, ETA, distance))


def test_bernoulli_kl_extremes_are_finite():
    p = torch.tensor([80.0, -80.0, 1e30, -1e30, 0.0])
    q = torch.tensor([-80.0, 80.0, -1e30, 1e30, 0.0])
    assert torch.isfinite(bernoulli_kl(p, q)).all() and torch.isfinite(bernoulli_kl(q, p)).all()
    assert bernoulli_kl(p, q)[0].item() == pytest.approx(80.0, rel=1e-6)  # -log sigma(q) when sigma(p) = 1


# -------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda g, r: rpo_loss(g, r, 0.0, 1.0), "beta must be > 0.0, got 0.0"),
        (lambda g, r: rpo_loss(g, r, float("nan"), 1.0), "beta must be a finite number"),
        (lambda g, r: rpo_loss(g, r, 0.1, -1.0), "eta must be >= 0.0, got -1.0"),
        (lambda g, r: rpo_loss(g, r, 0.1, float("inf")), "eta must be a finite number"),
        (lambda g, r: rpo_loss(g, r, 0.1, 1.0, "l1"), "distance='l1' is not valid. Allowed values: sq, bwd_kl, fwd_kl"),
        (lambda g, r: rebel_loss(g, r, -0.5), "eta must be > 0.0"),
        (lambda g, r: reward_weights(r, "rank", 1.0), "weighting='rank' is not valid"),
        (lambda g, r: reward_weights(r, "abs_normalized", 1.0), "needs the normalizer"),
        (lambda g, r: weighted_dpo_loss(g, r, True), "beta must be a finite number"),
        (lambda g, r: rpo_loss(g, r[:2], 0.1, 1.0), "reward_diff has 2 rows but there are 3 pairs"),
        (lambda g, r: rpo_loss(g[None, :], r, 0.1, 1.0), r"logratio_gap must have shape \[B\] or \[B, 1\]"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.tensor(GAP), torch.tensor(REWARD_DIFF))


# ------------------------------------------------------------------------------------------ property test
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS32 = torch.finfo(torch.float32).eps


def gaps(n: int, bound: float):
    return st.lists(st.one_of(st.floats(-8, 8), st.floats(-bound, bound, allow_nan=False, allow_infinity=False)), min_size=n, max_size=n)


def reference(kind: str, gap: torch.Tensor, diff: torch.Tensor, beta: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d gap) in float64 from the textbook formulas, and the magnitude the float32 result rounds at."""
    a, b = beta * gap, eta * diff
    s = torch.sigmoid
    if kind == "sq":
        return (a - b) ** 2, 2 * beta * (a - b)
    if kind == "bwd_kl":
        return bernoulli_kl(b, a), beta * (s(a) - s(b))
    if kind == "fwd_kl":
        return bernoulli_kl(a, b), beta * s(a) * s(-a) * (a - b)
    if kind == "rebel":
        return (gap / eta - diff) ** 2, (2 / eta) * (gap / eta - diff)
    w = s(eta * diff)
    return -w * torch.nn.functional.logsigmoid(a), -w * beta * s(-a)


def compute(kind: str, gap: torch.Tensor, diff: torch.Tensor, beta: float, eta: float) -> torch.Tensor:
    if kind in RPO_DISTANCES:
        return rpo_loss(gap, diff, beta, eta, kind)
    if kind == "rebel":
        return rebel_loss(gap, diff, eta)
    return weighted_dpo_loss(gap, reward_weights(diff, "sigmoid", eta), beta)


@pytest.mark.parametrize("kind", [*RPO_DISTANCES, "rebel", "weighted_sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), beta=st.floats(1e-3, 1e2), eta=st.floats(1e-3, 1e2))
def test_finite_and_close_to_float64(kind, dtype, data, beta, eta):
    bound = 100.0 if dtype == torch.float16 else 1e6  # |beta * gap| <= 1e8, far inside MAX_ABS_GAP
    gap_in = torch.tensor(data.draw(gaps(4, bound)), dtype=torch.float64).to(dtype)
    diff_in = torch.tensor(data.draw(gaps(4, bound)), dtype=torch.float64).to(dtype)
    assert bound * 1e2 < MAX_ABS_GAP
    want, want_grad = reference(kind, gap_in.double(), diff_in.double(), beta, eta)
    # The gradient comes back in the input's dtype: float16 cannot hold one past 65504 (the loss itself is float32).
    assume(want_grad.abs().max().item() < 0.5 * torch.finfo(dtype).max)
    gap = gap_in.clone().requires_grad_(True)
    loss = compute(kind, gap, diff_in, beta, eta)
    (grad,) = torch.autograd.grad(loss.sum(), gap)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)

    a, b = beta * gap_in.double().abs(), eta * diff_in.double().abs()
    scale = {"sq": (a + b) ** 2, "rebel": (gap_in.double().abs() / eta + diff_in.double().abs()) ** 2}.get(kind, a + b + 1)
    assert ((loss.double() - want).abs() <= 64 * EPS32 * scale + 1e-30).all(), (loss, want)
    grad_scale = {"sq": beta * (a + b), "rebel": (gap_in.double().abs() / eta + diff_in.double().abs()) / eta}.get(kind, beta * (a + b + 1))
    rounding = torch.finfo(dtype).eps * want_grad.abs() + torch.finfo(dtype).tiny  # into the input's dtype
    assert ((grad.double() - want_grad).abs() <= 64 * EPS32 * grad_scale + rounding).all(), (grad, want_grad)
