"""Tail-bucket log-sum-exp: `log Σ exp(z_v)` over the valid columns of a row that are *not* in its
explicit columns `cols` [n, k] (top-K support, or the sampled token), summed directly rather than as
`1 − Σ p` (which cancels to 0 or below for a confident distribution).

Grid: one program per `BLOCK_N` rows, looping over vocabulary tiles with an online log-sum-exp,
stored like the stats pass's as (row max, log Σ exp(z − max)) for the backend to add in float64. A
column is excluded by comparing the tile's column ids with the row's k explicit columns, one
`[BLOCK_N, BLOCK_V]` compare per explicit column: O(k) integer work per logit, small beside the
O(H) multiply-adds of a fused-linear tile (k = 128 against H ≥ 2048). Entries < 0 match nothing.
"""

import triton
import triton.language as tl

from .tiles import logit_tile, online_lse, row_block, store_lse


@triton.jit
def tail_lse_kernel(rows_ptr, n_rows, cols_ptr, k, max_ptr, logsum_ptr,
                    x, sx0, sx1, w, sw0, sw1, b, hdim, head_a, head_c,
                    vocab, valid_vocab, inv_temp,
                    LINEAR: tl.constexpr, BIAS_MASK: tl.constexpr, UPCAST_MASK: tl.constexpr, HEAD_MASK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    offs, row_mask, rows = row_block(rows_ptr, n_rows, BLOCK_N)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, valid_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z, _ = logit_tile(x, sx0, sx1, w, sw0, sw1, b, hdim, head_a, head_c, rows, row_mask, cols, vocab, valid_vocab,
                          inv_temp, LINEAR, BIAS_MASK & 1, UPCAST_MASK & 1, HEAD_MASK & 3, DOT_PRECISION,
                          BLOCK_N, BLOCK_V, BLOCK_H)
        explicit = tl.zeros((BLOCK_N, BLOCK_V), tl.int1)
        for j in range(0, k):
            c = tl.load(cols_ptr + offs * k + j, mask=row_mask, other=-1)
            explicit = explicit | (cols[None, :] == c[:, None])
        m, s = online_lse(m, s, tl.where(explicit, float("-inf"), z))
    store_lse(max_ptr, logsum_ptr, offs, row_mask, m, s)
