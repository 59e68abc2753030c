"""Typed records: what a TRL trainer already computed, handed by its adapter to the regularizers.

Shapes: ``B`` sequences (or pairs), ``T`` completion positions, ``H`` hidden size, ``V`` vocabulary.
Log-probs are of the sampled/labelled token at each position and 0 where the mask is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HiddenStates:
    """The next-token distribution at each position as ``logits = hidden @ weight.T / temperature``."""

    hidden: torch.Tensor
    """[B, T, H] final hidden states that predict each completion token."""
    weight: torch.Tensor
    """[V, H] the LM-head weight (bias-free)."""
    temperature: float = 1.0


@dataclass(frozen=True)
class KLRecord:
    """Per-token inputs of a KL estimate for a batch of completions sampled from the policy."""

    logps: torch.Tensor | None
    """[B, T] log pi(y_t): with its graph inside a loss, detached at rollout time. None where the tokens are not
    samples of the policy (SFT's data tokens): only estimators of the whole distribution apply then."""
    ref_logps: torch.Tensor | None
    """[B, T] log pi_ref(y_t), detached (None with ``logps``)."""
    mask: torch.Tensor
    """[B, T] float, 1 on the completion tokens that count."""
    policy_states: HiddenStates | None = None
    """The whole policy distribution, for estimators that need logits (``full``)."""
    ref_states: HiddenStates | None = None
    """The whole reference distribution, for estimators that need logits (``full``)."""
    logits: torch.Tensor | None = None
    """[B, T, V] policy logits, where the trainer has them (PPO rollouts), for ``full``."""
    ref_logits: torch.Tensor | None = None
    """[B, T, V] reference logits, where the trainer has them (PPO rollouts), for ``full``."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One DPO micro-batch of ``B`` (chosen, rejected) pairs, from the forward DPO already ran."""

    chosen_logps: torch.Tensor
    """[B, T] per-token policy log-probs of the chosen completion tokens (with their graph)."""
    rejected_logps: torch.Tensor
    """[B, T] the same for the rejected completions."""
    chosen_mask: torch.Tensor
    """[B, T] float, 1 on chosen completion tokens."""
    rejected_mask: torch.Tensor
    """[B, T] float, 1 on rejected completion tokens."""
    chosen_lengths: torch.Tensor
    """[B] prompt + chosen completion tokens (the sequence length of eq. 8)."""
    ref_chosen_logps: torch.Tensor | None
    """[B] summed reference log-probs of the chosen completions, detached (None when nothing needs them)."""
    ref_rejected_logps: torch.Tensor | None
    """[B] the same for the rejected completions."""
    columns: dict[str, torch.Tensor]
    """[B] float per-pair columns the regularizer asked for (e.g. ``margin``)."""
