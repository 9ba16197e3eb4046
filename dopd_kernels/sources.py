"""Where a stream's logits come from: a materialized logits tensor or a hidden-state/`lm_head` pair.

A backend never needs a stream's whole `[N, V]` logits at once; it asks its source for bounded
tiles `[rows, columns]` (computed in fp32, scaled by 1/temperature, padding columns at or past
`valid_vocab` set to -inf) or for the logits at a few columns per row. The same source type serves
the logits mode and the fused-linear mode, so every backend written against it handles both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype statistics are accumulated in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class LogitsSource:
    """A stream given as logits `[N, V]` (any float dtype; never copied to fp32 whole)."""

    logits: torch.Tensor
    temperature: float = 1.0
    valid_vocab: Optional[int] = None

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    @property
    def vocab(self) -> int:
        return self.logits.shape[1]

    @property
    def effective_vocab(self) -> int:
        """Columns that are not padding: [0, valid_vocab)."""
        return self.vocab if self.valid_vocab is None else self.valid_vocab

    @property
    def dtype(self) -> torch.dtype:
        return accum_dtype(self.logits.dtype)

    def tile(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Scaled logits of `rows` (a slice or index tensor) at columns [start, stop), shape [len(rows), stop-start]."""
        t = self.logits[rows, start:stop].to(self.dtype)
        return _finish(t, start, self.temperature, self.valid_vocab)

    def gather(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scaled logits at `cols` [len(rows), k] of each row in `rows`."""
        t = self.logits[rows].gather(1, cols) if isinstance(rows, slice) else self.logits[rows[:, None], cols]
        t = t.to(self.dtype)
        return _mask_gathered(t / self.temperature, cols, self.valid_vocab)


@dataclass
class LinearSource:
    """A stream given as hidden states `[N, H]` and an `lm_head` weight `[V, H]` (+ bias `[V]`).

    Tiles are `H[rows] @ W[start:stop]ᵀ` with fp32 accumulation: only `[rows, stop-start]` exists.

    Output-head transforms of real models (DESIGN.md section 4), in the order their forward applies
    them, before the distillation temperature:

        z = h·Wᵀ + b;   z ← scale · z;   z ← softcap · tanh(z / softcap) (when softcap is set);   z ← z / τ

    The gradient with respect to the raw `h·Wᵀ + b` is the gradient with respect to the final
    (pre-temperature) logit times `scale · (1 − tanh²(scale·z/softcap))`; see `head_jacobian`.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    temperature: float = 1.0
    valid_vocab: Optional[int] = None
    scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def has_transform(self) -> bool:
        return self.scale != 1.0 or self.softcap is not None

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def effective_vocab(self) -> int:
        """Columns that are not padding: [0, valid_vocab)."""
        return self.vocab if self.valid_vocab is None else self.valid_vocab

    @property
    def dtype(self) -> torch.dtype:
        return accum_dtype(self.hidden.dtype)

    def tile(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # The matmul runs in the compute dtype so the logits are never rounded to bf16.
        t = self.hidden[rows].to(self.dtype) @ self.weight[start:stop].to(self.dtype).T
        if self.bias is not None:
            t = t + self.bias[start:stop].to(self.dtype)
        return _finish(self.transform(t), start, self.temperature, self.valid_vocab)

    def gather(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        # K dot products per row: [r, K, H] gathered weight rows, bounded by the caller's row chunk.
        w = self.weight[cols].to(self.dtype)  # [r, K, H]
        t = torch.einsum("rkh,rh->rk", w, self.hidden[rows].to(self.dtype))
        if self.bias is not None:
            t = t + self.bias[cols].to(self.dtype)
        return _mask_gathered(self.transform(t) / self.temperature, cols, self.valid_vocab)

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """The head transform on raw logits `h·Wᵀ + b` (before the temperature)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def head_jacobian(self, scaled: torch.Tensor) -> torch.Tensor:
        """d(final logit)/d(raw logit) from tile values `scaled` = final logit / τ (as `tile`/`gather`
        return them): `scale · (1 − (τ·scaled / softcap)²)`, 0 at padding columns (-inf)."""
        jac = torch.full_like(scaled, self.scale)
        if self.softcap is not None:
            t = scaled * (self.temperature / self.softcap)  # tanh(scale·z/softcap)
            jac = torch.where(torch.isfinite(scaled), self.scale * (1.0 - t * t), torch.zeros_like(scaled))
        return jac


def _finish(t: torch.Tensor, start: int, temperature: float, valid_vocab: Optional[int]) -> torch.Tensor:
    if temperature != 1.0:
        t = t / temperature
    if valid_vocab is not None and start + t.shape[1] > valid_vocab:
        cols = torch.arange(start, start + t.shape[1], device=t.device)
        t = t.masked_fill(cols >= valid_vocab, float("-inf"))  # out of place: t may view the input
    return t


def _mask_gathered(t: torch.Tensor, cols: torch.Tensor, valid_vocab: Optional[int]) -> torch.Tensor:
    if valid_vocab is not None:
        t = t.masked_fill(cols >= valid_vocab, float("-inf"))
    return t
