// Fused-linear logit tiles with ATen matmul (MKL/oneDNN on CPU tensors, cuBLAS on CUDA tensors),
// shared by the CPU passes (kernels_cpu.cpp) and the CUDA glue (cuda_glue.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "passes_cpu.h"

namespace dopd {

// Whether the (CPU) row indices are consecutive, rows[j] = rows[0] + j: then the rows are a view.
inline bool consecutive_rows(const at::Tensor& rows) {
  if (!rows.device().is_cpu() || rows.numel() == 0) return false;
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t j = 1; j < rows.numel(); ++j)
    if (r[j] != r[0] + j) return false;
  return true;
}

// Hidden states of `rows` in the compute dtype [r, H]: a view when all rows are valid and the dtype
// matches (no copy of the hidden states), a gathered copy otherwise.
inline at::Tensor hidden_rows(const Stream& s, const at::Tensor& rows) {
  if (consecutive_rows(rows)) return s.x.narrow(0, rows.data_ptr<int64_t>()[0], rows.numel()).to(s.acc());
  return s.x.index_select(0, rows).to(s.acc());
}

// Weight rows [c0, c0 + len) in the compute dtype (a view when the dtype already matches).
inline at::Tensor weight_block(const Stream& s, int64_t c0, int64_t len) { return s.w->narrow(0, c0, len).to(s.acc()); }

// Unscaled logit tile h · W[c0:c0+len]ᵀ (+ b) [r, len], written into the front of `buf` (contiguous):
// fp32 (or fp64) accumulation and output, so nothing is rounded to 16 bits before the softmax.
inline at::Tensor linear_tile(const Stream& s, const at::Tensor& h, int64_t c0, int64_t len, at::Tensor& buf) {
  at::Tensor out = buf.narrow(0, 0, h.size(0) * len).view({h.size(0), len});
  const at::Tensor w = weight_block(s, c0, len);
  if (s.b.has_value() && s.b->defined()) {
    at::addmm_out(out, s.b->narrow(0, c0, len).to(s.acc()), h, w.t());
  } else {
    at::mm_out(out, h, w.t());
  }
  return out;
}

// Rows per chunk and columns per block in fused-linear mode; the tile buffers hold buffer() elements.
struct LinearPlan {
  int64_t n, rows_per_chunk, block;
  LinearPlan(int64_t n_, int64_t vv, Tiling t)
      : n(n_),
        rows_per_chunk(std::max<int64_t>(1, std::min(t.row_chunk, n_))),
        block(std::max<int64_t>(1, std::min(t.vocab_chunk, vv))) {}
  int64_t buffer() const { return rows_per_chunk * block; }
};

}  // namespace dopd
