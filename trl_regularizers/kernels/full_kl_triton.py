"""Triton kernels for the exact full-vocabulary KL: one pass over each logits row forward, one backward.

Both kernels treat a row pair ``(x, y)`` and compute KL(softmax(x) || softmax(y)); the reverse
direction passes ``(logits, ref_logits)``, the forward direction ``(ref_logits, logits)``.

Forward, per row and in float32: an online log-sum-exp of ``x`` and of ``y`` (max ``m`` and sum ``S``) plus
the running sum ``T = sum_v exp(x_v - m_x) (x_v - y_v)``, so that
``KL = T / S_x - (m_x - m_y) - (log S_x - log S_y)``. Each lane keeps its own running max; since one of
``exp(m_old - m_new)`` and ``exp(x - m_new)`` is 1, an update costs a single ``exp`` per element and tensor.
Backward writes the closed-form gradient w.r.t. the policy logits ``z`` in their dtype, with
``log p = (z - m_z) - log S_z``: reverse ``p (log p - log q - KL)``, forward ``p - q``.

Masked entries (``-inf``) follow ``core.full_kl``: ``x_v = -inf`` adds 0 to ``T`` (0 log 0 = 0) and its
gradient is 0; ``x_v > -inf = y_v`` makes the row's KL +inf (flagged per lane, so ``T`` stays finite).
Rows with ``grad_kl == 0`` (excluded by the mask) get a zero gradient whatever they hold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Chosen on an H100 for V = 151,936 bf16 (benchmarks/RESULTS.md): forward 1.75 ms at 2048/8 vs 4.6 ms at 4096/8.
FWD_BLOCK_V, FWD_NUM_WARPS = 2048, 8
BWD_BLOCK_V, BWD_NUM_WARPS = 4096, 8


@triton.jit
def _online_update(m, s, x, valid):
    """Add exp(x - m) into the running sum s, moving the running max m; returns (m, s, e, x_is_new_max)."""
    e = tl.exp(-tl.abs(x - m))
    new_max = x > m
    s_new = tl.where(new_max, s * e + 1.0, s + e)
    return tl.where(valid & new_max, x, m), tl.where(valid, s_new, s), e, new_max


@triton.jit
def _full_kl_fwd_kernel(
    x_ptr, y_ptr, kl_ptr, m_x_ptr, ls_x_ptr, m_y_ptr, ls_y_ptr,
    stride_x, stride_y, V,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    offs = tl.arange(0, BLOCK)
    m_x = tl.full([BLOCK], -3.0e38, tl.float32)
    m_y = tl.full([BLOCK], -3.0e38, tl.float32)
    s_x = tl.zeros([BLOCK], tl.float32)
    s_y = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    one_sided = tl.zeros([BLOCK], tl.int32)  # 1 where some x_v > -inf has y_v = -inf: KL = +inf
    for start in tl.range(0, V, BLOCK):
        cols = start + offs
        valid = cols < V
        x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols, mask=valid, other=0.0).to(tl.float32)
        x_masked = x == float("-inf")
        y_masked = y == float("-inf")
        one_sided = tl.where(valid & y_masked & (x > float("-inf")), 1, one_sided)
        diff = tl.where(x_masked | y_masked, 0.0, x - y)  # x masked: e = 0 below, and 0 * inf is NaN
        m_x, s_x, e, new_max = _online_update(m_x, s_x, x, valid)
        t_new = tl.where(new_max, t * e + diff, t + e * diff)
        t = tl.where(valid, t_new, t)
        m_y, s_y, _, _ = _online_update(m_y, s_y, y, valid)
    max_x = tl.max(m_x, axis=0)
    scale_x = tl.exp(m_x - max_x)
    sum_x = tl.sum(s_x * scale_x, axis=0)
    t_sum = tl.sum(t * scale_x, axis=0)
    max_y = tl.max(m_y, axis=0)
    sum_y = tl.sum(s_y * tl.exp(m_y - max_y), axis=0)
    ls_x = tl.log(sum_x)
    ls_y = tl.log(sum_y)
    kl = t_sum / sum_x - (max_x - max_y) - (ls_x - ls_y)
    kl = tl.where(tl.max(one_sided, axis=0) > 0, float("inf"), kl)
    tl.store(kl_ptr + row, kl)
    tl.store(m_x_ptr + row, max_x)
    tl.store(ls_x_ptr + row, ls_x)
    tl.store(m_y_ptr + row, max_y)
    tl.store(ls_y_ptr + row, ls_y)


@triton.jit
def _full_kl_bwd_kernel(
    z_ptr, r_ptr, grad_ptr, m_z_ptr, ls_z_ptr, m_r_ptr, ls_r_ptr, kl_ptr, grad_kl_ptr,
    stride_z, stride_r, stride_grad, V,
    REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    r_row = r_ptr + row * stride_r
    g_row = grad_ptr + row * stride_grad
    m_z = tl.load(m_z_ptr + row)
    ls_z = tl.load(ls_z_ptr + row)
    m_r = tl.load(m_r_ptr + row)
    ls_r = tl.load(ls_r_ptr + row)
    kl = tl.load(kl_ptr + row)
    grad_kl = tl.load(grad_kl_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in tl.range(0, V, BLOCK):
        cols = start + offs
        valid = cols < V
        z = tl.load(z_row + cols, mask=valid, other=0.0).to(tl.float32)
        r = tl.load(r_row + cols, mask=valid, other=0.0).to(tl.float32)
        logp = (z - m_z) - ls_z
        p = tl.exp(logp)
        if REVERSE:
            g = p * (logp - ((r - m_r) - ls_r) - kl)
            g = tl.where(z == float("-inf"), 0.0, g)
        else:
            g = p - tl.exp((r - m_r) - ls_r)
        g = tl.where(grad_kl != 0.0, g * grad_kl, 0.0)  # excluded rows may hold NaN
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=valid)


def _block(block: int, vocab: int) -> int:
    return min(block, triton.next_power_of_2(vocab))


def full_kl_forward(logits: torch.Tensor, ref_logits: torch.Tensor, reverse: bool):
    """Per-row float32 [N] (KL, max and log-sum of ``logits``, max and log-sum of ``ref_logits``) for [N, V] inputs.

    ``logsumexp(row) = max + log-sum``; they are kept apart so that ``log p = (z - max) - log-sum`` stays exact.
    """
    rows, vocab = logits.shape
    kl = torch.empty(rows, dtype=torch.float32, device=logits.device)
    m_x, ls_x, m_y, ls_y = (torch.empty_like(kl) for _ in range(4))
    x, y = (logits, ref_logits) if reverse else (ref_logits, logits)
    _full_kl_fwd_kernel[(rows,)](
        x, y, kl, m_x, ls_x, m_y, ls_y, x.stride(0), y.stride(0), vocab,
        BLOCK=_block(FWD_BLOCK_V, vocab), num_warps=FWD_NUM_WARPS,
    )
    return (kl, m_x, ls_x, m_y, ls_y) if reverse else (kl, m_y, ls_y, m_x, ls_x)


def full_kl_backward(logits, ref_logits, m_z, ls_z, m_r, ls_r, kl, grad_kl, reverse: bool, out: torch.Tensor | None = None):
    """Gradient of ``sum(grad_kl * kl)`` w.r.t. ``logits``, written into ``out`` (default: new, logits' dtype).

    ``m_*``, ``ls_*``: the per-row max and log-sum of ``full_kl_forward``.
    """
    rows, vocab = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    _full_kl_bwd_kernel[(rows,)](
        logits, ref_logits, grad, m_z, ls_z, m_r, ls_r, kl, grad_kl.contiguous().float(),
        logits.stride(0), ref_logits.stride(0), grad.stride(0), vocab,
        REVERSE=reverse, BLOCK=_block(BWD_BLOCK_V, vocab), num_warps=BWD_NUM_WARPS,
    )
    return grad
