"""@triton.jit helpers shared by the kernels: where a logit tile comes from, and small pieces of math.

A *stream* is passed to every kernel as the same eight arguments (see `stream_args` in
`backends/triton_backend.py`): `x, sx0, sx1, w, sw0, sw1, b, hdim`. In logits mode `x` is the
`[N, V]` logits (any float dtype, any strides) and `w, b, hdim` are unused; in fused-linear mode `x`
is the hidden states `[N, H]`, `w` the `lm_head` weight `[V, H]`, `b` the bias `[V]`.
"""

import triton
import triton.language as tl


@triton.jit
def logit_tile(x, sx0, sx1, w, sw0, sw1, b, hdim, rows, row_mask, cols, vocab, valid_vocab, inv_temp,
               LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 `[BLOCK_N, BLOCK_V]` tile of logits / τ at (`rows`, `cols`), -inf at columns ≥ valid_vocab.

    Fused-linear mode computes `H[rows] · W[cols]ᵀ` over H chunks with tl.dot accumulating in fp32
    (bf16/fp16 operands stay in their dtype, so tensor cores are used; fp32 operands use
    DOT_PRECISION, "ieee" by default). Nothing is rounded between the matmul and the softmax.
    Rows outside the block read as 0 (finite), so callers only mask their stores. Offsets into the
    `[V, H]` weight are int64 (V·H may pass 2^31).
    """
    col_in = cols < vocab
    if LINEAR:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for h0 in range(0, hdim, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_in = hs < hdim
            a = tl.load(x + rows[:, None] * sx0 + hs[None, :] * sx1, mask=row_mask[:, None] & h_in[None, :], other=0.0)
            bt = tl.load(w + cols.to(tl.int64)[:, None] * sw0 + hs[None, :] * sw1, mask=col_in[:, None] & h_in[None, :],
                         other=0.0)
            if UPCAST:  # hidden and weight of different dtypes: multiply in fp32
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, tl.trans(bt), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        z = acc
    else:
        z = tl.load(x + rows[:, None] * sx0 + cols[None, :] * sx1, mask=row_mask[:, None] & col_in[None, :],
                    other=0.0).to(tl.float32)
    z = z * inv_temp
    return tl.where((cols < valid_vocab)[None, :], z, float("-inf"))


@triton.jit
def row_block(rows_ptr, n_rows, BLOCK_N: tl.constexpr):
    """This program's block of the compacted rows: positions `offs` [BLOCK_N], which of them exist
    (`row_mask`) and their row ids `rows` (0 past the end, so loads there stay in bounds)."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < n_rows
    return offs, row_mask, tl.load(rows_ptr + offs, mask=row_mask, other=0)


@triton.jit
def online_lse(m, s, z):
    """Merge tile `z` into the running (max m, Σ exp(z − m)) of each row; safe when all are -inf."""
    m_new = tl.maximum(m, tl.max(z, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
    return m_new, s


@triton.jit
def finish_lse(m, s):
    return tl.where(m == float("-inf"), m, m + tl.log(s))


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
