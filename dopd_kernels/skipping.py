"""Skipping gradient tiles whose contribution is provably negligible (issue 14, "below the floor").

In fused-linear mode a gradient tile G [rows, block] (w.r.t. the logits) costs two contractions,
dH += (G·J)·W[block] and dW[block] += (G·J)ᵀ·H (J: the head's Jacobian, |J| ≤ |J|max = `LinearSource.scale`).
Cut Cross-Entropy skips blocks of cross-entropy's gradient whose entries all fall below a threshold tied
to the dtype. The same idea here, for any gradient w.r.t. logits that enter through a softmax (reverse
KL p_v(log p_v − log q_v − KL), forward KL p_v − q_v, JS β p_v(log p_v/m_v − KL(p‖m)), the few-column
terms p_v·dense + corrections), with a budget that makes the error provably small.

The bound. For a row i with gradient g (times its scale, before the head's Jacobian) and skipped
columns S, skipping changes the results by exactly

    ΔdH_i = −Σ_{v∈S} g_v J_v W_v,        ΔdW_v = −Σ_{i: v∈S_i} g_iv J_iv h_i,

so |ΔdH_ik| ≤ |J|max · max_v|W_vk| · ‖g_S‖₁ and Σ_v |ΔdW_vk| ≤ |J|max · Σ_i |h_ik| · ‖g_{i,S_i}‖₁.
The rule keeps ‖g_S‖₁ ≤ δ·‖g‖₁ for every row (δ = `TOLERANCE[dtype]`): the gradients returned are the
exact contractions of a logit gradient G̃ with ‖G̃_i − G_i‖₁ ≤ δ‖G_i‖₁ row by row (a backward error δ),
and the forward errors are at most δ · |J|max · ‖g_i‖₁ · max_v|W_vk| (dH) and
δ · |J|max · Σ_i ‖g_i‖₁ |h_ik| (dW, summed over the vocabulary): the expressions that bound the dense
contraction's own rounding error, with γ_n = n·u/(1 − n·u) in place of δ. δ = 2^-20 = 16·u for fp32
storage is γ of a 16-term sum (a dense row contracts V ~ 1e5 terms): what fp32 accumulation may round
away anyway, and 16× below the suite's 1e-5 relative tolerance. bf16 and fp16 storage is judged
against a naive same-dtype computation, whose error is at least the unit roundoff u (2^-8, 2^-11) of
every logit: δ = u/16. float64: no skipping.

‖g‖₁ is not known when a tile is formed (the sweep has not seen the other columns), but a lower bound
is: a gradient through a softmax sums to zero over the vocabulary (D is invariant to z + const), so its
positive and negative parts each carry ‖g‖₁/2, and over the columns seen so far

    ‖g‖₁ ≥ 2·max(Σ_seen g⁺, Σ_seen g⁻) = Σ_seen |g_v| + |Σ_seen g_v| =: L,

exact once every column is seen (a row that fits one tile), valid on any subset of the columns (up to
the rounding of the computed g's sum). A skip spends budget only up to δ·L(now) ≤ δ‖g‖₁, so the
guarantee holds whatever the later tiles hold.

The rule (one `RowBudget` per row chunk of a gradient sweep; `RowBudget.keep` per tile):
  1. Cut the tile's columns into blocks of `SKIP_COLUMNS`; m_ib = Σ_{v∈b} |g_iv| (float64).
  2. Add the tile to L_i. Row i's allowance is a_i = δ·L_i·(columns seen / vocabulary) − spent_i: the
     budget is released in proportion to the vocabulary swept, so an early tile cannot spend what the
     later tiles' blocks need; unspent allowance carries forward. a_i = 0 when L_i is not finite.
  3. Per group of `rows` consecutive rows, order the blocks by max_i m_ib / a_i and skip the longest
     prefix whose running sums stay ≤ a_i for every row of the group; spent_i grows by what was skipped.
A NaN or inf gradient never fits an allowance, so non-finite values still reach the gradients; a row
whose gradient is zero (zero scale) skips every block. db += Σ_i g_i costs O(rows × block) and stays
exact. With the vocabulary sharded over P ranks each shard spends its own budget: the guarantee
becomes P·δ.

Row granularity matters: a block can be skipped only where every row of its group has a negligible
gradient there, and rows peak on different tokens. The torch backend decides row by row (`rows=1`) and
contracts each column block for the rows that keep it (`gradients.add_tile`). Deciding for groups of 16
rows skips far less (`benchmarks/skipping_report.py`: 31–57% of the blocks against 90–92% row by row on
its peaked inputs, none against 2–3% on the benchmark suite's).

Wide full-vocabulary rows also skip whole tiles before forming them: the sweep before the gradient sweep
keeps a few numbers per tile that bound the tile's ‖g_T‖₁ from above and the row's ‖g‖₁ from below
(csrc/kernels_cpu.cpp, TileSkips, has the bounds); a row skips its tiles of smallest bound within δ·(that
lower bound) (`plan_tile_skips`), and its block rule above starts with that spent (`RowBudget(spent=…)`), so
the guarantee is the same while the skipped tiles cost neither recomputation nor contraction
(`SkipCounter.unformed`). The rows that keep a tile are gathered and projected alone, padded to a multiple
of `GATHER_ROWS`. `cpp`: reverse / forward KL (bounds from the online sweep of the log-sum-exps and KL), JS
and rows with given log-sum-exps (from the value sweep); `torch` likewise (`_kl_sweep`, `_value_sweep`).

JS value sweeps. A wide JS row needs a value sweep between its log-sum-exps and its gradient (log m_v is not
separable), and before this a whole value sweep was formed for every tile. Its log-sum-exp sweep now keeps each
tile's share of both streams' mass, P_T and Q_T, which bound the tile's value terms and gradient mass without
forming the tile (`js_tile_bounds`; csrc/kernels_cpu.cpp derives them). The row leaves out of its value sweep
its tiles of smallest bound within `VALUE_SHARE`·δ·J, J being the JS of the tiles' masses, which is at most the
row's JS (`plan_js_value_skips`). So the value errs by at most δ/4 relative, and the gradient constant by a known
E_c. Those tiles are then forced skips of the gradient plan, with E_c charged to its budget
(`js_gradient_start`, `plan_tile_skips(forced=...)`). A row whose forced mass does not fit δ·‖u‖₁ is a row whose
gradient nearly vanishes while its JS does not. It sweeps the tiles it left out after all (a correction sweep)
and then plans as without value skips. Both `cpp` and `torch` do this when skipping is on and a gradient follows
(eager or planned for a deferred one). A forward without a gradient sweeps every tile. DOPD's HT rows (full JS
with the log-sum-exps of the statistics pass) do the same: that pass keeps each tile's log-share of the student's
and the teacher's mass (`Stats.tile_shares`, [N, tiles] float32 per stream, asked for by `plan.dopd_share_streams`
when a gradient follows) and hands the HT rows' shares to their full pass.

Logits mode has no contraction to save (the gradient tile is the output): the rule is not applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

# δ per storage dtype of the student's hidden states and weight (see the module docstring).
TOLERANCE = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -12, torch.float16: 2.0 ** -15}
SKIP_COLUMNS = 256  # width of a skippable column block
# The share of δ·J a JS row's value sweep may leave out (`plan_js_value_skips`): its gradient plan starts ~2–3×
# that spent (`js_gradient_start`), and must still fit δ‖u‖₁.
VALUE_SHARE = 0.25
# Rows a gathered logit tile is padded to a multiple of (with rows that skip it): BLAS takes other kernels for
# GEMMs of a few rows, or of row counts off multiples of 4, which round differently from the dense tile's.
GATHER_ROWS = 16


def sum_as_float64(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Sums of a gradient or probability tile along `dim`, taken in its own dtype and returned as float64
    for the sums over blocks and tiles. `sum(dtype=float64)` would first copy the whole tile to float64
    (twice its memory, ~10x the time on CPU); the dtype's pairwise sum errs by ~u relative, far inside
    the rule's δ >= 16u."""
    return x.sum(dim, keepdim=keepdim).double()


def tolerance(dtype: torch.dtype) -> float:
    """δ for inputs stored in `dtype` (0.0: never skip)."""
    return TOLERANCE.get(dtype, 0.0)


@dataclass
class SkipCounter:
    """Gradient entries (row × column) offered to the contractions and those skipped; every entry
    costs the same 2·H FLOPs in each of dH and dW, so `fraction` is the share of contraction FLOPs saved.
    `unformed`: the skipped entries whose logits were not even recomputed, 2·H FLOPs per stream more each
    (the `cpp` backend's whole-tile skips of wide full-vocabulary rows, bounded from the statistics of the
    sweep before their gradient sweep; rows projected only to pad a gathered tile count as formed).
    `value_unformed`: entries of JS value sweeps not projected ("JS value sweeps" in the module docstring; 2·H
    FLOPs per stream each), less those a correction sweep projected."""

    entries: int = 0
    skipped: int = 0
    unformed: int = 0
    value_unformed: int = 0

    @property
    def fraction(self) -> float:
        return self.skipped / self.entries if self.entries else 0.0

    def add(self, keep: torch.Tensor, width: int) -> None:
        """Count a tile of `width` columns planned by `RowBudget.keep` (mask [rows, blocks])."""
        widths = torch.full((keep.shape[1],), SKIP_COLUMNS, dtype=torch.long, device=keep.device)
        widths[-1] = width - SKIP_COLUMNS * (keep.shape[1] - 1)
        self.entries += keep.shape[0] * width
        self.skipped += int(((~keep).long() * widths).sum())

    def add_whole(self, rows: int, unformed: int, width: int) -> None:
        """Count `rows` rows that skip a tile of `width` columns whole, `unformed` of them not projected."""
        self.entries += rows * width
        self.skipped += rows * width
        self.unformed += unformed * width


class TileSkips(NamedTuple):
    """The whole tiles the rows of a full-vocabulary gradient sweep skip, planned by the sweep before it
    (`plan_tile_skips`): keep [n, tiles] bool (tiles of the backend's `vocab_chunk` columns) and spent [n]
    float64, the bound mass of the skipped tiles, of the unscaled gradient (times the row's scale it starts
    the row's block budget). A deferred gradient carries it from the forward to its backward
    (`passes.Passes.full_pass(plan_skips=True)`, `full_grad_pass(tile_skips=...)`)."""

    keep: torch.Tensor
    spent: torch.Tensor


def plan_tile_skips(bound: torch.Tensor, lower: torch.Tensor, delta: float, forced: Optional[TileSkips] = None):
    """Whole tiles to skip: each row skips its tiles of smallest upper bound `bound` [n, tiles] (of ‖g_T‖₁,
    NaN last, ties to the lower tile) while their running sum stays ≤ δ·`lower` [n] (≤ ‖g‖₁); none where
    `lower` is not finite. Returns `TileSkips`. With `forced`, row i first skips the tiles `forced` leaves out,
    their mass `forced.spent[i]`, and the result is (`TileSkips`, failed [n] bool): a row where that mass alone
    exceeds δ·lower (or lower is not finite) while it leaves a tile out skips nothing and is marked failed."""
    bound = bound.double().nan_to_num(nan=float("inf"))
    start = torch.zeros_like(bound[:, 0]) if forced is None else forced.spent.double()
    if forced is not None:  # forced tiles first, at no further cost: their mass is `start`
        bound = torch.where(forced.keep, bound, torch.zeros_like(bound))
    ordered, order = bound.sort(dim=1, stable=True)
    running = start[:, None] + ordered.cumsum(1)
    limit = torch.where(torch.isfinite(lower), delta * lower.double(), torch.full_like(start, -1.0))
    fits = running <= limit[:, None]  # a prefix: the bounds are >= 0
    skip = torch.zeros_like(fits).scatter_(1, order, fits)
    spent = torch.where(fits, ordered, torch.zeros_like(ordered)).sum(1) + torch.where(fits[:, 0], start, 0.0)
    if forced is None:
        return TileSkips(~skip, spent)
    failed = (~forced.keep & ~skip).any(1)  # a forced tile that did not fit: none did
    return TileSkips(~skip, spent), failed


def js_tile_bounds(p: torch.Tensor, q: torch.Tensor, beta: float) -> tuple:
    """Bounds of a JS tile's terms from its shares of the two streams' mass, p = P_T and q = Q_T (float64, any
    shape; csrc/kernels_cpu.cpp, "skipping whole tiles of a JS row's value sweep", derives them):
    a_T ≥ |Σ_T β p log(p/m)|, b_T ≥ |Σ_T (1−β) q log(q/m)|, e_T ≥ Σ_T β p |log(p/m)|."""
    lb, l1b = -math.log(beta), -math.log1p(-beta)
    return (beta * torch.maximum(p * lb, (1 - beta) * q), (1 - beta) * torch.maximum(q * l1b, beta * p),
            beta * (p * lb + (1 - beta) * q))


def plan_js_value_skips(p: torch.Tensor, q: torch.Tensor, beta: float, delta: float) -> TileSkips:
    """The tiles each JS row leaves out of its value sweep, from the shares p = P_T, q = Q_T [n, tiles] of its
    log-sum-exp sweep: its tiles of smallest a_T + b_T while their sum stays ≤ `VALUE_SHARE`·δ·J, J = the JS of
    the tiles' masses (≤ the row's JS: merging columns never increases a divergence), so the value errs by at most
    δ/4 relative."""
    a, b, _ = js_tile_bounds(p, q, beta)
    m = beta * p + (1 - beta) * q
    xlog = lambda x: torch.where(x > 0, x * (x / m).log(), torch.zeros_like(x))
    return plan_tile_skips(a + b, (beta * xlog(p) + (1 - beta) * xlog(q)).sum(1), VALUE_SHARE * delta)


def js_gradient_start(value_skips: TileSkips, p: torch.Tensor, q: torch.Tensor, c: torch.Tensor, beta: float,
                      delta: float) -> tuple:
    """The start of JS rows' gradient plans after a value sweep that left out `value_skips`' tiles (shares p, q
    [n, tiles], constants c [n] summed over the kept tiles): (`TileSkips` forcing those tiles, spent
    Σ_skipped (e_T + (|c| + E_c)·P_T) + (1 + δ)·E_c; E_c [n] = Σ_skipped a_T, the constant's error bound)."""
    a, _, e = js_tile_bounds(p, q, beta)
    skipped = ~value_skips.keep
    zero = torch.zeros_like(a)
    ec = torch.where(skipped, a, zero).sum(1)
    mass = torch.where(skipped, e + (c.double().abs() + ec)[:, None] * p, zero).sum(1)
    return TileSkips(value_skips.keep, mass + (1 + delta) * ec), ec


class RowBudget:
    """The skip budget of `n` rows over one sweep of a `vocab`-column vocabulary (module docstring)."""

    def __init__(self, n: int, vocab: int, delta: float, device: torch.device, rows: int = 1,
                 spent: Optional[torch.Tensor] = None):
        """`spent` [n]: mass each row has already skipped, in the units of its gradient tiles (whole tiles
        skipped before the sweep, `plan_tile_skips`, times the row's scale)."""
        f64 = torch.float64
        self.delta, self.vocab, self.rows, self.seen = delta, vocab, rows, 0
        self.abs_sum, self.sum = (torch.zeros(n, dtype=f64, device=device) for _ in range(2))
        self.spent = torch.zeros(n, dtype=f64, device=device) if spent is None else spent.double().clone()

    def keep(self, g: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Blocks of the gradient tile `g` [n, width] (the next columns of the sweep) to contract:
        [n, ceil(width / SKIP_COLUMNS)] bool, the same for all rows of a group of `self.rows`. With `rows`
        (indices of the budget's rows, decided row by row only), `g` holds just those rows: the others
        skip the tile whole (bounded before the sweep and spent from the start)."""
        if rows is not None and self.rows != 1:
            raise ValueError("RowBudget.keep: a subset of rows is decided row by row only (rows=1)")
        sel = slice(None) if rows is None else rows
        n, width = g.shape
        whole = width // SKIP_COLUMNS * SKIP_COLUMNS  # columns in whole blocks; a partial block may follow
        size = g.abs()
        mass = [sum_as_float64(size[:, :whole].reshape(n, -1, SKIP_COLUMNS), -1)]
        if whole < width:
            mass.append(sum_as_float64(size[:, whole:], 1, keepdim=True))
        del size
        mass = torch.cat(mass, 1)  # m_ib [n, nb]
        nb = mass.shape[1]
        self.abs_sum[sel] += mass.sum(1)
        self.sum[sel] += sum_as_float64(g, 1)
        self.seen += width
        lower = self.abs_sum[sel] + self.sum[sel].abs()  # L ≤ ‖g‖₁
        allowance = self.delta * lower * min(1.0, self.seen / self.vocab) - self.spent[sel]
        allowance = torch.where(torch.isfinite(lower), allowance, torch.zeros_like(allowance)).clamp_min(0.0)
        # Groups of `rows` rows (the last one padded with rows of no mass and an unlimited allowance).
        groups = -(-n // self.rows)
        pad = groups * self.rows - n
        m = torch.nn.functional.pad(mass, (0, 0, 0, pad)).reshape(groups, self.rows, nb)
        a = torch.nn.functional.pad(allowance, (0, pad), value=float("inf")).reshape(groups, self.rows, 1)
        ratio = torch.where(m > 0, m / a.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(m))
        order = ratio.amax(1).argsort(dim=1)  # [groups, nb]: cheapest blocks first (NaN last)
        running = m.gather(2, order[:, None, :].expand_as(m)).cumsum(2)
        fits = (running <= a).all(1)  # a prefix of each group's order: running sums only grow
        skip = torch.zeros_like(fits).scatter_(1, order, fits)
        skip = skip[:, None, :].expand(groups, self.rows, nb).reshape(groups * self.rows, nb)[:n]
        self.spent[sel] += torch.where(skip, mass, torch.zeros_like(mass)).sum(1)
        return ~skip

    def pass_over(self, width: int) -> None:
        """Every row skips the sweep's next `width` columns whole (bounded before the sweep)."""
        self.seen += width
