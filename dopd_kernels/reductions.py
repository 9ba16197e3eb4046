"""Reducing a per-token loss `[N]` (0 at ignored positions) to what the caller asked for."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Reduction:
    """A call's reduction: `value(per_token)` is `reduce_loss`, and `weights()` its derivative
    d loss / d per_token [N] (float64), known before any loss is computed — so a scalar-reduced loss
    can form its gradient in the forward sweep (eager) and its backward only scales it by the upstream
    scalar. `weights()` is None for reduction="none", whose upstream gradient is arbitrary."""

    valid: torch.Tensor
    reduction: str
    token_shape: torch.Size
    normalizer: Optional[float] = None

    @property
    def scalar(self) -> bool:
        """Whether the reduction gives one number (its `weights()` exist)."""
        return self.reduction != "none"

    def value(self, per_token: torch.Tensor) -> torch.Tensor:
        return reduce_loss(per_token, self.valid, self.reduction, self.token_shape, self.normalizer)

    def weights(self) -> Optional[torch.Tensor]:
        f64, valid = torch.float64, self.valid
        if not self.scalar:
            return None
        if self.normalizer is not None:
            return torch.full(valid.shape, 1.0 / self.normalizer, dtype=f64, device=valid.device)
        if self.reduction == "sum":
            return torch.ones(valid.shape, dtype=f64, device=valid.device)
        if self.reduction == "mean":
            return torch.full(valid.shape, 1.0 / max(int(valid.sum()), 1), dtype=f64, device=valid.device)
        # seq_mean: 1 / (valid tokens of the sequence · sequences with a valid token)
        counts = valid.reshape(self.token_shape).sum(dim=1)
        per_seq = 1.0 / (counts.clamp(min=1).to(f64) * float(max(int((counts > 0).sum()), 1)))
        return per_seq[:, None].expand(self.token_shape).reshape(-1).contiguous()
