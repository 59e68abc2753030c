"""Loss terms against hand-computed values."""

import math

import pytest
import torch

from trl_regularizers.core.losses import chunked_nll_from_hidden, length_normalized_nll, margin_preference_loss, per_pair, ptx_nll


def test_length_normalized_nll_by_hand():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-0.5, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(length_normalized_nll(token_logps, mask), torch.tensor([2.0, 0.5]))
    # eq. 8 read literally: divide by prompt + completion length
    torch.testing.assert_close(length_normalized_nll(token_logps, mask, lengths=torch.tensor([6, 4])), torch.tensor([1.0, 0.25]))


def test_margin_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    expected = torch.tensor([math.log1p(math.exp(-(1.0 - 0.5))), math.log1p(math.exp(-(-0.5 - 1.0)))])
    torch.testing.assert_close(margin_preference_loss(chosen - rejected, torch.tensor([0.5, 1.0])), expected)
    torch.testing.assert_close(margin_preference_loss(chosen - rejected), -torch.nn.functional.logsigmoid(chosen - rejected))


def test_margin_never_broadcasts_into_a_square_loss():
    rewards = torch.randn(4, 1)  # [B, 1] as a reward head returns them
    losses = margin_preference_loss(rewards - rewards.flip(0), torch.ones(4))
    assert losses.shape == (4,)
    with pytest.raises(ValueError, match="3 rows but there are 4 pairs"):
        margin_preference_loss(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \[B\] or \[B, 1\]"):
        per_pair(torch.zeros(4, 2), "margin")


def test_ptx_nll_is_the_token_mean_of_shifted_cross_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[2, 1, 0]])  # predictions: position 0 -> token 1 (p=.25), position 1 -> token 0 (p=.1)
    torch.testing.assert_close(ptx_nll(logits, labels), torch.tensor((math.log(4) + math.log(10)) / 2))
    ignored = torch.tensor([[2, 1, -100]])
    torch.testing.assert_close(ptx_nll(logits, ignored), torch.tensor(math.log(4)))
    assert ptx_nll(logits, torch.full((1, 3), -100)).item() == 0.0


# Numerics and argument checks ---------------------------------------------------------------------------------


def test_length_normalized_nll_ignores_whatever_masked_positions_hold():
    """-inf (a masked-vocabulary token) or NaN outside the mask gave NaN (-inf * 0); now value and gradient are
    those of the masked-in tokens only."""
    for garbage in (float("-inf"), float("nan")):
        token_logps = torch.tensor([[-1.0, -2.0, garbage], [garbage, -0.5, -0.5]], requires_grad=True)
        mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
        value = length_normalized_nll(token_logps, mask)
        (grad,) = torch.autograd.grad(value.sum(), token_logps)
        torch.testing.assert_close(value, torch.tensor([1.5, 0.5]))
        torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5, 0.0], [0.0, -0.5, -0.5]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_length_normalized_nll_sums_half_precision_in_float32(dtype):
    """100 float16 log-probs of -1000 summed to -inf in float16; bf16 sums of many tokens lost their last terms."""
    token_logps = torch.full((1, 100), -1000.0, dtype=dtype)
    value = length_normalized_nll(token_logps, torch.ones(1, 100))
    assert value.dtype == torch.float32 and value.item() == 1000.0
    small = torch.full((1, 512), -1.0, dtype=dtype)
    small[0, 0] = -512.0  # bf16 accumulation: 512 + 511 * 1 stops growing at 512 + 2^k steps
    assert length_normalized_nll(small, torch.ones(1, 512)).item() == pytest.approx((512 + 511) / 512, rel=1e-6)


def test_length_normalized_nll_checks_shapes():
    with pytest.raises(ValueError, match=r"token_logps \(2, 3\) and mask \(2, 1\) must both be \[B, T\]"):
        length_normalized_nll(torch.zeros(2, 3), torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \(2,\), got \(2, 1\)"):
        length_normalized_nll(torch.zeros(2, 3), torch.ones(2, 3), lengths=torch.ones(2, 1))


def test_margin_loss_subtracts_the_margin_in_float32():
    """With bf16 logits the subtraction ran in bf16: 100 - 99.6 came out as 0.5 instead of 0.4."""
    logits = torch.tensor([100.0], dtype=torch.bfloat16)
    value = margin_preference_loss(logits, torch.tensor([99.6]))
    expected = math.log1p(math.exp(-(100.0 - 99.6)))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_margin_loss_of_extreme_float16_logits_is_exact():
    """float16 logits and margins: -60000 - 5000 rounded to -64992 in float16; float32 math gives 65000."""
    logits = torch.tensor([-60000.0, 60000.0], dtype=torch.float16, requires_grad=True)
    value = margin_preference_loss(logits, torch.tensor([5000.0, -5000.0], dtype=torch.float16))
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert value.tolist() == [65000.0, 0.0]
    assert grad.tolist() == [-1.0, 0.0]


def test_ptx_nll_ignored_rows_of_minus_inf_give_no_nan_gradient():
    """An ignored position whose logits are all -inf (a fully masked vocabulary) put NaN into the gradient
    through log_softmax; only the kept rows enter the loss now."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = float("-inf")
    logits.requires_grad_()
    value = ptx_nll(logits, torch.tensor([[0, 1, -100]]))
    (grad,) = torch.autograd.grad(value, logits)
    assert value.item() == pytest.approx(math.log(4))
    torch.testing.assert_close(grad[0, 0], torch.tensor([0.25, -0.75, 0.25, 0.25]))
    assert (grad[0, 1:] == 0).all()


def test_ptx_nll_with_nothing_to_predict_is_zero_even_for_infinite_logits():
    """``logits.sum() * 0`` was NaN when the logits held -inf or summed past the float32 range (3e38 + 3e38)."""
    for fill in (3e38, float("-inf")):
        logits = torch.full((1, 3, 4), fill, requires_grad=True)
        value = ptx_nll(logits, torch.full((1, 3), -100))
        (grad,) = torch.autograd.grad(value, logits)
        assert value.item() == 0.0 and (grad == 0).all()


def test_ptx_nll_checks_its_arguments():
    logits = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) or ignore_index=-100, got 7"):
        ptx_nll(logits, torch.tensor([[0, 7, 1]]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) or ignore_index=-100, got -1"):
        ptx_nll(logits, torch.tensor([[0, -1, 1]]))
    with pytest.raises(ValueError, match="ignore_index must be an integer, got -100.0"):
        ptx_nll(logits, torch.tensor([[0, 1, 1]]), ignore_index=-100.0)
    with pytest.raises(ValueError, match="labels must hold integer token ids, got dtype torch.float32"):
        ptx_nll(logits, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] and labels \[B, T\], got \(1, 3, 4\) and \(1, 2\)"):
        ptx_nll(logits, torch.zeros(1, 2, dtype=torch.long))
    assert ptx_nll(logits, torch.tensor([[0, 1, 3]]), ignore_index=3).item() == pytest.approx(math.log(4))


@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_nll_from_hidden_equals_ptx_nll_of_the_logits(chunk_size, dtype):
    """Value and gradients (w.r.t. hidden states and LM-head weight) equal ptx_nll of ``hidden @ W.T``, in chunks of
    any size; ignored rows (NaN hidden states included) contribute nothing."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(37, 8, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, 37, (2, 6))
    labels[0, 4:] = -100
    with torch.no_grad():
        hidden[0, 3:] = float("nan")  # predicts the ignored labels[0, 4:]
    ours = chunked_nll_from_hidden(hidden[:, :-1].reshape(-1, 8), weight, labels[:, 1:].reshape(-1), chunk_size)
    ours_grads = torch.autograd.grad(3.0 * ours, (hidden, weight))
    kept = torch.ones(2, 6, 1, dtype=torch.bool)
    kept[0, 3:] = False
    safe_hidden = torch.where(kept, hidden, 0.0)
    expected = ptx_nll(safe_hidden @ weight.T, labels)
    expected_grads = torch.autograd.grad(3.0 * expected, (hidden, weight))
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)  # float32 math
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected.double(), **tolerance)
    for got, want in zip(ours_grads, expected_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), **tolerance)
    assert (ours_grads[0][0, 3:] == 0).all()


def test_chunked_nll_from_hidden_with_nothing_to_predict_and_bad_arguments():
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    value = chunked_nll_from_hidden(hidden, weight, torch.full((4,), -100))
    assert value.item() == 0.0 and all((g == 0).all() for g in torch.autograd.grad(value, (hidden, weight)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) or ignore_index=-100, got 5"):
        chunked_nll_from_hidden(hidden, weight, torch.tensor([0, 5, 1, 1]))
    with pytest.raises(ValueError, match="must hold integer token ids"):
        chunked_nll_from_hidden(hidden, weight, torch.zeros(4))
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\], weight \[V, H\] and labels \[N\]"):
        chunked_nll_from_hidden(hidden, weight, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        chunked_nll_from_hidden(hidden, weight, torch.zeros(4, dtype=torch.long), chunk_size=0)
