"""Divergence passes over full vocabulary rows (DESIGN.md section 4, steps 3–4).

The kernels run on a compacted set of rows (`rows_ptr`: the original row ids of, e.g., the HT rows
of DOPD), so the cost is proportional to the rows that need the whole vocabulary. Log-probabilities
are `lp = (z − hi) − lo` from the `(hi, lo)` split of each row's float64 log-sum-exp
(`tiles.log_prob`).

`full_value_kernel` — grid: one program per `BLOCK_N` rows, looping over the vocabulary. With
`lp = log p`, `lq = log q` it accumulates per row the divergence (KIND REVERSE_KL Σ p(lp − lq),
FORWARD_KL Σ q(lq − lp), JS: JS_β with the mixture in log space, `log m = logaddexp(log β + lp,
log(1−β) + lq)`) and the constant `c` of the gradient (reverse KL: the KL itself; JS: β·KL(p‖m);
forward KL: 0). The per-tile sums are added across tiles with Neumaier's compensated sum
(`compensated_add`): c enters every gradient element as p·(r − c), and a plain fp32 running sum
over V/BLOCK_V ~ 1000 tiles would add its rounding to that of the tile sums.

`kl_online_kernel` — grid: one program per `BLOCK_N` rows, looping over the vocabulary: full-vocabulary
reverse / forward KL rows whose log-sum-exps are not known yet (full OPD: no stats pass). Both
streams' running max / sum and the KL's weighted mean logit difference K = E_a[a − b] (float64), in one
sweep (its docstring); the gradient sweep follows, 6 projections per fused-linear row instead of 8.

`grad_tile` — the gradient tile `G = scale_n · ∂D_n/∂z` (scale = upstream · weight / τ):
    reverse KL  p(lp − lq − c), formed as p(D − K): D = zs − zt exact, K = c + lse_s − lse_t (coef pair)
    JS          p(β(lp − log m) − c)
    forward KL  p − q
    KIND DENSE (dense part of sampled / tail-bucket top-K rows, `row_terms.py`): p · dense_n, 0 where
    p = 0 (a dense coefficient that overflows fp32 would make 0·inf = NaN there, as `row_math.h`
    guards too); with EXPLICIT the row's k explicit columns are set to their whole gradient
    `explicit` instead (one compare per explicit column and logit: O(k) beside a tile's O(H)
    multiply-adds), because p·dense + sparse cancels catastrophically there when dense is huge and
    p ≈ 1. In fused-linear mode G is then multiplied by the head transform's jacobian
    (`tiles.head_transform`), which makes it the gradient with respect to the raw `h·Wᵀ + b`.

`grad_kernel` — logits mode: grid (row blocks, vocabulary blocks), every program stores one tile of
the student gradient; nothing else of size [N, V] exists. Fused-linear mode: grid (row blocks,
vocabulary splits); a program recomputes its logit tiles by tl.dot and contracts each gradient
tile at once, H chunk by H chunk, into `dH[rows] += G·W[cols]` and (unless deterministic)
`dW[cols] += Gᵀ·H[rows]`, `db += Σ_rows G`.
  * dH has one writer per element and no atomics: with one vocabulary split the program owns its
    rows' dH and accumulates into it across its vocabulary tiles (read-modify-write, L2-resident);
    with several splits each split accumulates into its own slice of a `[splits, n, H]` fp32 scratch
    (DH_SCRATCH) that the backend sums in a fixed order. The scratch exists only when there are
    fewer row blocks than ~4 per SM, so it is bounded by ~4·SMs·BLOCK_N·H floats whatever N is.
  * dW / db are hit by every row block: fp32 atomic adds with relaxed semantics (no ordering with
    other memory is needed; each add is independent), letting the contraction happen while the
    tile is in registers. Their order varies from run to run, so the last bits do.

`grad_dw_kernel` — the deterministic dW / db (TritonBackend(deterministic=True) or
`torch.use_deterministic_algorithms(True)`): grid over vocabulary tiles; each program walks all row
blocks in order, recomputes their gradient tiles and accumulates `Gᵀ·H` into the dW rows it owns.
No atomics, the same bits every run; the cost is one more projection of each stream the gradient
reads (e.g. full JS: 2 projections + dH + dW = 4 GEMMs become 6).

The gradient operand of each contraction takes the dtype of the other operand (bf16 weight → bf16 G
on tensor cores, fp32 accumulation; fp32 stays fp32); with the student's upcast bit (mixed dtypes,
or bf16 under the interpreter) both multiply in fp32.
"""

import triton
import triton.language as tl

from ..codes import Divergence
from .tiles import (dot_operand, exact_difference, load_lse, load_operand, log_prob, logaddexp, logit_tile, round_to,
                    row_block, rows_at, store_lse)

# KIND codes, compared as constexprs inside the kernels: the divergences of `codes.Divergence`, then
# DENSE (the dense part of a sampled / tail-bucket row term), which is no divergence of the API.
REVERSE_KL = tl.constexpr(Divergence.REVERSE_KL.value)
FORWARD_KL = tl.constexpr(Divergence.FORWARD_KL.value)
JS = tl.constexpr(Divergence.JS.value)
DENSE = tl.constexpr(len(Divergence))
KINDS = {d.key: d.value for d in Divergence}  # the launch argument KIND of each API divergence name


@triton.jit
def compensated_add(s, comp, x):
    """Neumaier's step: s + x with the rounding error gathered in `comp` (the sum is s + comp)."""
    t = s + x
    comp += tl.where(tl.abs(s) >= tl.abs(x), (s - t) + x, (x - t) + s)
    return t, comp


@triton.jit
def logit_pair(rows, row_mask, cols, xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
               xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct, vocab, valid_vocab, inv_temp,
               LINEAR: tl.constexpr, BIAS_MASK: tl.constexpr, UPCAST_MASK: tl.constexpr, HEAD_MASK: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """The student's and the target's logit tiles (`tiles.logit_tile`) at (`rows`, `cols`): stream 0's
    bits of the masks for the student, stream 1's for the target."""
    zs, _ = logit_tile(xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs, rows, row_mask, cols, vocab, valid_vocab,
                       inv_temp, LINEAR, BIAS_MASK & 1, UPCAST_MASK & 1, HEAD_MASK & 3, DOT_PRECISION,
                       BLOCK_N, BLOCK_V, BLOCK_H)
    zt, _ = logit_tile(xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct, rows, row_mask, cols, vocab, valid_vocab,
                       inv_temp, LINEAR, (BIAS_MASK >> 1) & 1, (UPCAST_MASK >> 1) & 1, (HEAD_MASK >> 2) & 3,
                       DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    return zs, zt


@triton.jit
def kl_online_kernel(rows_ptr, n_rows, max_s_ptr, logsum_s_ptr, max_t_ptr, logsum_t_ptr, mean_ptr,
                     xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                     xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct,
                     vocab, valid_vocab, inv_temp,
                     KIND: tl.constexpr, LINEAR: tl.constexpr, BIAS_MASK: tl.constexpr, UPCAST_MASK: tl.constexpr,
                     HEAD_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Reverse or forward KL of full rows together with both log-sum-exps, in one sweep (no stats pass).

    With a the weighting stream (the student for REVERSE_KL, the target for FORWARD_KL), running maxima
    M_a, M_b, sums S_a = Σ e^{a−M_a}, S_b = Σ e^{b−M_b} and D_v = a_v − b_v:

        KL = K − (M_a + log S_a) + (M_b + log S_b),    K = E_a[D] = W / S_w,    W = Σ_v e^{a_v−M_a} D_v,

    S_w the same weights' sum; W and S_w are float64 and rescale by e^{M_a−M_a'} when the maximum grows
    (the C++ `KlState` of csrc/row_math.h). D_v is exact (`exact_difference`) and each tile's terms are
    summed around D at the tile's a-maximum, so K keeps the precision the reverse-KL gradient p(D_v − K)
    needs where log-ratios are ~100. Stores each stream's (max, log-sum) exactly as `stats_kernel` does
    (`store_lse`) and K (float64); the backend adds the rest in float64. A column without a-mass adds
    nothing; one where only a has mass makes W (and KL) +inf."""
    offs, row_mask, rows = row_block(rows_ptr, n_rows, BLOCK_N)
    m_a = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_b = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_a = tl.zeros((BLOCK_N,), tl.float32)
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float64)
    sw = tl.zeros((BLOCK_N,), tl.float64)
    for v0 in range(0, valid_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs, zt = logit_pair(rows, row_mask, cols, xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                            xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct, vocab, valid_vocab, inv_temp,
                            LINEAR, BIAS_MASK, UPCAST_MASK, HEAD_MASK, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        if KIND == REVERSE_KL:
            za, zb = zs, zt
        else:
            za, zb = zt, zs
        ma_new = tl.maximum(m_a, tl.max(za, 1))
        mb_new = tl.maximum(m_b, tl.max(zb, 1))
        shift_a = tl.where(ma_new == float("-inf"), 0.0, ma_new)
        shift_b = tl.where(mb_new == float("-inf"), 0.0, mb_new)
        # (W, S_w) so far, rescaled to the new maximum (0 while a has no mass).
        rescale = tl.exp(m_a - shift_a)
        rescale64 = tl.where(m_a == float("-inf"), 0.0, rescale).to(tl.float64)
        ea = tl.exp(za - shift_a[:, None])
        d_hi, d_lo = exact_difference(za, zb)
        ref = tl.max(tl.where(za == tl.max(za, 1)[:, None], d_hi, float("-inf")), 1)  # D at the tile's a-maximum
        ref = tl.where(tl.abs(ref) < float("inf"), ref, 0.0)  # (NaN too): an infinite D makes W inf below
        has = ea > 0
        rel = tl.sum(tl.where(has, ea * (d_hi - ref[:, None]), 0.0), 1) + tl.sum(tl.where(has, ea * d_lo, 0.0), 1)
        tile_s = tl.sum(ea, 1)
        w = w * rescale64 + rel.to(tl.float64) + ref.to(tl.float64) * tile_s.to(tl.float64)
        sw = sw * rescale64 + tile_s.to(tl.float64)
        s_a = s_a * rescale + tile_s
        s_b = s_b * tl.exp(m_b - shift_b) + tl.sum(tl.exp(zb - shift_b[:, None]), 1)
        m_a, m_b = ma_new, mb_new
    if KIND == REVERSE_KL:
        store_lse(max_s_ptr, logsum_s_ptr, offs, row_mask, m_a, s_a)
        store_lse(max_t_ptr, logsum_t_ptr, offs, row_mask, m_b, s_b)
    else:
        store_lse(max_s_ptr, logsum_s_ptr, offs, row_mask, m_b, s_b)
        store_lse(max_t_ptr, logsum_t_ptr, offs, row_mask, m_a, s_a)
    tl.store(mean_ptr + offs, w / sw, mask=row_mask)


@triton.jit
def full_value_kernel(rows_ptr, n_rows, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, value_ptr, c_ptr,
                      xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                      xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct,
                      vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta,
                      KIND: tl.constexpr, LINEAR: tl.constexpr, BIAS_MASK: tl.constexpr, UPCAST_MASK: tl.constexpr,
                      HEAD_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    offs, row_mask, rows = row_block(rows_ptr, n_rows, BLOCK_N)
    hi_s, lo_s = load_lse(lse_s_hi, lse_s_lo, offs, row_mask)
    hi_t, lo_t = load_lse(lse_t_hi, lse_t_lo, offs, row_mask)
    value = tl.zeros((BLOCK_N,), tl.float32)
    value_err = tl.zeros((BLOCK_N,), tl.float32)
    c = tl.zeros((BLOCK_N,), tl.float32)
    c_err = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, valid_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        zs, zt = logit_pair(rows, row_mask, cols, xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                            xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct, vocab, valid_vocab, inv_temp,
                            LINEAR, BIAS_MASK, UPCAST_MASK, HEAD_MASK, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        lp = log_prob(zs, hi_s, lo_s)
        lq = log_prob(zt, hi_t, lo_t)
        p = tl.exp(lp)
        q = tl.exp(lq)
        # 0 · log 0 = 0: a column without mass in the weighting distribution contributes nothing.
        if KIND == REVERSE_KL:
            part = tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), 1)
        elif KIND == FORWARD_KL:
            part = tl.sum(tl.where(q > 0, q * (lq - lp), 0.0), 1)
        else:
            lm = logaddexp(lp + log_beta, lq + log_1m_beta)
            kl_p = beta * tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), 1)
            part = kl_p + (1.0 - beta) * tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), 1)
            c, c_err = compensated_add(c, c_err, kl_p)
        value, value_err = compensated_add(value, value_err, part)
    value += value_err
    if KIND == REVERSE_KL:
        c = value
    else:
        c += c_err
    tl.store(value_ptr + offs, value, mask=row_mask)
    tl.store(c_ptr + offs, c, mask=row_mask)


@triton.jit
def grad_tile(offs, row_mask, rows, cols, hi_s, lo_s, hi_t, lo_t, coef, coef_lo, scale, ex_cols_ptr, ex_vals_ptr, k_explicit,
              xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
              xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct,
              vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta,
              KIND: tl.constexpr, EXPLICIT: tl.constexpr, LINEAR: tl.constexpr, BIAS_MASK: tl.constexpr,
              UPCAST_MASK: tl.constexpr, HEAD_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 gradient tile [BLOCK_N, BLOCK_V] with respect to the student's raw logits (module docstring).
    `coef` + `coef_lo`: the row constant as an fp32 pair (only reverse KL reads coef_lo)."""
    zs, jac = logit_tile(xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs, rows, row_mask, cols, vocab, valid_vocab,
                         inv_temp, LINEAR, BIAS_MASK & 1, UPCAST_MASK & 1, HEAD_MASK & 3, DOT_PRECISION,
                         BLOCK_N, BLOCK_V, BLOCK_H)
    lp = log_prob(zs, hi_s, lo_s)
    p = tl.exp(lp)
    if KIND == DENSE:
        g = tl.where(p > 0, p * coef[:, None], 0.0)
        if EXPLICIT:  # the row's explicit columns take their whole gradient (no p·dense + sparse)
            for j in range(0, k_explicit):
                c = tl.load(ex_cols_ptr + offs * k_explicit + j, mask=row_mask, other=-1)
                e = tl.load(ex_vals_ptr + offs * k_explicit + j, mask=row_mask, other=0.0)
                g = tl.where(cols[None, :] == c[:, None], e[:, None], g)
    else:
        zt, _ = logit_tile(xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct, rows, row_mask, cols, vocab, valid_vocab,
                           inv_temp, LINEAR, (BIAS_MASK >> 1) & 1, (UPCAST_MASK >> 1) & 1, (HEAD_MASK >> 2) & 3,
                           DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        lq = log_prob(zt, hi_t, lo_t)
        if KIND == FORWARD_KL:
            g = p - tl.exp(lq)
        elif KIND == REVERSE_KL:
            # lp − lq − c = D_v − K (K = c + lse_s − lse_t, the backend's coef pair): D_v exact, so where the
            # residual cancels to O(1) from log-ratios of ~100 it is rounded once, at its own size.
            d_hi, d_lo = exact_difference(zs, zt)
            g = tl.where(p > 0, p * ((d_hi - coef[:, None]) + (d_lo - coef_lo[:, None])), 0.0)
        else:
            r = beta * (lp - logaddexp(lp + log_beta, lq + log_1m_beta))
            g = tl.where(p > 0, p * (r - coef[:, None]), 0.0)
    g = g * scale[:, None]
    if HEAD_MASK & 3:
        g = g * jac
    return g


@triton.jit
def grad_kernel(rows_ptr, n_rows, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, coef_ptr, coef_lo_ptr, scale_ptr, ex_cols_ptr,
                ex_vals_ptr, k_explicit, g_ptr, sg0, sg1, dh_ptr, sdh0, dw_ptr, sdw0, db_ptr,
                xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct,
                vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta, tiles_per_program,
                KIND: tl.constexpr, EXPLICIT: tl.constexpr, LINEAR: tl.constexpr, NEED_DH: tl.constexpr,
                DH_SCRATCH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BIAS_MASK: tl.constexpr,
                UPCAST_MASK: tl.constexpr, HEAD_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    offs, row_mask, rows = row_block(rows_ptr, n_rows, BLOCK_N)
    hi_s, lo_s = load_lse(lse_s_hi, lse_s_lo, offs, row_mask)
    hi_t, lo_t = load_lse(lse_t_hi, lse_t_lo, offs, row_mask)
    coef, coef_lo = load_lse(coef_ptr, coef_lo_ptr, offs, row_mask)
    scale = tl.load(scale_ptr + offs, mask=row_mask, other=0.0)  # 0 on rows outside the block
    split = tl.program_id(1)
    # dH rows this program owns: the rows themselves, or its split's slice of the scratch.
    if DH_SCRATCH:
        dh_rows = split.to(tl.int64) * n_rows + offs
    else:
        dh_rows = rows
    start = split * tiles_per_program * BLOCK_V
    stop = tl.minimum(start + tiles_per_program * BLOCK_V, valid_vocab)
    for v0 in range(start, stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = cols < vocab
        g = grad_tile(offs, row_mask, rows, cols, hi_s, lo_s, hi_t, lo_t, coef, coef_lo, scale, ex_cols_ptr, ex_vals_ptr,
                      k_explicit, xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                      xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct,
                      vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta,
                      KIND, EXPLICIT, LINEAR, BIAS_MASK, UPCAST_MASK, HEAD_MASK, DOT_PRECISION,
                      BLOCK_N, BLOCK_V, BLOCK_H)
        if LINEAR:
            if NEED_DB:
                tl.atomic_add(db_ptr + cols, tl.sum(g, 0), mask=col_in, sem="relaxed")
            # The tile enters the two products in the dtype of the other operand (`dot_operand`).
            if NEED_DH:
                gw = dot_operand(g, ws.dtype.element_ty, UPCAST_MASK & 1)
            if NEED_DW:
                gh = dot_operand(g, xs.dtype.element_ty, UPCAST_MASK & 1)
            for h0 in range(0, hs, BLOCK_H):
                hcols = h0 + tl.arange(0, BLOCK_H)
                h_in = hcols < hs
                if NEED_DH:
                    w = load_operand(ws + cols.to(tl.int64)[:, None] * sws0 + hcols[None, :] * sws1,
                                     col_in[:, None] & h_in[None, :], UPCAST_MASK & 1)
                    dh = dh_ptr + dh_rows[:, None] * sdh0 + hcols[None, :]
                    dh_mask = row_mask[:, None] & h_in[None, :]
                    tl.store(dh, tl.load(dh, mask=dh_mask, other=0.0) + tl.dot(gw, w, input_precision=DOT_PRECISION),
                             mask=dh_mask)
                if NEED_DW:
                    h = load_operand(xs + rows[:, None] * sxs0 + hcols[None, :] * sxs1,
                                     row_mask[:, None] & h_in[None, :], UPCAST_MASK & 1)
                    part = tl.dot(tl.trans(gh), h, input_precision=DOT_PRECISION)
                    tl.atomic_add(dw_ptr + cols.to(tl.int64)[:, None] * sdw0 + hcols[None, :], part,
                                  mask=col_in[:, None] & h_in[None, :], sem="relaxed")
        else:
            tl.store(g_ptr + rows[:, None] * sg0 + cols[None, :] * sg1, round_to(g, g_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_in[None, :])


@triton.jit
def grad_dw_kernel(rows_ptr, n_rows, lse_s_hi, lse_s_lo, lse_t_hi, lse_t_lo, coef_ptr, coef_lo_ptr, scale_ptr, ex_cols_ptr,
                   ex_vals_ptr, k_explicit, dw_ptr, sdw0, db_ptr,
                   xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                   xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct,
                   vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta,
                   KIND: tl.constexpr, EXPLICIT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   BIAS_MASK: tl.constexpr, UPCAST_MASK: tl.constexpr, HEAD_MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = cols < vocab
    db = tl.zeros((BLOCK_V,), tl.float32)
    for r0 in range(0, n_rows, BLOCK_N):
        offs, row_mask, rows = rows_at(rows_ptr, n_rows, r0, BLOCK_N)
        hi_s, lo_s = load_lse(lse_s_hi, lse_s_lo, offs, row_mask)
        hi_t, lo_t = load_lse(lse_t_hi, lse_t_lo, offs, row_mask)
        coef, coef_lo = load_lse(coef_ptr, coef_lo_ptr, offs, row_mask)
        scale = tl.load(scale_ptr + offs, mask=row_mask, other=0.0)
        g = grad_tile(offs, row_mask, rows, cols, hi_s, lo_s, hi_t, lo_t, coef, coef_lo, scale, ex_cols_ptr, ex_vals_ptr,
                      k_explicit, xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, as_, cs,
                      xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, at, ct,
                      vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta,
                      KIND, EXPLICIT, True, BIAS_MASK, UPCAST_MASK, HEAD_MASK, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        if NEED_DB:
            db += tl.sum(g, 0)
        if NEED_DW:
            gh = dot_operand(g, xs.dtype.element_ty, UPCAST_MASK & 1)
            for h0 in range(0, hs, BLOCK_H):
                hcols = h0 + tl.arange(0, BLOCK_H)
                h_in = hcols < hs
                h = load_operand(xs + rows[:, None] * sxs0 + hcols[None, :] * sxs1,
                                 row_mask[:, None] & h_in[None, :], UPCAST_MASK & 1)
                dw = dw_ptr + cols.to(tl.int64)[:, None] * sdw0 + hcols[None, :]
                dw_mask = col_in[:, None] & h_in[None, :]
                part = tl.dot(tl.trans(gh), h, input_precision=DOT_PRECISION)
                tl.store(dw, tl.load(dw, mask=dw_mask, other=0.0) + part, mask=dw_mask)
    if NEED_DB:
        tl.store(db_ptr + cols, tl.load(db_ptr + cols, mask=col_in, other=0.0) + db, mask=col_in)
