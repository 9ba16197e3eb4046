"""The fused loss computation of DESIGN.md section 4, independent of how the passes are run.

    1. stats pass   — per valid row: log-sum-exp and sampled-token logit of every stream, running top-K
    2. planning     — rows grouped by the term they need (DOPD: routing into regimes; OPD: one group)
    3. values       — full-vocabulary rows: a value pass; top-K and sampled rows: O(K) gathers
    4. backward     — gradient pass over the rows that touch the whole vocabulary, sparse scatter for the rest

A backend supplies the passes (`stats_pass`, `full_value_pass`, `grad_pass`, `gather`); this module
owns the flow, the per-row bookkeeping and the autograd glue, so every backend computes the same
thing. The gradient work is deferred to backward: a non-scalar upstream gradient (per-token weights
with `reduction="none"`) is exact, and under `torch.no_grad()` no gradient work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .divergences import clamp_js
from .parallel import VocabShard
from .row_terms import RowTerm, sampled_term, topk_term
from .sources import LinearSource, LogitsSource

STUDENT = 0
DOUBLE_BACKWARD_ERROR = (
    "dopd_kernels: the fused losses cannot differentiate twice (backward with create_graph=True, a double "
    "backward or a Hessian-vector product); their backward is hand-derived and first-order. Use backend='reference' "
    "(float64 autograd) for second derivatives.")


def split_lse(lse: torch.Tensor, dtype: torch.dtype) -> tuple:
    """A float64 log-sum-exp as an unevaluated sum `hi + lo` of two `dtype` tensors.

    Kernels form log-probabilities as `(z − hi) − lo`: `z − hi` is exact when z is near the row's
    maximum (Sterbenz), so log p keeps fp32 precision even when the logits are ~1e4 and an fp32 lse
    alone would be off by an ulp of 1e4 (~1e-3). For float64 compute, lo is 0."""
    hi = lse.to(dtype)
    return hi, (lse - hi.to(lse.dtype)).to(dtype)


@dataclass
class Stats:
    """Per valid row (compact order): `lse[j]` (float64: the fp32 row max plus the log of the
    rescaled sum, added in float64 so no precision is lost at large logits; see `split_lse`) and
    `logit_y[j]` (scaled logits, compute dtype) of stream j, `topk[j]` the top-K column indices
    [n, K] of each stream that needs them."""

    lse: List[torch.Tensor]
    logit_y: List[torch.Tensor]
    topk: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Group:
    """Rows (positions into the compact valid-row order) that share one loss term."""

    pos: torch.Tensor
    target: int
    granularity: str
    divergence: str
    weight: float
    term: Optional[RowTerm] = None  # sampled / top-K rows
    full_c: Optional[torch.Tensor] = None  # full rows: the per-row constant of the gradient


@dataclass
class TermSettings:
    top_k: int
    js_beta: float
    topk_from: str
    topk_renorm: bool
    temperature: float


class LossEngine:
    """Runs the flow for one call. `plan(stats) -> List[Group]` decides each row's term."""

    def __init__(self, passes, sources: Sequence, tokens: torch.Tensor, valid: torch.Tensor,
                 settings: TermSettings, topk_streams: Sequence[int], plan: Callable[[Stats], List[Group]],
                 shard: Optional[VocabShard] = None):
        self.passes = passes
        self.shard = shard
        self.sources = list(sources)
        self.rows = valid.nonzero()[:, 0]
        self.tokens = tokens[self.rows]
        self.n_total = valid.shape[0]
        self.settings = settings
        self.topk_streams = tuple(topk_streams)
        self.plan = plan
        self.groups: List[Group] = []

    @property
    def student(self):
        return self.sources[STUDENT]

    def forward(self) -> torch.Tensor:
        """Per-token weighted loss [N] in the compute dtype (0 at rows that are not valid)."""
        out = torch.zeros(self.n_total, dtype=self.student.dtype, device=self.tokens.device)
        self.stats = self.run_stats_pass()
        self.groups = self.plan(self.stats)  # planned even without rows: routing may be collective
        for g in self.groups:
            if g.pos.numel() == 0:
                continue
            value = self._group_value(g)
            out[self.rows[g.pos]] = (g.weight * value).to(out.dtype)
        return out

    def run_stats_pass(self) -> Stats:
        """The stats pass; with a vocabulary shard, local statistics merged across the group."""
        k, n, dt = self.settings.top_k, self.rows.shape[0], self.student.dtype
        if n == 0:
            empty = self.tokens.new_zeros(0, dtype=dt)
            return Stats([self.tokens.new_zeros(0, dtype=torch.float64)] * len(self.sources), [empty] * len(self.sources),
                         {j: self.tokens.new_zeros(0, 0) for j in self.topk_streams})
        if self.shard is None:
            return self.passes.stats_pass(self.sources, self.rows, self.tokens, self.topk_streams, k)
        sh = self.shard
        local_tokens, owned = sh.localize(self.tokens)
        stats = self.passes.stats_pass(self.sources, self.rows, local_tokens, self.topk_streams, k)
        stats.lse = [sh.merge_logsumexp(lse) for lse in stats.lse]
        stats.logit_y = [sh.owned_max(z, owned) for z in stats.logit_y]
        k_global = min(k, sh.valid_vocab)
        for j, idx in stats.topk.items():
            values = self.passes.gather(self.sources[j], self.rows, idx)
            stats.topk[j] = sh.merge_topk(values, idx + sh.offset, k_global)
        return stats

    def _gather(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scaled logits of `source` at global columns `cols` [n, K]."""
        if self.shard is None:
            return self.passes.gather(source, rows, cols)
        local, owned = self.shard.localize(cols)
        return self.shard.owned_max(self.passes.gather(source, rows, local), owned)

    def _localize(self, term: RowTerm) -> RowTerm:
        """A term's explicit columns as this shard sees them. Added `sparse` values: foreign columns
        become local column 0 with value 0. Written `explicit` values: foreign columns become -1,
        which every writer skips (writing 0 at column 0 would erase that column's gradient)."""
        if self.shard is None:
            return term
        local, owned = self.shard.localize(term.cols)
        if term.explicit is None:
            return RowTerm(term.value, term.dense, local, term.sparse.masked_fill(~owned, 0.0))
        return RowTerm(term.value, term.dense, local.masked_fill(~owned, -1), None, term.explicit.masked_fill(~owned, 0.0))

    def _rest_logprob(self, source, rows: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """Log-probability [n] (float64) of the tail bucket: the valid columns outside `cols` [n, k]
        (global), summed directly. 1 − Σp over the explicit columns cancels: a tail below the rounding
        of the log-sum-exp came out as 0 or negative, and KL as inf (e.g. sampled forward KL when the
        student is confident of its sampled token)."""
        if self.shard is None:
            rest = self.passes.rest_logsumexp(source, rows, cols)
        else:  # each shard sums its own columns outside the support (foreign columns marked -1)
            local, owned = self.shard.localize(cols)
            rest = self.shard.merge_logsumexp(self.passes.rest_logsumexp(source, rows, local.masked_fill(~owned, -1)))
        return rest.to(torch.float64) - lse.to(torch.float64)

    def _vocab_size(self) -> int:
        """Size of the valid vocabulary top-K supports are drawn from (over all shards)."""
        if self.shard is not None:
            return self.shard.valid_vocab
        return self.student.valid_vocab or self.student.vocab

    def _group_value(self, g: Group) -> torch.Tensor:
        """Per-row value of a group. A row whose student or target log-sum-exp is not finite (a NaN or
        +inf logit, or no finite logit in the valid vocabulary) has no distribution: its value is NaN
        whatever the term (a top-K term would otherwise never look past its K columns)."""
        value = self._term_value(g)
        if g.divergence == "js":
            value = clamp_js(value, self.settings.js_beta, self.student.dtype)
        st = self.stats
        ok = torch.isfinite(st.lse[STUDENT][g.pos]) & torch.isfinite(st.lse[g.target][g.pos])
        return torch.where(ok.to(value.device), value, torch.full_like(value, float("nan")))

    def _term_value(self, g: Group) -> torch.Tensor:
        s, st = self.settings, self.stats
        lse_s, lse_t = st.lse[STUDENT][g.pos], st.lse[g.target][g.pos]
        target = self.sources[g.target]
        rows = self.rows[g.pos]
        if g.granularity == "full":
            value, g.full_c = self.passes.full_value_pass(self.student, target, rows, lse_s, lse_t, g.divergence, s.js_beta)
            if self.shard is not None:  # partial sums over this shard's columns
                value, g.full_c = self.shard.all_reduce(value), self.shard.all_reduce(g.full_c)
            return value
        f64 = torch.float64
        if g.granularity == "sampled":
            y = self.tokens[g.pos]
            rests = (None, None)
            if g.divergence != "reverse_kl":  # two buckets {y, not y}: the second one summed directly
                rests = (self._rest_logprob(self.student, rows, y[:, None], lse_s),
                         self._rest_logprob(target, rows, y[:, None], lse_t))
            g.term = sampled_term(st.logit_y[STUDENT][g.pos].to(f64) - lse_s.to(f64), st.logit_y[g.target][g.pos].to(f64) - lse_t.to(f64),
                                  y, g.divergence, s.js_beta, *rests)
        else:
            cols = st.topk[STUDENT if s.topk_from == "student" else g.target][g.pos]
            # A support covering the whole valid vocabulary (K >= V) leaves an empty tail, and the tail
            # form equals the renormalized one. Computing that empty tail as 1 − Σp from rounded
            # log-sum-exps gave one stream a spurious tail mass and the other none: KL = inf.
            renorm = s.topk_renorm or cols.shape[1] >= self._vocab_size()
            rests = (None, None)
            if not renorm:
                rests = (self._rest_logprob(self.student, rows, cols, lse_s), self._rest_logprob(target, rows, cols, lse_t))
            g.term = topk_term(self._gather(self.student, rows, cols).to(f64), self._gather(target, rows, cols).to(f64),
                               lse_s.to(f64), lse_t.to(f64), cols, g.divergence, s.js_beta, renorm, *rests)
        g.term = self._localize(g.term)
        return g.term.value

    def backward(self, grad_per_token: torch.Tensor, sink) -> None:
        """Accumulate d(Σ_n grad_n · loss_n)/d(student) into `sink`."""
        s = self.settings
        for g in self.groups:
            if g.pos.numel() == 0:
                continue
            rows = self.rows[g.pos]
            scale = grad_per_token[rows].to(torch.float64) * (g.weight / s.temperature)
            self.passes.grad_pass(self, g, rows, scale, sink)
        if self.shard is not None:
            sink.reduce_over(self.shard)


class LogitsGradSink:
    """Receives gradient tiles (with respect to the unscaled student logits); `grad` [N, V] is the
    only [N, V] allocation of the logits mode. It is a fresh contiguous tensor whatever the input's
    layout (a transposed or strided input gets a row-major gradient that kernels can write rows of)."""

    def __init__(self, logits: torch.Tensor):
        self.grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)

    def add_tile(self, rows: torch.Tensor, start: int, g: torch.Tensor, logits: Optional[torch.Tensor] = None) -> None:
        self.grad[rows, start:start + g.shape[1]] = g.to(self.grad.dtype)

    def add_sparse(self, rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor) -> None:
        self.grad.index_put_((rows[:, None].expand_as(cols), cols), g.to(self.grad.dtype), accumulate=True)

    def reduce_over(self, shard) -> None:
        """Each shard owns its columns of the logit gradient: nothing to combine."""

    def results(self, needs):
        return (self.grad,)


class LinearGradSink:
    """Contracts gradient tiles G [rows, block] into dH = G·W and dW += Gᵀ·H, db += Σ G at once.

    A gradient tile arrives with respect to the student's final (pre-temperature) logits. With a head
    transform (`LinearSource.scale`/`softcap`) it is first multiplied by `head_jacobian` to become the
    gradient with respect to the raw `h·Wᵀ + b` that the contractions need. Only the gradients that are
    needed are allocated: `needs` = (dH, dW, db); a frozen head (weight not requiring grad) has
    `dw = None`, and backends must skip its contraction (no `[V, H]` buffer, no `Gᵀ·H` work)."""

    def __init__(self, source: LinearSource, needs: Sequence[bool], sparse_rows: int):
        h, w = source.hidden, source.weight
        acc = source.dtype
        self.source, self.acc, self.sparse_rows = source, acc, sparse_rows
        self.dh = torch.zeros(h.shape, dtype=acc, device=h.device) if needs[0] else None
        self.dw = torch.zeros(w.shape, dtype=acc, device=w.device) if needs[1] else None
        b = source.bias
        self.db = torch.zeros(b.shape, dtype=acc, device=b.device) if (b is not None and needs[2]) else None

    def add_tile(self, rows: torch.Tensor, start: int, g: torch.Tensor, logits: Optional[torch.Tensor] = None) -> None:
        """`g` [len(rows), block]: gradient w.r.t. the final logits at columns [start, start + block);
        `logits`: the student's tile there as `LinearSource.tile` returns it (recomputed when None and a
        head transform needs it)."""
        src, stop = self.source, start + g.shape[1]
        g = g.to(self.acc)
        if src.has_transform:
            if logits is None:
                logits = src.tile(rows, start, stop)
            g = g * src.head_jacobian(logits.to(self.acc))
        if self.dh is not None:
            self.dh.index_add_(0, rows, g @ src.weight[start:stop].to(self.acc))
        if self.dw is not None:
            self.dw[start:stop] += g.T @ src.hidden[rows].to(self.acc)
        if self.db is not None:
            self.db[start:stop] += g.sum(0)

    def add_sparse(self, rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor) -> None:
        """`g` [n, k]: gradient w.r.t. the final logits at columns `cols` [n, k] of each row."""
        src = self.source
        g = g.to(self.acc)
        # Row chunks keep the gathered weight rows [r, K, H] within the tile budget.
        for i in range(0, rows.shape[0], self.sparse_rows):
            r, c, gi = rows[i:i + self.sparse_rows], cols[i:i + self.sparse_rows], g[i:i + self.sparse_rows]
            if src.has_transform:  # the K logits again (K dot products per row) for the head's Jacobian
                gi = gi * src.head_jacobian(src.gather(r, c).to(self.acc))
            if self.dh is not None:
                self.dh.index_add_(0, r, torch.einsum("rk,rkh->rh", gi, src.weight[c].to(self.acc)))
            if self.dw is not None:
                h = src.hidden[r].to(self.acc)
                self.dw.index_add_(0, c.reshape(-1), (gi[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
            if self.db is not None:
                self.db.index_add_(0, c.reshape(-1), gi.reshape(-1))

    def reduce_over(self, shard) -> None:
        """dH sums the contributions of every vocabulary shard (column-parallel linear backward)."""
        if self.dh is not None:
            shard.all_reduce(self.dh)

    def results(self, needs):
        src = self.source
        out = (self.dh, self.dw, self.db)
        dtypes = (src.hidden.dtype, src.weight.dtype, src.bias.dtype if src.bias is not None else None)
        return tuple(None if t is None else t.to(d) for t, d in zip(out, dtypes))


def student_tensors(source) -> tuple:
    """The differentiable tensors of the student source, in a fixed order."""
    if isinstance(source, LogitsSource):
        return (source.logits,)
    return (source.hidden, source.weight, source.bias)


class FusedLoss(torch.autograd.Function):
    """Autograd face of a `LossEngine`: inputs are the student's tensors, output the per-token loss."""

    @staticmethod
    def forward(ctx, engine: LossEngine, make_sink: Callable, *tensors):
        ctx.engine, ctx.make_sink = engine, make_sink
        return engine.forward()

    @staticmethod
    def backward(ctx, grad_per_token):
        # The passes give hand-derived first derivatives only. Autograd runs a backward with grad mode
        # on exactly when a graph of the gradient is requested (create_graph=True, double backward):
        # refuse it rather than return a gradient whose own derivative would silently be wrong.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        needs = ctx.needs_input_grad[2:]
        sink = ctx.make_sink(needs)
        ctx.engine.backward(grad_per_token, sink)
        grads = sink.results(needs)
        return (None, None, *(gr if need else None for gr, need in zip(grads, needs)))


def run(engine: LossEngine, passes) -> torch.Tensor:
    """Per-token loss [N]; differentiable with respect to the student when it requires grad."""
    tensors = student_tensors(engine.student)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return engine.forward()

    def make_sink(needs):
        if isinstance(engine.student, LogitsSource):
            return LogitsGradSink(engine.student.logits)
        return LinearGradSink(engine.student, needs, passes.sparse_rows(engine.student, engine.settings.top_k))

    return FusedLoss.apply(engine, make_sink, *tensors)
