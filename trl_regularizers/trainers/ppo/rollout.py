"""``Rollout``: one PPO batch after sampling, scoring, KL shaping and GAE, as the update reads it (torchtune's
``Trajectory`` plays the same part). Shapes: ``B`` sequences, ``Tq`` query tokens, ``T`` response tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rollout:
    queries: torch.Tensor
    """[B, Tq] left-padded prompt ids."""
    query_responses: torch.Tensor
    """[B, Tq + T] prompt and sampled response ids."""
    responses: torch.Tensor
    """[B, T] sampled response ids."""
    postprocessed: torch.Tensor
    """[B, T] responses truncated after the stop token (pad after it), as the reward model scores them."""
    sequence_lengths: torch.Tensor
    """[B] index of each response's last token."""
    padding_mask: torch.Tensor
    """[B, T] bool, True after the last token."""
    padding_mask_p1: torch.Tensor
    """[B, T] bool, True more than one step after the last token (values cover one step past it)."""
    logprobs: torch.Tensor
    """[B, T] sampling log-probs, ``INVALID_LOGPROB`` under ``padding_mask``."""
    ref_logprobs: torch.Tensor
    """[B, T] reference log-probs, ``INVALID_LOGPROB`` under ``padding_mask``."""
    values: torch.Tensor
    """[B, T] value estimates, 0 under ``padding_mask_p1``."""
    scores: torch.Tensor
    """[B] reward-model scores (minus ``missing_eos_penalty`` where a response has no EOS)."""
    contain_eos: torch.Tensor
    """[B] bool."""
    kl: torch.Tensor
    """[B, T] per-token KL estimate, 0 after the response."""
    kl_coef: float
    """The KL coefficient the rewards were shaped with."""
    non_score_reward: torch.Tensor
    """[B, T] ``-kl_coef * kl``."""
    rewards: torch.Tensor
    """[B, T] per-token rewards (whitened if asked)."""
    advantages: torch.Tensor
    """[B, T] GAE advantages, whitened over the response tokens."""
    returns: torch.Tensor
    """[B, T] value targets."""
