"""KL estimator values against exact KL on small categorical distributions, and the chunked full-vocab KL."""

from __future__ import annotations

import math

import pytest
import torch

from trl_regularizers.core.full_kl import full_vocab_kl
from trl_regularizers.core.kl import (
    KL_ESTIMATORS,
    MAX_CLAMP,
    finite_gradient_bound,
    get_kl_estimator,
    kl_estimator_names,
    per_token_kl,
    register_kl_estimator,
)

SAMPLED = kl_estimator_names("log_ratio")
VALUE_UNBIASED = {"k1", "k3"}  # E_pi[k(r)] = KL exactly, in either direction


def categorical_pair(vocab: int = 6, seed: int = 0, spread: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(spread * torch.randn(vocab, generator=generator, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(spread * torch.randn(vocab, generator=generator, dtype=torch.float64), -1)
    return logp, ref_logp


def exact_kl(logp: torch.Tensor, ref_logp: torch.Tensor, direction: str) -> torch.Tensor:
    if direction == "reverse":
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def test_registry_lists_every_estimator_and_rejects_unknown_names():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "abs", "full"}
    assert SAMPLED == ("k1", "k2", "k3", "abs") and KL_ESTIMATORS["full"].needs_distribution
    assert kl_estimator_names() == ("k1", "k2", "k3", "abs", "full")
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        get_kl_estimator("k4")
    with pytest.raises(ValueError, match="already registered"):
        register_kl_estimator("k1")(lambda r: r)
    with pytest.raises(ValueError, match="reverse, forward"):
        per_token_kl(torch.zeros(2), torch.zeros(2), "k1", direction="sideways")


def test_hand_computed_values():
    r = torch.tensor([0.5, -1.0, 0.0])
    logps, ref = r, torch.zeros(3)
    torch.testing.assert_close(per_token_kl(logps, ref, "k1"), r)
    torch.testing.assert_close(per_token_kl(logps, ref, "k2"), torch.tensor([0.125, 0.5, 0.0]))
    e = torch.exp(torch.tensor(1.0))
    torch.testing.assert_close(per_token_kl(logps, ref, "k3"), torch.tensor([torch.exp(torch.tensor(-0.5)) - 0.5, e - 2.0, 0.0]))
    torch.testing.assert_close(per_token_kl(logps, ref, "abs"), torch.tensor([0.5, 1.0, 0.0]))
    # forward: rho = exp(-r); k3 form is rho*log(rho) - rho + 1
    rho = torch.exp(-r)
    torch.testing.assert_close(per_token_kl(logps, ref, "k3", "forward"), rho * torch.log(rho) - rho + 1)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("estimator", SAMPLED)
def test_every_estimator_is_zero_for_equal_distributions(estimator, direction):
    logp, _ = categorical_pair()
    values = per_token_kl(logp, logp.clone(), estimator, direction)
    assert torch.equal(values, torch.zeros_like(values))


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("estimator", SAMPLED)
def test_exact_expectation_matches_kl_only_for_unbiased_estimators(estimator, direction):
    logp, ref_logp = categorical_pair(seed=3)
    expectation = (logp.exp() * per_token_kl(logp, ref_logp, estimator, direction)).sum()
    truth = exact_kl(logp, ref_logp, direction)
    if estimator in VALUE_UNBIASED:
        torch.testing.assert_close(expectation, truth)
    else:
        assert abs(expectation - truth) > 1e-3, f"{estimator} should be biased here"


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("estimator", SAMPLED)
def test_monte_carlo_mean_of_samples_from_pi(estimator, direction):
    """Unbiased estimators land within 4 standard errors of the exact KL; biased ones land on their own
    expectation (k2: E[r^2]/2; abs: E|r|), far from the KL."""
    logp, ref_logp = categorical_pair(vocab=8, seed=1, spread=0.7)
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(7))
    values = per_token_kl(logp[samples], ref_logp[samples], estimator, direction)
    mean, stderr = values.mean(), values.std() / len(values) ** 0.5
    truth = exact_kl(logp, ref_logp, direction)
    own_expectation = (logp.exp() * per_token_kl(logp, ref_logp, estimator, direction)).sum()
    assert abs(mean - own_expectation) < 4 * stderr
    if estimator in VALUE_UNBIASED:
        assert abs(mean - truth) < 4 * stderr
    else:
        assert abs(mean - truth) > 10 * stderr


def test_k2_bias_is_the_second_order_term():
    """k2 = r^2/2 matches KL to second order: the relative bias vanishes as pi -> pi_ref."""
    relative_bias = []
    for spread in (1.0, 0.1, 0.01):
        logp, ref_logp = categorical_pair(seed=5, spread=spread)
        expectation = (logp.exp() * per_token_kl(logp, ref_logp, "k2")).sum()
        truth = exact_kl(logp, ref_logp, "reverse")
        relative_bias.append(abs(expectation / truth - 1).item())
    assert relative_bias[0] > relative_bias[1] > relative_bias[2]
    assert relative_bias[2] < 0.02


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("estimator", SAMPLED)
def test_clamp_keeps_values_and_gradients_finite_at_huge_log_ratios(estimator, direction):
    logps = torch.tensor([1e4, -1e4, 3.0, -3.0], requires_grad=True)
    values = per_token_kl(logps, torch.zeros(4), estimator, direction, clamp=20.0)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(logps.grad).all()
    # inside the bound the clamp changes nothing
    unclamped = per_token_kl(logps.detach()[2:], torch.zeros(2), estimator, direction)
    torch.testing.assert_close(values.detach()[2:], unclamped)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_clamp_bounds_the_reference_so_clamped_tokens_keep_their_gradient(estimator):
    """kl_clamp has one meaning: |r| <= c by moving the reference; the gradient through log pi stays k'(+-c)."""
    logps = torch.tensor([30.0, -30.0], dtype=torch.float64, requires_grad=True)
    per_token_kl(logps, torch.zeros(2, dtype=torch.float64), estimator, clamp=5.0).sum().backward()
    r = torch.tensor([5.0, -5.0], dtype=torch.float64).requires_grad_()
    get_kl_estimator(estimator)(r).sum().backward()
    torch.testing.assert_close(logps.grad, r.grad)
    assert (logps.grad != 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("estimator", SAMPLED)
def test_half_precision_values_and_gradients_are_finite_at_every_log_ratio(estimator, direction, dtype):
    """At the default clamp (20) k3's float16 gradient would be 1 - e^20 = -4.9e8, -inf in float16: the bound
    tightens to ``finite_gradient_bound(float16)`` (6.9) there. bfloat16 holds e^20: its bound is the clamp."""
    logps = torch.tensor([-1e4, -60.0, -20.0, -3.0, 0.0, 3.0, 20.0, 60.0, 1e4], dtype=dtype, requires_grad=True)
    values = per_token_kl(logps, torch.zeros(9, dtype=dtype), estimator, direction, clamp=20.0)
    (grad,) = torch.autograd.grad(values.sum(), logps)
    assert values.dtype == torch.float32 and torch.isfinite(values).all()
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    limit = min(20.0, finite_gradient_bound(dtype))
    assert limit == (20.0 if dtype == torch.bfloat16 else pytest.approx(6.93, abs=0.01))
    reference = per_token_kl(logps.detach().double(), torch.zeros(9, dtype=torch.float64), estimator, direction, clamp=limit)
    # rtol: logps +- limit is rounded in float32, 1e-3 in r at |logps| = 1e4
    torch.testing.assert_close(values.double(), reference, rtol=2e-3, atol=0)
    assert torch.equal(values[3:6], per_token_kl(logps.detach()[3:6].float(), torch.zeros(3), estimator, direction))


def test_without_the_clamp_the_largest_bound_keeps_k3_finite():
    """kl_clamp=None: k3 at r = -1e4 would be e^1e4 (inf); the largest bound (50) gives k3(-50) instead, in float32
    as in float64. float32 itself would hold up to ``finite_gradient_bound(float32)`` (about 80)."""
    assert 79 < finite_gradient_bound(torch.float32) < 81
    for dtype in (torch.float32, torch.float64):
        got = per_token_kl(torch.zeros(1, dtype=dtype), torch.tensor([1e4], dtype=dtype), "k3")
        torch.testing.assert_close(got.double(), torch.tensor([math.expm1(MAX_CLAMP) - MAX_CLAMP], dtype=torch.float64), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"clamp must be in \(0, 50.0\]"):
        per_token_kl(torch.zeros(1), torch.zeros(1), "k3", clamp=0.0)


def naive_full_kl(logits, ref_logits, direction):
    logp = torch.log_softmax(logits.double(), -1)
    logq = torch.log_softmax(ref_logits.double(), -1)
    return exact_kl(logp, logq, direction)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_chunked_full_kl_equals_naive_values_and_gradients(direction, chunk_size):
    generator = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(2, 5, 97, generator=generator)).requires_grad_()
    ref_logits = 3 * torch.randn(2, 5, 97, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    weights = torch.randn(2, 5, generator=generator)

    ours = full_vocab_kl(logits, ref_logits, mask=mask, direction=direction, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)

    reference_logits = logits.detach().double().requires_grad_()
    naive = naive_full_kl(reference_logits, ref_logits, direction) * mask
    (naive_grad,) = torch.autograd.grad((naive * weights.double()).sum(), reference_logits)

    assert ours.dtype == torch.float32 and ours.shape == (2, 5)
    torch.testing.assert_close(ours.double(), naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad.double(), naive_grad, atol=1e-5, rtol=0)
    assert torch.equal(ours[0, 3:], torch.zeros(2))


def test_full_kl_keeps_the_logits_dtype_for_the_gradient_and_ignores_ref_grads():
    logits = torch.randn(4, 33, dtype=torch.bfloat16, requires_grad=True)
    ref_logits = torch.randn(4, 33, dtype=torch.bfloat16, requires_grad=True)
    full_vocab_kl(logits, ref_logits).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and ref_logits.grad is None
    with pytest.raises(ValueError, match="same shape"):
        full_vocab_kl(logits, ref_logits[:, :5])
