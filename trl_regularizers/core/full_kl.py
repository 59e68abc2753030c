"""Exact full-vocabulary KL per position, without materializing float32 [B, T, V] tensors.

KL(pi || pi_ref) = sum_v p_v (log p_v - log q_v) (eq. 3 of the regularization chapter) and
KL(pi_ref || pi) = sum_v q_v (log q_v - log p_v), with p = softmax(logits), q = softmax(ref_logits).

The forward pass keeps only per-position float32 statistics (KL, and the max and log-sum-exp remainder of
each side's logits); the backward pass recomputes the probabilities and writes the closed-form gradient
w.r.t. the logits z straight into a tensor of the logits' dtype:

* reverse: dKL/dz_v = p_v (log p_v - log q_v - KL)
* forward: dKL/dz_v = p_v - q_v

Masked vocabulary entries (logit ``-inf``: vocabulary masks, top-k/top-p processed or padded vocabularies)
follow the limits of the formula: an entry with probability 0 in the distribution the KL averages over
contributes 0 to the value and gets gradient 0 (0 log 0 = 0), whatever the other side holds there. An entry
with mass on that side only (reverse: p_v > 0 = q_v) makes the KL +inf: included positions then raise a
ValueError that names the position instead of returning inf and NaN gradients (a trainer would step on
them silently). Positions with ``mask == 0`` give exactly 0 with zero gradient whatever their logits.

Two backends compute the same values: ``"torch"`` (pure PyTorch, ``chunk_size`` positions at a
time, any device) and ``"triton"`` (``trl_regularizers.kernels``, one fused pass per row, CUDA only;
imported on first CUDA use). ``"auto"`` picks Triton for CUDA tensors when it is importable.
``full_vocab_kl_from_hidden`` goes one step further and never materializes the logits at all.

The reference is a constant: no gradient flows to ``ref_logits`` / ``ref_hidden`` / ``ref_weight``.

(About 400 lines, on purpose: the two autograd functions, the torch backend and the public functions share the chunked
statistics, the masking rules and their checks; split apart, each half would import the other's private helpers.)
"""

from __future__ import annotations

import operator
from functools import lru_cache
from typing import Literal

import torch

from trl_regularizers.core.kl import KL_DIRECTIONS, KLDirection, register_kl_estimator
from trl_regularizers.core.records import KLRecord

CHUNK_BUDGET_BYTES = 256 * 2**20
"""Default working memory of one chunk (``chunk_size=None``): 110 positions of a 151,936-entry vocabulary."""
BYTES_PER_ENTRY = 16
"""Bytes per [chunk, V] entry a chunk holds at its peak: two float32 logits (policy, reference), one float32
temporary, two boolean masks and the half-precision products they are converted from."""
FullKLBackend = Literal["auto", "torch", "triton"]
FULL_KL_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
MAX_ABS_LOGIT = 1e37
"""Finite logits up to this magnitude give a finite KL and gradient: in float32, |log p - log q - KL| stays below
about 4 * MAX_ABS_LOGIT + 2 log V, well inside its 3.4e38."""
_INF, _NEG_INF = float("inf"), float("-inf")


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


def rows_per_chunk(vocab: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows of [rows, ``vocab``] float32 work tensors that fit ``budget_bytes`` (``BYTES_PER_ENTRY`` per entry)."""
    return max(1, budget_bytes // (BYTES_PER_ENTRY * vocab))


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` as an int; ValueError unless it is an integer >= 1."""
    try:
        size = None if isinstance(chunk_size, bool) else operator.index(chunk_size)
    except TypeError:
        size = None
    if size is None or size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return size


def _log_softmax_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn float32 [n, V] logits ``x`` into log-probabilities in place; return the row max ``m`` and
    ``log sum_v exp(x_v - m)``, each [n].

    ``log_softmax = (x - m) - log_sum``: subtracting the max first keeps ``x - m`` exact for close logits, where
    ``x - (m + log_sum)`` would round ``log_sum`` away at large magnitudes (two tied logits of 1e30 got p = 1 each).
    A row without a finite logit gives ``m = -inf`` and NaN; the caller rejects or masks it.
    """
    m = x.amax(-1)
    x.sub_(m[:, None])
    log_sum = x.exp().sum(-1).log()
    x.sub_(log_sum[:, None])
    return m, log_sum


def _kl_rows_(logx: torch.Tensor, logy: torch.Tensor) -> torch.Tensor:
    """KL(x || y) = sum_v x_v (log x_v - log y_v) per row of [n, V] log-probabilities (``logy`` is overwritten),
    with masked entries: ``x_v = 0`` contributes 0 (0 log 0 = 0, whatever ``y_v``); ``x_v > 0 = y_v`` makes the
    row +inf."""
    term = logy.neg_().add_(logx)  # +inf where only y is masked, NaN where both are
    mass_on_x_only = term == _INF
    term.mul_(logx.exp()).masked_fill_(mass_on_x_only, _INF)  # +inf even where exp(log x) underflows to 0
    return term.masked_fill_(logx == _NEG_INF, 0.0).sum(-1)  # after the line above: 0 beats +inf when both are masked


def _torch_stats_(z: torch.Tensor, r: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, ...]:
    """Stats of float32 [n, V] logits ``z``, ``r`` (both overwritten)."""
    m_z, ls_z = _log_softmax_(z)
    m_r, ls_r = _log_softmax_(r)
    kl = _kl_rows_(z, r) if reverse else _kl_rows_(r, z)
    return kl, m_z, ls_z, m_r, ls_r


def _torch_grad_(z, r, m_z, ls_z, m_r, ls_r, kl, grad_kl, reverse: bool) -> torch.Tensor:
    """Gradient w.r.t. float32 [n, V] logits ``z`` (overwritten, like ``r``), in float32."""
    logp = z.sub_(m_z[:, None]).sub_(ls_z[:, None])
    logq = r.sub_(m_r[:, None]).sub_(ls_r[:, None])
    if reverse:
        masked = logp == _NEG_INF
        grad = logq.neg_().add_(logp).sub_(kl[:, None]).mul_(logp.exp_())
        grad.masked_fill_(masked, 0.0)  # p log p -> 0: a masked logit gets no gradient
    else:
        grad = logp.exp_().sub_(logq.exp_())
    # Rows with a zero upstream gradient (excluded by the mask) may hold anything, NaN included: write 0.
    return grad.mul_(grad_kl[:, None]).masked_fill_((grad_kl == 0)[:, None], 0.0)


def _float_copy(x: torch.Tensor, owned: bool) -> torch.Tensor:
    """``x`` in float32, never sharing memory with a tensor the caller keeps (unless ``owned``)."""
    return x.float() if owned else x.to(torch.float32, copy=True)


def _stats(z, r, reverse: bool, backend: str, chunk_size: int, owned: bool = False):
    """Per-row float32 (KL, max z, log-sum z, max r, log-sum r) for [N, V] logits (``_log_softmax_``); ``owned``:
    ``z`` and ``r`` may be overwritten."""
    if backend == "triton":
        from trl_regularizers.kernels.full_kl_triton import full_kl_forward

        return full_kl_forward(z, r, reverse)
    parts = [
        _torch_stats_(_float_copy(z[i : i + chunk_size], owned), _float_copy(r[i : i + chunk_size], owned), reverse)
        for i in range(0, z.shape[0], chunk_size)
    ]
    return tuple(torch.cat(column) for column in zip(*parts))


def _grad(z, r, stats, grad_kl, reverse: bool, backend: str, chunk_size: int, out=None, owned: bool = False):
    """Gradient of ``sum(grad_kl * KL)`` w.r.t. the [N, V] logits ``z``, in z's dtype; ``stats`` from ``_stats``."""
    kl, m_z, ls_z, m_r, ls_r = stats
    if backend == "triton":
        from trl_regularizers.kernels.full_kl_triton import full_kl_backward

        return full_kl_backward(z, r, m_z, ls_z, m_r, ls_r, kl, grad_kl, reverse, out=out)
    out = torch.empty_like(z) if out is None else out
    for i in range(0, z.shape[0], chunk_size):
        s = slice(i, i + chunk_size)
        zs, rs = _float_copy(z[s], owned), _float_copy(r[s], owned)
        out[s] = _torch_grad_(zs, rs, m_z[s], ls_z[s], m_r[s], ls_r[s], kl[s], grad_kl[s], reverse)
    return out


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, reverse: bool, backend: str, chunk_size: int):
        stats = _stats(logits, ref_logits, reverse, backend, chunk_size)
        ctx.save_for_backward(logits, ref_logits, *stats)
        ctx.config = (reverse, backend, chunk_size)
        return stats[0]

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, *stats = ctx.saved_tensors
        return _grad(logits, ref_logits, stats, grad_kl, *ctx.config), None, None, None, None


class _FullKLFromHidden(torch.autograd.Function):
    """Forward: ``chunk_size`` positions at a time, all of the vocabulary. Backward: all positions, vocabulary tiles
    of as many entries as a forward chunk (``chunk_size * V / N`` columns), so the gradient of each tile of
    ``weight`` is one product over every position (no [V, H] float32 accumulator; only [N, H] for ``hidden``)."""

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, ref_weight, reverse: bool, backend: str, chunk_size: int):
        parts = []
        for i in range(0, hidden.shape[0], chunk_size):
            logits = hidden[i : i + chunk_size] @ weight.T
            ref_logits = ref_hidden[i : i + chunk_size] @ ref_weight.T
            parts.append(_stats(logits, ref_logits, reverse, backend, chunk_size, owned=True))
        stats = tuple(torch.cat(column) for column in zip(*parts))
        ctx.save_for_backward(hidden, ref_hidden, weight, ref_weight, *stats)
        ctx.config = (reverse, backend, chunk_size)
        return stats[0]

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, ref_hidden, weight, ref_weight, *stats = ctx.saved_tensors
        reverse, backend, chunk_size = ctx.config
        positions, vocab = hidden.shape[0], weight.shape[0]
        columns = max(1, -(-chunk_size * vocab // positions))
        grad_kl = grad_kl.contiguous()
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[2] else None
        # An excluded row's gradient is 0, but 0 * NaN is not: drop its hidden state (left padding can be NaN).
        kept = torch.where(grad_kl[:, None] != 0, hidden, 0.0) if grad_weight is not None else None
        for v in range(0, vocab, columns):
            tile, ref_tile = weight[v : v + columns], ref_weight[v : v + columns]
            logits, ref_logits = hidden @ tile.T, ref_hidden @ ref_tile.T  # [N, columns]
            grad_logits = _grad(logits, ref_logits, stats, grad_kl, reverse, backend, positions, out=logits, owned=True)
            if grad_hidden is not None:
                grad_hidden += grad_logits @ tile
            if grad_weight is not None:
                grad_weight[v : v + columns] = grad_logits.T @ kept
        grad_hidden = grad_hidden.to(hidden.dtype) if grad_hidden is not None else None
        return grad_hidden, None, grad_weight, None, None, None, None


def _check(direction: str, chunk_size: int | None, vocab: int) -> int:
    """The chunk size to use (``rows_per_chunk(vocab)`` for None); ValueError for a bad direction or size."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"Unknown KL direction {direction!r}. Valid directions: {', '.join(KL_DIRECTIONS)}.")
    return rows_per_chunk(vocab) if chunk_size is None else check_chunk_size(chunk_size)


def _apply_mask(kl: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``KL * mask`` where ``mask != 0``, exactly 0 (and no gradient into the row) where ``mask == 0``."""
    if mask is None:
        return kl
    try:
        fits = torch.broadcast_shapes(mask.shape, kl.shape) == kl.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask {tuple(mask.shape)} must have the positions' shape {tuple(kl.shape)}")
    return torch.where(mask != 0, kl * mask.to(kl.dtype), 0.0)


def _check_finite(kl: torch.Tensor, mask: torch.Tensor | None, reverse: bool, why) -> torch.Tensor:
    """Raise a ValueError saying where and why when an included position's KL is not finite (one device sync)."""
    bad = ~torch.isfinite(kl)
    if not bool(bad.any()):
        return kl
    index = tuple(bad.nonzero()[0].tolist())
    name = "KL(pi||pi_ref)" if reverse else "KL(pi_ref||pi)"
    if mask is not None and not bool(torch.isfinite(mask.expand(kl.shape)[index])):
        reason = "mask is NaN or inf there"
    else:
        reason = why(index)
    raise ValueError(
        f"{name} is not finite at {int(bad.sum())} of {kl.numel()} positions (first at {index}, mask != 0 there): "
        f"{reason}. Positions with mask == 0 give 0 whatever their logits."
    )


def _logits_reason(z: torch.Tensor, r: torch.Tensor, reverse: bool) -> str:
    """Why the KL of one row pair (policy ``z``, reference ``r``, [V]) is not finite."""
    for name, row in (("logits", z), ("ref_logits", r)):
        if bool(row.isnan().any()) or bool((row == _INF).any()):
            return f"{name} hold NaN or +inf"
        if not bool((row > _NEG_INF).any()):
            return f"every entry of {name} is -inf (no distribution)"
    x, y, x_name, y_name = (z, r, "logits", "ref_logits") if reverse else (r, z, "ref_logits", "logits")
    if bool(((x > _NEG_INF) & (y == _NEG_INF)).any()):
        return (
            f"{y_name} is -inf at tokens where {x_name} is not: that KL is +inf (mass on one side only); "
            "mask the same vocabulary entries on both sides, or exclude the position with mask"
        )
    return f"the logits overflow float32 math (supported: |logit| <= {MAX_ABS_LOGIT:g})"


def full_vocab_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: KLDirection = "reverse",
    chunk_size: int | None = None,
    *,
    backend: FullKLBackend = "auto",
) -> torch.Tensor:
    """Exact KL between the next-token distributions at every position.

    Args:
        logits: policy logits [..., V] (any float dtype; math runs in float32), finite with
            ``|logit| <= MAX_ABS_LOGIT`` or ``-inf`` (masked entry). Divide by the sampling temperature first if
            the policy samples at one.
        ref_logits: reference logits, same shape and domain; treated as constant.
        mask: optional [...] mask (bool, 0/1 or weights): the result is ``KL * mask`` where ``mask != 0`` and
            exactly 0, with zero gradient, where ``mask == 0``, whatever the logits hold there.
        direction: ``"reverse"`` for KL(pi||pi_ref), ``"forward"`` for KL(pi_ref||pi).
        chunk_size: positions per chunk of the torch backend (integer >= 1); its peak extra memory is about
            ``BYTES_PER_ENTRY * chunk_size * V`` bytes. None: ``rows_per_chunk(V)``, i.e. ``CHUNK_BUDGET_BYTES``.
            The Triton backend needs no extra memory beyond the gradient.
        backend: ``"auto"`` (Triton for CUDA tensors when importable, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        float32 tensor of shape ``logits.shape[:-1]``.

    Raises:
        ValueError: when an included position's KL is not finite (one device sync per call): the side the KL
            averages over has mass where the other is ``-inf`` (the KL is +inf), a row is ``-inf`` everywhere,
            or logits are NaN, +inf or beyond ``MAX_ABS_LOGIT``; the message names the first such position.
    """
    chunk_size = _check(direction, chunk_size, logits.shape[-1])
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape")
    backend = resolve_backend(backend, logits.device)
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    ref_flat = ref_logits.detach().reshape(-1, vocab)
    if backend == "triton":
        flat, ref_flat = (t if t.stride(-1) == 1 else t.contiguous() for t in (flat, ref_flat))
    reverse = direction == "reverse"
    kl = _apply_mask(_FullKL.apply(flat, ref_flat, reverse, backend, chunk_size).reshape(logits.shape[:-1]), mask)
    return _check_finite(kl, mask, reverse, lambda i: _logits_reason(logits[i].detach(), ref_logits[i], reverse))


def full_vocab_kl_from_hidden(
    hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: KLDirection = "reverse",
    chunk_size: int | None = None,
    *,
    backend: FullKLBackend = "auto",
) -> torch.Tensor:
    """``full_vocab_kl(hidden @ weight.T, ref_hidden @ ref_weight.T, ...)`` without ever holding the logits.

    The forward does the LM-head products ``chunk_size`` positions at a time; the backward recomputes them in
    vocabulary tiles of the same number of entries over all N positions, so that each tile's weight gradient is
    one product. Peak extra memory is about ``BYTES_PER_ENTRY * chunk_size * V`` bytes plus a float32 [N, H]
    accumulator for ``hidden``'s gradient, instead of [..., V] logits and their gradient. LM-head work: the
    forward's 2 products and the backward's 4 (recompute policy and reference, gradient of ``hidden`` and of
    ``weight``), 12 * N * H * V FLOPs, against 8 * N * H * V for autograd through stored logits. Gradients flow to
    ``hidden`` and ``weight``; the reference side is constant. Untied LM heads with a bias are not supported:
    fold the bias in or use ``full_vocab_kl``.

    Args:
        hidden: policy final hidden states [..., H] (after the final norm).
        ref_hidden: reference hidden states, same shape.
        weight: policy LM-head weight [V, H]; ref_weight: reference LM-head weight [V, H].
        mask, direction, chunk_size, backend: as in ``full_vocab_kl``; positions with ``mask == 0`` give 0 and
            no gradient to ``hidden`` or ``weight`` even if their hidden states are NaN.

    Returns:
        float32 tensor of shape ``hidden.shape[:-1]``.

    Raises:
        ValueError: when an included position's KL is not finite: its logits (computed in ``hidden``'s
            dtype) overflow that dtype or ``MAX_ABS_LOGIT``, or the inputs hold NaN/inf there.

    The gradients are products in the inputs' dtype: finite while ``|dKL/dlogits| @ |weight|`` and
    ``|dKL/dlogits|.T @ |hidden|`` fit it (``|dKL/dlogits|`` is at most about the logits' spread).
    """
    chunk_size = _check(direction, chunk_size, weight.shape[0])
    if hidden.shape != ref_hidden.shape or weight.shape != ref_weight.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} / ref_hidden {tuple(ref_hidden.shape)} must match, and weight "
            f"{tuple(weight.shape)} / ref_weight {tuple(ref_weight.shape)} must be [V, {hidden.shape[-1]}]"
        )
    backend = resolve_backend(backend, hidden.device)
    size = hidden.shape[-1]
    reverse = direction == "reverse"
    kl = _FullKLFromHidden.apply(
        hidden.reshape(-1, size),
        ref_hidden.detach().reshape(-1, size),
        weight,
        ref_weight.detach(),
        reverse,
        backend,
        chunk_size,
    )
    kl = _apply_mask(kl.reshape(hidden.shape[:-1]), mask)
    why = f"the logits hidden @ weight.T overflow {hidden.dtype} or |logit| > {MAX_ABS_LOGIT:g}, or the inputs hold NaN/inf"
    return _check_finite(kl, mask, reverse, lambda index: why)


@register_kl_estimator("full", needs="distribution", unbiased={("reverse", "loss"), ("forward", "loss")}, unbiased_times_ratio=True)
def full(record: KLRecord, direction: KLDirection) -> torch.Tensor:
    """Exact KL over the vocabulary at every position (eq. 3), computed in chunks; no variance.

    From the record's logits [B, T, V] when it has them (``full_vocab_kl``), else from its final hidden states and
    LM heads at their temperature (``full_vocab_kl_from_hidden``, no [B, T, V] tensor). The same value at every
    sampled token, so in the reward it carries no gradient for the current token. Returns [B, T] float32, 0 where
    ``record.mask`` is 0.
    """
    if record.logits is not None and record.ref_logits is not None:
        return full_vocab_kl(record.logits, record.ref_logits, mask=record.mask, direction=direction)
    policy, ref = record.policy_states, record.ref_states
    if policy is None or ref is None:
        raise ValueError("kl_estimator='full' needs the record's logits or its hidden states (policy and reference)")
    return full_vocab_kl_from_hidden(
        (policy.hidden / policy.temperature).to(policy.weight.dtype),
        (ref.hidden.detach() / ref.temperature).to(ref.weight.dtype),
        policy.weight,
        ref.weight,
        mask=record.mask,
        direction=direction,
    )
