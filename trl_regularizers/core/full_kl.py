"""Exact full-vocabulary KL per position, without materializing float32 [B, T, V] tensors.

KL(pi || pi_ref) = sum_v p_v (log p_v - log q_v) (eq. 3 of the regularization chapter) and
KL(pi_ref || pi) = sum_v q_v (log q_v - log p_v), with p = softmax(logits), q = softmax(ref_logits).

The forward pass keeps only per-position float32 statistics (KL and both log-sum-exps); the backward
pass recomputes the probabilities and writes the closed-form gradient w.r.t. the logits z straight
into a tensor of the logits' dtype:

* reverse: dKL/dz_v = p_v (log p_v - log q_v - KL)
* forward: dKL/dz_v = p_v - q_v

Two backends compute the same values: ``"torch"`` (pure PyTorch, ``chunk_size`` positions at a
time, any device) and ``"triton"`` (``trl_regularizers.kernels``, one fused pass per row, CUDA only;
imported on first CUDA use). ``"auto"`` picks Triton for CUDA tensors when it is importable.
``full_vocab_kl_from_hidden`` goes one step further and never materializes the logits at all.

The reference is a constant: no gradient flows to ``ref_logits`` / ``ref_hidden`` / ``ref_weight``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

from trl_regularizers.core.kl import KL_DIRECTIONS, KLDirection

DEFAULT_CHUNK_SIZE = 1024
FullKLBackend = Literal["auto", "torch", "triton"]
FULL_KL_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the Triton kernels import (Triton installed and a CUDA device present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import trl_regularizers.kernels.full_kl_triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Concrete backend (``"torch"`` or ``"triton"``) for tensors on ``device``."""
    if backend not in FULL_KL_BACKENDS:
        raise ValueError(f"Unknown full-vocab KL backend {backend!r}. Valid backends: {', '.join(FULL_KL_BACKENDS)}.")
    if backend == "triton" and not (device.type == "cuda" and triton_available()):
        raise ValueError("backend='triton' needs CUDA tensors and an importable Triton; use 'auto' or 'torch'.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def _torch_stats(z: torch.Tensor, r: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lse_z = torch.logsumexp(z.float(), dim=-1)
    lse_r = torch.logsumexp(r.float(), dim=-1)
    logp = z.float() - lse_z[:, None]
    logq = r.float() - lse_r[:, None]
    kl = (logp.exp() * (logp - logq)).sum(-1) if reverse else (logq.exp() * (logq - logp)).sum(-1)
    return kl, lse_z, lse_r


def _torch_grad(z, r, lse_z, lse_r, kl, grad_kl, reverse: bool) -> torch.Tensor:
    logp = z.float() - lse_z[:, None]
    logq = r.float() - lse_r[:, None]
    p = logp.exp()
    grad = p * (logp - logq - kl[:, None]) if reverse else p - logq.exp()
    return (grad * grad_kl[:, None]).to(z.dtype)


def _stats(z, r, reverse: bool, backend: str, chunk_size: int):
    """Per-row (KL, lse(z), lse(r)) in float32 for [N, V] logits."""
    if backend == "triton":
        from trl_regularizers.kernels.full_kl_triton import full_kl_forward

        return full_kl_forward(z, r, reverse)
    parts = [_torch_stats(z[i : i + chunk_size], r[i : i + chunk_size], reverse) for i in range(0, z.shape[0], chunk_size)]
    return tuple(torch.cat(column) for column in zip(*parts))


def _grad(z, r, lse_z, lse_r, kl, grad_kl, reverse: bool, backend: str, chunk_size: int, out=None):
    """Gradient of ``sum(grad_kl * KL)`` w.r.t. the [N, V] logits ``z``, in z's dtype."""
    if backend == "triton":
        from trl_regularizers.kernels.full_kl_triton import full_kl_backward

        return full_kl_backward(z, r, lse_z, lse_r, kl, grad_kl, reverse, out=out)
    out = torch.empty_like(z) if out is None else out
    for i in range(0, z.shape[0], chunk_size):
        s = slice(i, i + chunk_size)
        out[s] = _torch_grad(z[s], r[s], lse_z[s], lse_r[s], kl[s], grad_kl[s], reverse)
    return out


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, reverse: bool, backend: str, chunk_size: int):
        kl, lse_z, lse_r = _stats(logits, ref_logits, reverse, backend, chunk_size)
        ctx.save_for_backward(logits, ref_logits, lse_z, lse_r, kl)
        ctx.config = (reverse, backend, chunk_size)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, lse_z, lse_r, kl = ctx.saved_tensors
        return _grad(logits, ref_logits, lse_z, lse_r, kl, grad_kl, *ctx.config), None, None, None, None


class _FullKLFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, ref_weight, reverse: bool, backend: str, chunk_size: int):
        stats = []
        for i in range(0, hidden.shape[0], chunk_size):
            logits = hidden[i : i + chunk_size] @ weight.T
            ref_logits = ref_hidden[i : i + chunk_size] @ ref_weight.T
            stats.append(_stats(logits, ref_logits, reverse, backend, chunk_size))
        kl, lse_z, lse_r = (torch.cat(column) for column in zip(*stats))
        ctx.save_for_backward(hidden, ref_hidden, weight, ref_weight, lse_z, lse_r, kl)
        ctx.config = (reverse, backend, chunk_size)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, ref_hidden, weight, ref_weight, lse_z, lse_r, kl = ctx.saved_tensors
        reverse, backend, chunk_size = ctx.config
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[2] else None
        for i in range(0, hidden.shape[0], chunk_size):
            s = slice(i, i + chunk_size)
            logits = hidden[s] @ weight.T
            ref_logits = ref_hidden[s] @ ref_weight.T
            grad_logits = _grad(logits, ref_logits, lse_z[s], lse_r[s], kl[s], grad_kl[s], reverse, backend, chunk_size, out=logits)
            if grad_hidden is not None:
                grad_hidden[s] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ hidden[s]).float()
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, None, grad_weight, None, None, None, None


def _check(direction: str, chunk_size: int) -> None:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"Unknown KL direction {direction!r}. Valid directions: {', '.join(KL_DIRECTIONS)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _apply_mask(kl: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return kl if mask is None else kl * mask.to(kl.dtype)


def full_vocab_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: KLDirection = "reverse",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    backend: FullKLBackend = "auto",
) -> torch.Tensor:
    """Exact KL between the next-token distributions at every position.

    Args:
        logits: policy logits [..., V] (any float dtype; math runs in float32).
            Divide by the sampling temperature first if the policy samples at one.
        ref_logits: reference logits, same shape; treated as constant.
        mask: optional [...] mask; masked-out positions return 0 (their logits are still read).
        direction: ``"reverse"`` for KL(pi||pi_ref), ``"forward"`` for KL(pi_ref||pi).
        chunk_size: positions per chunk of the torch backend; its peak extra memory is about
            4 * chunk_size * V float32. The Triton backend needs no extra memory beyond the gradient.
        backend: ``"auto"`` (Triton for CUDA tensors when importable, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        float32 tensor of shape ``logits.shape[:-1]``.
    """
    _check(direction, chunk_size)
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape")
    backend = resolve_backend(backend, logits.device)
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    ref_flat = ref_logits.detach().reshape(-1, vocab)
    if backend == "triton":
        flat, ref_flat = (t if t.stride(-1) == 1 else t.contiguous() for t in (flat, ref_flat))
    kl = _FullKL.apply(flat, ref_flat, direction == "reverse", backend, chunk_size)
    return _apply_mask(kl.reshape(logits.shape[:-1]), mask)


def full_vocab_kl_from_hidden(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: KLDirection = "reverse",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    backend: FullKLBackend = "auto",
) -> torch.Tensor:
    """``full_vocab_kl(hidden @ weight.T, ref_hidden @ ref_weight.T, ...)`` without ever holding the logits.

    The LM-head products are done ``chunk_size`` positions at a time, forward and again in backward,
    so peak extra memory is a few [chunk_size, V] tensors instead of [..., V] logits and their gradient.
    Gradients flow to ``hidden`` and ``weight`` (float32-accumulated over chunks); the reference side is
    constant. Untied LM heads with a bias are not supported: fold the bias in or use ``full_vocab_kl``.

    Args:
        hidden: policy final hidden states [..., H] (after the final norm).
        ref_hidden: reference hidden states, same shape.
        weight: policy LM-head weight [V, H]; ref_weight: reference LM-head weight [V, H].
        mask, direction, chunk_size, backend: as in ``full_vocab_kl``.

    Returns:
        float32 tensor of shape ``hidden.shape[:-1]``.
    """
    _check(direction, chunk_size)
    if hidden.shape != ref_hidden.shape or weight.shape != ref_weight.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} / ref_hidden {tuple(ref_hidden.shape)} must match, and weight "
            f"{tuple(weight.shape)} / ref_weight {tuple(ref_weight.shape)} must be [V, {hidden.shape[-1]}]"
        )
    backend = resolve_backend(backend, hidden.device)
    size = hidden.shape[-1]
    kl = _FullKLFromHidden.apply(
        hidden.reshape(-1, size),
        ref_hidden.detach().reshape(-1, size),
        weight,
        ref_weight.detach(),
        direction == "reverse",
        backend,
        chunk_size,
    )
    return _apply_mask(kl.reshape(hidden.shape[:-1]), mask)
