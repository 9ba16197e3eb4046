// Launchers of the CUDA kernels (kernels_cuda.cu). Torch-free on purpose: raw device pointers and a
// cudaStream_t only, so nvcc can compile-check the kernels on machines whose torch has no CUDA
// headers. The torch-facing side is cuda_glue.cpp.
//
// Statistics are float32 (the compute type of fp32 / bf16 / fp16 inputs); per-row sums that the
// engine adds across tiles (divergence value, gradient constant) are float64.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dopd {
namespace cuda {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Largest top-K the stats kernel keeps per row (its shared-memory sort holds 2 · MAX_TOPK entries).
constexpr int MAX_TOPK = 1024;

// `len` columns of `n` rows. Row i's columns start at ptr + row(i) · stride + offset elements, with
// row(i) = rows[i] when `rows` is given (logits mode: rows of the [N, V] logits, offset = col0) and
// i otherwise (fused-linear mode: a dense [n, len] tile, offset 0). `col0` is the vocabulary
// column of the tile's first column.
struct Tile {
  const void* ptr;
  int dtype;
  const int64_t* rows;
  int64_t stride;
  int64_t offset;
  int64_t col0;
  int64_t len;
};

// Where gradient columns go, laid out like the student's Tile and of its dtype (the logit gradient
// in logits mode; in fused-linear mode the student tile itself, overwritten in place).
struct Out {
  void* ptr;
  const int64_t* rows;
  int64_t stride;
  int64_t offset;
};

// Merge a tile of scaled logits (z · inv_tau) into running per-row statistics: (m, s) of the online
// log-sum-exp and, when k > 0, the top-k kept sorted best first in (topk_v, topk_i) [n, k] with
// `count` valid entries. Initialise with init_stats, finish with finish_stats.
cudaError_t init_stats(int64_t n, int k, float* m, float* s, float* topk_v, int64_t* topk_i, int* count,
                       cudaStream_t stream);
cudaError_t merge_stats(Tile z, int64_t n, float inv_tau, float* m, float* s, int k, float* topk_v,
                        int64_t* topk_i, int* count, cudaStream_t stream);
cudaError_t finish_stats(int64_t n, const float* m, const float* s, float* lse, cudaStream_t stream);

// Add Σ over the tile's columns of the divergence `kind` (0 reverse KL, 1 forward KL, 2 JS) to value[i]
// and, for JS, of β p (log p − log m) to c[i].
cudaError_t add_value(Tile zs, Tile zt, int64_t n, float inv_tau, const float* lse_s, const float* lse_t, int kind,
                      float beta, double* value, double* c, cudaStream_t stream);

// Gradient columns scale_i · τ ∂D/∂z of the tile. Full-vocabulary term when zt.ptr is set (row
// constants lse_t, c); otherwise p · dense_i on every column plus scale_i · sparse[i, q] at the k
// columns cols[i, q] that fall in the tile, or with `overwrite` scale_i · sparse[i, q] as those columns'
// whole gradient (RowTerm.explicit). zs and zt share one dtype.
cudaError_t grad_tile(Tile zs, Tile zt, int64_t n, float inv_tau, const float* lse_s, const float* lse_t,
                      const float* c, const float* dense, const int64_t* cols, const float* sparse, int k,
                      bool overwrite, const float* scale, int kind, float beta, Out out, cudaStream_t stream);

}  // namespace cuda
}  // namespace dopd
