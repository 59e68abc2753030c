"""Exact full-vocabulary KL per position, computed in chunks of positions.

KL(pi || pi_ref) = sum_v p_v (log p_v - log q_v) (eq. 3 of the regularization chapter) and
KL(pi_ref || pi) = sum_v q_v (log q_v - log p_v), with p = softmax(logits), q = softmax(ref_logits).

Neither direction ever materializes a float32 [B, T, V] tensor: the forward pass reduces
``chunk_size`` positions at a time, and the backward pass recomputes each chunk and writes the
gradient straight into a tensor of the logits' dtype. Closed-form gradients w.r.t. the logits z:

* reverse: dKL/dz_v = p_v (log p_v - log q_v - KL)
* forward: dKL/dz_v = p_v - q_v

The reference is a constant: no gradient flows to ``ref_logits``.
"""

from __future__ import annotations

import torch

from trl_regularizers.core.kl import KL_DIRECTIONS, KLDirection

DEFAULT_CHUNK_SIZE = 1024


def _chunk_kl(logits: torch.Tensor, ref_logits: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    if direction == "reverse":
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        kl = (logq.exp() * (logq - logp)).sum(-1)
    return kl, logp, logq


class _ChunkedFullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ref_logits: torch.Tensor, direction: str, chunk_size: int) -> torch.Tensor:
        kl = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk_size):
            stop = start + chunk_size
            kl[start:stop] = _chunk_kl(logits[start:stop], ref_logits[start:stop], direction)[0]
        ctx.save_for_backward(logits, ref_logits, kl)
        ctx.direction, ctx.chunk_size = direction, chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        logits, ref_logits, kl = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            _, logp, logq = _chunk_kl(logits[start:stop], ref_logits[start:stop], ctx.direction)
            p = logp.exp()
            if ctx.direction == "reverse":
                chunk_grad = p * (logp - logq - kl[start:stop, None])
            else:
                chunk_grad = p - logq.exp()
            grad[start:stop] = (chunk_grad * grad_kl[start:stop, None]).to(grad.dtype)
        return grad, None, None, None


def full_vocab_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: KLDirection = "reverse",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Exact KL between the next-token distributions at every position.

    Args:
        logits: policy logits [..., V] (any float dtype; math runs in float32 per chunk).
            Divide by the sampling temperature first if the policy samples at one.
        ref_logits: reference logits, same shape; treated as constant.
        mask: optional [...] mask; masked-out positions return 0 (their logits are still read).
        direction: ``"reverse"`` for KL(pi||pi_ref), ``"forward"`` for KL(pi_ref||pi).
        chunk_size: positions per chunk; peak extra memory is about 3 * chunk_size * V float32.

    Returns:
        float32 tensor of shape ``logits.shape[:-1]``.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"Unknown KL direction {direction!r}. Valid directions: {', '.join(KL_DIRECTIONS)}.")
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = logits.shape[-1]
    kl = _ChunkedFullKL.apply(logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab), direction, chunk_size)
    kl = kl.reshape(logits.shape[:-1])
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl
