"""Loss terms against hand-computed values."""

import math

import pytest
import torch

from trl_regularizers.core.losses import length_normalized_nll, margin_preference_loss, per_pair, ptx_nll


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
