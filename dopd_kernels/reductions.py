"""Reducing a per-token loss `[N]` (0 at ignored positions) to what the caller asked for."""

from __future__ import annotations

from typing import Optional

import torch


def reduce_loss(per_token: torch.Tensor, valid: torch.Tensor, reduction: str, token_shape: torch.Size,
                normalizer: Optional[float] = None) -> torch.Tensor:
    """Reduce `per_token` [N] (flattened from `token_shape`).

    mean:     Σ loss / number of valid tokens.
    seq_mean: per sequence (row of [B, T]) the mean over its valid tokens, then the mean over the
              sequences that have at least one valid token.
    sum:      Σ loss.
    none:     the per-token loss shaped like the tokens.
    With `normalizer`, "mean" and "sum" both return Σ loss / normalizer (a token count supplied by
    a trainer that accumulates gradients over micro-batches).

    A batch with no valid token gives 0 with a zero gradient (not NaN) for every reduction.
    """
    if reduction == "none":
        return per_token.reshape(token_shape)
    total = per_token.sum()
    if normalizer is not None:
        return total / normalizer
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / valid.sum().clamp(min=1).to(per_token.dtype)
    if reduction == "seq_mean":
        per_seq = per_token.reshape(token_shape).sum(dim=1)
        counts = valid.reshape(token_shape).sum(dim=1)
        seq_means = per_seq / counts.clamp(min=1).to(per_token.dtype)
        return seq_means.sum() / (counts > 0).sum().clamp(min=1).to(per_token.dtype)
    raise ValueError(f"unknown reduction {reduction!r}")
