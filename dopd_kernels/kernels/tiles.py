"""@triton.jit helpers shared by the kernels: where a logit tile comes from, and small pieces of math.

A *stream* is passed to every kernel as the same ten arguments (see `stream_args` in
`backends/triton_backend.py`): `x, sx0, sx1, w, sw0, sw1, b, hdim, head_a, head_c`. In logits mode
`x` is the `[N, V]` logits (any float dtype, any strides) and the rest is unused; in fused-linear mode
`x` is the hidden states `[N, H]`, `w` the `lm_head` weight `[V, H]`, `b` the bias `[V]`, and
`head_a, head_c` the runtime scalars of the stream's output-head transform (`head_transform`).

Per-stream options are constexpr bit masks, bit j (or bits 2j..2j+1 for HEAD_MASK) for stream j, so
one kernel source covers every combination; the untransformed path compiles to what it was before.

Log-probabilities are formed as `(z − hi) − lo` from the `(hi, lo)` fp32 pair of a float64
log-sum-exp (`engine.split_lse`, `log_prob`): `z − hi` is exact near the row maximum, so log p keeps
fp32 precision at logits of any magnitude (an fp32 lse of size 1e4 alone is off by ~1e-3).
"""

import triton
import triton.language as tl

# HEAD codes of a stream's output-head transform (2 bits of HEAD_MASK per stream).
HEAD_NONE, HEAD_SCALE, HEAD_SOFTCAP = 0, 1, 2


@triton.jit
def tanh_abs(ax):
    """(tanh(ax), 1 − tanh²(ax)) for ax ≥ 0, from e = exp(−2·ax) ∈ (0, 1]: tanh = (1 − e)/(1 + e),
    1 − tanh² = 4e/(1 + e)² (no cancellation near saturation). Below 1/4 the odd Taylor series (error
    < 1e-8 relative) replaces 1 − e, which would cancel. The interpreter has no libdevice tanh,
    and this form is the same on every Triton version."""
    e = tl.exp(-2.0 * ax)
    xs = tl.minimum(ax, 0.25)  # the series is only used below 1/4 (and cannot overflow when clamped)
    x2 = xs * xs
    series = xs * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, series, (1.0 - e) / (1.0 + e))
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def head_transform(z, a, c, HEAD: tl.constexpr):
    """Output-head transform of raw logits `z = h·Wᵀ + b` (fp32) in the tile epilogue, and its
    jacobian d(final)/d(raw) (`sources.LinearSource.transform` / `head_jacobian`):
        HEAD_SCALE    final = a·z                         jacobian a           (a = scale)
        HEAD_SOFTCAP  final = c·tanh(a·z), u = tanh(a·z)  jacobian c·a·(1 − u²) (a = scale / c)
    HEAD_NONE returns z and 1."""
    if HEAD == 1:
        out = z * a
        jac = a
    elif HEAD == 2:
        x = z * a
        t, one_m_t2 = tanh_abs(tl.abs(x))
        out = c * tl.where(x < 0, -t, t)
        jac = (c * a) * one_m_t2
    else:
        out = z
        jac = 1.0
    return out, jac


@triton.jit
def logit_tile(x, sx0, sx1, w, sw0, sw1, b, hdim, head_a, head_c, rows, row_mask, cols, vocab, valid_vocab, inv_temp,
               LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, HEAD: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """(`[BLOCK_N, BLOCK_V]` fp32 tile of final logits / τ at (`rows`, `cols`), -inf at columns
    ≥ valid_vocab; the head transform's jacobian there, 1 without one).

    Fused-linear mode computes `H[rows] · W[cols]ᵀ` over H chunks with tl.dot accumulating in fp32
    (bf16/fp16 operands stay in their dtype, so tensor cores are used; fp32 operands use
    DOT_PRECISION, "ieee" by default), adds the bias and applies the head transform in registers.
    Nothing is rounded between the matmul and the softmax. Rows outside the block read as 0
    (finite), so callers only mask their stores. Offsets into the `[V, H]` weight are int64.
    """
    col_in = cols < vocab
    jac = 1.0
    if LINEAR:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for h0 in range(0, hdim, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_in = hs < hdim
            # UPCAST: hidden and weight of different dtypes, multiplied in fp32.
            a = load_operand(x + rows[:, None] * sx0 + hs[None, :] * sx1, row_mask[:, None] & h_in[None, :], UPCAST)
            bt = load_operand(w + cols.to(tl.int64)[:, None] * sw0 + hs[None, :] * sw1, col_in[:, None] & h_in[None, :],
                              UPCAST)
            acc = tl.dot(a, tl.trans(bt), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        z, jac = head_transform(acc, head_a, head_c, HEAD)
    else:
        z = tl.load(x + rows[:, None] * sx0 + cols[None, :] * sx1, mask=row_mask[:, None] & col_in[None, :],
                    other=0.0).to(tl.float32)
    z = z * inv_temp
    return tl.where((cols < valid_vocab)[None, :], z, float("-inf")), jac


@triton.jit
def rows_at(rows_ptr, n_rows, start, BLOCK_N: tl.constexpr):
    """The block of compacted rows from position `start`: positions `offs` [BLOCK_N] (int64, so that
    `offs · K` indexing of `[n, K]` buffers cannot overflow), which of them exist (`row_mask`) and
    their row ids `rows` (0 past the end, so loads there stay in bounds)."""
    offs = start + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = offs < n_rows
    return offs, row_mask, tl.load(rows_ptr + offs, mask=row_mask, other=0)


@triton.jit
def row_block(rows_ptr, n_rows, BLOCK_N: tl.constexpr):
    """This program's block of rows (`rows_at` from program_id(0) · BLOCK_N)."""
    return rows_at(rows_ptr, n_rows, tl.program_id(0).to(tl.int64) * BLOCK_N, BLOCK_N)


@triton.jit
def load_lse(hi_ptr, lo_ptr, offs, row_mask):
    """The `(hi, lo)` fp32 pair of the rows' float64 log-sum-exp (`engine.split_lse`)."""
    return tl.load(hi_ptr + offs, mask=row_mask, other=0.0), tl.load(lo_ptr + offs, mask=row_mask, other=0.0)


@triton.jit
def log_prob(z, hi, lo):
    """log p = (z − hi) − lo for a tile `z` [BLOCK_N, BLOCK_V] (see the module docstring)."""
    return (z - hi[:, None]) - lo[:, None]


@triton.jit
def exact_difference(a, b):
    """a − b as an unevaluated fp32 sum hi + lo, exactly (Knuth's TwoSum; lo is 0 where hi is not finite):
    a log-ratio of ~100 loses nothing where the reverse-KL gradient's residual cancels to O(1)."""
    hi = a - b
    bv = hi - a
    lo = (a - (hi - bv)) - (b + bv)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@triton.jit
def online_lse(m, s, z):
    """Merge tile `z` into the running (max m, Σ exp(z − m)) of each row; safe when all are -inf."""
    m_new = tl.maximum(m, tl.max(z, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
    return m_new, s


@triton.jit
def store_lse(max_ptr, logsum_ptr, offs, row_mask, m, s):
    """Store a log-sum-exp as its two fp32 parts, the row max and log Σ exp(z − max) (0 for an
    empty row, whose max is -inf); the backend adds them in float64."""
    tl.store(max_ptr + offs, m, mask=row_mask)
    tl.store(logsum_ptr + offs, tl.where(m == float("-inf"), 0.0, tl.log(s)), mask=row_mask)


@triton.jit
def logaddexp(a, b):
    """log(exp a + exp b), -inf when both are -inf."""
    mx = tl.maximum(a, b)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return tl.where(mx == float("-inf"), mx, safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def topk_keys(z, cols):
    """int64 sort keys ordering (value, -column) lexicographically: the high 32 bits are the
    order-preserving integer image of the fp32 value (flip the magnitude bits of negatives), the
    low 32 bits `2^31 − 1 − col`, so equal values prefer the lower column. One integer sort then
    moves values and indices together; `key_column` inverts the low half."""
    bits = z.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def key_column(keys):
    return 0x7FFFFFFF - (keys & 0xFFFFFFFF)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 → `dtype`, rounding to nearest even. For bf16 the rounding is done on the fp32 bits
    first (add half an ulp of bf16, ties to even, clear the low 16 bits), so the final cast is exact:
    GPUs round like this anyway, and Triton 3.9's interpreter would otherwise truncate."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot_operand(g, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """An fp32 gradient tile as an operand of a contraction with a `dtype` tensor: rounded to
    `dtype` (bf16/fp16 → tensor cores with fp32 accumulation; fp32 stays fp32), and with UPCAST
    (student hidden and weight of different dtypes, or bf16 under the interpreter) back to fp32 to
    multiply with the upcast other operand. Rounded once per tile, so only the rounded tile stays
    live over the H loop."""
    x = round_to(g, dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_operand(ptrs, mask, UPCAST: tl.constexpr):
    """A masked block of hidden states or weights (0 outside `mask`), in fp32 with UPCAST."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x
