"""Defaults shared by the pass backends (`torch`, `triton`, compiled): the parts of the `passes.Passes`
protocol a backend may leave to plain tiled PyTorch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import skipping
from ..passes import FullRows, Grads
from ..sources import LinearSource

NEG_INF = float("-inf")


def online_logsumexp(m: torch.Tensor, s: torch.Tensor, tile: torch.Tensor):
    """Merge a tile [r, c] into a running (max, Σ exp(z − max)) pair [r]; safe when everything is -inf."""
    m_new = torch.maximum(m, tile.max(dim=1).values)
    shift = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
    s = s * torch.exp(m - shift) + torch.exp(tile - shift[:, None]).sum(dim=1)
    return m_new, s


def merge_logsumexp(m: torch.Tensor, s: torch.Tensor, m_t: torch.Tensor, s_t: torch.Tensor):
    """Merge a tile's (max, Σ exp(z − max)) pair [r] into a running one; safe when either is all -inf."""
    m_new = torch.maximum(m, m_t)
    shift = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
    return m_new, s * torch.exp(m - shift) + s_t * torch.exp(m_t - shift)


def finish_logsumexp(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 log-sum-exp `max + log Σ exp(z − max)` (the `Stats.lse` contract): the sum of an fp32 max
    of size ~1e4 and an O(1) log is kept exactly, not rounded to an ulp of the max (~1e-3)."""
    m64 = m.to(torch.float64)
    return torch.where(m == NEG_INF, m64, m64 + torch.log(s).to(torch.float64))


def skips_whole_tiles(student, skip_negligible: bool, vocab_chunk: int) -> bool:
    """Whether a backend that skips negligible tiles (`skipping.py`) with vocabulary tiles of `vocab_chunk`
    columns may leave whole tiles of `student`'s rows out of a sweep: skipping on, a fused-linear student
    wider than one tile, stored in a dtype that skips at all. Its stats pass keeps tile shares only then."""
    return (skip_negligible and isinstance(student, LinearSource) and student.effective_vocab > vocab_chunk
            and skipping.tolerance(student.hidden.dtype) > 0)


def without_columns(tile: torch.Tensor, cols: torch.Tensor, start: int) -> torch.Tensor:
    """A copy of the tile [r, c] (columns `start`…) with each row's columns `cols` [r, k] (global; those
    outside the tile or < 0 ignored) at -inf: what a tail bucket sums over."""
    inside = (cols >= start) & (cols < start + tile.shape[1])
    hits = torch.zeros(tile.shape, dtype=torch.int32, device=tile.device)
    hits.scatter_add_(1, torch.where(inside, cols - start, torch.zeros_like(cols)), inside.to(torch.int32))
    return tile.masked_fill(hits > 0, NEG_INF)


class PassBackend:
    """Base of the pass backends. Subclasses implement the passes of `passes.Passes`."""

    def select(self, sources: Sequence, top_k: int) -> "PassBackend":
        """The passes that run a call over `sources` with top-K `top_k`: this backend, unless it
        delegates such calls (Triton: float64 inputs and a top-K beyond its registers)."""
        return self

    def full_pass(self, student, target, rows: torch.Tensor, lse_s: Optional[torch.Tensor],
                  lse_t: Optional[torch.Tensor], kind: str, beta: float, scale: Optional[torch.Tensor],
                  grads: Optional[Grads], plan_skips: bool = False, tile_shares=None) -> FullRows:
        """`passes.Passes.full_pass` from the separate sweeps: statistics (when not given), value, gradient.
        They skip no whole tile, so `plan_skips` plans none and `tile_shares` goes unused."""
        if lse_s is None:
            stats = self.stats_pass((student, target), rows, torch.zeros_like(rows), (), 1)
            lse_s, lse_t = stats.lse
        value, c = self.full_value_pass(student, target, rows, lse_s, lse_t, kind, beta)
        if scale is not None:
            self.full_grad_pass(student, target, rows, lse_s, lse_t, c, kind, beta, scale, grads)
        return FullRows(lse_s, lse_t, value, c)

    def rest_logsumexp(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """log Σ exp(scaled logit) over the valid columns of each row of `rows` that are not in
        `cols` [n, k] (entries < 0 are ignored): a tail bucket summed directly, [n] float64 formed like
        `Stats.lse` (running max and rescaled sum in the compute dtype, `max + log(sum)` added in
        float64). A plain tiled pass over `source.tile`; backends may override it with a kernel."""
        row_chunk, vocab_chunk = self.tile_shape()
        vocab = source.effective_vocab
        out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
        for i in range(0, rows.shape[0], row_chunk):
            r, c = rows[i:i + row_chunk], cols[i:i + row_chunk]
            m = torch.full((r.shape[0],), NEG_INF, dtype=source.dtype, device=r.device)
            s = torch.zeros_like(m)
            for c0 in range(0, vocab, vocab_chunk):
                m, s = online_logsumexp(m, s, without_columns(source.tile(r, c0, min(c0 + vocab_chunk, vocab)), c, c0))
            out[i:i + row_chunk] = finish_logsumexp(m, s)
        return out

    def tile_shape(self) -> tuple:
        """(rows, columns) of the PyTorch tiles of the default passes."""
        return 1024, 8192

    def sparse_rows(self, source, k: int) -> int:
        """Rows per chunk when a PyTorch pass gathers K weight rows of width H per row (`gradients.add_sparse`):
        [rows, K, H] stays within one tile of `tile_shape`."""
        row_chunk, vocab_chunk = self.tile_shape()
        width = source.hidden.shape[1] if isinstance(source, LinearSource) else 1
        return max(1, (row_chunk * vocab_chunk) // max(1, k * width))
