"""Which estimator x placement gives an unbiased gradient? Exact enumeration on a categorical policy.

pi_theta = softmax(theta) over V tokens, pi_ref fixed. For a token y ~ pi_theta:
* placement "loss"   -> expected gradient sum_y pi(y) d k(r_y) / d theta        (pathwise; pi(y) not differentiated)
* placement "reward" -> expected gradient sum_y pi(y) k(r_y) d log pi(y) / d theta (score function; k not differentiated)
The sets of pairs equal to the exact gradient of the KL are asserted against the registry of
trl_regularizers.core.kl, whose generated table docs/kl_estimators.md shows. Every registered estimator goes through
``kl_estimate`` on a record of the V possible sampled tokens, so a new one (of either kind) is checked as it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trl_regularizers.core.kl import KL_PLACEMENTS, estimator_table, kl_estimate, kl_estimator_names, unbiased_estimators, unbiased_pairs
from trl_regularizers.core.records import KLRecord

DOCS = Path(__file__).resolve().parents[2] / "docs" / "kl_estimators.md"


def policy_and_reference(seed: int, vocab: int = 5):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(vocab, generator=generator, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(vocab, generator=generator, dtype=torch.float64), -1)
    return theta, ref_logp


def exact_kl_gradient(theta, ref_logp, direction):
    theta = theta.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    if direction == "reverse":
        kl = (logp.exp() * (logp - ref_logp)).sum()
    else:
        kl = (ref_logp.exp() * (ref_logp - logp)).sum()
    return torch.autograd.grad(kl, theta)[0]


def per_token_values(theta, logp, ref_logp, estimator, direction):
    """The estimate [V] for each possible sampled token y (one position; its distribution is softmax(theta))."""
    vocab = len(logp)
    record = KLRecord(logp[None], ref_logp[None], torch.ones(1, vocab, dtype=logp.dtype),
                      logits=theta.expand(1, vocab, vocab), ref_logits=ref_logp.expand(1, vocab, vocab))
    return kl_estimate(record, estimator, direction)[0].to(logp.dtype)


def expected_gradient(theta, ref_logp, estimator, placement, direction):
    theta = theta.clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)
    weights = logp.exp().detach()
    values = per_token_values(theta, logp, ref_logp, estimator, direction)
    if placement == "loss":
        objective = (weights * values).sum()
    else:
        objective = (weights * values.detach() * logp).sum()
    (grad,) = torch.autograd.grad(objective, theta, allow_unused=True)
    return torch.zeros_like(theta) if grad is None else grad


def found_unbiased_pairs(direction: str, seed: int) -> set[tuple[str, str]]:
    theta, ref_logp = policy_and_reference(seed)
    truth = exact_kl_gradient(theta, ref_logp, direction)
    assert truth.abs().max() > 0.05  # a nontrivial case, so "biased" is detectable
    found = set()
    for estimator in kl_estimator_names():
        for placement in KL_PLACEMENTS:
            grad = expected_gradient(theta, ref_logp, estimator, placement, direction)
            if torch.allclose(grad, truth, atol=1e-5, rtol=0):
                found.add((estimator, placement))
            else:
                assert (grad - truth).abs().max() > 1e-3, (estimator, placement, direction)
    return found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_reverse_kl_gradient_table(seed):
    assert found_unbiased_pairs("reverse", seed) == set(unbiased_pairs("reverse"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_forward_kl_gradient_table(seed):
    assert found_unbiased_pairs("forward", seed) == set(unbiased_pairs("forward"))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_value_unbiased_estimators_need_both_gradient_parts(estimator):
    """Loss part + reward part = the full gradient of E_pi[k]; for k1/k3 that is the reverse-KL gradient."""
    theta, ref_logp = policy_and_reference(4)
    both = sum(expected_gradient(theta, ref_logp, estimator, placement, "reverse") for placement in KL_PLACEMENTS)
    torch.testing.assert_close(both, exact_kl_gradient(theta, ref_logp, "reverse"))


def test_k3_in_the_loss_follows_the_forward_kl_gradient():
    """GRPO's default (k3 in the loss) descends KL(pi_ref||pi) in expectation, not KL(pi||pi_ref)."""
    theta, ref_logp = policy_and_reference(6)
    torch.testing.assert_close(
        expected_gradient(theta, ref_logp, "k3", "loss", "reverse"), exact_kl_gradient(theta, ref_logp, "forward")
    )


def test_docs_show_the_generated_registry_table():
    assert estimator_table() in DOCS.read_text(), "docs/kl_estimators.md: paste trl_regularizers.core.kl.estimator_table()"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_times_ratio_metadata(seed):
    """GRPO's use_bias_correction_kl: the loss term k(r) * pi/sg(pi) (value k, plus a score-function part)."""
    theta, ref_logp = policy_and_reference(seed)
    truth = exact_kl_gradient(theta, ref_logp, "reverse")
    found = set()
    for estimator in kl_estimator_names():
        theta_ = theta.clone().requires_grad_()
        logp = torch.log_softmax(theta_, -1)
        values = per_token_values(theta_, logp, ref_logp, estimator, "reverse")
        objective = (logp.exp().detach() * values * torch.exp(logp - logp.detach())).sum()
        if torch.allclose(torch.autograd.grad(objective, theta_)[0], truth, atol=1e-5, rtol=0):
            found.add(estimator)
    assert found == set(unbiased_estimators("loss", times_ratio=True))
