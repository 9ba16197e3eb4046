// CUDA kernels of the fused DOPD / OPD passes; per-row math from row_math.h (the same code the CPU
// kernels and the C++ unit tests run). One thread block per row and tile: in logits mode the tile is
// the whole row of the bf16/fp16/fp32 logits (any strides; student and target dtypes may differ),
// read once per pass (the gradient is written once); in fused-linear mode cuda_glue.cpp computes
// bounded fp32 tiles of raw logits with cuBLAS and these kernels are the epilogue: the output-head
// transform (scale, soft-cap) on every value read, the head's jacobian on every gradient written into
// a gradient tile, which the glue then contracts into dH and dW.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels_cuda.h"
#include "row_math.h"

namespace dopd {
namespace cuda {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int SORT = 2 * MAX_TOPK;  // shared top-K merge buffer: kept entries + one round of candidates
constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int64_t NO_COLUMN = 0x7fffffffffffffffLL;  // ranks after every real column (see topk_before)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

template <typename T>
__device__ __forceinline__ const T* row_of(const Tile& t, int64_t i) {
  return static_cast<const T*>(t.ptr) + (t.rows ? t.rows[i] : i) * t.stride + t.offset;
}

// Transformed logit (before 1/τ) of column j of a row of tile t.
template <typename T>
__device__ __forceinline__ float logit_at(const Tile& t, const T* row, int64_t j) {
  return t.head.logit(to_f(row[j * t.step]));
}

// -- block reductions (result valid in thread 0) -----------------------------------------------------

template <typename S>
__device__ S block_sum(S v, S* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `red` may still be read from a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = threadIdx.x < WARPS ? red[threadIdx.x] : S(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

__device__ LseState<float> block_lse(LseState<float> a, float* red_m, float* red_s) {
  for (int o = 16; o > 0; o >>= 1) {
    const LseState<float> b{__shfl_xor_sync(FULL_MASK, a.m, o), __shfl_xor_sync(FULL_MASK, a.s, o)};
    a = lse_merge(a, b);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    red_m[warp] = a.m;
    red_s[warp] = a.s;
  }
  __syncthreads();
  a = threadIdx.x < WARPS ? LseState<float>{red_m[threadIdx.x], red_s[threadIdx.x]} : lse_empty<float>();
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) {
      const LseState<float> b{__shfl_xor_sync(FULL_MASK, a.m, o), __shfl_xor_sync(FULL_MASK, a.s, o)};
      a = lse_merge(a, b);
    }
  return a;
}

// Sort sv/si[0, size) best first (size a power of two) with a bitonic network on topk_before.
__device__ void bitonic_sort_best_first(float* sv, int64_t* si, int size) {
  for (int span = 2; span <= size; span <<= 1) {
    for (int j = span >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < size; t += blockDim.x) {
        const int p = t ^ j;
        if (p > t) {
          const bool best_first = (t & span) == 0;  // direction of this bitonic subsequence
          if (best_first == topk_before(sv[p], si[p], sv[t], si[t])) {
            const float v = sv[t];
            sv[t] = sv[p];
            sv[p] = v;
            const int64_t c = si[t];
            si[t] = si[p];
            si[p] = c;
          }
        }
      }
      __syncthreads();
    }
  }
}

// -- stats -----------------------------------------------------------------------------------------

__global__ void init_stats_kernel(int64_t n, float* m, float* s, int* count) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  m[i] = neg_inf<float>();
  s[i] = 0.0f;
  if (count) count[i] = 0;
}

// One block per row. The tile is scanned in rounds of SORT − k columns; each value updates the
// thread's online log-sum-exp and, if it beats the k-th kept value, is appended to the shared
// buffer behind the kept entries; a round with candidates is merged by one bitonic sort.
template <typename T>
__global__ void __launch_bounds__(THREADS) merge_stats_kernel(Tile z, float inv_tau, float* m, float* s, int k,
                                                              float* topk_v, int64_t* topk_i, int* count) {
  __shared__ float sv[SORT];
  __shared__ int64_t si[SORT];
  __shared__ float red_m[WARPS], red_s[WARPS];
  __shared__ int n_cand;
  const int64_t i = blockIdx.x;
  const T* row = row_of<T>(z, i);
  int kept = k ? count[i] : 0;
  for (int q = threadIdx.x; q < k; q += blockDim.x) {
    sv[q] = q < kept ? topk_v[i * k + q] : neg_inf<float>();
    si[q] = q < kept ? topk_i[i * k + q] : NO_COLUMN;
  }
  LseState<float> st = lse_empty<float>();
  const int64_t round = k ? SORT - k : z.len;
  for (int64_t base = 0; base < z.len; base += round) {
    const int64_t end = base + round < z.len ? base + round : z.len;
    if (threadIdx.x == 0) n_cand = 0;
    __syncthreads();
    for (int64_t j = base + threadIdx.x; j < end; j += blockDim.x) {
      const float v = logit_at(z, row, j) * inv_tau;
      lse_push(st, v);
      if (topk_admits_sorted(v, sv, kept, k)) {  // `kept` is fixed during a round: at most `round` enter
        const int slot = atomicAdd(&n_cand, 1);
        sv[k + slot] = v;
        si[k + slot] = z.col0 + j;
      }
    }
    __syncthreads();
    const int nc = n_cand;
    if (nc > 0) {
      int size = 1;
      while (size < k + nc) size <<= 1;
      for (int q = k + nc + threadIdx.x; q < size; q += blockDim.x) {
        sv[q] = neg_inf<float>();
        si[q] = NO_COLUMN;
      }
      __syncthreads();
      bitonic_sort_best_first(sv, si, size);
      kept = kept + nc < k ? kept + nc : k;
    }
  }
  const LseState<float> b = block_lse(st, red_m, red_s);
  if (threadIdx.x == 0) {
    const LseState<float> merged = lse_merge(LseState<float>{m[i], s[i]}, b);
    m[i] = merged.m;
    s[i] = merged.s;
    if (k) count[i] = kept;
  }
  for (int q = threadIdx.x; q < k; q += blockDim.x) {
    topk_v[i * k + q] = sv[q];
    topk_i[i * k + q] = si[q];
  }
}

__global__ void finish_stats_kernel(int64_t n, const float* m, const float* s, float* log_sum) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) log_sum[i] = lse_log_sum(LseState<float>{m[i], s[i]});
}

// -- value -----------------------------------------------------------------------------------------

// Sums in float64: terms p·(log p − log q) of large logits reach hundreds while the divergence (and
// the reverse-KL gradient constant it becomes) needs fp32 precision of the total.
template <int KIND, typename TS, typename TT>
__global__ void __launch_bounds__(THREADS) add_value_kernel(Tile zs, Tile zt, float inv_tau, RowLse lse_s,
                                                            RowLse lse_t, DivParams<float> P, double* value,
                                                            double* c) {
  __shared__ double red[WARPS];
  const int64_t i = blockIdx.x;
  const TS* a = row_of<TS>(zs, i);
  const TT* b = row_of<TT>(zt, i);
  const float hs = lse_s.hi[i], ls = lse_s.lo[i], ht = lse_t.hi[i], lt = lse_t.lo[i];
  double v = 0.0, cs = 0.0;
  for (int64_t j = threadIdx.x; j < zs.len; j += blockDim.x) {
    const float lp = log_prob(logit_at(zs, a, j) * inv_tau, hs, ls), lq = log_prob(logit_at(zt, b, j) * inv_tau, ht, lt);
    v += value_term<KIND>(lp, lq, P);
    if (KIND == JS) cs += js_c_term(lp, lq, P);
  }
  v = block_sum(v, red);
  if (KIND == JS) cs = block_sum(cs, red);
  if (threadIdx.x == 0) {
    value[i] += v;
    if (KIND == JS) c[i] += cs;
  }
}

// -- gradient --------------------------------------------------------------------------------------

template <int KIND, bool FULL, typename TS, typename TT>
__global__ void __launch_bounds__(THREADS) grad_kernel(Tile zs, Tile zt, float inv_tau, RowLse lse_s, RowLse lse_t,
                                                       const double* c, const float* dense, const int64_t* cols,
                                                       const float* sparse, int k, bool overwrite, const float* scale,
                                                       DivParams<float> P, Out out) {
  const int64_t i = blockIdx.x;
  const TS* a = row_of<TS>(zs, i);
  TS* g = static_cast<TS*>(out.ptr) + (out.rows ? out.rows[i] : i) * out.stride + out.offset;
  const float hs = lse_s.hi[i], ls = lse_s.lo[i], sc = scale[i];
  if (FULL) {
    const TT* b = row_of<TT>(zt, i);
    const float ht = lse_t.hi[i], lt = lse_t.lo[i], ci = c ? float(c[i]) : 0.0f;
    const double ki = KIND == REVERSE_KL && c ? reverse_kl_offset(c[i], hs, ls, ht, lt) : 0.0;
    for (int64_t j = threadIdx.x; j < zs.len; j += blockDim.x) {
      const float x = logit_at(zs, a, j), xs = x * inv_tau, xt = logit_at(zt, b, j) * inv_tau;
      const float lq = log_prob(xt, ht, lt);
      g[j * out.step] = from_f<TS>(full_grad_term<KIND>(log_prob(xs, hs, ls), lq, xs, xt, ci, ki, P) * sc * zs.head.jacobian(x));
    }
    return;
  }
  const float d = dense[i];
  // Columns carrying a sparse coefficient are written again, below, with both parts.
  for (int64_t j = threadIdx.x; j < zs.len; j += blockDim.x) {
    const float x = logit_at(zs, a, j);
    g[j * out.step] = from_f<TS>(dense_grad_term(log_prob(x * inv_tau, hs, ls), d) * sc * zs.head.jacobian(x));
  }
  __syncthreads();
  // Each explicit column in the tile is written once, by the thread of its first occurrence (repeated
  // columns sum their coefficients), from the logit (out never aliases zs), rounded once.
  for (int q = threadIdx.x; q < k; q += blockDim.x) {
    const int64_t col = cols[i * k + q] - zs.col0;
    if (col < 0 || col >= zs.len) continue;
    bool first = true;
    float sp = 0.0f;
    for (int r = 0; r < k; ++r)
      if (cols[i * k + r] - zs.col0 == col) {
        first = first && r >= q;
        sp += sparse[i * k + r];
      }
    if (!first) continue;
    const float x = logit_at(zs, a, col);
    const float base = overwrite ? 0.0f : dense_grad_term(log_prob(x * inv_tau, hs, ls), d);
    g[col * out.step] = from_f<TS>((base + sp) * sc * zs.head.jacobian(x));
  }
}

// -- dispatch --------------------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
cudaError_t with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case F32: return f(Tag<float>());
    case BF16: return f(Tag<__nv_bfloat16>());
    case F16: return f(Tag<__half>());
    default: return cudaErrorInvalidValue;
  }
}

template <int K>
struct KindTag {
  static constexpr int value = K;
};

template <typename F>
cudaError_t with_kind(int kind, F&& f) {
  switch (kind) {
    case REVERSE_KL: return f(KindTag<REVERSE_KL>());
    case FORWARD_KL: return f(KindTag<FORWARD_KL>());
    case JS: return f(KindTag<JS>());
    default: return cudaErrorInvalidValue;
  }
}

// f(KindTag, Tag<TS>, Tag<TT>) for a runtime student dtype, target dtype and divergence kind: the
// instantiations of a full-vocabulary pass over a (student, target) pair.
template <typename F>
cudaError_t with_pair_kind(int dtype_s, int dtype_t, int kind, F&& f) {
  return with_dtype(dtype_s, [&](auto ts) {
    return with_dtype(dtype_t, [&](auto tt) { return with_kind(kind, [&](auto kt) { return f(kt, ts, tt); }); });
  });
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + THREADS - 1) / THREADS); }

}  // namespace

cudaError_t init_stats(int64_t n, int k, float* m, float* s, float*, int64_t*, int* count, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  init_stats_kernel<<<blocks_for(n), THREADS, 0, stream>>>(n, m, s, k ? count : nullptr);
  return cudaGetLastError();
}

cudaError_t merge_stats(Tile z, int64_t n, float inv_tau, float* m, float* s, int k, float* topk_v, int64_t* topk_i,
                        int* count, cudaStream_t stream) {
  if (k < 0 || k > MAX_TOPK) return cudaErrorInvalidValue;
  if (n == 0 || z.len == 0) return cudaSuccess;
  return with_dtype(z.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    merge_stats_kernel<T><<<static_cast<unsigned>(n), THREADS, 0, stream>>>(z, inv_tau, m, s, k, topk_v, topk_i, count);
    return cudaGetLastError();
  });
}

cudaError_t finish_stats(int64_t n, const float* m, const float* s, float* log_sum, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  finish_stats_kernel<<<blocks_for(n), THREADS, 0, stream>>>(n, m, s, log_sum);
  return cudaGetLastError();
}

cudaError_t add_value(Tile zs, Tile zt, int64_t n, float inv_tau, RowLse lse_s, RowLse lse_t, int kind, float beta,
                      double* value, double* c, cudaStream_t stream) {
  if (n == 0 || zs.len == 0) return cudaSuccess;
  return with_pair_kind(zs.dtype, zt.dtype, kind, [&](auto kt, auto ts, auto tt) {
    constexpr int KIND = decltype(kt)::value;
    add_value_kernel<KIND, typename decltype(ts)::type, typename decltype(tt)::type>
        <<<static_cast<unsigned>(n), THREADS, 0, stream>>>(zs, zt, inv_tau, lse_s, lse_t, div_params<float>(KIND, beta),
                                                           value, c);
    return cudaGetLastError();
  });
}

cudaError_t grad_tile(Tile zs, Tile zt, int64_t n, float inv_tau, RowLse lse_s, RowLse lse_t, const double* c,
                      const float* dense, const int64_t* cols, const float* sparse, int k, bool overwrite,
                      const float* scale, int kind, float beta, Out out, cudaStream_t stream) {
  if (n == 0 || zs.len == 0) return cudaSuccess;
  if (zt.ptr == nullptr) {  // few-column term: the student's tile only
    return with_dtype(zs.dtype, [&](auto ts) {
      using TS = typename decltype(ts)::type;
      grad_kernel<REVERSE_KL, false, TS, TS><<<static_cast<unsigned>(n), THREADS, 0, stream>>>(
          zs, zt, inv_tau, lse_s, lse_t, c, dense, cols, sparse, k, overwrite, scale, div_params<float>(REVERSE_KL, 0.5),
          out);
      return cudaGetLastError();
    });
  }
  return with_pair_kind(zs.dtype, zt.dtype, kind, [&](auto kt, auto ts, auto tt) {
    constexpr int KIND = decltype(kt)::value;
    grad_kernel<KIND, true, typename decltype(ts)::type, typename decltype(tt)::type>
        <<<static_cast<unsigned>(n), THREADS, 0, stream>>>(zs, zt, inv_tau, lse_s, lse_t, c, dense, cols, sparse, k,
                                                           overwrite, scale, div_params<float>(KIND, beta), out);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace dopd
