"""Finiteness check for regularizer terms (torch only)."""

from __future__ import annotations

import torch


def check_finite(term: str, value: torch.Tensor) -> torch.Tensor:
    """Return ``value``; raise ``FloatingPointError`` naming the regularizer ``term`` if it holds NaN or inf."""
    if not torch.isfinite(value.detach()).all():
        raise FloatingPointError(
            f"trl_regularizers: the {term} term is not finite ({value.detach().flatten()[:8].tolist()}). "
            "Lower the coefficient or the learning rate, or bound the log-ratio with kl_clamp."
        )
    return value
