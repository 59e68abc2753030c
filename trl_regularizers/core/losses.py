"""Regularizing loss terms. Equation numbers refer to the regularization chapter (shared/reference).

Shapes: B = batch (pairs or sequences), T = tokens, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_pair(values: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``values`` as shape [B]; accepts [B] or [B, 1] and refuses anything else.

    A [B] margin broadcast against [B, 1] rewards silently builds a [B, B] loss (ms-swift #9927).
    """
    if values.dim() == 2 and values.shape[1] == 1:
        return values[:, 0]
    if values.dim() != 1:
        raise ValueError(f"{name} must have shape [B] or [B, 1], got {tuple(values.shape)}")
    return values


def length_normalized_nll(token_logps: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence NLL divided by a length: the alpha term of DPO+NLL (eq. 7-8, Pang et al. 2024).

    Args:
        token_logps: [B, T] log-probabilities of the target tokens.
        mask: [B, T], 1 on the tokens whose log-probs are summed (the chosen completion).
        lengths: [B] normalizers; defaults to ``mask.sum(-1)`` (completion tokens). Pass the
            prompt+completion lengths for the |c|+|y| normalization of eq. 8 read literally.

    Returns:
        [B] tensor ``-sum_t mask * logp / length``.
    """
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    if lengths is None:
        lengths = mask.sum(-1)
    return -total / lengths.to(total.dtype).clamp(min=1.0)


def margin_preference_loss(logits: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair ``-log sigmoid(logits - margin)``.

    With ``logits = r(y_c) - r(y_r)`` this is the Llama 2 margin reward loss (eq. 9, Touvron et al. 2023);
    with ``logits = beta * (chosen log-ratio - rejected log-ratio)`` it is DPO with a per-pair offset
    (ODPO, Amini et al. 2024). ``margin=None`` means no margin.

    Args:
        logits: [B] or [B, 1].
        margin: [B] or [B, 1], or None.

    Returns:
        [B] losses (take ``.mean()`` for the batch loss).
    """
    logits = per_pair(logits, "logits")
    if margin is not None:
        margin = per_pair(margin, "margin")
        if margin.shape != logits.shape:
            raise ValueError(f"margin has {margin.shape[0]} rows but there are {logits.shape[0]} pairs")
        logits = logits - margin.to(logits.dtype)
    return -F.logsigmoid(logits)


def ptx_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token-mean next-token NLL on pretraining data: the gamma term of PPO-ptx (eq. 6, Ouyang et al. 2022).

    Args:
        logits: [B, T, V] logits of the model on the ptx batch.
        labels: [B, T] token ids, ``ignore_index`` where no loss is taken; shifted by one inside.

    Returns:
        scalar: mean over the non-ignored next-token predictions (0 if there are none).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if not (shift_labels != ignore_index).any():
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)
