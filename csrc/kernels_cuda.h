// Launchers of the CUDA kernels (kernels_cuda.cu). Torch-free on purpose: raw device pointers and a
// cudaStream_t only, so nvcc can compile-check the kernels on machines whose torch has no CUDA
// headers. The torch-facing side is cuda_glue.cpp.
//
// Statistics are float32 (the compute type of fp32 / bf16 / fp16 inputs); per-row sums that the
// engine adds across tiles (divergence value, gradient constant) are float64.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "row_math.h"

namespace dopd {
namespace cuda {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Largest top-K the stats kernel keeps per row (its shared-memory sort holds 2 · MAX_TOPK entries).
constexpr int MAX_TOPK = 1024;

// `len` columns of `n` rows. Row i's column j is at ptr + row(i) · stride + offset + j · step
// elements, with row(i) = rows[i] when `rows` is given (logits mode: rows of the [N, V] logits, any
// strides, offset = col0 · step) and i otherwise (fused-linear mode: a dense [n, len] fp32 tile of raw
// logits h·Wᵀ + b, offset 0, step 1). `col0` is the vocabulary column of the tile's first column.
// `head` is the stream's output-head transform (identity in logits mode), applied to every value read.
struct Tile {
  const void* ptr;
  int dtype;
  const int64_t* rows;
  int64_t stride;
  int64_t offset;
  int64_t col0;
  int64_t len;
  int64_t step;
  Head<float> head;
};

// Where gradient columns go, laid out like the student's Tile and of its dtype (the logit gradient
// in logits mode, any strides; in fused-linear mode a separate dense fp32 [n, len] tile, which the
// glue contracts into dH and dW).
struct Out {
  void* ptr;
  const int64_t* rows;
  int64_t stride;
  int64_t offset;
  int64_t step;
};

// A per-row log-sum-exp as the pair hi + lo of dopd_kernels.engine.split_lse (fp32 each): the
// kernels form log p = (x − hi) − lo, which keeps fp32 precision at logits of any magnitude.
struct RowLse {
  const float* hi;
  const float* lo;
};

// Merge a tile of scaled logits (head(z) · inv_tau) into running per-row statistics: (m, s) of the
// online log-sum-exp and, when k > 0, the top-k kept sorted best first in (topk_v, topk_i) [n, k]
// with `count` valid entries. Initialise with init_stats; finish_stats writes log s (0 for an empty
// row) beside the max m, for the caller to add in float64.
cudaError_t init_stats(int64_t n, int k, float* m, float* s, float* topk_v, int64_t* topk_i, int* count,
                       cudaStream_t stream);
cudaError_t merge_stats(Tile z, int64_t n, float inv_tau, float* m, float* s, int k, float* topk_v,
                        int64_t* topk_i, int* count, cudaStream_t stream);
cudaError_t finish_stats(int64_t n, const float* m, const float* s, float* log_sum, cudaStream_t stream);

// Add Σ over the tile's columns of the divergence `kind` (0 reverse KL, 1 forward KL, 2 JS) to value[i]
// and, for JS, of β p (log p − log m) to c[i]. zs and zt may differ in dtype.
cudaError_t add_value(Tile zs, Tile zt, int64_t n, float inv_tau, RowLse lse_s, RowLse lse_t, int kind, float beta,
                      double* value, double* c, cudaStream_t stream);

// Gradient columns scale_i · τ ∂D/∂z of the tile, times the student head's jacobian (so with respect
// to the raw logits). Full-vocabulary term when zt.ptr is set (row constants lse_t, c; zt may differ
// from zs in dtype); otherwise p · dense_i on every column plus scale_i · sparse[i, q] at the k
// columns cols[i, q] that fall in the tile, or with `overwrite` scale_i · sparse[i, q] as those
// columns' whole gradient (RowTerm.explicit). `out` must not alias zs.
cudaError_t grad_tile(Tile zs, Tile zt, int64_t n, float inv_tau, RowLse lse_s, RowLse lse_t, const double* c,
                      const float* dense, const int64_t* cols, const float* sparse, int k, bool overwrite,
                      const float* scale, int kind, float beta, Out out, cudaStream_t stream);

}  // namespace cuda
}  // namespace dopd
