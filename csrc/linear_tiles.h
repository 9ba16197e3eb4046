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

// Whether a stream's matmuls take its 16-bit operands as they are: CUDA tensors whose hidden states and
// weight share one 16-bit dtype go to tensor cores with fp32 accumulation and fp32 output (ATen's mm /
// addmm with an fp32 out_dtype, cuBLAS GemmEx), so no weight block is ever copied to fp32. Every other
// case (CPU tensors, fp32, mixed dtypes) converts the operands to the compute dtype.
inline bool half_operands(const Stream& s) {
  return s.x.is_cuda() && s.acc() == at::kFloat && s.x.scalar_type() != at::kFloat &&
         s.x.scalar_type() == s.w->scalar_type();
}

// The dtype of the matmul operands: the 16-bit input dtype with half_operands, else the compute dtype.
inline at::ScalarType operand_dtype(const Stream& s) { return half_operands(s) ? s.x.scalar_type() : s.acc(); }

// Hidden states of `rows` [r, H] in the operand dtype: a view when all rows are valid and the dtype
// matches (no copy of the hidden states), a gathered copy otherwise.
inline at::Tensor hidden_rows(const Stream& s, const at::Tensor& rows) {
  if (consecutive_rows(rows)) return s.x.narrow(0, rows.data_ptr<int64_t>()[0], rows.numel()).to(operand_dtype(s));
  return s.x.index_select(0, rows).to(operand_dtype(s));
}

// Weight rows [c0, c0 + len) in the operand dtype (a view when the dtype already matches).
inline at::Tensor weight_block(const Stream& s, int64_t c0, int64_t len) {
  return s.w->narrow(0, c0, len).to(operand_dtype(s));
}

// Unscaled logit tile h · W[c0:c0+len]ᵀ (+ b) [r, len], written into the front of `buf` (contiguous,
// compute dtype): fp32 (or fp64) accumulation and output, so nothing is rounded to 16 bits before the
// softmax. `h` comes from hidden_rows.
inline at::Tensor linear_tile(const Stream& s, const at::Tensor& h, int64_t c0, int64_t len, at::Tensor& buf) {
  at::Tensor out = buf.narrow(0, 0, h.size(0) * len).view({h.size(0), len});
  const at::Tensor w = weight_block(s, c0, len);
  const bool bias = s.b.has_value() && s.b->defined();
  if (half_operands(s)) {
    at::mm_out(out, h, w.t(), s.acc());
    if (bias) out.add_(s.b->narrow(0, c0, len));
  } else if (bias) {
    at::addmm_out(out, s.b->narrow(0, c0, len).to(s.acc()), h, w.t());
  } else {
    at::mm_out(out, h, w.t());
  }
  return out;
}

// acc += a · b (fp32 acc; a in fp32, b from hidden_rows / weight_block): with half_operands, a is
// rounded to b's 16-bit dtype and the product runs on tensor cores with fp32 accumulation (no fp32
// copy of b); otherwise a plain fp32 (fp64) addmm.
inline void contract_into(const Stream& s, at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (half_operands(s)) {
    at::addmm_out(acc, acc, a.to(b.scalar_type()), b, s.acc());
  } else {
    acc.addmm_(a, b);
  }
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
