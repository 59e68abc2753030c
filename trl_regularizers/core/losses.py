"""Regularizing loss terms. Equation numbers refer to the regularization chapter (shared/reference).

Shapes: B = batch (pairs or sequences), T = tokens, V = vocabulary. Half-precision inputs are computed and
returned in float32 (sums of many bf16/fp16 terms lose precision or overflow).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from trl_regularizers.core.full_kl import check_chunk_size, rows_per_chunk


def per_pair(values: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``values`` as shape [B]; accepts [B] or [B, 1] and refuses anything else.

    A [B] margin broadcast against [B, 1] rewards silently builds a [B, B] loss (ms-swift #9927).
    """
    if values.dim() == 2 and values.shape[1] == 1:
        return values[:, 0]
    if values.dim() != 1:
        raise ValueError(f"{name} must have shape [B] or [B, 1], got {tuple(values.shape)}")
    return values


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The widest floating dtype among ``tensors`` and float32."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def length_normalized_nll(token_logps: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence NLL divided by a length: the alpha term of DPO+NLL (eq. 7-8, Pang et al. 2024).

    ``-sum_t mask_t logp_t / max(length, 1)``; positions with ``mask == 0`` contribute exactly 0 (value and
    gradient) whatever ``token_logps`` holds there, ``-inf`` included.

    Args:
        token_logps: [B, T] log-probabilities of the target tokens.
        mask: [B, T], 1 on the tokens whose log-probs are summed (the chosen completion).
        lengths: [B] normalizers; defaults to ``mask.sum(-1)`` (completion tokens). Pass the
            prompt+completion lengths for the |c|+|y| normalization of eq. 8 read literally.
            Lengths below 1 count as 1.

    Returns:
        [B] tensor in at least float32.
    """
    if token_logps.dim() != 2 or mask.shape != token_logps.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    if lengths is not None and lengths.shape != token_logps.shape[:1]:
        raise ValueError(f"lengths must have shape [B] = {tuple(token_logps.shape[:1])}, got {tuple(lengths.shape)}")
    dtype = compute_dtype(token_logps, mask)
    weights = mask.to(dtype)
    total = torch.where(mask != 0, token_logps.to(dtype) * weights, 0.0).sum(-1)
    if lengths is None:
        lengths = weights.sum(-1)
    return -total / lengths.to(dtype).clamp(min=1.0)


def margin_preference_loss(logits: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair ``-log sigmoid(logits - margin)``, computed in at least float32.

    With ``logits = r(y_c) - r(y_r)`` this is the Llama 2 margin reward loss (eq. 9, Touvron et al. 2023);
    with ``logits = beta * (chosen log-ratio - rejected log-ratio)`` it is DPO with a per-pair offset
    (ODPO, Amini et al. 2024). ``margin=None`` means no margin.

    Args:
        logits: [B] or [B, 1].
        margin: [B] or [B, 1], or None. Finite ``logits`` and ``margin`` give a finite loss while
            ``|logits - margin|`` fits the compute dtype (float32: below 3.4e38).

    Returns:
        [B] losses (take ``.mean()`` for the batch loss).
    """
    logits = per_pair(logits, "logits")
    dtype = compute_dtype(logits) if margin is None else compute_dtype(logits, margin)
    logits = logits.to(dtype)
    if margin is not None:
        margin = per_pair(margin, "margin")
        if margin.shape != logits.shape:
            raise ValueError(f"margin has {margin.shape[0]} rows but there are {logits.shape[0]} pairs")
        # In the logits' own dtype a bf16 reward of 100 would round a margin of 0.4 to 0.5.
        logits = logits - margin.to(dtype)
    return -F.logsigmoid(logits)


def ptx_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Token-mean next-token NLL on pretraining data: the gamma term of PPO-ptx (eq. 6, Ouyang et al. 2022).

    ``mean over t with labels[t+1] != ignore_index of -log softmax(logits[t])[labels[t+1]]``, in float32.
    Ignored positions contribute nothing, value or gradient, whatever their logits (``-inf`` rows included).

    Args:
        logits: [B, T, V] logits of the model on the ptx batch.
        labels: [B, T] integer token ids in ``[0, V)``, ``ignore_index`` where no loss is taken; shifted by one inside.
        ignore_index: an integer.

    Returns:
        scalar: mean over the non-ignored next-token predictions (0, still attached to ``logits``' graph, if
        there are none).
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1].reshape(-1, vocab)
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != ignore_index
    if not _check_labels(shift_labels, keep, vocab, ignore_index):
        return shift_logits[:0].float().sum()  # 0 with a (zero) gradient path, even for inf logits
    # Only the kept rows: an ignored row of -inf logits would give NaN gradients through log_softmax.
    return F.cross_entropy(shift_logits[keep].float(), shift_labels[keep])


def _check_labels(labels: torch.Tensor, keep: torch.Tensor, vocab: int, ignore_index: int) -> bool:
    """Whether any label is kept; ValueError for float labels or a kept id outside ``[0, vocab)`` (one device sync)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    out_of_range = keep & ((labels < 0) | (labels >= vocab))
    any_kept, any_out_of_range = torch.stack([keep.any(), out_of_range.any()]).tolist()
    if any_out_of_range:
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {int(labels[out_of_range][0])}")
    return any_kept


class _ChunkedNLL(torch.autograd.Function):
    """Sum of ``logsumexp(h W^T) - (h W^T)[label]`` over rows; the gradients are computed in the forward, chunk by
    chunk (the logits are needed there anyway), and only scaled by the upstream gradient in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int):
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        rows = torch.arange(min(chunk_size, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, target = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logits = (h @ weight.T).float()  # [C, V]
            log_norm = logits.logsumexp(-1)
            total += (log_norm - logits.gather(1, target[:, None])[:, 0]).sum()
            if needs_hidden or needs_weight:
                grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place
                grad_logits[rows[: h.shape[0]], target] -= 1.0
                grad_logits = grad_logits.to(h.dtype)
                if needs_hidden:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight
                if needs_weight:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grad_hidden = (next(saved) * grad_total).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_weight = (next(saved) * grad_total).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def chunked_nll_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``ptx_nll`` from final hidden states and the LM-head weight, never holding the [N, V] logits or their gradient.

    ``mean over rows with labels != ignore_index of -log softmax(hidden @ weight.T)[label]``, the logits of
    ``chunk_size`` rows at a time in float32 (from a product in ``weight``'s dtype). The gradients w.r.t. ``hidden``
    and ``weight`` are computed in that same pass (no recomputation, so no second look at ``weight`` in the backward:
    under DeepSpeed ZeRO-3 only the call needs the gathered weight). Memory is O(chunk_size * V) beyond the float32
    gradient accumulators [N, H] and [V, H].

    Args:
        hidden: [N, H] final hidden states (after the final norm), already aligned with ``labels`` (the caller shifts).
        weight: [V, H] LM-head weight (bias-free; the logits must be exactly ``hidden @ weight.T``).
        labels: [N] integer token ids in ``[0, V)``, ``ignore_index`` where no loss is taken.
        chunk_size: rows per chunk; None picks as many as fit ``core.full_kl.CHUNK_BUDGET_BYTES``.
        ignore_index: an integer.

    Returns:
        float32 scalar (0, still attached to ``hidden``'s and ``weight``'s graphs, if no label is kept).
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H], weight [V, H] and labels [N], got {tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(labels.shape)}")
    vocab = weight.shape[0]
    chunk_size = rows_per_chunk(vocab) if chunk_size is None else check_chunk_size(chunk_size)
    keep = labels != ignore_index
    if not _check_labels(labels, keep, vocab, ignore_index):
        return hidden[:0].float().sum() + weight[:0].float().sum()
    # Only the kept rows: an ignored row's hidden state may be anything (NaN padding included).
    hidden, labels = hidden[keep].to(weight.dtype), labels[keep]
    return _ChunkedNLL.apply(hidden, weight, labels, chunk_size) / hidden.shape[0]
