"""Property-based tests of trl_regularizers.core: finite inputs in each function's documented domain give finite
values and gradients that agree with a float64 computation of the formula, for float16, bfloat16 and float32.

Tolerances follow float32 rounding (the math of every function runs in at least float32), plus the rounding of
results returned in the input dtype. Examples are derandomized, so CI sees the same ones on every run.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trl_regularizers.core.control import AdaptiveKLController, FixedKLController
from trl_regularizers.core.full_kl import MAX_ABS_LOGIT, full_vocab_kl, full_vocab_kl_from_hidden
from trl_regularizers.core.kl import MAX_CLAMP, finite_gradient_bound, get_kl_estimator, kl_estimator_names, per_token_kl
from trl_regularizers.core.losses import length_normalized_nll, margin_preference_loss, ptx_nll

PROPERTY = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS32 = torch.finfo(torch.float32).eps
NEG_INF = float("-inf")


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def subnormal_step(dtype: torch.dtype) -> float:
    """Spacing of the dtype's subnormals: the absolute error of rounding a tiny result into it."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def values(n: int, bound: float, moderate: float = 8.0):
    """``n`` finite floats: mostly moderate, some anywhere in [-bound, bound] (hypothesis favours the edges)."""
    extreme = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    return st.lists(st.one_of(st.floats(-moderate, moderate), extreme), min_size=n, max_size=n)


def tensor(data, shape, dtype, bound: float, moderate: float = 8.0) -> torch.Tensor:
    numel = math.prod(shape)
    drawn = data.draw(values(numel, bound, moderate))
    return torch.tensor(drawn, dtype=torch.float64).reshape(shape).to(dtype)


def logit_bound(dtype: torch.dtype) -> float:
    """The largest |logit| of the full-vocab KL's documented domain that the dtype holds."""
    return min(torch.finfo(dtype).max, 0.99 * MAX_ABS_LOGIT)


def check_close(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{what}: not finite: {got}"
    error = (got - want).abs()
    assert (error <= tol).all(), f"{what}: |got - want| = {error.max().item():.3g} > tol\ngot  {got}\nwant {want}\ntol  {tol}"


# ----------------------------------------------------------------------------------------------------------------
# Sampled-token KL estimators (core/kl.py)


def reference_estimate(fn, r: torch.Tensor, direction: str) -> torch.Tensor:
    return fn(r) if direction == "reverse" else torch.exp(-r) * fn(-r)


def estimator_rounding_scale(fn, r: torch.Tensor, direction: str) -> torch.Tensor:
    """Magnitude of the terms a float32 evaluation adds up: |k| + |r| + |expm1(-r)|, times rho when forward."""
    if direction == "reverse":
        return fn(r).abs() + r.abs() + torch.expm1(-r).abs()
    s = -r
    return torch.exp(s) * (fn(s).abs() + s.abs() + torch.expm1(-s).abs())


@PROPERTY
@given(
    data=st.data(),
    estimator=st.sampled_from(kl_estimator_names("log_ratio")),
    direction=st.sampled_from(["reverse", "forward"]),
    dtype=st.sampled_from(DTYPES),
    size=st.integers(1, 12),
    clamp=st.one_of(st.none(), st.floats(0.01, 50.0)),
)
def test_per_token_kl_is_finite_and_matches_float64(data, estimator, direction, dtype, size, clamp):
    """Any finite log-probs (|r| up to the dtype's max), with or without ``clamp``: finite values and gradients,
    equal to the estimator evaluated in float64 on the log-ratio bounded by ``min(clamp or 50, finite_gradient_bound)``."""
    bound = torch.finfo(dtype).max
    logps = tensor(data, (size,), dtype, bound, moderate=30.0)
    ref_logps = tensor(data, (size,), dtype, bound, moderate=30.0)
    logps.requires_grad_()
    got = per_token_kl(logps, ref_logps, estimator=estimator, direction=direction, clamp=clamp)
    (grad,) = torch.autograd.grad(got.sum(), logps)
    assert got.dtype == torch.float32 and got.shape == logps.shape
    assert torch.isfinite(got).all() and torch.isfinite(grad).all(), f"not finite: {got}, gradient {grad}"
    limit = min(MAX_CLAMP if clamp is None else clamp, finite_gradient_bound(dtype))

    fn = get_kl_estimator(estimator)
    x, y = logps.detach().double().requires_grad_(), ref_logps.double()
    r = x - torch.clamp(y, x.detach() - limit, x.detach() + limit)
    want = reference_estimate(fn, r, direction)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    # float32 rounding of r and of logps +- limit; agreement is claimed where that rounding is below 1 (bf16
    # logps of 90000 round logps - 2 back to logps: r = 0, not 2)
    slack = 2 * EPS32 * r.detach().abs() + 2 * EPS32 * (x.detach().abs() + limit)
    accurate = slack <= 1.0
    r0 = r.detach()
    spread = torch.stack([(reference_estimate(fn, r0 + d, direction) - want.detach()).abs() for d in (slack, -slack)]).amax(0)
    tol = spread + 16 * EPS32 * estimator_rounding_scale(fn, r0, direction) + 1e-30
    check_close(got[accurate], want.detach()[accurate], tol[accurate], f"{estimator}/{direction}/{dtype}")
    grad_tol = (
        torch.stack([(torch.func.grad(lambda t: reference_estimate(fn, t, direction).sum())(r0 + d) - want_grad).abs() for d in (slack, -slack)]).amax(0)
        + 16 * EPS32 * (want_grad.abs() + estimator_rounding_scale(fn, r0, direction) + 1.0)
        + eps(dtype) * want_grad.abs()  # the gradient comes back in the input dtype
    )
    check_close(grad[accurate], want_grad[accurate], grad_tol[accurate], f"grad {estimator}/{direction}/{dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Exact full-vocabulary KL (core/full_kl.py)


def reference_full_kl(z: torch.Tensor, r: torch.Tensor, reverse: bool):
    """float64 [N, V] -> (KL [N], dKL/dz [N, V], float32 rounding scale of KL [N], of the gradient [N, V])."""
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(r, -1)
    p, q = logp.exp(), logq.exp()
    x, y = (logp, logq) if reverse else (logq, logp)
    diff = torch.where(x == NEG_INF, 0.0, x - y)
    kl = (x.exp() * diff).sum(-1)
    vocab = z.shape[-1]
    # error of log p_v in float32: ~ eps (2 |log p_v| + V + 2); of the KL: summed over its terms
    dlogp = torch.where(logp == NEG_INF, 0.0, 2 * logp.abs()) + vocab + 2
    dlogq = torch.where(logq == NEG_INF, 0.0, 2 * logq.abs()) + vocab + 2
    dx, dy = (dlogp, dlogq) if reverse else (dlogq, dlogp)
    kl_scale = (x.exp() * (dx * (diff.abs() + 1) + dy + diff.abs())).sum(-1) * (1 + vocab)
    if reverse:
        centred = torch.where(logp == NEG_INF, 0.0, logp - logq - kl[:, None])
        grad = p * centred
        grad_scale = p * ((centred.abs() + 1) * dlogp + dlogq + kl_scale[:, None])
    else:
        grad = p - q
        grad_scale = p * dlogp + q * dlogq
    return kl, grad, kl_scale, grad_scale


@st.composite
def full_kl_case(draw, masked_entries: bool = True):
    """(logits, ref_logits, mask, direction, chunk_size): included rows have a finite KL (masked entries on the
    zero-mass side only), excluded rows (mask 0) may hold anything: NaN, +inf, a row of -inf, one-sided masks."""
    dtype = draw(st.sampled_from(DTYPES))
    direction = draw(st.sampled_from(["reverse", "forward"]))
    rows, vocab = draw(st.integers(1, 5)), draw(st.integers(2, 10))
    bound = logit_bound(dtype)
    z = torch.tensor(draw(values(rows * vocab, bound)), dtype=torch.float64).reshape(rows, vocab)
    r = torch.tensor(draw(values(rows * vocab, bound)), dtype=torch.float64).reshape(rows, vocab)
    z, r = z.to(dtype), r.to(dtype)
    if masked_entries:
        # 0: finite on both sides, 1: -inf on both, 2: -inf on the side the KL does not average over only
        kinds = torch.tensor(draw(st.lists(st.sampled_from([0, 0, 1, 2]), min_size=rows * vocab, max_size=rows * vocab)))
        kinds = kinds.reshape(rows, vocab)
        kinds[:, draw(st.integers(0, vocab - 1))] = 0  # every row keeps a token with mass on both sides
        zero_mass_side = z if direction == "reverse" else r
        z[kinds == 1], r[kinds == 1] = NEG_INF, NEG_INF
        zero_mass_side[kinds == 2] = NEG_INF
    weights = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 1.0, 0.5]), min_size=rows, max_size=rows)))
    for row in torch.nonzero(weights == 0).flatten().tolist():
        garbage = draw(st.sampled_from(["none", "nan", "posinf", "all_masked", "one_sided"]))
        if garbage == "nan":
            z[row, 0] = float("nan")
        elif garbage == "posinf":
            r[row, -1] = float("inf")
        elif garbage == "all_masked":
            z[row], r[row] = NEG_INF, NEG_INF
        elif garbage == "one_sided":  # +inf KL in this direction
            (r if direction == "reverse" else z)[row, :] = NEG_INF
            (z if direction == "reverse" else r)[row, 0] = 0.0
    chunk_size = draw(st.integers(1, 4))
    return z, r, weights, direction, chunk_size


@PROPERTY
@given(case=full_kl_case(), upstream=st.lists(st.floats(-2, 2), min_size=5, max_size=5))
def test_full_vocab_kl_matches_float64_with_masked_entries_and_rows(case, upstream):
    """Values and gradients of included rows equal the float64 formula (0 log 0 = 0); rows with mask 0 give
    exactly 0 and a zero gradient whatever they hold."""
    z, r, weights, direction, chunk_size = case
    rows, reverse = z.shape[0], direction == "reverse"
    coef = torch.tensor(upstream[:rows], dtype=torch.float32)
    logits = z.clone().requires_grad_()
    got = full_vocab_kl(logits, r, weights, direction, chunk_size, backend="torch")
    (grad,) = torch.autograd.grad((coef * got).sum(), logits)

    kept = weights != 0
    assert (got[~kept] == 0).all() and (grad[~kept] == 0).all()
    assert torch.isfinite(got).all() and torch.isfinite(grad.float()).all()
    if not kept.any():
        return
    kl, want_grad, kl_scale, grad_scale = reference_full_kl(z[kept].double(), r[kept].double(), reverse)
    w = weights[kept].double()
    check_close(got[kept], w * kl, 8 * EPS32 * w * kl_scale + 1e-30, f"KL {direction} {z.dtype}")
    c = (coef[kept].double() * w)[:, None]
    want_grad = c * want_grad
    grad_tol = c.abs() * 8 * EPS32 * grad_scale + eps(z.dtype) * want_grad.abs() + subnormal_step(z.dtype)
    check_close(grad[kept], want_grad, grad_tol, f"dKL/dz {direction} {z.dtype}")
    masked_logits = z[kept] == NEG_INF
    assert (grad[kept][masked_logits] == 0).all()


@PROPERTY
@given(case=full_kl_case(masked_entries=False), scale=st.sampled_from([1.0, 1e3, 1e30]))
def test_full_vocab_kl_of_shifted_and_scaled_logits_stays_exact(case, scale):
    """Tied and near-tied logits at large magnitudes: KL(softmax(z + c) || softmax(r + c)) is KL(z || r)."""
    z, r, weights, direction, chunk_size = case
    kept = weights != 0
    assume(kept.any())
    z, r = z[kept].float().clamp(-8, 8), r[kept].float().clamp(-8, 8)
    shifted = full_vocab_kl(z + scale, r + scale, direction=direction, chunk_size=chunk_size, backend="torch")
    kl, *_ = reference_full_kl((z + scale).double(), (r + scale).double(), direction == "reverse")
    check_close(shifted, kl, 1e-5 * (1 + kl.abs()), f"shifted by {scale}")


@PROPERTY
@given(data=st.data(), dtype=st.sampled_from(DTYPES), direction=st.sampled_from(["reverse", "forward"]))
def test_full_vocab_kl_from_hidden_never_gives_nan(data, dtype, direction):
    """Extreme finite hidden states and LM heads: the KL is finite and equals the float64 KL of the same
    (dtype-computed) logits, or a ValueError says that those logits overflow; never NaN. The gradients are
    finite wherever their products fit the dtype (sum_v |dKL/dz_v| |W_v| and sum_t |dKL/dz_t| |h_t|)."""
    rows, size, vocab = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(2, 8))
    bound = torch.finfo(dtype).max
    hidden = tensor(data, (rows, size), dtype, bound, moderate=3.0).requires_grad_()
    weight = tensor(data, (vocab, size), dtype, bound, moderate=3.0).requires_grad_()
    ref_hidden = tensor(data, (rows, size), dtype, bound, moderate=3.0)
    ref_weight = tensor(data, (vocab, size), dtype, bound, moderate=3.0)
    chunk_size = data.draw(st.integers(1, 3))
    logits, ref_logits = (hidden @ weight.T).detach(), ref_hidden @ ref_weight.T
    in_domain = all(torch.isfinite(t).all() and (t.abs() <= MAX_ABS_LOGIT).all() for t in (logits, ref_logits))
    try:
        got = full_vocab_kl_from_hidden(hidden, ref_hidden, weight, ref_weight, None, direction, chunk_size, backend="torch")
    except ValueError as error:
        assert not in_domain, f"raised inside the domain: {error}"
        assert "overflow" in str(error)
        return
    assert torch.isfinite(got).all()
    grad_hidden, grad_weight = torch.autograd.grad(got.sum(), (hidden, weight))
    if not in_domain:
        return
    kl, grad_logits, kl_scale, _ = reference_full_kl(logits.double(), ref_logits.double(), direction == "reverse")
    check_close(got, kl, 8 * EPS32 * kl_scale + 1e-30, "from hidden")
    limit = torch.finfo(dtype).max / 4
    fits_hidden = grad_logits.abs() @ weight.detach().double().abs() <= limit
    fits_weight = grad_logits.abs().T @ hidden.detach().double().abs() <= limit
    assert torch.isfinite(grad_hidden[fits_hidden].float()).all() and torch.isfinite(grad_weight[fits_weight].float()).all()


# ----------------------------------------------------------------------------------------------------------------
# Loss terms (core/losses.py)


@PROPERTY
@given(data=st.data(), dtype=st.sampled_from(DTYPES), with_lengths=st.booleans())
def test_length_normalized_nll_matches_float64(data, dtype, with_lengths):
    """Finite log-probs (sums within float32 range); masked positions may hold -inf or NaN and change nothing."""
    batch, tokens = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 12))
    bound = min(torch.finfo(dtype).max, 1e37)
    logps = tensor(data, (batch, tokens), dtype, bound, moderate=20.0)
    mask = torch.tensor(data.draw(st.lists(st.integers(0, 1), min_size=batch * tokens, max_size=batch * tokens))).reshape(batch, tokens)
    garbage = data.draw(st.sampled_from([0.0, NEG_INF, float("nan")]))
    logps = torch.where(mask.bool(), logps, torch.tensor(garbage, dtype=dtype)).requires_grad_()
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))) if with_lengths else None
    got = length_normalized_nll(logps, mask, lengths)
    (grad,) = torch.autograd.grad(got.sum(), logps)

    x = torch.where(mask.bool(), logps.detach().double(), 0.0)
    n = (mask.sum(-1) if lengths is None else lengths).double().clamp(min=1)
    want = -x.sum(-1) / n
    tol = 4 * EPS32 * (tokens + 2) * x.abs().sum(-1) / n + 1e-30
    check_close(got, want, tol, f"length_normalized_nll {dtype}")
    want_grad = torch.where(mask.bool(), -1.0 / n[:, None], 0.0)
    check_close(grad, want_grad, eps(dtype) * want_grad.abs(), "d nll / d logp")


@PROPERTY
@given(data=st.data(), dtype=st.sampled_from(DTYPES), margin_dtype=st.sampled_from((None, *DTYPES)))
def test_margin_preference_loss_matches_float64(data, dtype, margin_dtype):
    """-log sigmoid(logits - margin) for finite logits and margins whose difference fits float32."""
    batch = data.draw(st.integers(1, 6))
    bound = min(torch.finfo(dtype).max, 1e38)
    logits = tensor(data, (batch,), dtype, bound, moderate=30.0).requires_grad_()
    margin = None if margin_dtype is None else tensor(data, (batch,), margin_dtype, min(torch.finfo(margin_dtype).max, 1e38))
    got = margin_preference_loss(logits, margin)
    (grad,) = torch.autograd.grad(got.sum(), logits)

    x = logits.detach().double() - (0.0 if margin is None else margin.double())
    want = -torch.nn.functional.logsigmoid(x)
    rounding = EPS32 * (logits.detach().double().abs() + (0.0 if margin is None else margin.double().abs()))
    slope = torch.sigmoid(-x)  # |d loss / dx|
    check_close(got, want, 4 * (slope * rounding + EPS32 * want.abs()) + 1e-30, f"margin loss {dtype}/{margin_dtype}")
    want_grad = -torch.sigmoid(-x)
    check_close(grad, want_grad, 4 * (rounding * 0.25 + EPS32) + eps(dtype) * want_grad.abs() + subnormal_step(dtype), "d loss / d logits")


@PROPERTY
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_ptx_nll_matches_float64(data, dtype):
    """Finite logits within the full-vocab KL's domain; ignored positions may hold a row of -inf."""
    batch, tokens, vocab = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5)), data.draw(st.integers(2, 8))
    logits = tensor(data, (batch, tokens, vocab), dtype, logit_bound(dtype))
    labels = torch.tensor(data.draw(st.lists(st.integers(-1, vocab - 1), min_size=batch * tokens, max_size=batch * tokens)))
    labels = labels.reshape(batch, tokens).masked_fill(labels.reshape(batch, tokens) < 0, -100)
    ignored_rows = torch.zeros(batch, tokens, dtype=torch.bool)
    ignored_rows[:, :-1] = labels[:, 1:] == -100
    if data.draw(st.booleans()):
        logits[ignored_rows] = NEG_INF
    logits.requires_grad_()
    got = ptx_nll(logits, labels)
    (grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == torch.float32 and torch.isfinite(got) and torch.isfinite(grad.float()).all()

    z = logits.detach()[:, :-1].reshape(-1, vocab).double()
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    if not keep.any():
        assert got.item() == 0.0 and (grad == 0).all()
        return
    logp = torch.log_softmax(z[keep], -1)
    want = -logp.gather(1, y[keep, None]).mean()
    scale = (z[keep].abs().amax(-1) * 4 + vocab + 2).mean()
    check_close(got, want, 4 * EPS32 * scale, f"ptx_nll {dtype}")
    want_grad = torch.zeros_like(z)
    want_grad[keep] = (logp.exp() - torch.nn.functional.one_hot(y[keep], vocab)) / keep.sum()
    got_grad = grad[:, :-1].reshape(-1, vocab)
    check_close(got_grad, want_grad, 8 * EPS32 * scale / keep.sum() + eps(dtype) * want_grad.abs() + subnormal_step(dtype), "d ptx / d logits")
    assert (grad[:, -1] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# KL controllers (core/control.py)

positive = st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False).filter(lambda v: v > 0)


@PROPERTY
@given(
    init_coef=positive,
    target=positive,
    horizon=positive,
    clip=st.floats(1e-6, 10.0),
    steps=st.lists(st.tuples(st.floats(allow_nan=False, allow_infinity=False), st.integers(1, 10**6)), min_size=1, max_size=8),
)
def test_adaptive_controller_stays_positive_and_moves_toward_the_target(init_coef, target, horizon, clip, steps):
    """Each update multiplies beta by a factor in (0, 2) on the side of the target, and keeps it finite and > 0,
    or raises a ValueError (n_steps out of range, or beta leaving the floats); state_dict round-trips exactly."""
    controller = AdaptiveKLController(init_coef, target, horizon, clip)
    for observed, n_steps in steps:
        before = controller.value
        try:
            after = controller.update(observed, n_steps)
        except ValueError as error:
            assert controller.value == before, "a refused update must not move beta"
            assert "n_steps" in str(error) or "left (0, inf)" in str(error)
            assert n_steps >= horizon / clip or not 0 < before * (1 + min(max(observed / target - 1, -clip), clip) * n_steps / horizon) < math.inf
            continue
        assert 0 < after < math.inf
        error_term = observed / target - 1
        if error_term > 0:
            assert after >= before
        elif error_term < 0:
            assert after <= before
        bound = clip * n_steps / horizon
        assert before * (1 - bound) * (1 - 1e-12) <= after <= before * (1 + bound) * (1 + 1e-12)
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.state_dict() == controller.state_dict()


@PROPERTY
@given(
    name=st.sampled_from(["init_coef", "target", "horizon", "clip"]),
    bad=st.one_of(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), float("-inf"), True]), st.floats(max_value=0.0)),
)
def test_controller_numbers_outside_their_range_are_refused_by_name(name, bad):
    kwargs = dict(init_coef=0.1, target=1.0, horizon=100.0, clip=0.2)
    kwargs[name] = bad
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a finite number > 0, got {bad!r}")):
        AdaptiveKLController(**kwargs)
    if name == "init_coef" and not bad == 0.0:
        with pytest.raises(ValueError, match="coef must be a finite number >= 0"):
            FixedKLController(bad)
