"""PPO math (trl_regularizers.core.ppo) against hand-computed values, analytic gradients and TRL 1.12."""

from __future__ import annotations

import math

import pytest
import torch

from trl_regularizers.core.ppo import (
    WHITEN_EPS,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    shape_rewards,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ----------------------------------------------------------------------------- masked statistics
def test_masked_mean_by_hand():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    torch.testing.assert_close(masked_mean(values, mask), t(8.0 / 3.0))  # (1 + 2 + 5) / 3
    torch.testing.assert_close(masked_mean(values, mask, dim=1), t([1.5, 5.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN


def test_masked_var_by_hand():
    values, mask = t([1.0, 2.0, 3.0, 100.0]), torch.tensor([True, True, True, False])
    # mean 2; squared deviations 1, 0, 1: biased 2/3, Bessel-corrected 2/2 = 1
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), t(2.0 / 3.0))
    torch.testing.assert_close(masked_var(values, mask), t(1.0))
    # too few positions for a spread: 0 (TRL raises for none and gives NaN for one)
    one = torch.tensor([False, True, False, False])
    assert masked_var(values, one).item() == 0.0
    assert masked_var(values, one, unbiased=False).item() == 0.0
    assert masked_var(values, torch.zeros_like(one)).item() == 0.0


def test_masked_whiten_by_hand():
    values, mask = t([1.0, 2.0, 3.0, 100.0]), torch.tensor([True, True, True, False])
    scale = 1.0 / math.sqrt(1.0 + WHITEN_EPS)  # mean 2, unbiased var 1
    torch.testing.assert_close(masked_whiten(values, mask), t([-1.0, 0.0, 1.0, 98.0]) * scale)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), t([-1.0, 0.0, 1.0, 98.0]) * scale + 2.0)
    # [1, 3]: mean 2, unbiased var (1 + 1) / 1 = 2
    whitened = masked_whiten(t([1.0, 3.0]), torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(whitened, t([-1.0, 1.0]) / math.sqrt(2.0 + WHITEN_EPS))


def test_masked_whiten_with_too_few_positions_centers_only():
    values = t([5.0, 7.0, 9.0])
    one = torch.tensor([False, True, False])
    torch.testing.assert_close(masked_whiten(values, one), t([-2.0, 0.0, 2.0]))  # mean 7, no scaling
    torch.testing.assert_close(masked_whiten(values, one, shift_mean=False), values)
    none = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(masked_whiten(values, none), values)  # empty mask: mean 0, unchanged
    for mask in (one, none):  # the unused branch must not poison the gradient either
        leaf = values.clone().requires_grad_()
        masked_whiten(leaf, mask).sum().backward()
        assert torch.isfinite(leaf.grad).all()


def test_masked_statistics_ignore_what_is_masked_out():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, generator=generator, dtype=F64)
    mask = torch.rand(3, 5, generator=generator) < 0.6
    mask[0, :2] = True
    garbage = values.masked_fill(~mask, 1e6)
    assert masked_mean(garbage, mask).item() == pytest.approx(masked_mean(values, mask).item(), rel=1e-12)
    assert masked_var(garbage, mask).item() == pytest.approx(masked_var(values, mask).item(), rel=1e-12)
    torch.testing.assert_close(masked_whiten(garbage, mask)[mask], masked_whiten(values, mask)[mask])


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_masked_whiten_matches_trl_1_12():
    ppo = pytest.importorskip(
        "trl.experimental.ppo.ppo_trainer",
        reason="TRL >= 1.13 removed trl.experimental.ppo; the comparison runs in the TRL 1.12 environment",
    )
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        values = torch.randn(4, 7, generator=generator) * (1 + 10 * trial)
        mask = torch.rand(4, 7, generator=generator) < 0.7
        mask[0, :2] = True  # at least two positions: TRL raises or returns NaN otherwise
        # float32: bit for bit (the trainer's numbers do not change when it switches to these functions)
        assert torch.equal(masked_mean(values, mask), ppo.masked_mean(values, mask))
        assert torch.equal(masked_mean(values, mask, dim=1), ppo.masked_mean(values, mask, axis=1))
        assert torch.equal(masked_var(values, mask), ppo.masked_var(values, mask))
        assert torch.equal(masked_var(values, mask, unbiased=False), ppo.masked_var(values, mask, unbiased=False))
        for shift_mean in (True, False):
            assert torch.equal(masked_whiten(values, mask, shift_mean), ppo.masked_whiten(values, mask, shift_mean))
        # float64: TRL computes the Bessel factor in float32, so equal to rounding only
        torch.testing.assert_close(masked_whiten(values.double(), mask), ppo.masked_whiten(values.double(), mask))


# ----------------------------------------------------------------------------- reward shaping
def test_shape_rewards_by_hand():
    kl = t([[0.1, 0.2, 0.3, 0.0], [0.5, 0.5, 0.5, 0.5], [0.4, 0.0, 0.0, 0.0]])
    scores = t([1.0, 2.0, 3.0])
    last_index = torch.tensor([2, 3, -1])  # row 1 fills T; row 2 is an empty response
    non_score, rewards = shape_rewards(kl, scores, last_index, coef=0.5)
    torch.testing.assert_close(non_score, t([[-0.05, -0.1, -0.15, 0.0], [-0.25] * 4, [-0.2, 0.0, 0.0, 0.0]]))
    # score on last_index + 1 when it exists (3, -), else on last_index (3); -1 + 1 = 0
    torch.testing.assert_close(rewards, t([[-0.05, -0.1, -0.15, 1.0], [-0.25, -0.25, -0.25, 1.75], [2.8, 0.0, 0.0, 0.0]]))
    assert torch.equal(non_score, -0.5 * kl)  # not modified in place by the score


def test_shape_rewards_validates():
    kl, scores, last = torch.zeros(2, 3), torch.zeros(2), torch.tensor([0, 1])
    for coef in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"coef must be a finite number >= 0, got {coef}"):
            shape_rewards(kl, scores, last, coef)
    with pytest.raises(ValueError, match=r"scores must have shape \[B\] = \(2,\), got \(2, 1\)"):
        shape_rewards(kl, scores[:, None], last, 0.1)
    with pytest.raises(ValueError, match="last_index must be an integer tensor"):
        shape_rewards(kl, scores, last.float(), 0.1)
    with pytest.raises(ValueError, match=r"kl must have shape \[B, T\]"):
        shape_rewards(kl[0], scores, last, 0.1)


# ----------------------------------------------------------------------------- GAE
def test_gae_by_hand():
    rewards, values = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, gamma=0.5, lam=0.5)
    # t=2: delta = 2 + 0.5*0 - 0 = 2;      A = 2
    # t=1: delta = 0 + 0.5*0 - 1 = -1;     A = -1 + 0.25*2 = -0.5
    # t=0: delta = 1 + 0.5*1 - 0.5 = 1;    A = 1 + 0.25*(-0.5) = 0.875
    torch.testing.assert_close(advantages, t([[0.875, -0.5, 2.0]]))
    torch.testing.assert_close(returns, t([[1.375, 0.5, 2.0]]))


def test_gae_limits():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 6, generator=generator, dtype=F64)
    values = torch.randn(3, 6, generator=generator, dtype=F64)
    # gamma = lam = 1: telescoping sum, reward-to-go minus value
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    advantages, returns = gae(rewards, values, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, reward_to_go - values)
    torch.testing.assert_close(returns, reward_to_go)
    # gamma * lam = 0: the one-step TD error r_t + gamma V_{t+1} - V_t, with V_T = 0
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=F64)], 1)
    torch.testing.assert_close(gae(rewards, values, gamma=0.9, lam=0.0)[0], rewards + 0.9 * next_values - values)
    torch.testing.assert_close(gae(rewards, values, gamma=0.0, lam=0.7)[0], rewards - values)


def test_gae_ignores_trailing_padding():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(2, 4, generator=generator, dtype=F64)
    values = torch.randn(2, 4, generator=generator, dtype=F64)
    padded = [torch.cat([x, torch.zeros(2, 3, dtype=F64)], 1) for x in (rewards, values)]
    advantages, returns = gae(rewards, values, 0.99, 0.95)
    padded_advantages, padded_returns = gae(*padded, 0.99, 0.95)
    torch.testing.assert_close(padded_advantages[:, :4], advantages)
    torch.testing.assert_close(padded_returns[:, :4], returns)
    assert (padded_advantages[:, 4:] == 0).all()


@pytest.mark.parametrize("name, value", [("gamma", 1.5), ("gamma", -0.1), ("gamma", math.nan), ("lam", 2.0), ("lam", math.inf)])
def test_gae_validates(name, value):
    kwargs = {"gamma": 0.9, "lam": 0.9, name: value}
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\], got {value}"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        gae(torch.zeros(1, 2), torch.zeros(1, 3), 0.9, 0.9)


# ----------------------------------------------------------------------------- clipped policy loss
# ratios 1.5, 0.5, 1.1, 1.0, 0.5, 1.5 with eps = 0.2:
#   A= 1, r=1.5: -1.5 vs -1.2 -> -1.2 clipped (grad 0)       A= 1, r=0.5: -0.5 vs -0.8 -> -0.5
#   A=-1, r=1.1:  1.1 vs  1.1 -> 1.1 (inside the range)       A= 2, r=1.0: -2.0 vs -2.0 -> -2.0
#   A=-1, r=0.5:  0.5 vs  0.8 -> 0.8 clipped (grad 0)         A=-1, r=1.5:  1.5 vs  1.2 -> 1.5
RATIOS = [1.5, 0.5, 1.1, 1.0, 0.5, 1.5]
ADVANTAGES = [1.0, 1.0, -1.0, 2.0, -1.0, -1.0]
CLIPPED = [True, False, False, False, True, False]


def policy_inputs():
    old = t([-1.0, -2.0, -0.5, -3.0, -1.5, -0.2])
    logprobs = (old + t(RATIOS).log()).requires_grad_()
    return logprobs, old, t(ADVANTAGES).requires_grad_()


def test_clipped_policy_loss_by_hand():
    logprobs, old, advantages = policy_inputs()
    mask = torch.ones(6, dtype=torch.bool)
    loss, stats = clipped_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    torch.testing.assert_close(loss, t((-1.2 - 0.5 + 1.1 - 2.0 + 0.8 + 1.5) / 6))
    assert stats.clipfrac.item() == pytest.approx(2 / 6)
    torch.testing.assert_close(stats.ratio_mean, t(sum(RATIOS) / 6))
    torch.testing.assert_close(stats.approxkl, t(0.5 * sum(math.log(r) ** 2 for r in RATIOS) / 6))
    assert not (stats.clipfrac.requires_grad or stats.approxkl.requires_grad or stats.ratio_mean.requires_grad)


def test_clipped_policy_loss_gradients_are_the_analytic_ones():
    logprobs, old, advantages = policy_inputs()
    loss, _ = clipped_policy_loss(logprobs, old, advantages, torch.ones(6, dtype=torch.bool), cliprange=0.2)
    grad_logprobs, grad_advantages = torch.autograd.grad(loss, (logprobs, advantages))
    n = 6
    # unclipped term chosen: d/dlogp (-A r) = -A r, d/dA = -r; clipped term chosen: 0 and -clip(r)
    expected_logprobs = [0.0 if c else -a * r / n for a, r, c in zip(ADVANTAGES, RATIOS, CLIPPED)]
    expected_advantages = [-min(max(r, 0.8), 1.2) / n if c else -r / n for r, c in zip(RATIOS, CLIPPED)]
    torch.testing.assert_close(grad_logprobs, t(expected_logprobs))
    torch.testing.assert_close(grad_advantages, t(expected_advantages))


def test_clipped_policy_loss_ignores_padding():
    logprobs, old, advantages = policy_inputs()
    mask = torch.tensor([True, True, True, True, False, False])
    loss, stats = clipped_policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    torch.testing.assert_close(loss, t((-1.2 - 0.5 + 1.1 - 2.0) / 4))
    assert stats.clipfrac.item() == pytest.approx(1 / 4)
    # garbage in the padded positions changes neither the loss nor its gradient there (0)
    garbage = [x.detach().clone() for x in (logprobs, old, advantages)]
    for x, fill in zip(garbage, (5.0, -7.0, 100.0)):
        x[4:] = fill
    leaf = garbage[0].requires_grad_()
    padded_loss, masked = clipped_policy_loss(leaf, garbage[1], garbage[2], mask, cliprange=0.2, masked_stats=True)
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(masked.approxkl, t(0.5 * sum(math.log(r) ** 2 for r in RATIOS[:4]) / 4))
    torch.testing.assert_close(masked.ratio_mean, t(sum(RATIOS[:4]) / 4))
    padded_loss.backward()
    assert (leaf.grad[4:] == 0).all()
    # TRL's unmasked stats: padding filled with one value in both log-probs counts as log-ratio 0, ratio 1
    trl_like = [x.detach().clone() for x in (logprobs, old)]
    for x in trl_like:
        x[4:] = 1.0  # INVALID_LOGPROB
    _, unmasked = clipped_policy_loss(*trl_like, advantages.detach(), mask, cliprange=0.2)
    torch.testing.assert_close(unmasked.approxkl, t(0.5 * sum(math.log(r) ** 2 for r in RATIOS[:4]) / 6))
    torch.testing.assert_close(unmasked.ratio_mean, t((sum(RATIOS[:4]) + 2.0) / 6))
    # an empty mask gives 0 (TRL: NaN)
    assert clipped_policy_loss(logprobs, old, advantages, torch.zeros(6, dtype=torch.bool), 0.2)[0].item() == 0.0


# ----------------------------------------------------------------------------- clipped value loss
# c = 0.2:
#   V=1.0, old=0.0, R=0.0: clip 0.2; errors 1.00 vs 0.04 -> 1.00 unclipped, dV = (V - R)/n
#   V=3.0, old=2.5, R=4.0: clip 2.7; errors 1.00 vs 1.69 -> 1.69 clipped,   dV = 0
#   V=0.0, old=0.5, R=2.0: clip 0.3; errors 4.00 vs 2.89 -> 4.00 unclipped
#   V=2.0, old=2.0, R=2.5: clip 2.0; errors 0.25 vs 0.25 -> 0.25 inside the range
VALUES, OLD_VALUES, RETURNS = [1.0, 3.0, 0.0, 2.0], [0.0, 2.5, 0.5, 2.0], [0.0, 4.0, 2.0, 2.5]
VALUES_CLIPPED, VALUE_CLIPPED = [0.2, 2.7, 0.3, 2.0], [False, True, False, False]


def test_clipped_value_loss_by_hand_and_gradients():
    values, returns = t(VALUES).requires_grad_(), t(RETURNS).requires_grad_()
    loss, stats = clipped_value_loss(values, t(OLD_VALUES), returns, torch.ones(4, dtype=torch.bool), cliprange_value=0.2)
    torch.testing.assert_close(loss, t(0.5 * (1.0 + 1.69 + 4.0 + 0.25) / 4))
    assert stats.clipfrac.item() == pytest.approx(1 / 4)
    grad_values, grad_returns = torch.autograd.grad(loss, (values, returns))
    n = 4
    expected_values = [0.0 if c else (v - r) / n for v, r, c in zip(VALUES, RETURNS, VALUE_CLIPPED)]
    expected_returns = [-((vc if c else v) - r) / n for v, vc, r, c in zip(VALUES, VALUES_CLIPPED, RETURNS, VALUE_CLIPPED)]
    torch.testing.assert_close(grad_values, t(expected_values))
    torch.testing.assert_close(grad_returns, t(expected_returns))


def test_clipped_value_loss_ignores_padding():
    mask = torch.tensor([True, False, True, True, False])
    values = t(VALUES + [50.0]).requires_grad_()
    loss, stats = clipped_value_loss(values, t(OLD_VALUES + [-9.0]), t(RETURNS + [3.0]), mask, cliprange_value=0.2)
    torch.testing.assert_close(loss, t(0.5 * (1.0 + 4.0 + 0.25) / 3))
    assert stats.clipfrac.item() == pytest.approx(0.0)
    loss.backward()
    assert values.grad[1].item() == 0.0 and values.grad[4].item() == 0.0


@pytest.mark.parametrize("value", [0.0, -0.2, math.inf, math.nan])
def test_clip_ranges_are_validated(value):
    x, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"cliprange must be a finite number > 0, got {value}"):
        clipped_policy_loss(x, x, x, mask, cliprange=value)
    with pytest.raises(ValueError, match=rf"cliprange_value must be a finite number > 0, got {value}"):
        clipped_value_loss(x, x, x, mask, cliprange_value=value)


def test_losses_refuse_broadcasting():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"advantages \(2, 1\)"):
        clipped_policy_loss(x, x, x[:, :1], mask, cliprange=0.2)
    with pytest.raises(ValueError, match=r"mask \(2,\)"):
        clipped_value_loss(x, x, x, mask[:, 0], cliprange_value=0.2)


# ----------------------------------------------------------------------------- property: finite in, finite out
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_finite_inputs_give_finite_outputs():
    hypothesis = pytest.importorskip("hypothesis", reason="the property test needs hypothesis (the dev extra)")
    st = hypothesis.strategies

    @st.composite
    def batches(draw):
        batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 6))
        dtype = draw(st.sampled_from(DTYPES))

        def tensor(low, high):
            numbers = draw(st.lists(st.floats(low, high, width=32), min_size=batch * length, max_size=batch * length))
            return torch.tensor(numbers).reshape(batch, length).to(dtype)

        # rows of the mask may be all False (padding rows), and so may the whole mask
        flags = draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
        mask = torch.tensor(flags).reshape(batch, length)
        if draw(st.booleans()):
            mask[draw(st.integers(0, batch - 1))] = False
        last_index = torch.tensor(draw(st.lists(st.integers(-1, length - 1), min_size=batch, max_size=batch)))
        return dtype, mask, last_index, tensor

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(batches(), st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.01, 10.0))
    def check(batch, unit, clip):
        dtype, mask, last_index, tensor = batch
        values = tensor(-1e3, 1e3)
        everywhere = torch.ones_like(mask) if dtype != torch.float16 else mask  # float16 can overflow off the mask
        assert torch.isfinite(masked_mean(values, mask)) and torch.isfinite(masked_var(values, mask))
        for shift_mean in (True, False):
            whitened = masked_whiten(values, mask, shift_mean)
            assert whitened.dtype == dtype and torch.isfinite(whitened[everywhere]).all()
        kl, scores = tensor(0.0, 10.0), tensor(-10.0, 10.0)[:, 0]
        non_score, rewards = shape_rewards(kl, scores, last_index, coef=unit)
        assert torch.isfinite(non_score).all() and torch.isfinite(rewards).all()
        advantages, returns = gae(rewards, tensor(-100.0, 100.0), gamma=unit, lam=1.0 - unit)
        assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
        logprobs = tensor(-10.0, 0.0).requires_grad_()  # log-ratios within +-10: exp fits float16
        loss, stats = clipped_policy_loss(logprobs, tensor(-10.0, 0.0), tensor(-2.0, 2.0), mask, cliprange=clip)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats) and torch.isfinite(logprobs.grad).all()
        values = tensor(-100.0, 100.0).requires_grad_()
        loss, stats = clipped_value_loss(values, tensor(-100.0, 100.0), tensor(-100.0, 100.0), mask, cliprange_value=clip)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(stats.clipfrac) and torch.isfinite(values.grad).all()

    check()
