"""Stats pass (DESIGN.md section 4, step 1): one sweep over the vocabulary for up to three streams.

Grid: one program per block of `BLOCK_N` (compacted) rows. The program walks the valid vocabulary in
`BLOCK_V` column tiles; for each tile and each stream it forms the logit tile (a load in logits mode,
`H·Wᵀ` by tl.dot in fused-linear mode, `tiles.logit_tile`) and updates, per row,

  * the online (max, Σ exp) pair, stored as the row max and log Σ exp(z − max) (two fp32 outputs the
    backend adds in float64: the log-sum-exp of logits ~1e4 keeps its fp32 relative precision),
  * the logit at the sampled token (a masked row sum: the token's column lies in exactly one tile),
  * for the streams flagged in TAIL_MASK, the token's tail bucket: a second online (max, Σ exp) over
    the same tile with the token's column at -inf (summed directly, not as the log-sum-exp less p_y,
    which cancels when p_y ≈ 1; `kernels/tail.py` does the same for several columns, in a sweep of
    its own),
  * for the streams flagged in TOPK_MASK, the running top-K.

Running top-K (K ≤ 256, `backends/triton_backend.MAX_TOPK`): each row keeps its K_PAD largest values
so far as int64 keys packing (value, column) (`tiles.topk_keys`), sorted descending, in a `[BLOCK_N,
K_PAD]` register block, with K_PAD = BLOCK_V (the backend makes BLOCK_V ≥ next power of two ≥ K; the
first K are written). A tile is merged only when some row's tile maximum beats its current K_PAD-th
key (after the first few tiles of a peaked LM distribution almost every tile is skipped): the tile's
keys are bitonic-sorted ascending, and the running block and the tile combine elementwise by `max`,
which leaves exactly the K_PAD largest of the union as a bitonic sequence; one bitonic merge sorts
it descending. The compare-and-swap layers are written with reshape/split/min/max (`compare_swap`)
rather than tl.sort, whose xor-reductions the interpreter evaluates element by element (about 50×
slower).
No scratch memory: the top-K costs its O(N·K) output only (a two-stage per-tile scratch would be
O(N·K·V/BLOCK_V)).

Streams are passed as `tiles.py` ten-argument groups; per-stream options are bit masks
(bit j = stream j; HEAD_MASK: bits 2j..2j+1) so one kernel covers 1–3 streams, both modes, any head
transforms and any top-K subset. Offsets into the `[n_topk_streams, n, K]` output are int64
(`topk_offsets`): slot·n·K passes 2^31 at 8.4M rows with K = 128.
"""

import triton
import triton.language as tl

from .tiles import key_column, logit_tile, online_lse, row_block, store_lse, topk_keys


@triton.jit
def compare_swap(x, J: tl.constexpr, DIR_BIT: tl.constexpr, DESC: tl.constexpr, BLOCK_N: tl.constexpr,
                 K_PAD: tl.constexpr):
    """One bitonic layer on [BLOCK_N, K_PAD]: order each pair (i, i + J) (bit J of i clear) ascending
    when bit DIR_BIT of i is clear, descending otherwise; DESC reverses every pair. The pairs are
    exposed by reshape/permute/split (elementwise min/max), not by reductions, so the layer is a
    handful of vectorised operations in the interpreter as well."""
    y = tl.permute(tl.reshape(x, (BLOCK_N, K_PAD // (2 * J), 2, J)), (0, 1, 3, 2))
    a, b = tl.split(y)
    lo = tl.minimum(a, b)
    hi = tl.maximum(a, b)
    up = (((tl.arange(0, K_PAD // (2 * J)) * (2 * J)) & DIR_BIT) == 0) ^ DESC
    up = up[None, :, None]
    y = tl.join(tl.where(up, lo, hi), tl.where(up, hi, lo))
    return tl.reshape(tl.permute(y, (0, 1, 3, 2)), (BLOCK_N, K_PAD))


@triton.jit
def merge_topk(run, keys, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, LOG_K: tl.constexpr):
    """Running top-K `run` [BLOCK_N, K_PAD] (keys descending) merged with a tile's keys [BLOCK_N, K_PAD]."""
    enters = tl.max(keys, 1) > tl.min(run, 1)
    if tl.max(enters.to(tl.int32), 0) > 0:
        # Bitonic sort of the tile, ascending.
        for stage in tl.static_range(1, LOG_K + 1):
            for sub in tl.static_range(stage):
                keys = compare_swap(keys, 1 << (stage - 1 - sub), 1 << stage, False, BLOCK_N, K_PAD)
        # max(descending, ascending) keeps the K_PAD largest of the union as a bitonic sequence;
        # one descending bitonic merge sorts it.
        run = tl.maximum(run, keys)
        for sub in tl.static_range(LOG_K):
            run = compare_swap(run, 1 << (LOG_K - 1 - sub), K_PAD, True, BLOCK_N, K_PAD)
    return run


@triton.jit
def stream_update(z, cols, tok, m, s, ly, run, mt, st, TOPK: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr,
                  K_PAD: tl.constexpr, LOG_K: tl.constexpr):
    m, s = online_lse(m, s, z)
    at_token = cols[None, :] == tok[:, None]
    ly += tl.sum(tl.where(at_token, z, 0.0), 1)
    if TAIL:
        mt, st = online_lse(mt, st, tl.where(at_token, float("-inf"), z))
    if TOPK:
        run = merge_topk(run, topk_keys(z, cols[None, :]), BLOCK_N, K_PAD, LOG_K)
    return m, s, ly, run, mt, st


@triton.jit
def topk_offsets(slot, n_rows, top_k, offs, ks):
    """Flat int64 offsets [BLOCK_N, K_PAD] of (slot, offs, ks) in the `[slots, n_rows, top_k]` output."""
    return (slot * n_rows + offs.to(tl.int64))[:, None] * top_k + ks[None, :]


@triton.jit
def store_stream(max_ptr, logsum_ptr, ly_ptr, topk_ptr, tail_max_ptr, tail_logsum_ptr, j, slot, n_rows, top_k, offs,
                 row_mask, m, s, ly, run, mt, st, TOPK: tl.constexpr, TAIL: tl.constexpr, K_PAD: tl.constexpr):
    store_lse(max_ptr + j * n_rows, logsum_ptr + j * n_rows, offs, row_mask, m, s)
    tl.store(ly_ptr + j * n_rows + offs, ly, mask=row_mask)
    if TAIL:
        store_lse(tail_max_ptr + j * n_rows, tail_logsum_ptr + j * n_rows, offs, row_mask, mt, st)
    if TOPK:
        ks = tl.arange(0, K_PAD)
        tl.store(topk_ptr + topk_offsets(slot, n_rows, top_k, offs, ks), key_column(run),
                 mask=row_mask[:, None] & (ks < top_k)[None, :])


@triton.jit
def stats_kernel(rows_ptr, tok_ptr, n_rows, max_ptr, logsum_ptr, ly_ptr, topk_ptr, top_k, tail_max_ptr, tail_logsum_ptr,
                 x0, sx00, sx01, w0, sw00, sw01, b0, h0, a0, c0,
                 x1, sx10, sx11, w1, sw10, sw11, b1, h1, a1, c1,
                 x2, sx20, sx21, w2, sw20, sw21, b2, h2, a2, c2,
                 vocab, valid_vocab, inv_temp,
                 NUM_STREAMS: tl.constexpr, LINEAR: tl.constexpr, BIAS_MASK: tl.constexpr,
                 UPCAST_MASK: tl.constexpr, HEAD_MASK: tl.constexpr, TOPK_MASK: tl.constexpr, TAIL_MASK: tl.constexpr,
                 LOG_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Writes the row max and log Σ exp(z − max) [NUM_STREAMS, n] each, the sampled logit
    [NUM_STREAMS, n] (fp32, final logits / τ), the top-K columns [n_topk_streams, n, top_k]
    (descending) and, for the TAIL_MASK streams, the tail bucket's max and log-sum [NUM_STREAMS, n] of
    the rows `rows_ptr[0:n]`."""
    K_PAD: tl.constexpr = BLOCK_V
    offs, row_mask, rows = row_block(rows_ptr, n_rows, BLOCK_N)
    tok = tl.load(tok_ptr + offs, mask=row_mask, other=-1)

    ninf = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    # Empty running top-K: (-inf, column 2^31 − 1) sorts below every real key.
    empty = topk_keys(tl.full((BLOCK_N, K_PAD), float("-inf"), tl.float32), tl.full((1, K_PAD), 0x7FFFFFFF, tl.int32))
    m0, s0, y0, r0, mt0, st0 = ninf, zero, zero, empty, ninf, zero
    m1, s1, y1, r1, mt1, st1 = ninf, zero, zero, empty, ninf, zero
    m2, s2, y2, r2, mt2, st2 = ninf, zero, zero, empty, ninf, zero

    for v0 in range(0, valid_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z, _ = logit_tile(x0, sx00, sx01, w0, sw00, sw01, b0, h0, a0, c0, rows, row_mask, cols, vocab, valid_vocab,
                          inv_temp, LINEAR, BIAS_MASK & 1, UPCAST_MASK & 1, HEAD_MASK & 3, DOT_PRECISION,
                          BLOCK_N, BLOCK_V, BLOCK_H)
        m0, s0, y0, r0, mt0, st0 = stream_update(z, cols, tok, m0, s0, y0, r0, mt0, st0, TOPK_MASK & 1, TAIL_MASK & 1,
                                                 BLOCK_N, K_PAD, LOG_K)
        if NUM_STREAMS > 1:
            z, _ = logit_tile(x1, sx10, sx11, w1, sw10, sw11, b1, h1, a1, c1, rows, row_mask, cols, vocab,
                              valid_vocab, inv_temp, LINEAR, (BIAS_MASK >> 1) & 1, (UPCAST_MASK >> 1) & 1,
                              (HEAD_MASK >> 2) & 3, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
            m1, s1, y1, r1, mt1, st1 = stream_update(z, cols, tok, m1, s1, y1, r1, mt1, st1, (TOPK_MASK >> 1) & 1,
                                                     (TAIL_MASK >> 1) & 1, BLOCK_N, K_PAD, LOG_K)
        if NUM_STREAMS > 2:
            z, _ = logit_tile(x2, sx20, sx21, w2, sw20, sw21, b2, h2, a2, c2, rows, row_mask, cols, vocab,
                              valid_vocab, inv_temp, LINEAR, (BIAS_MASK >> 2) & 1, (UPCAST_MASK >> 2) & 1,
                              (HEAD_MASK >> 4) & 3, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
            m2, s2, y2, r2, mt2, st2 = stream_update(z, cols, tok, m2, s2, y2, r2, mt2, st2, (TOPK_MASK >> 2) & 1,
                                                     (TAIL_MASK >> 2) & 1, BLOCK_N, K_PAD, LOG_K)

    # A stream's slot in the top-K output counts the top-K streams before it.
    store_stream(max_ptr, logsum_ptr, ly_ptr, topk_ptr, tail_max_ptr, tail_logsum_ptr, 0, 0, n_rows, top_k, offs,
                 row_mask, m0, s0, y0, r0, mt0, st0, TOPK_MASK & 1, TAIL_MASK & 1, K_PAD)
    if NUM_STREAMS > 1:
        store_stream(max_ptr, logsum_ptr, ly_ptr, topk_ptr, tail_max_ptr, tail_logsum_ptr, 1, TOPK_MASK & 1, n_rows,
                     top_k, offs, row_mask, m1, s1, y1, r1, mt1, st1, (TOPK_MASK >> 1) & 1, (TAIL_MASK >> 1) & 1, K_PAD)
    if NUM_STREAMS > 2:
        store_stream(max_ptr, logsum_ptr, ly_ptr, topk_ptr, tail_max_ptr, tail_logsum_ptr, 2,
                     (TOPK_MASK & 1) + ((TOPK_MASK >> 1) & 1), n_rows, top_k, offs, row_mask, m2, s2, y2, r2, mt2, st2,
                     (TOPK_MASK >> 2) & 1, (TAIL_MASK >> 2) & 1, K_PAD)
