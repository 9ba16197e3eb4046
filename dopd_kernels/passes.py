"""The pass protocol: what a backend provides to the engine (DESIGN.md section 4).

A backend is a set of passes over the vocabulary. Each pass takes sources (`sources.py`: the
streams' tensors and their scalar settings), row indices into them and per-row tensors, and returns
tensors or accumulates into the gradient buffers it is handed (`Grads`). A pass never sees the
engine, its plan or the autograd state: calls go one way, engine → passes.

Row arguments: `rows` [n] int64 indexes the sources' rows; every other per-row tensor ([n], [n, K])
is aligned with it. Log-sum-exps are float64 [n] (`Stats.lse`); passes that compute in fp32 take
them apart with `split_lse`. Column indices below 0 (another vocabulary shard's) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from .row_terms import RowTerm
from .skipping import TileSkips

STUDENT = 0  # position of the student among the streams of a call (the teacher and priv_student follow)


def split_lse(lse: torch.Tensor, dtype: torch.dtype) -> tuple:
    """A float64 log-sum-exp as an unevaluated sum `hi + lo` of two `dtype` tensors.

    Kernels form log-probabilities as `(z − hi) − lo`: `z − hi` is exact when z is near the row's
    maximum (Sterbenz), so log p keeps fp32 precision even when the logits are ~1e4 and an fp32 lse
    alone would be off by an ulp of 1e4 (~1e-3). For float64 compute, lo is 0."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(lse.dtype)).to(dtype)


@dataclass
class Stats:
    """Per row of a stats pass: `lse[j]` [n] (float64: the row max plus the log of the rescaled sum,
    added in float64 so no precision is lost at large logits; see `split_lse`) and `logit_y[j]` [n]
    (scaled logit of the sampled token, compute dtype) of stream j; `topk[j]` [n, K] the top-K column
    indices of each stream that needs them; `rest_lse[j]` [n] (float64, formed like `lse`) the log-sum-exp
    of stream j over the valid columns other than the sampled token, summed directly (exact when
    p_y ≈ 1, where lse + log(1 − p_y) cancels), for each stream asked for (`rest_streams`);
    `tile_shares[j]` [n, tiles] (float32) the log-share of stream j's softmax mass in each of the backend's
    vocabulary tiles, log Σ_{v∈T} p_v, for each stream asked for (`share_streams`) where the backend's
    `full_pass` uses them (`Passes.full_pass`'s `tile_shares`), absent elsewhere."""

    lse: List[torch.Tensor]
    logit_y: List[torch.Tensor]
    topk: Dict[int, torch.Tensor] = field(default_factory=dict)
    rest_lse: Dict[int, torch.Tensor] = field(default_factory=dict)
    tile_shares: Dict[int, torch.Tensor] = field(default_factory=dict)


class Grads(NamedTuple):
    """The student's gradient accumulators a gradient pass adds into (None: not needed).

    logits: [N, V] gradient w.r.t. the student's logits (logits mode; the only [N, V] allocation).
    dh [N, H], dw [V, H], db [V]: fused-linear mode, in the accumulation dtype (`source.dtype`).
    Gradient tiles arrive w.r.t. the final (pre-temperature) logits; in fused-linear mode a pass
    multiplies them by the head's Jacobian (`LinearSource.head_jacobian`) before contracting."""

    logits: Optional[torch.Tensor] = None
    dh: Optional[torch.Tensor] = None
    dw: Optional[torch.Tensor] = None
    db: Optional[torch.Tensor] = None


class FullRows(NamedTuple):
    """What `Passes.full_pass` returns, per row [n]: both log-sum-exps, the divergence and its gradient
    constant (float64), and the whole tiles its gradient sweep may skip when it was asked to plan them
    (`skipping.TileSkips`), else None."""

    lse_s: torch.Tensor
    lse_t: torch.Tensor
    value: torch.Tensor
    c: torch.Tensor
    tile_skips: Optional[TileSkips] = None


@runtime_checkable
class Passes(Protocol):
    """The passes every pass backend (`torch`, `cpp`, `cuda`, `triton`) implements."""

    def supports(self, device: torch.device) -> bool:
        """Whether the passes run on tensors of `device`."""

    def select(self, sources: Sequence, top_k: int) -> "Passes":
        """The passes that run a call over `sources` with top-K `top_k`: usually `self`; a backend may
        hand calls it cannot run (e.g. float64 inputs) to another one."""

    def stats_pass(self, sources: Sequence, rows: torch.Tensor, tokens: torch.Tensor, topk_streams: Sequence[int],
                   top_k: int, rest_streams: Sequence[int] = (), share_streams: Sequence[int] = ()) -> Stats:
        """Log-sum-exp and sampled logit (`tokens` [n]) of every stream at `rows`, the top-`top_k`
        columns of the streams `topk_streams` and the tail bucket (`Stats.rest_lse`: every valid column
        but `tokens`) of the streams `rest_streams` (positions in `sources`), summed directly (not as the
        log-sum-exp less p_y), in the same sweep where the backend can (torch, cpp, triton; `cuda` calls
        `rest_logsumexp`). `share_streams`: streams whose per-tile shares (`Stats.tile_shares`) a full
        pass with a gradient may use; a backend that would not use them keeps none."""

    def gather(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scaled logits [n, K] of `source` at columns `cols` [n, K] of `rows`."""

    def rest_logsumexp(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """log Σ exp(scaled logit) [n] (float64) over the valid columns of each row not in `cols` [n, k]."""

    def full_value_pass(self, student, target, rows: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
                        kind: str, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary divergence [n] of each row and its gradient constant c [n] (reverse KL: the
        KL itself; JS: β·KL(p‖m); forward KL: 0), both float64."""

    def full_pass(self, student, target, rows: torch.Tensor, lse_s: Optional[torch.Tensor],
                  lse_t: Optional[torch.Tensor], kind: str, beta: float, scale: Optional[torch.Tensor],
                  grads: Optional[Grads], plan_skips: bool = False,
                  tile_shares: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> FullRows:
        """Full-vocabulary rows in as few sweeps as the backend can (`FullRows`). `lse_s`/`lse_t` None: the
        log-sum-exps are computed here too (no stats pass ran); `scale` [n] and `grads` given: the gradient
        (`full_grad_pass`) is added as well. A backend that holds a row's whole vocabulary in one tile does
        all of it in one sweep; `backends/base.py` composes the separate passes. `plan_skips` (no `scale`: a
        deferred gradient follows): also plan the whole tiles that gradient's sweep may skip
        (`FullRows.tile_skips`; None where the backend does not skip tiles). `tile_shares`: the student's and
        the target's `Stats.tile_shares` at `rows`, with the log-sum-exps they came from: a JS value sweep
        leaves out the tiles they bound as negligible when a gradient follows (`skipping.plan_js_value_skips`)."""

    def full_grad_pass(self, student, target, rows: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
                       c: torch.Tensor, kind: str, beta: float, scale: torch.Tensor, grads: Grads,
                       tile_skips: Optional[TileSkips] = None) -> None:
        """Add `scale[n]` × ∂D/∂z (times τ) of full-vocabulary rows into `grads`; `tile_skips`: `full_pass`'s
        planned whole-tile skips of these rows (a backend that does not skip tiles ignores them)."""

    def term_grad_pass(self, student, rows: torch.Tensor, lse_s: torch.Tensor, term: RowTerm, scale: torch.Tensor,
                       grads: Grads) -> None:
        """Add `scale[n]` × the gradient of a few-column term (`row_terms.RowTerm`) into `grads`:
        `p_v · dense` on every column plus its sparse or explicit columns, or, with no dense part
        (renormalized top-K), its K columns only."""
