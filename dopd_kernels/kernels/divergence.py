"""Divergence passes over full vocabulary rows (DESIGN.md section 4, steps 3–4).

Both kernels run on a compacted set of rows (`rows_ptr`: the original row ids of, e.g., the HT rows
of DOPD), so the cost is proportional to the rows that need the whole vocabulary.

`full_value_kernel` — grid: one program per `BLOCK_N` rows, looping over the vocabulary. With
`lp = log p`, `lq = log q` from the stats pass's log-sum-exps it accumulates per row the divergence
(KIND 0 reverse KL Σ p(lp − lq), 1 forward KL Σ q(lq − lp), 2 JS_β with the mixture in log space,
`log m = logaddexp(log β + lp, log(1−β) + lq)`) and the constant `c` of the gradient
(reverse KL: the KL itself; JS: β·KL(p‖m); forward KL: 0).

`grad_kernel` — the gradient tile `G = scale_n · ∂D_n/∂z` (scale = upstream · weight / τ):
    reverse KL  p(lp − lq − c)      JS  p(β(lp − log m) − c)      forward KL  p − q
    KIND 3 (dense part of sampled / tail-bucket top-K rows, `row_terms.py`): p · dense_n; with
    EXPLICIT the row's k explicit columns are set to their whole gradient `explicit` instead (one
    compare per explicit column and logit: O(k) beside a tile's O(H) multiply-adds), because
    p·dense + sparse cancels catastrophically there when dense is huge and p ≈ 1.
Logits mode: grid (row blocks, vocabulary blocks), every program stores one tile of the student
gradient; nothing else of size [N, V] exists. Fused-linear mode: grid (row blocks, vocabulary
splits); a program recomputes its logit tiles by tl.dot and contracts each gradient tile at once,
H chunk by H chunk, into `dH[rows] += G·W[cols]` and `dW[cols] += Gᵀ·H[rows]` (and `db += Σ_rows G`)
with fp32 atomic adds. Atomics let both contractions happen while the tile is in registers: a
dW-owning grid (vocabulary-major) would have to recompute every tile once more for dH, and G itself
may not be stored. Contention is low: a dH row block is hit by the few vocabulary splits of its row
block, a dW block by the row blocks only. The gradient operand of each contraction takes the dtype
of the other operand (bf16 weight → bf16 G on tensor cores, fp32 accumulation; fp32 stays fp32);
with the student's upcast bit (mixed dtypes, or bf16 under the interpreter) both multiply in fp32.
"""

import triton
import triton.language as tl

from .tiles import logaddexp, logit_tile, round_to, row_block

REVERSE_KL, FORWARD_KL, JS, DENSE = 0, 1, 2, 3
KINDS = {"reverse_kl": REVERSE_KL, "forward_kl": FORWARD_KL, "js": JS}


@triton.jit
def full_value_kernel(rows_ptr, n_rows, lse_s_ptr, lse_t_ptr, value_ptr, c_ptr,
                      xs, sxs0, sxs1, ws, sws0, sws1, bs, hs,
                      xt, sxt0, sxt1, wt, swt0, swt1, bt, ht,
                      vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta,
                      KIND: tl.constexpr, LINEAR: tl.constexpr, BIAS_MASK: tl.constexpr, UPCAST_MASK: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    offs, row_mask, rows = row_block(rows_ptr, n_rows, BLOCK_N)
    lse_s = tl.load(lse_s_ptr + offs, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + offs, mask=row_mask, other=0.0)
    value = tl.zeros((BLOCK_N,), tl.float32)
    c = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, valid_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        lp = logit_tile(xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, rows, row_mask, cols, vocab, valid_vocab, inv_temp,
                        LINEAR, BIAS_MASK & 1, UPCAST_MASK & 1, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H) - lse_s[:, None]
        lq = logit_tile(xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, rows, row_mask, cols, vocab, valid_vocab, inv_temp,
                        LINEAR, (BIAS_MASK >> 1) & 1, (UPCAST_MASK >> 1) & 1, DOT_PRECISION, BLOCK_N, BLOCK_V,
                        BLOCK_H) - lse_t[:, None]
        p = tl.exp(lp)
        q = tl.exp(lq)
        # 0 · log 0 = 0: a column without mass in the weighting distribution contributes nothing.
        if KIND == 0:
            value += tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), 1)
        elif KIND == 1:
            value += tl.sum(tl.where(q > 0, q * (lq - lp), 0.0), 1)
        else:
            lm = logaddexp(lp + log_beta, lq + log_1m_beta)
            kl_p = tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), 1)
            value += beta * kl_p + (1.0 - beta) * tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), 1)
            c += beta * kl_p
    if KIND == 0:
        c = value
    tl.store(value_ptr + offs, value, mask=row_mask)
    tl.store(c_ptr + offs, c, mask=row_mask)


@triton.jit
def grad_kernel(rows_ptr, n_rows, lse_s_ptr, lse_t_ptr, coef_ptr, scale_ptr, ex_cols_ptr, ex_vals_ptr, k_explicit,
                g_ptr, sg0, sg1, dh_ptr, sdh0, dw_ptr, sdw0, db_ptr,
                xs, sxs0, sxs1, ws, sws0, sws1, bs, hs,
                xt, sxt0, sxt1, wt, swt0, swt1, bt, ht,
                vocab, valid_vocab, inv_temp, beta, log_beta, log_1m_beta, tiles_per_program,
                KIND: tl.constexpr, EXPLICIT: tl.constexpr, LINEAR: tl.constexpr, NEED_DH: tl.constexpr,
                NEED_DW: tl.constexpr,
                NEED_DB: tl.constexpr, BIAS_MASK: tl.constexpr, UPCAST_MASK: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    offs, row_mask, rows = row_block(rows_ptr, n_rows, BLOCK_N)
    lse_s = tl.load(lse_s_ptr + offs, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + offs, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + offs, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + offs, mask=row_mask, other=0.0)  # 0 on rows outside the block
    start = tl.program_id(1) * tiles_per_program * BLOCK_V
    stop = tl.minimum(start + tiles_per_program * BLOCK_V, valid_vocab)
    for v0 in range(start, stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = cols < vocab
        lp = logit_tile(xs, sxs0, sxs1, ws, sws0, sws1, bs, hs, rows, row_mask, cols, vocab, valid_vocab, inv_temp,
                        LINEAR, BIAS_MASK & 1, UPCAST_MASK & 1, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H) - lse_s[:, None]
        p = tl.exp(lp)
        if KIND == 3:
            g = p * coef[:, None]
            if EXPLICIT:  # the row's explicit columns take their whole gradient (no p·dense + sparse)
                for j in range(0, k_explicit):
                    c = tl.load(ex_cols_ptr + offs * k_explicit + j, mask=row_mask, other=-1)
                    e = tl.load(ex_vals_ptr + offs * k_explicit + j, mask=row_mask, other=0.0)
                    g = tl.where(cols[None, :] == c[:, None], e[:, None], g)
        else:
            lq = logit_tile(xt, sxt0, sxt1, wt, swt0, swt1, bt, ht, rows, row_mask, cols, vocab, valid_vocab,
                            inv_temp, LINEAR, (BIAS_MASK >> 1) & 1, (UPCAST_MASK >> 1) & 1, DOT_PRECISION,
                            BLOCK_N, BLOCK_V, BLOCK_H) - lse_t[:, None]
            if KIND == 1:
                g = p - tl.exp(lq)
            else:
                if KIND == 0:
                    r = lp - lq
                else:
                    r = beta * (lp - logaddexp(lp + log_beta, lq + log_1m_beta))
                g = tl.where(p > 0, p * (r - coef[:, None]), 0.0)
        g = g * scale[:, None]
        if LINEAR:
            if NEED_DB:
                tl.atomic_add(db_ptr + cols, tl.sum(g, 0), mask=col_in)
            # The tile enters the two products in the dtype of the other operand (tensor cores for
            # bf16/fp16), rounded once here so that only the rounded tiles stay live over the H loop.
            gw = round_to(g, ws.dtype.element_ty)
            gh = round_to(g, xs.dtype.element_ty)
            if UPCAST_MASK & 1:
                gw = gw.to(tl.float32)
                gh = gh.to(tl.float32)
            for h0 in range(0, hs, BLOCK_H):
                hcols = h0 + tl.arange(0, BLOCK_H)
                h_in = hcols < hs
                if NEED_DH:
                    w = tl.load(ws + cols.to(tl.int64)[:, None] * sws0 + hcols[None, :] * sws1,
                                mask=col_in[:, None] & h_in[None, :], other=0.0)
                    if UPCAST_MASK & 1:
                        w = w.to(tl.float32)
                    part = tl.dot(gw, w, input_precision=DOT_PRECISION)
                    tl.atomic_add(dh_ptr + rows[:, None] * sdh0 + hcols[None, :], part,
                                  mask=row_mask[:, None] & h_in[None, :])
                if NEED_DW:
                    h = tl.load(xs + rows[:, None] * sxs0 + hcols[None, :] * sxs1,
                                mask=row_mask[:, None] & h_in[None, :], other=0.0)
                    if UPCAST_MASK & 1:
                        h = h.to(tl.float32)
                    part = tl.dot(tl.trans(gh), h, input_precision=DOT_PRECISION)
                    tl.atomic_add(dw_ptr + cols.to(tl.int64)[:, None] * sdw0 + hcols[None, :], part,
                                  mask=col_in[:, None] & h_in[None, :])
        else:
            tl.store(g_ptr + rows[:, None] * sg0 + cols[None, :] * sg1, round_to(g, g_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_in[None, :])
