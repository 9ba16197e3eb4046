"""Top-K / sampled-token columns in fused-linear mode (DESIGN.md section 4, step 4): K dot products
per row for the logits, and the sparse gradient contracted straight into dH, dW and db.

Grid: one program per row; the row's K explicit columns (K_PAD = next power of two, K ≤ 256) are
handled together, the hidden dimension in `BLOCK_H` chunks. Traffic is the K weight rows of each
row, `O(N·K·H)`, and nothing is allocated besides the `[n, K]` result: no `[rows, K, H]` gather.
Indices are int64 (`i·K` passes 2^31 at 8.4M rows with K = 256).

  gather_kernel       z[i, j] = head(H[row_i] · W[col_ij] + b[col_ij]) / τ  (fp32 products and sums;
                      -inf at columns ≥ valid_vocab), and with WANT_JAC the head transform's
                      jacobian there (`tiles.head_transform`), which the sparse gradient needs
  sparse_grad_kernel  dH[row_i] += Σ_j g_ij W[col_ij]  (a plain read-modify-write: one program owns
                      the row), and unless deterministic dW[col_ij] += g_ij H[row_i], db[col_ij] += g_ij
                      (relaxed fp32 atomics: the same column recurs across rows, and no ordering
                      with other memory is needed)
  sparse_dw_kernel    the deterministic dW / db: one program per distinct column, summing its
                      (row, g) entries in the fixed order of a stable sort by column (the backend
                      sorts); every dW row has one writer, so no atomics and the same bits every run
"""

import triton
import triton.language as tl

from .tiles import head_transform


@triton.jit
def gather_kernel(rows_ptr, cols_ptr, k, out_ptr, jac_ptr, x, sx0, sx1, w, sw0, sw1, b, hdim, head_a, head_c,
                  valid_vocab, inv_temp, HAS_BIAS: tl.constexpr, HEAD: tl.constexpr, WANT_JAC: tl.constexpr,
                  K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
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
    acc, jac = head_transform(acc, head_a, head_c, HEAD)
    z = tl.where(cols < valid_vocab, acc * inv_temp, float("-inf"))
    tl.store(out_ptr + i * k + ks, z, mask=k_in)
    if WANT_JAC:
        tl.store(jac_ptr + i * k + ks, tl.zeros((K_PAD,), tl.float32) + jac, mask=k_in)


@triton.jit
def sparse_grad_kernel(rows_ptr, cols_ptr, g_ptr, k, dh_ptr, sdh0, dw_ptr, sdw0, db_ptr,
                       x, sx0, sx1, w, sw0, sw1, hdim,
                       NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                       K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """`g` [n, K]: the gradient with respect to the raw logits (head jacobian already applied)."""
    i = tl.program_id(0).to(tl.int64)
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
            dh = dh_ptr + row * sdh0 + hs
            tl.store(dh, tl.load(dh, mask=h_in, other=0.0) + tl.sum(g[:, None] * wt, 0), mask=h_in)
        if NEED_DW:
            hv = tl.load(x + row * sx0 + hs * sx1, mask=h_in, other=0.0).to(tl.float32)
            tl.atomic_add(dw_ptr + cols[:, None] * sdw0 + hs[None, :], g[:, None] * hv[None, :],
                          mask=k_in[:, None] & h_in[None, :], sem="relaxed")
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, g, mask=k_in, sem="relaxed")


@triton.jit
def sparse_dw_kernel(order_ptr, seg_ptr, rows_ptr, cols_ptr, g_ptr, k, dw_ptr, sdw0, db_ptr, x, sx0, sx1, hdim,
                     NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program s sums the entries `order[seg[s]:seg[s+1]]` (flat indices i·K + j of the `[n, K]`
    columns, all equal to one column) into that column's dW row and db entry."""
    s = tl.program_id(0)
    start = tl.load(seg_ptr + s)
    stop = tl.load(seg_ptr + s + 1)
    col = tl.load(cols_ptr + tl.load(order_ptr + start))
    if NEED_DW:
        for h0 in range(0, hdim, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_in = hs < hdim
            acc = tl.zeros((BLOCK_H,), tl.float32)
            for e0 in range(start, stop, BLOCK_E):
                es = e0 + tl.arange(0, BLOCK_E)
                e_in = es < stop
                flat = tl.load(order_ptr + es, mask=e_in, other=0)
                row = tl.load(rows_ptr + flat // k, mask=e_in, other=0)
                g = tl.load(g_ptr + flat, mask=e_in, other=0.0)
                hv = tl.load(x + row[:, None] * sx0 + hs[None, :] * sx1, mask=e_in[:, None] & h_in[None, :],
                             other=0.0).to(tl.float32)
                acc += tl.sum(g[:, None] * hv, 0)
            dw = dw_ptr + col * sdw0 + hs
            tl.store(dw, tl.load(dw, mask=h_in, other=0.0) + acc, mask=h_in)
    if NEED_DB:
        acc_b = tl.zeros((BLOCK_E,), tl.float32)
        for e0 in range(start, stop, BLOCK_E):
            es = e0 + tl.arange(0, BLOCK_E)
            e_in = es < stop
            acc_b += tl.load(g_ptr + tl.load(order_ptr + es, mask=e_in, other=0), mask=e_in, other=0.0)
        tl.store(db_ptr + col, tl.load(db_ptr + col) + tl.sum(acc_b, 0))
