"""Top-K / sampled-token columns in fused-linear mode (DESIGN.md section 4, step 4): K dot products
per row for the logits, and the sparse gradient contracted straight into dH, dW and db.

Grid: one program per row; the row's K explicit columns (K_PAD = next power of two) are handled
together, the hidden dimension in `BLOCK_H` chunks. Traffic is the K weight rows of each row,
`O(N·K·H)`, and nothing is allocated besides the `[n, K]` result: no `[rows, K, H]` gather.

  gather_kernel       z[i, j] = (H[row_i] · W[col_ij] + b[col_ij]) / τ  (fp32 products and sums;
                      -inf at columns ≥ valid_vocab)
  sparse_grad_kernel  dH[row_i] += Σ_j g_ij W[col_ij],  dW[col_ij] += g_ij H[row_i],  db[col_ij] += g_ij
                      (fp32 atomics: the same column recurs across rows)
"""

import triton
import triton.language as tl


@triton.jit
def gather_kernel(rows_ptr, cols_ptr, k, out_ptr, x, sx0, sx1, w, sw0, sw1, b, hdim, valid_vocab, inv_temp,
                  HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    ks = tl.arange(0, K_PAD)
    k_in = ks < k
    cols = tl.load(cols_ptr + i * k + ks, mask=k_in, other=0)
    acc = tl.zeros((K_PAD,), tl.float32)
    for h0 in range(0, hdim, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_in = hs < hdim
        hv = tl.load(x + row * sx0 + hs * sx1, mask=h_in, other=0.0).to(tl.float32)
        wt = tl.load(w + cols[:, None] * sw0 + hs[None, :] * sw1, mask=k_in[:, None] & h_in[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(wt * hv[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b + cols, mask=k_in, other=0.0).to(tl.float32)
    z = tl.where(cols < valid_vocab, acc * inv_temp, float("-inf"))
    tl.store(out_ptr + i * k + ks, z, mask=k_in)


@triton.jit
def sparse_grad_kernel(rows_ptr, cols_ptr, g_ptr, k, dh_ptr, sdh0, dw_ptr, sdw0, db_ptr,
                       x, sx0, sx1, w, sw0, sw1, hdim,
                       NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                       K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    ks = tl.arange(0, K_PAD)
    k_in = ks < k
    cols = tl.load(cols_ptr + i * k + ks, mask=k_in, other=0)
    g = tl.load(g_ptr + i * k + ks, mask=k_in, other=0.0)
    for h0 in range(0, hdim, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_in = hs < hdim
        if NEED_DH:
            wt = tl.load(w + cols[:, None] * sw0 + hs[None, :] * sw1, mask=k_in[:, None] & h_in[None, :],
                         other=0.0).to(tl.float32)
            tl.atomic_add(dh_ptr + row * sdh0 + hs, tl.sum(g[:, None] * wt, 0), mask=h_in)
        if NEED_DW:
            hv = tl.load(x + row * sx0 + hs * sx1, mask=h_in, other=0.0).to(tl.float32)
            tl.atomic_add(dw_ptr + cols[:, None] * sdw0 + hs[None, :], g[:, None] * hv[None, :],
                          mask=k_in[:, None] & h_in[None, :])
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, g, mask=k_in)
