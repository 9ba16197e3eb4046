"""The `torch` backend: the passes of `passes.Passes` as vocabulary-blocked PyTorch, for any device.

Work is tiled into `[row_chunk, vocab_chunk]` blocks; the largest temporary of any pass is a few
tiles of that size (and, in fused-linear mode, `[r, K, H]` weight gathers bounded by the same
budget). No `[N, V]` tensor is created other than the logits-mode gradient.

In fused-linear mode the gradient passes skip the contractions of column blocks whose gradient is
provably negligible (`skipping.py`: the bound and the rule), row by row: each block contracts the
rows that keep it. `skip_counter` counts what was skipped.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import gradients, skipping
from ..divergences import log_mixture
from ..passes import STUDENT, FullRows, Grads, Stats, split_lse
from ..row_terms import RowTerm
from ..sources import LinearSource
from ..topk import select_top_k
from .base import (NEG_INF, PassBackend, finish_logsumexp, merge_logsumexp, online_logsumexp, skips_whole_tiles,
                   without_columns)


def _kl_terms(lp: torch.Tensor, p: torch.Tensor, log_r: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """p_v(log p_v − log r_v) on a tile, 0 where p has no mass (log p = −inf), as `divergences.kl` forms its
    terms (so their sums agree bit for bit); written into `out` when given, a tile at a time."""
    t = torch.sub(lp, log_r, out=out)
    return t.mul_(p).masked_fill_(lp == NEG_INF, 0.0)


def _tile_value(lp: torch.Tensor, lq: torch.Tensor, kind: str, beta: float, sums: bool = False) -> tuple:
    """A tile's part [r] of each row's divergence and of its gradient constant c (reverse KL: the KL
    itself; JS: β·KL(p‖m); forward KL: 0), both summed over a row's tiles, and with `sums` the tile's
    sums [r] (float64) for `_value_tile_bounds` (else None), taken from the same terms. They write the
    gradient g_v = p_v(a_v − c) around its row constant c (JS a_v = β(log p_v − log m_v), reverse KL
    a_v = log p_v − log q_v, as `_full_tile_grad` forms them): (P_T, Σ_T p·a, Σ_T p·|a|); forward KL
    (g = p − q): (P_T, Q_T). JS forms its log-mixture once; the terms reuse two tile buffers, so the
    sums cost no tile beyond the value's."""
    if kind == "forward_kl":
        q = lq.exp()
        value = _kl_terms(lq, q, lp).sum(-1)
        return value, torch.zeros_like(value), (skipping.sum_as_float64(lp.exp(), 1), skipping.sum_as_float64(q, 1)) if sums else None
    log_r = log_mixture(lp, lq, beta) if kind == "js" else lq
    p = lp.exp()
    mass = skipping.sum_as_float64(p, 1) if sums else None
    t = _kl_terms(lp, p, log_r)
    kl_p = t.sum(-1)
    weight = beta if kind == "js" else 1.0  # p·a = weight · p(log p − log r)
    tile_sums = (mass, weight * kl_p.double(), weight * skipping.sum_as_float64(t.abs_(), 1)) if sums else None
    if kind == "reverse_kl":
        return kl_p, kl_p, tile_sums
    kl_q = _kl_terms(lq, torch.exp(lq, out=p), log_r, out=t).sum(-1)
    return beta * kl_p + (1.0 - beta) * kl_q, beta * kl_p, tile_sums


def _log_softmax_tile(tile: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """log p = (z − hi) − lo for a tile [r, c] and a row log-sum-exp given as `split_lse` parts [r]:
    z − hi is exact near the row maximum, so log p keeps the compute dtype's relative precision
    however large the logits are."""
    return (tile - hi[:, None]) - lo[:, None]


def _merge_topk(vals: torch.Tensor, idx: torch.Tensor, tile: torch.Tensor, start: int, k: int):
    """Keep the k largest of the running (vals, idx) and a new tile starting at column `start` (ties:
    the lower column, `topk.select_top_k`); the kept ones stay in column order."""
    cols = torch.arange(start, start + tile.shape[1], device=tile.device).expand(tile.shape[0], -1)
    cand_v, cand_i = torch.cat([vals, tile], dim=1), torch.cat([idx, cols], dim=1)
    keep = select_top_k(cand_v, min(k, cand_v.shape[1]))  # running columns precede the tile's: column order
    return cand_v.gather(1, keep), cand_i.gather(1, keep)


def _times_dense(p: torch.Tensor, dense: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """p_v · dense on a tile (p [r, c] in the compute dtype `dt`, dense [r, 1] float64, both as
    `RowTerm.dense_normalizer` gives them: a huge |dense| is already folded into p); 0 where p
    underflowed (dense may be ±inf there, its log-magnitude unknown, and 0·inf would be NaN)."""
    return torch.where(p > 0, p * dense.to(dt).nan_to_num(posinf=0.0, neginf=0.0), torch.zeros_like(p))


def _exact_difference(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """a − b as an unevaluated sum hi + lo of their dtype, exactly (Knuth's TwoSum; lo is 0 where hi is not
    finite). A log-ratio D_v = x_s − x_t of ~100 then loses nothing to rounding where the reverse-KL
    gradient's residual D_v − K cancels to O(1)."""
    hi = a - b
    bv = hi - a  # −b as the sum saw it
    lo = (a - (hi - bv)) - (b + bv)
    return hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))


def _weighted_difference(e: torch.Tensor, za: torch.Tensor, zb: torch.Tensor) -> tuple:
    """(Σ_v e_v D_v, Σ_v e_v) [r] in float64 of a tile [r, c], D_v = za − zb and e_v ≥ 0 the weights.

    The terms are summed around D at each row's largest weight, ref, as Σ e (D − ref) + ref·Σ e: where one
    column dominates, its term is exactly 0 and the others round relative to their own distance from it, so
    the weighted mean (the reverse-KL constant K = E_p[D]) keeps float64's precision at log-ratios of ~100."""
    hi, lo = _exact_difference(za, zb)
    ref = hi.gather(1, e.argmax(1, keepdim=True))
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))  # an infinite D gives w = inf below
    has = e > 0
    zero = torch.zeros_like(e)
    rel = torch.where(has, e * (hi - ref), zero).sum(1).double() + torch.where(has, e * lo, zero).sum(1).double()
    total = e.sum(1).double()
    return rel + ref[:, 0].double() * total, total


def _tile_kl(za: torch.Tensor, zb: torch.Tensor) -> tuple:
    """A tile's own KL state (`_merge_kl`) of the weighting stream `za` and the other stream `zb` [r, c],
    relative to the tile's maxima."""
    ma, mb = za.max(1).values, zb.max(1).values
    sha = torch.where(ma == NEG_INF, torch.zeros_like(ma), ma)
    shb = torch.where(mb == NEG_INF, torch.zeros_like(mb), mb)
    ea = torch.exp(za - sha[:, None])
    w, sw = _weighted_difference(ea, za, zb)
    return ma, ea.sum(1), mb, torch.exp(zb - shb[:, None]).sum(1), w, sw


def _difference_range(za: torch.Tensor, zb: torch.Tensor) -> tuple:
    """(min, max) [r] of D_v = a_v − b_v over a tile's columns where a_v > −inf (`_kl_tile_bounds`)."""
    d, seen = za - zb, za > NEG_INF
    return (torch.where(seen, d, torch.full_like(d, float("inf"))).amin(1),
            torch.where(seen, d, torch.full_like(d, NEG_INF)).amax(1))


def _merge_kl(state: tuple, tile: tuple) -> tuple:
    """Merge a tile's KL state (`_tile_kl`) into the running state (ma, sa, mb, sb, w, sw) [r]: maxima m
    and sums s = Σ e^{z − m} of each stream, and (float64) w = Σ_v e^{a_v − ma} D_v, D_v = a_v − b_v, with
    sw the same weights' sum, so that K = E_a[D] = w/sw and KL(a‖b) = K − (ma + log sa) + (mb + log sb)
    (`csrc/row_math.h` KlState; `_weighted_difference` for the precision of K). Each part rescales to
    the larger maximum, w and sw by e^{m − m'} taken in float64."""
    ma, sa, mb, sb, w, sw = state
    ta, tsa, tb, tsb, tw, tsw = tile
    ma2, mb2 = torch.maximum(ma, ta), torch.maximum(mb, tb)
    sha = torch.where(ma2 == NEG_INF, torch.zeros_like(ma2), ma2)
    shb = torch.where(mb2 == NEG_INF, torch.zeros_like(mb2), mb2)

    def rescale64(m, total):  # e^{m − sha} in float64; 0 where nothing was weighted (m − sha may be −inf − 0)
        return torch.where(total > 0, torch.exp(m.double() - sha.double()), torch.zeros_like(total))

    return (ma2, sa * torch.exp(ma - sha) + tsa * torch.exp(ta - sha), mb2,
            sb * torch.exp(mb - shb) + tsb * torch.exp(tb - shb),
            rescale64(ma, sw) * w + rescale64(ta, tsw) * tw, rescale64(ma, sw) * sw + rescale64(ta, tsw) * tsw)


def _kl_tile_bounds(tiles: Sequence[tuple], ranges: Sequence[tuple], lse_a: torch.Tensor, lse_b: torch.Tensor,
                    k: torch.Tensor) -> tuple:
    """From the online sweep's tile states (`_tile_kl`, one per tile), for reverse KL their ranges of D
    (`_difference_range`; forward KL: none), and the row's log-sum-exps and K = E_a[D] [r] (float64): upper bounds [r, tiles] of each tile's gradient mass ‖u_T‖₁ (u = τ·∂D/∂z before the scale)
    and a lower bound [r] of the row's ‖u‖₁ = Σ_T |Σ_{v∈T} u_v| (csrc/kernels_cpu.cpp TileMass derives them),
    with P_T, Q_T the tile's shares of the student's and teacher's softmax mass:
        reverse KL (a = student), u = p(D − K):  ‖u_T‖₁ ≤ P_T·max(|Dmax_T − K|, |Dmin_T − K|),  Σ_T u = P_T(D̄_T − K);
        forward KL (a = teacher), u = p − q:     ‖u_T‖₁ ≤ P_T + Q_T,                           Σ_T u = P_T − Q_T."""
    ta, tsa, tb, tsb, tw, tsw = (torch.stack(x, 1) for x in zip(*tiles))

    def share(m, total, lse):  # a tile's share of a stream's softmax mass
        return torch.where(m == NEG_INF, torch.zeros_like(total, dtype=torch.float64),
                           torch.exp(m.double() + total.double().log() - lse[:, None]))

    pa = share(ta, tsa, lse_a)
    if not ranges:
        pb = share(tb, tsb, lse_b)
        return pa + pb, (pb - pa).abs().sum(1)
    dmin, dmax = (torch.stack(x, 1) for x in zip(*ranges))
    kk, has = k[:, None], pa > 0
    spread = torch.maximum((dmax.double() - kk).abs(), (dmin.double() - kk).abs())
    zero = torch.zeros_like(pa)
    return torch.where(has, pa * spread, zero), torch.where(has, pa * (tw / tsw - kk).abs(), zero).sum(1)


def _value_tile_bounds(sums: Sequence[tuple], c: torch.Tensor, kind: str) -> tuple:
    """From the value sweep's tile sums (`_tile_value`, one per tile) and the rows' constants c [r]
    (float64): upper bounds [r, tiles] of each tile's ‖g_T‖₁ and a lower bound [r] of the row's ‖g‖₁
    (csrc/kernels_cpu.cpp TileMass derives them):
        g = p(a − c):  ‖g_T‖₁ ≤ Σ_T p|a| + |c|·P_T,   ‖g‖₁ ≥ Σ_T |Σ_T p·a − c·P_T|;
        g = p − q:     ‖g_T‖₁ ≤ P_T + Q_T,            ‖g‖₁ ≥ Σ_T |P_T − Q_T|."""
    parts = [torch.stack(x, 1) for x in zip(*sums)]
    if kind == "forward_kl":
        pt, qt = parts
        return pt + qt, (pt - qt).abs().sum(1)
    pt, pa, pabs = parts
    cc = c[:, None]
    return pabs + cc.abs() * pt, (pa - cc * pt).abs().sum(1)


def _reverse_kl_residual(zs: torch.Tensor, zt: torch.Tensor, k: tuple) -> torch.Tensor:
    """log p − log q − c = D_v − K of a tile [r, c] (scaled logits zs, zt; K = c + lse_s − lse_t [r] as
    `split_lse` parts): D_v exact (`_exact_difference`) and K in two parts, so that where the residual
    cancels to O(1) from log-ratios of ~100 it is rounded once, at its own size."""
    hi, lo = _exact_difference(zs, zt)
    return (hi - k[0][:, None]) + (lo - k[1][:, None])


class TorchBackend(PassBackend):
    """Vocabulary-chunked PyTorch. `row_chunk × vocab_chunk` bounds every temporary."""

    name = "torch"

    def __init__(self, row_chunk: int = 1024, vocab_chunk: int = 8192, skip_negligible: bool = True):
        """`skip_negligible`: skip the fused-linear contractions of negligible gradient blocks
        (`skipping.py`); `skip_counter` (a `skipping.SkipCounter`) counts them across calls."""
        if row_chunk < 1 or vocab_chunk < 1:
            raise ValueError(f"row_chunk and vocab_chunk must be >= 1, got {row_chunk}, {vocab_chunk}")
        if not isinstance(skip_negligible, bool):
            raise TypeError(f"skip_negligible must be a bool, got {type(skip_negligible).__name__}")
        self.row_chunk, self.vocab_chunk, self.skip_negligible = row_chunk, vocab_chunk, skip_negligible
        self.skip_counter = skipping.SkipCounter()

    def supports(self, device: torch.device) -> bool:
        return True

    def __repr__(self) -> str:
        return (f"TorchBackend(row_chunk={self.row_chunk}, vocab_chunk={self.vocab_chunk}, "
                f"skip_negligible={self.skip_negligible})")

    # -- tiling ---------------------------------------------------------------------------------

    def _row_chunks(self, n: int):
        for i in range(0, n, self.row_chunk):
            yield slice(i, min(i + self.row_chunk, n))

    def _vocab_blocks(self, source):
        v = source.effective_vocab
        for c in range(0, v, self.vocab_chunk):
            yield c, min(c + self.vocab_chunk, v)

    def _tile_count(self, source) -> int:
        """Vocabulary tiles of `source` (`_vocab_blocks`): the columns of a per-tile plan such as `TileSkips.keep`."""
        return -(-source.effective_vocab // self.vocab_chunk)

    def tile_shape(self) -> tuple:
        return self.row_chunk, self.vocab_chunk

    def gather(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        step = self.sparse_rows(source, cols.shape[1])
        return torch.cat([source.gather(rows[i:i + step], cols[i:i + step]) for i in range(0, rows.shape[0], step)])

    # -- passes ---------------------------------------------------------------------------------

    def stats_pass(self, sources: Sequence, rows: torch.Tensor, tokens: torch.Tensor, topk_streams, top_k: int,
                   rest_streams: Sequence[int] = (), share_streams: Sequence[int] = ()) -> Stats:
        """One sweep per stream over its tiles: the log-sum-exp, the running top-K where asked, for
        `rest_streams` the tail bucket: the same tiles with the sampled column at -inf, summed with their
        own running max (the tail's largest logit may be far below z_y's) — no extra projection, and for
        `share_streams`, where `full_pass` can leave whole tiles out (`base.skips_whole_tiles`), each tile's
        log-share: its own log-sum-exp, merged into the row's."""
        lse, topk, rest, shares = self._stats_sweep(sources, rows, tokens, topk_streams, top_k, rest_streams,
                                                    share_streams)
        logit_y = [src.gather(rows, tokens[:, None])[:, 0] for src in sources]
        return Stats(lse, logit_y, topk, rest, shares)

    def _stats_sweep(self, sources: Sequence, rows: torch.Tensor, tokens: Optional[torch.Tensor], topk_streams,
                     top_k: int, rest_streams: Sequence[int] = (), share_streams: Sequence[int] = ()) -> tuple:
        """`stats_pass`'s sweep: its `Stats` fields but the sampled logits, (lse, topk, rest_lse, tile_shares)
        (`tokens` only for `rest_streams`)."""
        n, dt = rows.shape[0], sources[STUDENT].dtype
        lse = [torch.empty(n, dtype=torch.float64, device=rows.device) for _ in sources]
        rest = {j: torch.empty(n, dtype=torch.float64, device=rows.device) for j in rest_streams}
        k = min(top_k, sources[STUDENT].effective_vocab)
        topk = {j: torch.empty(n, k, dtype=torch.long, device=rows.device) for j in topk_streams}
        wide = skips_whole_tiles(sources[STUDENT], self.skip_negligible, self.vocab_chunk)
        tiles = self._tile_count(sources[STUDENT])
        shares = {j: torch.empty(n, tiles, dtype=torch.float64, device=rows.device) for j in share_streams if wide}
        for sl in self._row_chunks(n):
            r, y = rows[sl], tokens[sl, None] if rest_streams else None
            for j, src in enumerate(sources):
                m = torch.full((r.shape[0],), NEG_INF, dtype=dt, device=r.device)
                s = torch.zeros_like(m)
                m_rest, s_rest = m.clone(), s.clone()
                vals = torch.empty(r.shape[0], 0, dtype=dt, device=r.device)
                idx = torch.empty(r.shape[0], 0, dtype=torch.long, device=r.device)
                for t, (c0, c1) in enumerate(self._vocab_blocks(src)):
                    tile = src.tile(r, c0, c1)
                    if j in shares:  # the tile's own (max, sum), merged into the row's
                        m_t, s_t = online_logsumexp(torch.full_like(m, NEG_INF), torch.zeros_like(s), tile)
                        shares[j][sl, t] = finish_logsumexp(m_t, s_t)
                        m, s = merge_logsumexp(m, s, m_t, s_t)
                    else:
                        m, s = online_logsumexp(m, s, tile)
                    if j in rest:
                        m_rest, s_rest = online_logsumexp(m_rest, s_rest, without_columns(tile, y, c0))
                    if j in topk:
                        vals, idx = _merge_topk(vals, idx, tile, c0, k)
                lse[j][sl] = finish_logsumexp(m, s)
                if j in shares:  # log P_T: −inf for a tile without mass (as cpp's), NaN where the lse is NaN or +inf
                    x = shares[j][sl]
                    shares[j][sl] = torch.where(x == NEG_INF, x, x - lse[j][sl, None])
                if j in rest:
                    rest[j][sl] = finish_logsumexp(m_rest, s_rest)
                if j in topk:
                    topk[j][sl] = idx
        return lse, topk, rest, {j: x.float() for j, x in shares.items()}

    def full_value_pass(self, student, target, rows, lse_s, lse_t, kind: str, beta: float):
        """Σ_v of the divergence over the vocabulary for each row, and the gradient constant c
        (reverse KL: the KL itself; JS: β·KL(p‖m); forward KL: 0). Tile partial sums add in float64."""
        value, c, _ = self._value_sweep(student, target, rows, lse_s, lse_t, kind, beta, 0.0)
        return value, c

    def _value_sweep(self, student, target, rows, lse_s, lse_t, kind: str, beta: float, delta: float,
                     shares: Optional[tuple] = None) -> tuple:
        """`full_value_pass`'s (value, c) and, with δ > 0, the whole tiles each row may skip in its gradient
        sweep (`_value_tile_bounds`, `skipping.plan_tile_skips`): a `skipping.TileSkips`; else None. With JS
        `shares` (P_T, Q_T [n, tiles], from the stats pass's `Stats.tile_shares`), each row also leaves out of
        this sweep the tiles `skipping.plan_js_value_skips` bounds, and its gradient plan starts from them
        (`skipping.js_gradient_start`); a row whose start does not fit its budget sweeps the tiles it left out
        after all (a correction sweep), then plans as without value skips."""
        n, f64 = rows.shape[0], torch.float64
        value = torch.zeros(n, dtype=f64, device=rows.device)
        c = torch.zeros_like(value)
        tiles = self._tile_count(student)
        keep = torch.ones(n, tiles, dtype=torch.bool, device=rows.device) if delta > 0 else None
        spent = torch.zeros(n, dtype=f64, device=rows.device) if delta > 0 else None
        lse = (*split_lse(lse_s, student.dtype), *split_lse(lse_t, target.dtype))
        for sl in self._row_chunks(n):
            r, chunk_lse = rows[sl], tuple(x[sl] for x in lse)
            value_skips = None if shares is None else skipping.plan_js_value_skips(*(x[sl] for x in shares), beta, delta)
            value[sl], c[sl], sums, formed = self._value_tiles(student, target, r, chunk_lse, kind, beta, delta > 0,
                                                               None if value_skips is None else value_skips.keep)
            if delta == 0:
                continue
            bound, lower = _value_tile_bounds(sums, c[sl], kind)
            if value_skips is None:
                keep[sl], spent[sl] = skipping.plan_tile_skips(bound, lower, delta)
                continue
            forced, ec = skipping.js_gradient_start(value_skips, *(x[sl] for x in shares), c[sl], beta, delta)
            p_t = torch.stack([x[0] for x in sums], 1)
            (keep[sl], spent[sl]), failed = skipping.plan_tile_skips(bound + ec[:, None] * p_t, lower - ec, delta, forced)
            if bool(failed.any()):  # rows whose divergence hides inside their tiles: the tiles they left out
                more = ~value_skips.keep & failed[:, None]
                v, cc, sums2, formed2 = self._value_tiles(student, target, r, chunk_lse, kind, beta, True, more)
                formed += formed2
                value[sl] += v
                c[sl] += cc
                sums = [tuple(a + b for a, b in zip(x, y)) for x, y in zip(sums, sums2)]  # disjoint tiles
                bound, lower = _value_tile_bounds(sums, c[sl], kind)
                again, again_spent = skipping.plan_tile_skips(bound[failed], lower[failed], delta)
                keep[sl][failed], spent[sl][failed] = again, again_spent
            self.skip_counter.value_unformed += r.shape[0] * student.effective_vocab - formed
        return value, c, None if keep is None else skipping.TileSkips(keep, spent)

    def _value_tiles(self, student, target, r: torch.Tensor, lse: tuple, kind: str, beta: float, sums: bool,
                     keep: Optional[torch.Tensor] = None) -> tuple:
        """One value sweep of the chunk rows `r` (log-sum-exps `lse` = (hi_s, lo_s, hi_t, lo_t) [r]): value [r]
        and c [r] (float64), with `sums` each tile's `_tile_value` sums (a list over the tiles), and the
        (row × column) entries projected. With `keep` [r, tiles], a row sums only the tiles it keeps (zero
        elsewhere), each tile formed for those rows alone (`_gathered`)."""
        f64, n = torch.float64, r.shape[0]
        zero = lambda: torch.zeros(n, dtype=f64, device=r.device)
        value, c, tile_sums, formed = zero(), zero(), [], 0
        for t, (c0, c1) in enumerate(self._vocab_blocks(student)):
            keep_t = None if keep is None or bool(keep[:, t].all()) else keep[:, t]
            at = slice(None)  # the chunk rows the tile is formed for
            if keep_t is not None:
                kept = keep_t.nonzero()[:, 0]
                at = self._gathered(keep_t, kept)
            if at is None:  # no row keeps the tile
                tile_sums.append((zero(), zero(), zero()))
                continue
            lp = _log_softmax_tile(student.tile(r[at], c0, c1), lse[0][at], lse[1][at])
            lq = _log_softmax_tile(target.tile(r[at], c0, c1), lse[2][at], lse[3][at])
            formed += lp.shape[0] * (c1 - c0)
            parts = _tile_value(lp, lq, kind, beta, sums=sums)
            parts = (parts[0].to(f64), parts[1].to(f64), *(parts[2] or ()))
            if keep_t is not None and isinstance(at, slice):  # the whole tile: the rows that skip it add nothing
                parts = tuple(x.masked_fill(~keep_t, 0.0) for x in parts)
            elif keep_t is not None:  # gathered: the kept rows first, then rows padding the tile
                parts = tuple(zero().index_add_(0, kept, x[:kept.shape[0]]) for x in parts)
            value += parts[0]
            c += parts[1]
            tile_sums.append(parts[2:])
        return value, c, tile_sums if sums else None, formed

    @staticmethod
    def _gathered(keep: torch.Tensor, kept: torch.Tensor) -> Optional[torch.Tensor]:
        """The chunk rows a tile is formed for when only the rows `kept` (mask `keep` [r]) need it: `kept`, padded
        with rows that skip it to a multiple of `skipping.GATHER_ROWS` (a GEMM of a few rows takes other BLAS
        kernels, which round differently), or every row (a slice) when that is no fewer; None when no row keeps
        it."""
        n_rows, m = keep.shape[0], kept.shape[0]
        if m == 0:
            return None
        padded = min(n_rows, -(-m // skipping.GATHER_ROWS) * skipping.GATHER_ROWS)
        if padded == n_rows:
            return slice(None)
        return torch.cat([kept, (~keep).nonzero()[:padded - m, 0]])

    def full_pass(self, student, target, rows, lse_s, lse_t, kind: str, beta: float, scale, grads,
                  plan_skips: bool = False, tile_shares=None) -> FullRows:
        """Full-vocabulary rows in one sweep when a row's whole valid vocabulary fits one tile
        (V ≤ `vocab_chunk`, so no tile is wider than any other pass's): each chunk of rows gets its two
        streams' logits once and takes from them the log-sum-exps (when not given), the value, the
        gradient constant and, with `scale`, the gradient contracted at once — the matmul floor.
        Wider rows of reverse / forward KL without given log-sum-exps: those and the KL online in one
        sweep (`_kl_sweep`), then the gradient sweep; JS and rows with given log-sum-exps: the statistics
        (when not given), the value sweep (`_value_sweep`), the gradient sweep. In wide rows the sweep
        before the gradient's also bounds the whole tiles each row may skip (`skipping.plan_tile_skips`); with
        `plan_skips` and no `scale` those are returned for a deferred `full_grad_pass`. A JS value sweep leaves
        out the tiles the stats pass's tile shares bound (its own, or with given log-sum-exps `tile_shares`)."""
        v, n, dt, f64 = student.effective_vocab, rows.shape[0], student.dtype, torch.float64
        # DESIGN.md's memory rule: no [chunk, V] tensor in fused-linear mode, so a whole row must fit one
        # ordinary tile (V ≤ vocab_chunk). A wider vocabulary takes two sweeps for reverse / forward KL
        # (log-sum-exps and KL online, then the gradient: its constant is the whole row's KL), three for JS
        # (its log-mixture needs both log-sum-exps before any term).
        if v > self.vocab_chunk:
            # δ of the gradient sweep that follows at once, or (plan_skips) of the deferred one: tiles planned now
            delta = 0.0
            if scale is not None or plan_skips:
                delta = self._delta(student, grads if scale is not None else None)
            if lse_s is not None or kind == "js":  # the value sweep bounds the tiles once it has c
                if lse_s is None:  # JS: the statistics, and the tile shares its value sweep may leave tiles out by
                    (lse_s, lse_t), _, _, shares = self._stats_sweep((student, target), rows, None, (), 1,
                                                                     share_streams=(0, 1) if delta > 0 else ())
                    tile_shares = (shares[0], shares[1]) if shares else None
                shares = None  # with δ > 0 a JS value sweep leaves out the tiles the shares bound
                if kind == "js" and tile_shares is not None and delta > 0:
                    shares = tuple(x.double().exp() for x in tile_shares)
                value, c, tile_skips = self._value_sweep(student, target, rows, lse_s, lse_t, kind, beta, delta,
                                                         shares)
            else:
                lse_s, lse_t, value, tile_skips = self._kl_sweep(student, target, rows, kind, delta)
                c = value.clone() if kind == "reverse_kl" else torch.zeros_like(value)
            if scale is None:
                return FullRows(lse_s, lse_t, value, c, tile_skips)
            self._full_grad_sweep(student, target, rows, lse_s, lse_t, c, kind, beta, scale, grads, tile_skips)
            return FullRows(lse_s, lse_t, value, c)
        given = lse_s is not None
        if not given:
            lse_s, lse_t = (torch.empty(n, dtype=f64, device=rows.device) for _ in range(2))
        value, c = torch.zeros(n, dtype=f64, device=rows.device), torch.zeros(n, dtype=f64, device=rows.device)
        for sl in self._row_chunks(n):
            r = rows[sl]
            zs, zt = student.tile(r, 0, v), target.tile(r, 0, v)
            if not given:
                for lse, z in ((lse_s, zs), (lse_t, zt)):
                    m = torch.full((z.shape[0],), NEG_INF, dtype=z.dtype, device=z.device)
                    lse[sl] = finish_logsumexp(*online_logsumexp(m, torch.zeros_like(m), z))
            (hs, ls), (ht, lt) = split_lse(lse_s[sl], dt), split_lse(lse_t[sl], target.dtype)
            lp, lq = _log_softmax_tile(zs, hs, ls), _log_softmax_tile(zt, ht, lt)
            p = lp.exp()
            if kind == "reverse_kl":  # KL = E_p[x_s − x_t] − lse_s + lse_t, the mean precise (_weighted_difference)
                w, sw = _weighted_difference(p, zs, zt)
                value[sl] = c[sl] = w / sw - lse_s[sl] + lse_t[sl]
            else:
                row_value, row_c, _ = _tile_value(lp, lq, kind, beta)
                value[sl], c[sl] = row_value.to(f64), row_c.to(f64)
            if scale is not None:
                grad = self._full_tile_grad(lp, p, lq, zs, zt, self._constants(c[sl], lse_s[sl], lse_t[sl], kind, dt),
                                            kind, beta)
                self._add_tile(grads, student, r, 0, grad.mul_(scale[sl, None].to(dt)), zs, self._budget(student, grads, r))
        return FullRows(lse_s, lse_t, value, c)

    def _kl_sweep(self, student, target, rows: torch.Tensor, kind: str, delta: float = 0.0) -> tuple:
        """Both streams' log-sum-exps and the reverse (KL(s‖t)) or forward (KL(t‖s)) KL of each row [n]
        (float64) in one sweep over the vocabulary (`_tile_kl`, `_merge_kl`). With δ > 0, also the whole tiles
        each row may skip in its gradient sweep (`_kl_tile_bounds`, `skipping.plan_tile_skips`): a
        `skipping.TileSkips`; else None."""
        n, f64, reverse = rows.shape[0], torch.float64, kind == "reverse_kl"
        lse_s, lse_t, value = (torch.empty(n, dtype=f64, device=rows.device) for _ in range(3))
        tiles = self._tile_count(student)
        keep = torch.ones(n, tiles, dtype=torch.bool, device=rows.device) if delta > 0 else None
        spent = torch.zeros(n, dtype=f64, device=rows.device) if delta > 0 else None
        for sl in self._row_chunks(n):
            r = rows[sl]
            m = torch.full((r.shape[0],), NEG_INF, dtype=student.dtype, device=r.device)
            w = torch.zeros(r.shape[0], dtype=f64, device=r.device)
            state = (m, torch.zeros_like(m), m.clone(), torch.zeros_like(m), w, w.clone())
            states, ranges = [], []
            for c0, c1 in self._vocab_blocks(student):
                zs, zt = student.tile(r, c0, c1), target.tile(r, c0, c1)
                za, zb = (zs, zt) if reverse else (zt, zs)
                tile = _tile_kl(za, zb)
                state = _merge_kl(state, tile)
                if delta > 0:
                    states.append(tile)
                    if reverse:
                        ranges.append(_difference_range(za, zb))
            ma, sa, mb, sb, w, sw = state
            lse_a, lse_b = finish_logsumexp(ma, sa), finish_logsumexp(mb, sb)
            lse_s[sl], lse_t[sl] = (lse_a, lse_b) if reverse else (lse_b, lse_a)
            value[sl] = w / sw - lse_a + lse_b
            if delta > 0:
                keep[sl], spent[sl] = skipping.plan_tile_skips(*_kl_tile_bounds(states, ranges, lse_a, lse_b, w / sw),
                                                               delta)
        return lse_s, lse_t, value, None if keep is None else skipping.TileSkips(keep, spent)

    def full_grad_pass(self, student, target, rows, lse_s, lse_t, c, kind: str, beta: float, scale: torch.Tensor,
                       grads: Grads, tile_skips: Optional[skipping.TileSkips] = None) -> None:
        """Gradient tiles of full-vocabulary rows, scaled per row by `scale` (upstream · weight / τ), leaving out
        the whole tiles `full_pass(plan_skips=True)` planned (`tile_skips`)."""
        self._full_grad_sweep(student, target, rows, lse_s, lse_t, c, kind, beta, scale, grads, tile_skips)

    def _full_grad_sweep(self, student, target, rows, lse_s, lse_t, c, kind: str, beta: float, scale: torch.Tensor,
                         grads: Grads, tile_skips: Optional[skipping.TileSkips]) -> None:
        """`full_grad_pass`; `tile_skips` from `_kl_sweep` or `_value_sweep`, or None: a tile is formed only for the
        rows that keep it (`_gathered`; with the whole chunk's tile, the skipping rows' gradient is 0); each row's
        block budget starts with its spent bound, times its scale. A row of non-finite scale keeps every tile
        (its NaN or inf reaches every column, as without skipping); where this sweep skips nothing
        (`_delta`), `tile_skips` are not used."""
        if self._delta(student, grads) == 0:
            tile_skips = None
        (hs, ls), (ht, lt), dt = split_lse(lse_s, student.dtype), split_lse(lse_t, target.dtype), student.dtype
        for sl in self._row_chunks(rows.shape[0]):
            r, sc = rows[sl], scale[sl, None].to(dt)
            keep = spent = None
            if tile_skips is not None:
                finite = torch.isfinite(scale[sl])
                keep = tile_skips.keep[sl] | ~finite[:, None]
                spent = tile_skips.spent[sl] * scale[sl].double().abs()
                spent = torch.where(finite, spent, torch.zeros_like(spent))
            budget = self._budget(student, grads, r, spent)
            const = self._constants(c[sl], lse_s[sl], lse_t[sl], kind, dt)
            row_hs, row_ls, row_ht, row_lt = hs[sl], ls[sl], ht[sl], lt[sl]

            def tile_grad(at, c0: int, c1: int) -> tuple:  # the gradient and student logits of chunk rows `at`
                z, zt = student.tile(r[at], c0, c1), target.tile(r[at], c0, c1)
                lp = _log_softmax_tile(z, row_hs[at], row_ls[at])
                lq = _log_softmax_tile(zt, row_ht[at], row_lt[at])
                cst = tuple(x[at] for x in const) if isinstance(const, tuple) else const[at]
                return self._full_tile_grad(lp, lp.exp(), lq, z, zt, cst, kind, beta).mul_(sc[at]), z

            for t, (c0, c1) in enumerate(self._vocab_blocks(student)):
                kept = None if keep is None or bool(keep[:, t].all()) else keep[:, t].nonzero()[:, 0]
                if kept is None:
                    self._add_tile(grads, student, r, c0, *tile_grad(slice(None), c0, c1), budget)
                    continue
                n_rows, m = r.shape[0], kept.shape[0]
                at = self._gathered(keep[:, t], kept)
                if at is None:
                    budget.pass_over(c1 - c0)
                    self.skip_counter.add_whole(n_rows, n_rows, c1 - c0)
                elif isinstance(at, slice):  # the whole tile; the rows that skip it get no gradient
                    g, z = tile_grad(at, c0, c1)
                    g[~keep[:, t]] = 0
                    self._add_tile(grads, student, r, c0, g, z, budget)
                else:
                    g, z = tile_grad(at, c0, c1)
                    g, z = g[:m], z[:m]
                    tile_keep = budget.keep(g, rows=kept)
                    self.skip_counter.add(tile_keep, c1 - c0)
                    self.skip_counter.add_whole(n_rows - m, n_rows - at.shape[0], c1 - c0)
                    gradients.add_tile(grads, student, r[kept], c0, g, z, tile_keep)

    def term_grad_pass(self, student, rows, lse_s, term: RowTerm, scale: torch.Tensor, grads: Grads) -> None:
        """Gradient of few-column terms: `p_v · dense` tiles with the explicit columns written or the
        sparse ones added; a renormalized top-K (no dense part) moves only its K logits."""
        dt = student.dtype
        if term.dense is None:
            gradients.add_sparse(grads, student, rows, term.cols, (term.sparse * scale[:, None]).to(dt),
                                 self.sparse_rows(student, term.cols.shape[1]))
            return
        # p·dense formed as unit·exp(z − lse), |dense| folded into lse where it is huge
        # (RowTerm.dense_normalizer: exact where p_v underflows and dense overflows)
        lse, dense = term.dense_normalizer(lse_s)
        hs, ls = split_lse(lse, dt)
        for sl in self._row_chunks(rows.shape[0]):
            r, sc = rows[sl], scale[sl, None].to(dt)
            budget = self._budget(student, grads, r)
            for c0, c1 in self._vocab_blocks(student):
                z = student.tile(r, c0, c1)
                p = _log_softmax_tile(z, hs[sl], ls[sl]).exp()
                grad = _times_dense(p, dense[sl, None], dt)
                if term.explicit is not None:
                    self._write_explicit(grad, term.cols[sl], term.explicit[sl].to(dt), c0)
                else:
                    self._fold_sparse(grad, term.cols[sl], term.sparse[sl].to(dt), c0)
                self._add_tile(grads, student, r, c0, grad * sc, z, budget)

    def _delta(self, student, grads: Optional[Grads]) -> float:
        """δ of the gradient sweeps (`skipping.tolerance`), 0.0 where nothing is skipped: skipping off, no
        contraction to save (logits mode, no dH or dW needed), float64 inputs. `grads` None: of a deferred
        gradient sweep that will contract (its whole tiles planned now)."""
        if not self.skip_negligible or not isinstance(student, LinearSource):
            return 0.0
        if grads is not None and grads.dh is None and grads.dw is None:
            return 0.0
        return skipping.tolerance(student.hidden.dtype)

    def _budget(self, student, grads: Grads, rows: torch.Tensor, spent=None):
        """The skip budget of a row chunk's gradient sweep (`skipping.RowBudget`, `spent` [r] already spent),
        or None where nothing is skipped (`_delta`)."""
        delta = self._delta(student, grads)
        return skipping.RowBudget(rows.shape[0], student.effective_vocab, delta, rows.device,
                                  spent=spent) if delta > 0 else None

    def _add_tile(self, grads: Grads, student, rows: torch.Tensor, start: int, g: torch.Tensor, z: torch.Tensor,
                  budget) -> None:
        """`gradients.add_tile`, with the blocks `budget` finds negligible left out and counted."""
        keep = None
        if budget is not None:
            keep = budget.keep(g)
            self.skip_counter.add(keep, g.shape[1])
        gradients.add_tile(grads, student, rows, start, g, z, keep)

    @staticmethod
    def _constants(c: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, kind: str, dtype: torch.dtype):
        """What `_full_tile_grad` takes of a row's constant c [n] (float64): reverse KL K = c + lse_s − lse_t
        as `split_lse` parts; otherwise c [n, 1] in `dtype`."""
        if kind == "reverse_kl":
            return split_lse(c + lse_s - lse_t, dtype)
        return c[:, None].to(dtype)

    @staticmethod
    def _full_tile_grad(lp, p, lq, zs, zt, const, kind: str, beta: float) -> torch.Tensor:
        """∂D/∂z (times τ) on a tile (scaled logits zs, zt; `const` from `_constants`): reverse KL
        p(log p − log q − c) = p(D_v − K) (`_reverse_kl_residual`), forward KL p − q, JS p(β(log p − log m) − c);
        0 where the student has no mass (except forward KL's −q)."""
        if kind == "forward_kl":
            return p - lq.exp()
        # The residual is formed, then scaled by p and masked in place: a fresh tile of its own.
        if kind == "reverse_kl":
            r = _reverse_kl_residual(zs, zt, const)
        else:  # log m is finite wherever p > 0; the entries where p = 0 are masked below
            r = torch.sub(lp, log_mixture(lp, lq, beta)).mul_(beta).sub_(const)
        return r.mul_(p).masked_fill_(~(p > 0), 0.0)

    @staticmethod
    def _write_explicit(grad: torch.Tensor, cols: torch.Tensor, explicit: torch.Tensor, start: int) -> None:
        """Set the explicit columns inside this tile to their whole gradient (no p·dense + sparse sum)."""
        inside = (cols >= start) & (cols < start + grad.shape[1])
        r, j = inside.nonzero(as_tuple=True)
        grad[r, cols[r, j] - start] = explicit[r, j]

    @staticmethod
    def _fold_sparse(grad: torch.Tensor, cols: torch.Tensor, sparse: torch.Tensor, start: int) -> None:
        """Add the sparse coefficients whose columns fall inside this tile."""
        inside = (cols >= start) & (cols < start + grad.shape[1])
        local = torch.where(inside, cols - start, torch.zeros_like(cols))
        grad.scatter_add_(1, local, torch.where(inside, sparse, torch.zeros_like(sparse)))
