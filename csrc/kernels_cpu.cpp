// CPU passes of the fused DOPD / OPD loss: OpenMP over tokens, blocked loops over the vocabulary,
// per-row math from row_math.h.
//
// Logits mode: each thread owns whole rows and streams them block by block (each logit is read once
// per pass from memory; a block is re-read from cache by the two-step max / sum-exp). Fused-linear
// mode: for each chunk of rows and vocabulary block, ATen matmul writes the logit tile
// H[rows] · W[block]ᵀ (+ b) into a fixed-size buffer, the rows of the tile are processed in parallel
// (the output-head transform, scale and soft-cap, is their first step: the tile epilogue); in the
// gradient pass the gradient tile, times the head's jacobian, overwrites the logit tile and is
// contracted at once into dH and dW, each row leaving out its provably negligible 256-column blocks when
// asked to (BlockSkipper, the rule of dopd_kernels/skipping.py). No buffer has a full vocabulary axis. Full-vocabulary rows take
// the fewest sweeps their math allows (full_pass, see "full-vocabulary rows" below), and every GEMM and
// dot product is counted (matmul_flops).
//
// Inputs of any strides: logits, gradients, hidden states and weights are read (and written) through
// their strides; a non-unit column stride costs a copy of one block into per-thread scratch.
// Log-sum-exps come in as the pair (hi, lo) of dopd_kernels.engine.split_lse, and the stats pass
// returns (max, log Σ exp(z − max)) for the engine to add in float64.
#include "passes_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "linear_tiles.h"
#include "row_math.h"

namespace dopd {
namespace {

using at::Tensor;

int num_threads() { return std::max(1, at::get_num_threads()); }

// -- matmul FLOP counter ---------------------------------------------------------------------------

// FLOPs of the tile GEMMs and dot products the passes perform (2·m·n·k per product), for
// tests/test_matmul_floor.py to check the pass plan against the matmul floor. One relaxed atomic add per
// GEMM (and one per pass for the K-column dot products): free next to the work it counts, so always on.
std::atomic<int64_t> matmul_flops_counted{0};

void count_flops(int64_t flops) { matmul_flops_counted.fetch_add(flops, std::memory_order_relaxed); }

// linear_tile and contract_into (linear_tiles.h, shared with the CUDA glue), counted.
Tensor counted_tile(const Stream& s, const Tensor& h, int64_t c0, int64_t len, Tensor& buf) {
  count_flops(2 * h.size(0) * len * h.size(1));
  return linear_tile(s, h, c0, len, buf);
}

void counted_contract(const Stream& s, const Tensor& acc, const Tensor& a, const Tensor& b) {
  count_flops(2 * a.size(0) * a.size(1) * b.size(1));
  contract_into(s, acc, a, b);
}

// A gradient tile G [r, len] of columns [c0, c0 + len), with respect to the raw logits, contracted at once:
// dH += G·W (into dh_rows [r, H], when defined), dW += Gᵀ·H, db += Σ_rows G.
void contract_tile(const Stream& s, const Tensor& g, const Tensor& h, int64_t c0, int64_t len, const Tensor& dh_rows,
                   const std::optional<Tensor>& dw, const std::optional<Tensor>& db) {
  if (dh_rows.defined()) counted_contract(s, dh_rows, g, weight_block(s, c0, len));
  if (dw.has_value() && dw->defined()) counted_contract(s, dw->narrow(0, c0, len), g.t(), h);
  if (db.has_value() && db->defined()) db->narrow(0, c0, len).add_(g.sum(0));
}

// -- element access ------------------------------------------------------------------------------

// Pointer to `len` elements in A, element j at `off + j · step` of a tensor's storage: the data itself
// when its dtype is A and step is 1, otherwise a converted (or gathered) copy in `scratch`.
template <typename A, typename T>
const A* load_as(const void* base, int64_t off, int64_t len, int64_t step, A* scratch) {
  const T* p = static_cast<const T*>(base) + off;
  if constexpr (std::is_same_v<T, A>) {
    if (step == 1) return p;
  }
  for (int64_t j = 0; j < len; ++j) scratch[j] = static_cast<A>(p[j * step]);
  return scratch;
}

template <typename A, typename T>
void store_as(void* base, int64_t off, int64_t step, const A* src, int64_t len) {
  T* p = static_cast<T*>(base) + off;
  for (int64_t j = 0; j < len; ++j) p[j * step] = static_cast<T>(src[j]);
}

template <typename A>
using LoadFn = const A* (*)(const void*, int64_t, int64_t, int64_t, A*);
template <typename A>
using StoreFn = void (*)(void*, int64_t, int64_t, const A*, int64_t);

template <typename A>
LoadFn<A> loader(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return load_as<A, float>;
    case at::kDouble: return load_as<A, double>;
    case at::kBFloat16: return load_as<A, c10::BFloat16>;
    case at::kHalf: return load_as<A, c10::Half>;
    default: throw std::invalid_argument("dopd cpu: logits must be float32, float64, bfloat16 or float16");
  }
}

template <typename A>
StoreFn<A> storer(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return store_as<A, float>;
    case at::kDouble: return store_as<A, double>;
    case at::kBFloat16: return store_as<A, c10::BFloat16>;
    case at::kHalf: return store_as<A, c10::Half>;
    default: throw std::invalid_argument("dopd cpu: gradient must be float32, float64, bfloat16 or float16");
  }
}

// Rows of a 2-D tensor of any strides and float dtype, read in A (logits [N, V], weight rows [V, H]).
template <typename A>
struct Rows {
  const void* base;
  int64_t stride, step;  // element strides of rows and columns
  LoadFn<A> load;

  explicit Rows(const Tensor& x)
      : base(x.data_ptr()), stride(x.stride(0)), step(x.stride(1)), load(loader<A>(x.scalar_type())) {
    TORCH_CHECK(x.dim() == 2, "dopd cpu: expected a 2-D tensor");
  }
  const A* segment(int64_t row, int64_t c0, int64_t len, A* scratch) const {
    return load(base, row * stride + c0 * step, len, step, scratch);
  }
};

// Per-row output-head transform of a fused-linear tile, in place (logits-mode streams have none).
template <typename A>
void head_transform(A* z, int64_t len, const Head<A> h) {
  if (h.identity()) return;
  if (h.cap > A(0)) {
    for (int64_t j = 0; j < len; ++j) z[j] = h.logit(z[j]);  // tanh: a library call, not vectorised
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) z[j] *= h.scale;
  }
}

template <typename A>
Head<A> head_of(const Stream& s) {
  return make_head<A>(s.scale, s.softcap);
}

// A log-sum-exp as the rows (hi, lo) [2, n] of split_lse, in the compute dtype.
template <typename A>
struct SplitLse {
  Tensor t;
  const A *hi, *lo;

  SplitLse(const Tensor& lse, at::ScalarType acc, int64_t n) : t(lse.to(acc).contiguous()) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == 2 && t.size(1) == n, "dopd cpu: a log-sum-exp must be (hi, lo) [2, n]");
    hi = t.data_ptr<A>();
    lo = hi + n;
  }
};

// Per-thread scratch for converted segments.
template <typename A>
struct Scratch {
  std::vector<A> s, t, g;
  explicit Scratch(int64_t n) : s(n), t(n), g(n) {}
};

// Raw logits h_i · W[col] + b[col] of single columns of a fused-linear stream (K dot products per
// row, no [n, K, H] gather): the rows' hidden states copied to a contiguous [n, H] block in the compute
// dtype; weight rows and bias read through their strides.
template <typename A>
struct ColumnDots {
  Tensor h;
  const A* hp;
  int64_t hd;
  Rows<A> w;
  std::optional<Rows<A>> b;

  ColumnDots(const Stream& s, const Tensor& rows)
      : h(hidden_rows(s, rows).contiguous()), hp(h.data_ptr<A>()), hd(h.size(1)), w(*s.w),
        b(s.b.has_value() && s.b->defined() ? std::optional<Rows<A>>(Rows<A>(s.b->unsqueeze(1))) : std::nullopt) {}

  A raw(int64_t i, int64_t col, A* scratch) const {
    const A* wr = w.segment(col, 0, hd, scratch);
    const A* hr = hp + i * hd;
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t e = 0; e < hd; ++e) acc += hr[e] * wr[e];
    if (b) {
      A bv;
      acc += *b->segment(col, 0, 1, &bv);
    }
    return acc;
  }
};

// -- stats ---------------------------------------------------------------------------------------

// Running statistics of one row: online log-sum-exp and top-k heap (heap storage owned by the caller).
template <typename A>
struct RowStats {
  LseState<A> lse;
  A* heap_v;
  int64_t* heap_i;
  int count;
};

// (max, Σ exp(z·inv_tau − max)) of one block of logits, column `skip` (relative to the block; outside
// [0, len): none) left out: a tail bucket's share of the block. A NaN logit gives a NaN sum, which stays
// NaN through every later lse_merge.
template <bool SKIP, typename A>
LseState<A> segment_lse_of(const A* z, int64_t len, A inv_tau, int64_t skip) {
  A mx = neg_inf<A>();
  int nans = 0;
#pragma omp simd reduction(max : mx) reduction(+ : nans)
  for (int64_t j = 0; j < len; ++j) {
    const A x = SKIP && j == skip ? neg_inf<A>() : z[j] * inv_tau;
    mx = std::max(mx, x);
    nans += x != x;
  }
  if (nans) return {mx, std::numeric_limits<A>::quiet_NaN()};
  if (mx == neg_inf<A>()) return lse_empty<A>();  // an all -inf block adds nothing to the log-sum-exp
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) sum += SKIP && j == skip ? A(0) : fexp(z[j] * inv_tau - mx);
  return {mx, sum};
}

// The loops without the column test where no column is left out (every stats block): it costs a 64-bit
// compare and a blend per element.
template <typename A>
LseState<A> segment_lse(const A* z, int64_t len, A inv_tau, int64_t skip) {
  if (skip >= 0 && skip < len) return segment_lse_of<true>(z, len, inv_tau, skip);
  return segment_lse_of<false>(z, len, inv_tau, skip);
}

// Merge one block of scaled logits z·inv_tau (columns c0 .. c0+len) into a row's statistics; returns
// the block's own (max, sum).
template <typename A>
LseState<A> stats_segment(const A* z, int64_t c0, int64_t len, A inv_tau, int k, RowStats<A>& st) {
  const LseState<A> block = segment_lse(z, len, inv_tau, -1);
  st.lse = lse_merge(st.lse, block);
  if (!topk_admits(block.m, st.heap_v, st.count, k)) return block;  // nothing here beats the weakest kept column
  for (int64_t j = 0; j < len; ++j) {
    const A v = z[j] * inv_tau;
    if (topk_admits(v, st.heap_v, st.count, k)) topk_push(st.heap_v, st.heap_i, &st.count, k, v, c0 + j);
  }
  return block;
}

// The tail bucket of a row's sampled token (every valid column but `token`) beside its statistics, from
// the same block: the block's state unless the token lies in it (then that block once more without it).
template <typename A>
void tail_segment(const A* z, int64_t c0, int64_t len, A inv_tau, int64_t token, LseState<A> block, LseState<A>& tail) {
  const int64_t skip = token - c0;
  tail = lse_merge(tail, skip >= 0 && skip < len ? segment_lse(z, len, inv_tau, skip) : block);
}

// A tail bucket's segment: `z` with the row's excluded columns (those in [c0, c0 + len); entries
// < 0 belong to another vocabulary shard) set to -inf, written to `out` (which may be `z` itself).
template <typename A>
const A* mask_excluded(const A* z, int64_t c0, int64_t len, const int64_t* ex, int64_t k_ex, A* out) {
  if (out != z) std::copy(z, z + len, out);
  for (int64_t q = 0; q < k_ex; ++q) {
    const int64_t c = ex[q] - c0;
    if (ex[q] >= 0 && c >= 0 && c < len) out[c] = neg_inf<A>();
  }
  return out;
}

// log P_T: the log-share of a row's softmax mass (log-sum-exp `l`) in a tile's (max, Σ exp) state, in float64;
// −inf for a tile without mass, NaN where `l` is NaN or +inf. P_T itself is tile_share.
template <typename A>
double tile_log_share(const LseState<A>& x, double l) {
  return x.m == neg_inf<A>() ? -HUGE_VAL : double(x.m) + std::log(double(x.s)) - l;
}

template <typename A>
double tile_share(const LseState<A>& x, double l) {
  return std::exp(tile_log_share(x, l));
}

// Per row, (max, log-sum) of the log-sum-exp, the top-k columns (k > 0) and, with `tail_tokens` [n], the
// tail bucket of the row's token: (max, log-sum) over the valid columns but that one, summed in the same
// sweep ([0] tensors without). With `excluded` [n, k_ex], the log-sum-exp is over the valid columns
// outside the row's excluded ones (a tail bucket of several columns, summed directly). With `shares`
// (fused-linear), also each vocabulary tile's log-share of the row's mass, log P_T [n, tiles] (float32; [0]
// without): what a later full_pass needs to leave tiles out of a JS value sweep (js_value_skips).
template <typename A>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> stats_impl(const Stream& s, const Tensor& rows, int64_t k64,
                                                                      Tiling tl, const Tensor* excluded = nullptr,
                                                                      const int64_t* tail_tokens = nullptr,
                                                                      bool shares = false) {
  const int64_t n = rows.size(0), vv = s.valid_vocab;
  const int k = static_cast<int>(k64);
  const int64_t k_ex = excluded ? excluded->size(1) : 0;
  const int64_t* ex = excluded ? excluded->data_ptr<int64_t>() : nullptr;
  const A inv_tau = static_cast<A>(s.inv_tau);
  const int64_t* rp = rows.data_ptr<int64_t>();
  std::vector<A> heap_v(static_cast<size_t>(n) * k);
  Tensor topk = at::empty({n, k64}, rows.options().dtype(at::kLong));
  int64_t* heap_i = topk.data_ptr<int64_t>();
  std::vector<RowStats<A>> st(n);
  for (int64_t i = 0; i < n; ++i) st[i] = {lse_empty<A>(), heap_v.data() + i * k, heap_i + i * k, 0};
  std::vector<LseState<A>> tail(tail_tokens ? n : 0, lse_empty<A>());
  auto segment = [&](const A* z, int64_t i, int64_t c0, int64_t len) {
    const LseState<A> block = stats_segment(z, c0, len, inv_tau, k, st[i]);
    if (tail_tokens) tail_segment(z, c0, len, inv_tau, tail_tokens[i], block, tail[i]);
    return block;
  };
  Tensor log_shares = at::empty({0, 0}, rows.options().dtype(at::kFloat));  // filled below with `shares`

  if (!s.linear()) {
    const Rows<A> x(s.x);
    const int64_t block = std::max<int64_t>(1, std::min(tl.vocab_chunk, vv));
#pragma omp parallel num_threads(num_threads())
    {
      Scratch<A> scr(block);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c0 = 0; c0 < vv; c0 += block) {
          const int64_t len = std::min(block, vv - c0);
          const A* z = x.segment(rp[i], c0, len, scr.s.data());
          if (ex) z = mask_excluded(z, c0, len, ex + i * k_ex, k_ex, scr.g.data());
          segment(z, i, c0, len);
        }
    }
  } else {
    const Head<A> head = head_of<A>(s);
    const LinearPlan plan(n, vv, tl);
    const int64_t tiles = (vv + plan.block - 1) / plan.block;
    Tensor buf = at::empty({plan.buffer()}, rows.options().dtype(s.acc()));
    std::vector<LseState<A>> tile_st(shares ? plan.rows_per_chunk * tiles : 0);  // a chunk's tile states
    if (shares) log_shares = at::empty({n, tiles}, rows.options().dtype(at::kFloat));
    for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
      const int64_t r = std::min(plan.rows_per_chunk, n - r0);
      const Tensor h = hidden_rows(s, rows.narrow(0, r0, r));
      for (int64_t c0 = 0; c0 < vv; c0 += plan.block) {
        const int64_t len = std::min(plan.block, vv - c0);
        A* tile = counted_tile(s, h, c0, len, buf).data_ptr<A>();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
        for (int64_t i = 0; i < r; ++i) {
          A* z = tile + i * len;  // this row's part of the tile buffer: transformed and masked in place
          head_transform(z, len, head);
          if (ex) mask_excluded(z, c0, len, ex + (r0 + i) * k_ex, k_ex, z);
          const LseState<A> block = segment(z, r0 + i, c0, len);
          if (shares) tile_st[i * tiles + c0 / plan.block] = block;
        }
      }
      if (!shares) continue;
      // The chunk's rows are complete: their tiles' log-shares (NaN ones make js_value_skips leave nothing out).
      float* out = log_shares.data_ptr<float>() + r0 * tiles;
      for (int64_t i = 0; i < r; ++i) {
        const double l = double(st[r0 + i].lse.m) + double(lse_log_sum(st[r0 + i].lse));
        for (int64_t q = 0; q < tiles; ++q)
          out[i * tiles + q] = static_cast<float>(tile_log_share(tile_st[i * tiles + q], l));
      }
    }
  }

  auto vec = [&](int64_t m) { return at::empty({m}, rows.options().dtype(s.acc())); };
  Tensor mx = vec(n), log_sum = vec(n), tail_mx = vec(tail.size()), tail_log_sum = vec(tail.size());
  A *mp = mx.data_ptr<A>(), *lp = log_sum.data_ptr<A>(), *tmp = tail_mx.data_ptr<A>(), *tlp = tail_log_sum.data_ptr<A>();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    mp[i] = st[i].lse.m;
    lp[i] = lse_log_sum(st[i].lse);
    if (tail_tokens) {
      tmp[i] = tail[i].m;
      tlp[i] = lse_log_sum(tail[i]);
    }
    topk_sort(st[i].heap_v, st[i].heap_i, st[i].count);
  }
  return {mx, log_sum, topk, tail_mx, tail_log_sum, log_shares};
}

// -- full-vocabulary value -------------------------------------------------------------------------

// Row constants and parameters are taken by value throughout: read through a reference, the compiler
// cannot prove them loop-invariant and gives up vectorising the column loops.
// The sums run in float64: terms p·(log p − log q) of logits ~N(0, 40²) reach hundreds while the
// divergence, and the reverse-KL gradient constant c it becomes, need fp32 precision of the total.
// One tile of a row's value sweep, kept for skipping its gradient tile whole (TileSkips): P_T = Σ_T p_v, Q_T = Σ_T q_v,
// and with u_v = p_v(a_v − c) (reverse KL a = lp − lq, JS a = β(lp − log m)) the tile's Σ p_v·a_v and Σ p_v·|a_v|.
struct TileSums {
  double p, q, pa, pa_abs;
};

// With `tile`, also the block's TileSums.
template <int KIND, typename A>
void value_segment(const A* zs, const A* zt, int64_t len, A inv_tau, A ls, A ls2, A lt, A lt2, const DivParams<A> P,
                   double& value, double& c, TileSums* tile = nullptr) {
  double v = 0, cs = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < len; ++j)
    v += double(value_term<KIND>(log_prob(zs[j] * inv_tau, ls, ls2), log_prob(zt[j] * inv_tau, lt, lt2), P));
  if constexpr (KIND == JS) {
#pragma omp simd reduction(+ : cs)
    for (int64_t j = 0; j < len; ++j)
      cs += double(js_c_term(log_prob(zs[j] * inv_tau, ls, ls2), log_prob(zt[j] * inv_tau, lt, lt2), P));
  }
  if (tile) {
    double pm = 0, qm = 0, am = 0;
#pragma omp simd reduction(+ : pm, qm, am)
    for (int64_t j = 0; j < len; ++j) {
      const A lp = log_prob(zs[j] * inv_tau, ls, ls2), lq = log_prob(zt[j] * inv_tau, lt, lt2);
      const A p = fexp(lp);
      pm += double(p);
      if constexpr (KIND == FORWARD_KL) {
        qm += double(fexp(lq));
      } else {
        const A a = KIND == JS ? P.beta * (lp - log_mixture(lp, lq, P)) : lp - lq;
        am += lp > neg_inf<A>() ? double(p * std::abs(a)) : 0.0;
      }
    }
    *tile = {pm, qm, KIND == JS ? cs : v, am};
  }
  value += v;
  c += cs;
}

struct NoBlockHook {
  void operator()(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t) const {}
};

// The tiles each row of a chunk keeps (keep [rows, tiles]) and the bound mass it skipped (spent [rows]): whole
// tiles a row of a full-vocabulary sweep neither projects nor uses ("skipping whole tiles" below).
struct TileSkips {
  int64_t tiles = 0;
  std::vector<uint8_t> keep;
  std::vector<double> spent;
  bool kept(int64_t i, int64_t tile) const { return keep[i * tiles + tile] != 0; }
};

// The rows of a chunk of `r` rows that form one tile, `ids` (increasing). When they leave rows of the chunk out,
// their hidden states are gathered and padded with rows that skip the tile to a multiple of GATHER_ROWS (their
// logits unused); otherwise the chunk's whole tile is projected. A GEMM of a few rows takes other BLAS kernels,
// which round the logits differently from the dense tile's GEMM, and on the ~50-nat logits of peaked rows (whose
// gradients cancel) measurably less accurately.
struct TileRows {
  int64_t m, padded;
  bool gather;
  std::vector<int64_t> order;  // gathered: ids, then the padding rows

  TileRows(const std::vector<int64_t>& ids, int64_t r)
      : m(static_cast<int64_t>(ids.size())), padded(std::min(r, (m + GATHER_ROWS - 1) / GATHER_ROWS * GATHER_ROWS)),
        gather(padded < r) {
    if (!gather) return;
    order.assign(ids.begin(), ids.end());
    for (int64_t i = 0, q = 0; static_cast<int64_t>(order.size()) < padded; ++i) {
      if (q < m && ids[q] == i) ++q;  // ids is increasing: i is kept, not a padding row
      else order.push_back(i);
    }
  }
  // The tile row of the j-th kept row (chunk row i).
  int64_t at(int64_t j, int64_t i) const { return gather ? j : i; }
  // The hidden states [padded, H] the tile is projected from, of the chunk's `h` [r, H].
  Tensor select(const Tensor& h) const {
    if (!gather || !h.defined()) return h;
    return h.index_select(0, at::from_blob(const_cast<int64_t*>(order.data()), {padded}, at::TensorOptions().dtype(at::kLong)));
  }
};

// Fused-linear sweep over both streams' logit tiles (two projections per row): for each chunk of rows and
// vocabulary block, the transformed tiles of s and t, then f(q, zs, zt, c0, len) for each row q of the chunk
// (an index into `rows`; zs may be overwritten) at columns [c0, c0 + len), rows in parallel, then after(rows of the chunk, their
// student hidden states, the student tile [r, len], c0, len). With `pre` (one chunk: rows.size(0) ≤ row_chunk), a
// tile is formed only for the rows that keep it (TileRows), f is called for those alone, and `after` is not called.
// Returns the (row × column) entries projected, padding rows included.
template <typename A, typename F, typename G = NoBlockHook>
int64_t linear_pair_sweep(const Stream& s, const Stream& t, const Tensor& rows, Tiling tl, F&& f, G&& after = G(),
                          const TileSkips* pre = nullptr) {
  const int64_t n = rows.size(0), vv = s.valid_vocab;
  const Head<A> head_s = head_of<A>(s), head_t = head_of<A>(t);
  const LinearPlan plan(n, vv, tl);
  TORCH_CHECK(!pre || n <= plan.rows_per_chunk, "dopd cpu: tile skips need one chunk");
  Tensor buf_s = at::empty({plan.buffer()}, rows.options().dtype(s.acc()));
  Tensor buf_t = at::empty({plan.buffer()}, rows.options().dtype(s.acc()));
  std::vector<int64_t> ids;
  int64_t projected = 0;
  for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
    const int64_t r = std::min(plan.rows_per_chunk, n - r0);
    const Tensor rr = rows.narrow(0, r0, r);
    const Tensor hs = hidden_rows(s, rr), ht = hidden_rows(t, rr);
    for (int64_t c0 = 0; c0 < vv; c0 += plan.block) {
      const int64_t len = std::min(plan.block, vv - c0);
      ids.clear();
      for (int64_t i = 0; i < r; ++i)
        if (!pre || pre->kept(i, c0 / plan.block)) ids.push_back(i);
      if (ids.empty()) continue;
      const TileRows tr(ids, r);
      projected += tr.padded * len;
      const Tensor tile = counted_tile(s, tr.select(hs), c0, len, buf_s);
      A* ts = tile.data_ptr<A>();
      A* tt = counted_tile(t, tr.select(ht), c0, len, buf_t).data_ptr<A>();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
      for (int64_t j = 0; j < tr.m; ++j) {
        const int64_t at = tr.at(j, ids[j]) * len;
        head_transform(ts + at, len, head_s);
        head_transform(tt + at, len, head_t);
        f(r0 + ids[j], ts + at, tt + at, c0, len);
      }
      if (!pre) after(rr, hs, tile, c0, len);
    }
  }
  return projected;
}

// Value and gradient constant of fused-linear full-vocabulary rows from given log-sum-exps (hi, lo) [2, n]:
// one sweep of both streams' tiles (rows wider than one tile; see full_impl). With `sums` [rows of one chunk,
// tiles], also each tile's TileSums (zero for a skipped tile). With `pre` (one chunk), each row sums only the
// tiles it keeps; with `projected`, the entries the sweep projected are added to it.
template <int KIND, typename A>
std::tuple<Tensor, Tensor> value_impl(const Stream& s, const Stream& t, const Tensor& rows, const Tensor& lse_s,
                                      const Tensor& lse_t, double beta, Tiling tl, TileSums* sums = nullptr,
                                      const TileSkips* pre = nullptr, int64_t* projected = nullptr) {
  const int64_t n = rows.size(0);
  const A inv_tau = static_cast<A>(s.inv_tau);
  const DivParams<A> P = div_params<A>(KIND, beta);
  const SplitLse<A> ls(lse_s, s.acc(), n), lt(lse_t, s.acc(), n);
  Tensor value = at::zeros({n}, rows.options().dtype(at::kDouble));
  Tensor c = at::zeros({n}, rows.options().dtype(at::kDouble));
  double* vp = value.data_ptr<double>();
  double* cp = c.data_ptr<double>();
  const int64_t block = LinearPlan(n, s.valid_vocab, tl).block, tiles = (s.valid_vocab + block - 1) / block;
  if (sums) std::fill_n(sums, n * tiles, TileSums{});
  const int64_t formed = linear_pair_sweep<A>(s, t, rows, tl, [&](int64_t q, A* zs, const A* zt, int64_t c0, int64_t len) {
    value_segment<KIND>(zs, zt, len, inv_tau, ls.hi[q], ls.lo[q], lt.hi[q], lt.lo[q], P, vp[q], cp[q],
                        sums ? sums + q * tiles + c0 / block : nullptr);
  }, NoBlockHook(), pre);
  if (projected) *projected += formed;
  if (KIND == REVERSE_KL) c.copy_(value);
  return {value, c};
}

// -- gradient ------------------------------------------------------------------------------------

// What the gradient of one row needs besides its logits.
template <typename A>
struct GradRow {
  A ls, ls2, lt, lt2, c, dense, scale;  // log-sum-exps as (hi, lo) pairs
  double k;             // reverse KL: c + lse_s − lse_t (reverse_kl_offset)
  const int64_t* cols;  // few-column term: explicit columns [K] and their coefficients
  const A* sparse;
  bool overwrite;       // coefficients are the columns' whole gradient (else added to p·dense)
};

struct NoSkipHook {
  template <typename A>
  void operator()(const A*, int64_t) const {}
};

// Gradient of one block (τ · ∂D/∂z times `scale`, times the head's jacobian: with respect to the raw
// logits) into g; zs holds the transformed logits and g may alias it (element-wise in place). The block is
// first formed before the jacobian, explicit columns included, and shown to before_jacobian(g, len) (the skip
// rule's block masses, BlockSkipper); `jac` is scratch [len] for the jacobians, read before g overwrites zs
// (unused, may be null, when the head is the identity).
template <int KIND, bool FULL, typename A, typename Hook = NoSkipHook>
void grad_segment(const A* zs, const A* zt, A* g, int64_t c0, int64_t len, int64_t k, A inv_tau, const GradRow<A> r,
                  const DivParams<A> P, const Head<A> head, A* jac, Hook&& before_jacobian = Hook()) {
  const bool transform = !head.identity();
  if (transform) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) jac[j] = head.jacobian(zs[j]);
  }
  if constexpr (FULL) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const A xs = zs[j] * inv_tau, xt = zt[j] * inv_tau;
      const A lp = log_prob(xs, r.ls, r.ls2), lq = log_prob(xt, r.lt, r.lt2);
      g[j] = full_grad_term<KIND>(lp, lq, xs, xt, r.c, r.k, P) * r.scale;
    }
  } else {
    // A huge dense coefficient arrives folded into the log-sum-exp (RowTerm.dense_normalizer: ls − log|dense|
    // and dense = ±1), so p·dense never multiplies an underflowed p by an overflowing coefficient.
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) g[j] = dense_grad_term(log_prob(zs[j] * inv_tau, r.ls, r.ls2), r.dense) * r.scale;
    // The explicit columns inside this block: their whole gradient, or a sparse part added.
    for (int64_t q = 0; q < k; ++q) {
      const int64_t col = r.cols[q] - c0;
      if (col >= 0 && col < len) g[col] = (r.overwrite ? A(0) : g[col]) + r.sparse[q] * r.scale;
    }
  }
  before_jacobian(static_cast<const A*>(g), len);
  if (transform) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) g[j] *= jac[j];
  }
}

template <typename A>
const A* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<A>() : nullptr;
}

// The logits-mode gradient [N, V] a pass writes rows of (written once per element): in place when its dtype
// is the compute dtype and its columns contiguous, else through per-thread scratch converted on store.
template <typename A>
struct LogitsGrad {
  void* base;
  int64_t stride, step;
  bool direct;
  StoreFn<A> store;

  LogitsGrad(const std::optional<Tensor>& gl, at::ScalarType acc) {
    TORCH_CHECK(gl.has_value() && gl->defined() && gl->dim() == 2, "dopd cpu: logits mode needs grad_logits [N, V]");
    base = gl->data_ptr();
    stride = gl->stride(0);
    step = gl->stride(1);
    direct = gl->scalar_type() == acc && step == 1;
    store = storer<A>(gl->scalar_type());
  }
  // Where the gradient of columns [c0, c0 + len) of `row` is formed; commit() stores it.
  A* target(int64_t row, int64_t c0, A* scratch) const {
    return direct ? static_cast<A*>(base) + row * stride + c0 * step : scratch;
  }
  void commit(int64_t row, int64_t c0, const A* g, int64_t len) const {
    if (!direct) store(base, row * stride + c0 * step, step, g, len);
  }
};

// -- skipping negligible gradient blocks --------------------------------------------------------------
//
// dopd_kernels/skipping.py's rule, row by row (RowBudget with rows=1), where a fused-linear gradient sweep
// forms its tiles: a tile row's gradient u (times its scale, before the head's jacobian) is cut into blocks
// of SKIP_COLUMNS columns with masses m_b = Σ|u_v|; L = Σ_seen |u_v| + |Σ_seen u_v| ≤ ‖u‖₁ (a gradient through
// a softmax sums to zero); the allowance a = δ·L·(columns seen / V) − spent (0 when L is not finite) is spent
// on the row's cheapest blocks while their running sum stays ≤ a. So each row's skipped mass is at most
// δ‖u‖₁ (a backward error δ); a NaN or inf mass never fits, db stays exact. Per row of a chunk: three
// doubles; per tile: the keep bits [rows, blocks]. Sweeps run their tiles in column order from 0 and start
// each row (start_row) before its first tile, so `c0 + len` columns have been swept after a tile. A row may
// start with mass already spent: tiles skipped whole before they were formed (TileSkips, below).

// How many gradient entries (row × column) were offered to the contractions, how many were skipped, and how
// many of those were skipped before their logits were recomputed (TileSkips: no projection either); and how many
// entries of JS value sweeps were not projected (js_value_skips; less a correction sweep's), two projections each.
struct SkipCount {
  int64_t entries = 0, skipped = 0, unformed = 0, value_unformed = 0;
  SkipCount& operator+=(const SkipCount& o) {
    entries += o.entries, skipped += o.skipped, unformed += o.unformed, value_unformed += o.value_unformed;
    return *this;
  }
};

// δ for a student stored in `dtype` (0: never skip).
double skip_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return SKIP_TOLERANCE_FP32;
    case at::kBFloat16: return SKIP_TOLERANCE_BF16;
    case at::kHalf: return SKIP_TOLERANCE_FP16;
    default: return 0.0;
  }
}

// The δ a gradient sweep skips with: the caller's option `want`, a dH or dW to contract (`contracts`), a
// fused-linear student and a dtype with δ > 0; else 0 (never skip).
double skip_delta(bool want, const Stream& s, bool contracts) {
  return want && contracts && s.linear() ? skip_tolerance(s.x.scalar_type()) : 0.0;
}

// The skip state of one row chunk of a gradient sweep over `vocab` columns in tiles of at most `block`
// columns. decide() runs for distinct rows in parallel; contract() runs once per tile, after them.
struct BlockSkipper {
  double delta;
  int64_t vocab, chunk_rows, max_blocks;
  std::vector<double> abs_sum, sum, spent, mass;  // [chunk_rows] each; mass [chunk_rows, max_blocks]
  std::vector<int32_t> order;                     // [chunk_rows, max_blocks]: scratch of decide()
  std::vector<uint8_t> keep;                      // [chunk_rows, max_blocks]: the current tile's blocks to contract
  SkipCount count;

  // Skipping is on with `want` (the caller's option), a dH or dW to contract and a dtype with δ > 0.
  BlockSkipper(bool want, const Stream& s, bool contracts, int64_t chunk_rows_, int64_t block)
      : delta(skip_delta(want, s, contracts)), vocab(s.valid_vocab),
        chunk_rows(chunk_rows_), max_blocks((block + SKIP_COLUMNS - 1) / SKIP_COLUMNS) {
    if (!on()) return;
    const size_t cells = static_cast<size_t>(chunk_rows) * max_blocks;
    abs_sum.resize(chunk_rows);
    sum.resize(chunk_rows);
    spent.resize(chunk_rows);
    mass.resize(cells);
    order.resize(cells);
    keep.resize(cells);
  }
  bool on() const { return delta > 0; }

  // Row i (of the chunk) starts its sweep, `spent0` of its allowance already spent (TileSkips).
  void start_row(int64_t i, double spent0) {
    if (!on()) return;
    abs_sum[i] = sum[i] = 0.0;
    spent[i] = spent0;
  }

  // Row i (of the chunk) skips the tile of `len` columns whole (TileSkips): none of its blocks is contracted.
  void drop(int64_t i, int64_t len) {
    std::fill_n(keep.data() + i * max_blocks, (len + SKIP_COLUMNS - 1) / SKIP_COLUMNS, uint8_t(0));
  }

  // Row i (of the chunk) of the tile at columns [c0, c0 + len): u [len], its gradient before the jacobian.
  template <typename A>
  void decide(int64_t i, const A* u, int64_t c0, int64_t len) {
    const int64_t nb = (len + SKIP_COLUMNS - 1) / SKIP_COLUMNS;
    double* m = mass.data() + i * max_blocks;
    int32_t* ord = order.data() + i * max_blocks;
    uint8_t* kp = keep.data() + i * max_blocks;
    double total = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t j0 = b * SKIP_COLUMNS, j1 = std::min(len, j0 + SKIP_COLUMNS);
      double a = 0, t = 0;
#pragma omp simd reduction(+ : a, t)
      for (int64_t j = j0; j < j1; ++j) {
        a += std::abs(double(u[j]));
        t += double(u[j]);
      }
      m[b] = a;
      abs_sum[i] += a;
      total += t;
      ord[b] = static_cast<int32_t>(b);
      kp[b] = 1;
    }
    sum[i] += total;
    const double lower = abs_sum[i] + std::abs(sum[i]);  // L ≤ ‖u‖₁
    const double released = std::min(1.0, double(c0 + len) / double(vocab));
    const double allowance = std::isfinite(lower) ? std::max(0.0, delta * lower * released - spent[i]) : 0.0;
    // Cheapest blocks first, NaN masses last (ties to the lower block): the longest prefix within the allowance.
    std::sort(ord, ord + nb, [m](int32_t x, int32_t y) {
      if (std::isnan(m[x]) || std::isnan(m[y])) return !std::isnan(m[x]) && std::isnan(m[y]);
      return m[x] < m[y] || (m[x] == m[y] && x < y);
    });
    double running = 0;
    for (int64_t q = 0; q < nb; ++q) {
      running += m[ord[q]];
      if (!(running <= allowance)) break;
      kp[ord[q]] = 0;
      spent[i] += m[ord[q]];
    }
  }

  // The gradient tile g [r, len] (with respect to the raw logits) of the chunk's rows `ids` [r] (null: its first
  // r rows) contracted into dh_rows [r, H] and dw for the blocks each row keeps (h: the rows' hidden states
  // [r, H]); db over the whole tile. Runs of consecutive blocks kept by the same rows contract at once,
  // gathering those rows when they are not all of them: skipped entries cost no FLOPs. With skipping off, the
  // whole tile (contract_tile).
  void contract(const Stream& s, const Tensor& g, const Tensor& h, int64_t c0, int64_t len, const Tensor& dh_rows,
                const std::optional<Tensor>& dw, const std::optional<Tensor>& db, const int64_t* ids = nullptr) {
    if (!on()) return contract_tile(s, g, h, c0, len, dh_rows, dw, db);
    if (db.has_value() && db->defined()) db->narrow(0, c0, len).add_(g.sum(0));
    const int64_t r = g.size(0), nb = (len + SKIP_COLUMNS - 1) / SKIP_COLUMNS;
    auto kept = [&](int64_t i, int64_t b) { return keep[(ids ? ids[i] : i) * max_blocks + b] != 0; };
    auto same = [&](int64_t b, int64_t b2) {
      for (int64_t i = 0; i < r; ++i)
        if (kept(i, b) != kept(i, b2)) return false;
      return true;
    };
    count.entries += r * len;
    std::vector<int64_t> idx;
    for (int64_t b0 = 0, b1; b0 < nb; b0 = b1) {
      for (b1 = b0 + 1; b1 < nb && same(b0, b1);) ++b1;
      const int64_t j0 = b0 * SKIP_COLUMNS, width = std::min(len, b1 * SKIP_COLUMNS) - j0;
      idx.clear();
      for (int64_t i = 0; i < r; ++i)
        if (kept(i, b0)) idx.push_back(i);
      const int64_t n_b = static_cast<int64_t>(idx.size());
      count.skipped += (r - n_b) * width;
      if (n_b == r) {
        contract_tile(s, g.narrow(1, j0, width), h, c0 + j0, width, dh_rows, dw, std::nullopt);
      } else if (n_b > 0) {
        const Tensor at_rows = at::from_blob(idx.data(), {n_b}, at::TensorOptions().dtype(at::kLong));
        const Tensor dh_part = dh_rows.defined() ? at::zeros({n_b, dh_rows.size(1)}, dh_rows.options()) : Tensor();
        const Tensor h_b = dw.has_value() && dw->defined() ? h.index_select(0, at_rows) : Tensor();
        contract_tile(s, g.narrow(1, j0, width).index_select(0, at_rows), h_b, c0 + j0, width, dh_part, dw, std::nullopt);
        if (dh_rows.defined()) dh_rows.index_add_(0, at_rows, dh_part);
      }
    }
  }
};

// -- skipping whole tiles before they are formed ------------------------------------------------------
//
// A full-vocabulary reverse / forward KL row wider than one tile gets its log-sum-exps and value in one
// online sweep (KlState) that sees each of its tiles T once. A few numbers of that sweep per (row, tile)
// (TileMass) bound the L1 mass of the tile's gradient u (τ·∂D/∂z, before the scale and the jacobian) without
// forming it, with P_T = Σ_T p_v, Q_T = Σ_T q_v, D_v = x_s,v − x_t,v (scaled logits), K = E_p[D] (KlState):
//   reverse KL, u_v = p_v(log p_v − log q_v − c) = p_v(D_v − K):  ‖u_T‖₁ ≤ P_T · max(|Dmax_T − K|, |Dmin_T − K|),
//   forward KL, u_v = p_v − q_v:                                   ‖u_T‖₁ ≤ P_T + Q_T,
// and their tile sums bound the row's mass from below, ‖u‖₁ ≥ Σ_T |Σ_{v∈T} u_v| =: L, with Σ_T u_v =
// P_T(D̄_T − K) (D̄_T: the p-weighted mean of D over T) and P_T − Q_T. skipping.py's rule on these: a
// row skips its tiles of smallest bound while their running sum stays ≤ δ·L ≤ δ‖u‖₁ (none when L is not
// finite). Its gradient sweep neither recomputes nor contracts those tiles (the rows that keep a tile are
// gathered) and starts the row's BlockSkipper with their bounds spent, so that the row's total skipped mass
// stays ≤ δ‖u‖₁: the guarantee of skipping.py, now also saving the two recomputed projections. The bounds
// come from the computed statistics: their rounding moves them by a few fp32 ulps (relative), far inside δ.

// One tile of KL(a‖b)'s two streams in the online sweep (online_segment).
template <typename A>
struct TileMass {
  LseState<A> a, b;  // (max, Σ exp(x − max)) of the tile's scaled logits
  A dmin, dmax;      // reverse KL: the range of x_a − x_b over the tile's columns where x_a > −inf
  double w, sw;      // Σ e^{x_a − a.m}(x_a − x_b) and Σ e^{x_a − a.m}, as KlState's
};

// The tiles to skip of `rows` rows: bounds(i, bound) writes row i's upper bounds of ‖u_T‖₁ [tiles] and returns
// its lower bound L ≤ ‖u‖₁. A row skips its tiles of smallest bound (NaN last, ties to the lower tile) while their
// running sum stays ≤ δ·L; none when L is not finite. With `forced`, row i first skips the tiles `forced` leaves
// out, their mass forced->spent[i]; a row that leaves a tile out but whose mass alone exceeds δ·L (or whose L is
// not finite) skips nothing and is marked in `failed`.
template <typename F>
TileSkips plan_tile_skips(int64_t rows, int64_t tiles, double delta, F&& bounds, const TileSkips* forced = nullptr,
                          std::vector<uint8_t>* failed = nullptr) {
  TileSkips out{tiles, std::vector<uint8_t>(rows * tiles, 1), std::vector<double>(rows, 0.0)};
  if (failed) failed->assign(rows, 0);
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<double> bound(tiles);
    std::vector<int64_t> ord(tiles);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const double lower = bounds(i, bound.data());
      double running = forced ? forced->spent[i] : 0.0;
      if (!std::isfinite(lower) || !(running <= delta * lower)) {
        if (forced && std::count(forced->keep.begin() + i * tiles, forced->keep.begin() + (i + 1) * tiles, 0))
          (*failed)[i] = 1;
        continue;
      }
      if (forced) std::copy_n(forced->keep.begin() + i * tiles, tiles, out.keep.begin() + i * tiles);
      out.spent[i] = running;
      for (int64_t q = 0; q < tiles; ++q) ord[q] = q;
      std::sort(ord.begin(), ord.end(), [&](int64_t u, int64_t v) {
        if (std::isnan(bound[u]) || std::isnan(bound[v])) return !std::isnan(bound[u]) && std::isnan(bound[v]);
        return bound[u] < bound[v] || (bound[u] == bound[v] && u < v);
      });
      for (int64_t q = 0; q < tiles; ++q) {
        if (!out.kept(i, ord[q])) continue;  // forced
        running += bound[ord[q]];
        if (!(running <= delta * lower)) break;
        out.keep[i * tiles + ord[q]] = 0;
        out.spent[i] = running;
      }
    }
  }
  return out;
}

// The bounds of a row from its online sweep (state st, tiles mass [tiles]): see above.
template <int KIND, typename A>
double online_bounds(const KlState<A>& st, const TileMass<A>* mass, int64_t tiles, double* bound) {
  const double la = double(st.a.m) + std::log(double(st.a.s)), lb = double(st.b.m) + std::log(double(st.b.s));
  const double k = KIND == REVERSE_KL ? kl_mean_difference(st) : 0.0;  // reverse KL: a = p, b = q
  double lower = 0;
  for (int64_t q = 0; q < tiles; ++q) {
    const TileMass<A>& m = mass[q];
    const double pa = tile_share(m.a, la);
    if constexpr (KIND == REVERSE_KL) {
      if (pa == 0) {
        bound[q] = 0;
        continue;
      }
      const double mean = m.w / m.sw;  // D̄_T
      bound[q] = pa * std::max(std::abs(double(m.dmax) - k), std::abs(double(m.dmin) - k));
      lower += pa * std::abs(mean - k);
    } else {  // forward KL: a = q (teacher), b = p (student)
      const double pb = tile_share(m.b, lb);
      bound[q] = pa + pb;
      lower += std::abs(pb - pa);
    }
  }
  return lower;
}

// The bounds of a row from its value sweep (tiles sums [tiles], gradient constant c), log-sum-exps given: with
// u_v = p_v(a_v − c), ‖u_T‖₁ ≤ Σ_T p_v|a_v| + |c|·P_T and Σ_T u_v = Σ_T p_v a_v − c·P_T; forward KL as above.
template <int KIND>
double value_bounds(const TileSums* sums, double c, int64_t tiles, double* bound) {
  double lower = 0;
  for (int64_t q = 0; q < tiles; ++q) {
    const TileSums& m = sums[q];
    if constexpr (KIND == FORWARD_KL) {
      bound[q] = m.p + m.q;
      lower += std::abs(m.p - m.q);
    } else {
      bound[q] = m.pa_abs + std::abs(c) * m.p;
      lower += std::abs(m.pa - c * m.p);
    }
  }
  return lower;
}

// -- skipping whole tiles of a JS row's value sweep --------------------------------------------------
//
// JS sweeps its log-sum-exps first, then its value and constant c = β KL(p‖m) (log m_v is not separable), and its
// gradient needs c before any tile. The log-sum-exp sweep's TileMass gives each tile's share of both streams'
// mass, P_T and Q_T, and these bound the tile's terms without forming them. With m = βp + (1−β)q ≥ βp,
// p·log(p/m) ≤ p·log(1/β), and log x ≥ 1 − 1/x gives p·log(p/m) ≥ p − m = (1−β)(p − q) ≥ −(1−β)q, so (for q
// with β and 1 − β swapped)
//   |Σ_T β p log(p/m)|      ≤ a_T = β·max(P_T log(1/β), (1−β) Q_T),
//   |Σ_T (1−β) q log(q/m)|  ≤ b_T = (1−β)·max(Q_T log(1/(1−β)), β P_T),
//   Σ_T β p |log(p/m)|      ≤ e_T = β(P_T log(1/β) + (1−β) Q_T).
// The JS of the tiles' masses, J = Σ_T β P_T log(P_T/M_T) + (1−β) Q_T log(Q_T/M_T) (M_T = βP_T + (1−β)Q_T), is at
// most the row's (merging columns never increases a divergence). A row leaves out of its value sweep its tiles
// of smallest a_T + b_T while their sum stays ≤ s·δ·J (js_value_skips; s = SKIP_VALUE_SHARE = 1/4): its value
// errs by at most δ/4 relative, and its constant c̃, summed over the kept tiles, by at most E_c = Σ_skipped a_T.
// Its gradient sweep leaves those tiles out too, each of mass ‖u_T‖₁ = Σ_T p|β log(p/m) − c| ≤ e_T + (|c̃| + E_c)·P_T;
// the kept tiles' gradients, formed with c̃, err by E_c·Σ p ≤ E_c, and their block rule, whose lower bound is of
// ‖ũ‖₁ ≤ ‖u‖₁ + E_c, by δ·E_c more. That sum starts the row's gradient plan (js_gradient_start; plan_tile_skips with `forced`), whose lower
// bound, Σ_kept |Σ_T ũ_v| − E_c, is ≤ ‖u‖₁. That start is ~2–3× the value's skipped bound mass (e_T ≤ 2a_T, the
// c terms), hence the share s = 1/4: it fits δ‖u‖₁ unless ‖u‖₁ falls below ~J (near-disjoint streams, whose
// gradient vanishes while their JS does not). A row where it does not fit takes a correction sweep of the tiles
// it left out (formed as the first sweep's, padded alike, so their logits round alike) and plans as without value
// skips: skipping.py's guarantee holds for every row.

// a_T, b_T, e_T of a tile with shares p = P_T, q = Q_T.
struct JsTileBound {
  double a, b, e;
};

inline JsTileBound js_tile_bound(double p, double q, double beta) {
  const double lb = -std::log(beta), l1b = -std::log1p(-beta);
  return {beta * std::max(p * lb, (1 - beta) * q), (1 - beta) * std::max(q * l1b, beta * p),
          beta * (p * lb + (1 - beta) * q)};
}

// x·log(x/y), 0 at x = 0.
inline double xlog_ratio(double x, double y) { return x > 0 ? x * std::log(x / y) : 0.0; }

// The shares P_T, Q_T of the tiles of the rows of a JS log-sum-exp sweep: states st [rows], tile masses [rows, tiles].
template <typename A>
struct JsShares {
  const KlState<A>* st;
  const TileMass<A>* mass;
  int64_t tiles;
  std::pair<double, double> operator()(int64_t i, int64_t q) const {
    const double lp = double(st[i].a.m) + std::log(double(st[i].a.s)), lq = double(st[i].b.m) + std::log(double(st[i].b.s));
    return {tile_share(mass[i * tiles + q].a, lp), tile_share(mass[i * tiles + q].b, lq)};
  }
};

// The same shares given as log P_T, log Q_T [rows, tiles] (the stats pass's, stats_impl with `shares`: DOPD's HT rows).
struct LogShares {
  const float *ls, *lt;
  int64_t tiles;
  std::pair<double, double> operator()(int64_t i, int64_t q) const {
    return {std::exp(double(ls[i * tiles + q])), std::exp(double(lt[i * tiles + q]))};
  }
};

// The value sweep's tile skips of `rows` JS rows, within SKIP_VALUE_SHARE·δ·J (Shares: JsShares or LogShares).
template <typename Shares>
TileSkips js_value_skips(const Shares& shares, int64_t rows, double beta, double delta) {
  return plan_tile_skips(rows, shares.tiles, SKIP_VALUE_SHARE * delta, [&](int64_t i, double* bound) {
    double j = 0;
    for (int64_t q = 0; q < shares.tiles; ++q) {
      const auto [p_t, q_t] = shares(i, q);
      const JsTileBound b = js_tile_bound(p_t, q_t, beta);
      const double m_t = beta * p_t + (1 - beta) * q_t;
      bound[q] = b.a + b.b;
      j += beta * xlog_ratio(p_t, m_t) + (1 - beta) * xlog_ratio(q_t, m_t);
    }
    return j;  // J ≤ the row's JS
  });
}

// The start of a JS row's gradient plan after a value sweep that left out `vskip`'s tiles: those tiles forced,
// spent Σ_skipped (e_T + (|c̃| + E_c) P_T) + (1 + δ)E_c, and each row's E_c.
struct JsGradientStart {
  TileSkips forced;
  std::vector<double> ec;
};

template <typename Shares>
JsGradientStart js_gradient_start(const TileSkips& vskip, const Shares& shares, const double* c, int64_t rows,
                                  double beta, double delta) {
  const int64_t tiles = vskip.tiles;
  JsGradientStart out{{tiles, vskip.keep, std::vector<double>(rows, 0.0)}, std::vector<double>(rows, 0.0)};
  for (int64_t i = 0; i < rows; ++i) {
    double ec = 0, mass = 0, share = 0;
    for (int64_t q = 0; q < tiles; ++q) {
      if (vskip.kept(i, q)) continue;
      const auto [p_t, q_t] = shares(i, q);
      const JsTileBound b = js_tile_bound(p_t, q_t, beta);
      ec += b.a, mass += b.e, share += p_t;
    }
    out.ec[i] = ec;
    out.forced.spent[i] = mass + (std::abs(c[i]) + ec) * share + (1 + delta) * ec;
  }
  return out;
}

// grad_pass (see passes_cpu.h); with `skip`, fused-linear tiles leave out their negligible blocks (BlockSkipper),
// counted in the result. `pre` (full-vocabulary rows, fused-linear, the chunk's rows: rows.size(0) ≤ row_chunk):
// the tiles each row skips whole (TileSkips), neither recomputed nor contracted.
template <int KIND, bool FULL, typename A>
SkipCount grad_impl(const Stream& s, const Stream* t, const Tensor& rows, const Tensor& lse_s,
                    const std::optional<Tensor>& lse_t, const std::optional<Tensor>& c, const std::optional<Tensor>& dense,
                    const std::optional<Tensor>& cols, const std::optional<Tensor>& sparse, bool overwrite,
                    const Tensor& scale, double beta, Tiling tl, const std::optional<Tensor>& grad_logits,
                    const std::optional<Tensor>& dh, const std::optional<Tensor>& dw, const std::optional<Tensor>& db,
                    bool skip, const TileSkips* pre = nullptr) {
  const int64_t n = rows.size(0), vv = s.valid_vocab;
  const A inv_tau = static_cast<A>(s.inv_tau);
  const DivParams<A> P = div_params<A>(KIND, beta);
  const int64_t* rp = rows.data_ptr<int64_t>();
  auto as_acc = [&](const std::optional<Tensor>& x) -> std::optional<Tensor> {
    if (!x.has_value() || !x->defined()) return std::nullopt;
    return x->to(s.acc()).contiguous();
  };
  const Tensor sc_c = scale.to(s.acc()).contiguous();
  const SplitLse<A> ls(lse_s, s.acc(), n);
  const std::optional<SplitLse<A>> lt = FULL ? std::optional<SplitLse<A>>(SplitLse<A>(*lse_t, s.acc(), n)) : std::nullopt;
  const std::optional<Tensor> c_c = as_acc(c), dense_c = as_acc(dense), sparse_c = as_acc(sparse);
  const std::optional<Tensor> cols_c = cols.has_value() && cols->defined() ? std::optional<Tensor>(cols->contiguous()) : std::nullopt;
  const A *sc = sc_c.data_ptr<A>(), *cc = data_or_null<A>(c_c), *dn = data_or_null<A>(dense_c), *sp = data_or_null<A>(sparse_c);
  // Reverse KL's k (reverse_kl_offset) from the constant in float64: its fp32 cast would round it at ~1e-5.
  const std::optional<Tensor> c_d = KIND == REVERSE_KL && FULL ? std::optional<Tensor>(c->to(at::kDouble).contiguous()) : std::nullopt;
  const double* cd = c_d ? c_d->data_ptr<double>() : nullptr;
  const int64_t* cl = cols_c ? cols_c->data_ptr<int64_t>() : nullptr;
  const int64_t k = cols_c ? cols_c->size(1) : 0;
  auto row_of = [&](int64_t i) {
    return GradRow<A>{ls.hi[i], ls.lo[i], FULL ? lt->hi[i] : A(0), FULL ? lt->lo[i] : A(0), (FULL && cc) ? cc[i] : A(0),
                      FULL ? A(0) : dn[i], sc[i], cd ? reverse_kl_offset(cd[i], ls.hi[i], ls.lo[i], lt->hi[i], lt->lo[i]) : 0.0,
                      FULL ? nullptr : cl + i * k, FULL ? nullptr : sp + i * k, overwrite};
  };

  if (!s.linear()) {
    const LogitsGrad<A> out(grad_logits, s.acc());
    const Rows<A> xs(s.x);
    const std::optional<Rows<A>> xt = FULL ? std::optional<Rows<A>>(Rows<A>(t->x)) : std::nullopt;
    const int64_t block = std::max<int64_t>(1, std::min(tl.vocab_chunk, vv));
    const Head<A> none = make_head<A>(1.0, 0.0);
#pragma omp parallel num_threads(num_threads())
    {
      Scratch<A> scr(block);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) {
        const GradRow<A> r = row_of(i);
        for (int64_t c0 = 0; c0 < vv; c0 += block) {
          const int64_t len = std::min(block, vv - c0);
          A* g = out.target(rp[i], c0, scr.g.data());
          const A* zs = xs.segment(rp[i], c0, len, scr.s.data());
          const A* zt = FULL ? xt->segment(rp[i], c0, len, scr.t.data()) : nullptr;
          grad_segment<KIND, FULL>(zs, zt, g, c0, len, k, inv_tau, r, P, none, static_cast<A*>(nullptr));
          out.commit(rp[i], c0, g, len);
        }
      }
    }
    return {};  // logits mode: the gradient tile is the output, no contraction to skip
  }

  const bool want_dh = dh.has_value() && dh->defined(), want_dw = dw.has_value() && dw->defined();
  const Head<A> head_s = head_of<A>(s), head_t = FULL ? head_of<A>(*t) : head_s;
  const LinearPlan plan(n, vv, tl);
  Tensor buf_s = at::empty({plan.buffer()}, rows.options().dtype(s.acc()));
  Tensor buf_t = FULL ? at::empty({plan.buffer()}, rows.options().dtype(s.acc())) : Tensor();
  BlockSkipper skipper(skip, s, want_dh || want_dw, plan.rows_per_chunk, plan.block);
  TORCH_CHECK(!pre || (FULL && skipper.on() && n <= plan.rows_per_chunk), "dopd cpu: tile skips need one skipping chunk");
  std::vector<int64_t> ids;  // the chunk's rows that form the current tile
  for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
    const int64_t r = std::min(plan.rows_per_chunk, n - r0);
    const Tensor rr = rows.narrow(0, r0, r);
    const Tensor hs = hidden_rows(s, rr);
    const Tensor ht = FULL ? hidden_rows(*t, rr) : Tensor();
    Tensor dh_rows = want_dh ? at::zeros({r, s.x.size(1)}, rows.options().dtype(s.acc())) : Tensor();
    // The tiles' bounds are of the unscaled τ·∂D/∂z; the skipper's masses carry the row's scale. A row of
    // non-finite scale keeps every tile: its NaN or inf reaches every column, as without skipping.
    auto skips_tiles = [&](int64_t i) { return pre && std::isfinite(double(sc[r0 + i])); };
    for (int64_t i = 0; i < r; ++i)
      skipper.start_row(i, skips_tiles(i) ? pre->spent[i] * std::abs(double(sc[r0 + i])) : 0.0);
    for (int64_t c0 = 0; c0 < vv; c0 += plan.block) {
      const int64_t len = std::min(plan.block, vv - c0);
      ids.clear();
      for (int64_t i = 0; i < r; ++i)
        if (!skips_tiles(i) || pre->kept(i, c0 / plan.block)) ids.push_back(i);
      const int64_t m = static_cast<int64_t>(ids.size());
      if (m == 0) {
        skipper.count += SkipCount{r * len, r * len, r * len};
        continue;
      }
      // The rows that keep the tile are gathered (TileRows); with the chunk's whole tile projected, the rows that
      // skip it contract nothing.
      const TileRows tr(ids, r);
      const bool gather = tr.gather;
      const Tensor hs_m = tr.select(hs), ht_m = tr.select(ht);
      Tensor dh_m = dh_rows, at_ids;
      if (gather) {
        at_ids = at::from_blob(ids.data(), {m}, at::TensorOptions().dtype(at::kLong));
        if (want_dh) dh_m = at::zeros({m, dh_rows.size(1)}, dh_rows.options());
        skipper.count += SkipCount{(r - m) * len, (r - m) * len, (r - tr.padded) * len};
      }
      const Tensor tile_all = counted_tile(s, hs_m, c0, len, buf_s);
      A* ts = tile_all.data_ptr<A>();
      A* tt = FULL ? counted_tile(*t, ht_m, c0, len, buf_t).data_ptr<A>() : nullptr;
#pragma omp parallel num_threads(num_threads())
      {
        std::vector<A> jac(head_s.identity() ? 0 : len);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < m; ++j) {
          const int64_t i = ids[j], at = tr.at(j, i);  // chunk row, tile row
          head_transform(ts + at * len, len, head_s);
          if (FULL) head_transform(tt + at * len, len, head_t);
          grad_segment<KIND, FULL>(ts + at * len, FULL ? tt + at * len : nullptr, ts + at * len, c0, len, k, inv_tau,
                                   row_of(r0 + i), P, head_s, jac.data(), [&](const A* u, int64_t) {
                                     if (skipper.on()) skipper.decide(i, u, c0, len);
                                   });
        }
      }
      if (gather) {
        skipper.contract(s, tile_all.narrow(0, 0, m), hs_m.narrow(0, 0, m), c0, len, dh_m, dw, db, ids.data());
        if (want_dh) dh_rows.index_add_(0, at_ids, dh_m);
      } else {
        for (int64_t i = 0, q = 0; i < r; ++i) {  // the rows that skip the tile: a zero gradient, not contracted
          if (q < m && ids[q] == i) {
            ++q;
          } else {
            std::fill(ts + i * len, ts + (i + 1) * len, A(0));
            skipper.drop(i, len);
          }
        }
        skipper.contract(s, tile_all, hs, c0, len, dh_rows, dw, db);  // the gradient tile, now in `tile_all`
      }
    }
    if (want_dh) dh->index_add_(0, rr, dh_rows);
  }
  return skipper.count;
}

// -- full-vocabulary rows in the fewest sweeps ------------------------------------------------------
//
// The value of a row needs both log-sum-exps; its gradient p_v(… − c) needs the row constant c (reverse KL:
// the KL; JS: β KL(p‖m)), known only once the whole row is summed. A fused-linear row that fits one tile is
// done in one sweep (its logits computed once: log-sum-exps when not given, value, c, gradient); in logits
// mode a thread runs a row's phases one after the other (full_row); a fused-linear row wider than a tile takes
// one sweep per quantity that needs the previous one complete: reverse / forward KL without given
// log-sum-exps compute them and the value online in one sweep (KlState), JS computes them first (log m_v is
// not separable), and the gradient follows in a last sweep that recomputes the tiles.

template <typename F>
void for_blocks(int64_t vv, int64_t block, F&& f) {
  for (int64_t c0 = 0; c0 < vv; c0 += block) f(c0, std::min(block, vv - c0));
}

// Merge one block of both streams (logits zs, zt, scaled by inv_tau) into a row's KlState: the two
// log-sum-exps and, for reverse / forward KL, W (row_math.h). JS keeps only the log-sum-exps: its log m_v =
// log(β p_v + (1−β) q_v) mixes the normalised distributions, so no running sum rescales into Σ p log(p/m).
// With `tile`, also the block's TileMass.
template <int KIND, typename A>
void online_segment(const A* zs, const A* zt, int64_t len, A inv_tau, KlState<A>& st, TileMass<A>* tile = nullptr) {
  const A* za = KIND == FORWARD_KL ? zt : zs;  // the weighting stream a of KL(a‖b)
  const A* zb = KIND == FORWARD_KL ? zs : zt;
  A ma = neg_inf<A>(), mb = neg_inf<A>(), sa = 0, sb = 0;
  int nan_a = 0, nan_b = 0;
#pragma omp simd reduction(max : ma, mb) reduction(+ : nan_a, nan_b)
  for (int64_t j = 0; j < len; ++j) {
    ma = std::max(ma, za[j] * inv_tau);
    mb = std::max(mb, zb[j] * inv_tau);
    nan_a += za[j] != za[j];
    nan_b += zb[j] != zb[j];
  }
  if (ma > neg_inf<A>()) {
#pragma omp simd reduction(+ : sa)
    for (int64_t j = 0; j < len; ++j) sa += fexp(za[j] * inv_tau - ma);
  }
  if (mb > neg_inf<A>()) {
#pragma omp simd reduction(+ : sb)
    for (int64_t j = 0; j < len; ++j) sb += fexp(zb[j] * inv_tau - mb);
  }
  // A NaN logit makes its stream's sum NaN for good (see lse_merge), as in stats_segment.
  KlState<A> seg{{ma, nan_a ? std::numeric_limits<A>::quiet_NaN() : sa},
                 {mb, nan_b ? std::numeric_limits<A>::quiet_NaN() : sb}, 0.0, 0.0};
  if constexpr (KIND != JS) {
    if (ma > neg_inf<A>()) {
      // D_v = x_a − x_b in float64: exact for fp32 logits. A column where b has no mass and a has some gives
      // D_v = +inf, so KL = +inf, as value_term gives.
      double w = 0, sw = 0;
#pragma omp simd reduction(+ : w, sw)
      for (int64_t j = 0; j < len; ++j) {
        const A x = za[j] * inv_tau;
        const double e = double(fexp(x - ma));
        w += x > neg_inf<A>() ? e * (double(x) - double(zb[j] * inv_tau)) : 0.0;
        sw += e;
      }
      seg.w = w;
      seg.sw = sw;
    }
    if (tile) {
      A dmin = HUGE_VAL, dmax = -HUGE_VAL;
      if constexpr (KIND == REVERSE_KL) {
#pragma omp simd reduction(min : dmin) reduction(max : dmax)
        for (int64_t j = 0; j < len; ++j) {
          const A x = za[j] * inv_tau, d = x - zb[j] * inv_tau;
          dmin = std::min(dmin, x > neg_inf<A>() ? d : A(HUGE_VAL));
          dmax = std::max(dmax, x > neg_inf<A>() ? d : A(-HUGE_VAL));
        }
      }
      *tile = {seg.a, seg.b, dmin, dmax, seg.w, seg.sw};
    }
  } else if (tile) {
    *tile = {seg.a, seg.b, A(0), A(0), 0.0, 0.0};  // JS: the streams' shares alone (js_value_skips)
  }
  st = kl_merge(st, seg);
}

// A log-sum-exp state as split_lse's (hi, lo): max + log Σ added in float64 (Stats.lse), then split.
template <typename A>
void split_state(const LseState<A>& st, A& hi, A& lo) {
  const double l = double(st.m) + double(lse_log_sum(st));
  hi = static_cast<A>(l);
  lo = static_cast<A>(l - double(hi));
}

// What full_pass returns for one row: the log-sum-exps it computed (when not given), value and constant.
template <typename A>
struct FullRow {
  LseState<A> s, t;
  double value = 0, c = 0;
};

// The end of phase 1: a row's log-sum-exps (also into r's (hi, lo) pairs) and, for reverse / forward KL, its value.
template <int KIND, typename A>
FullRow<A> finish_online(const KlState<A>& st, GradRow<A>& r) {
  FullRow<A> out;
  out.s = KIND == FORWARD_KL ? st.b : st.a;
  out.t = KIND == FORWARD_KL ? st.a : st.b;
  split_state(out.s, r.ls, r.ls2);
  split_state(out.t, r.lt, r.lt2);
  if constexpr (KIND != JS) out.value = kl_value(st);
  return out;
}

// One full-vocabulary row in the fewest passes over its columns, read in blocks by load(c0, len, zs, zt):
// phase 1 without given log-sum-exps (online_segment), phase 2 for JS or given log-sum-exps (value_segment),
// then with `grad` the gradient, emit(c0, len, zs, zt, r) (grad_segment). r holds the given (hi, lo) pairs and
// the scale.
template <int KIND, typename A, typename Load, typename Emit>
FullRow<A> full_row(int64_t vv, int64_t block, A inv_tau, const DivParams<A> P, GradRow<A> r, bool given, bool grad,
                    Load&& load, Emit&& emit) {
  const A *zs, *zt;
  FullRow<A> out;
  if (!given) {
    KlState<A> st = kl_empty<A>();
    for_blocks(vv, block, [&](int64_t c0, int64_t len) {
      load(c0, len, zs, zt);
      online_segment<KIND>(zs, zt, len, inv_tau, st);
    });
    out = finish_online<KIND>(st, r);
  }
  if (given || KIND == JS) {
    for_blocks(vv, block, [&](int64_t c0, int64_t len) {
      load(c0, len, zs, zt);
      value_segment<KIND>(zs, zt, len, inv_tau, r.ls, r.ls2, r.lt, r.lt2, P, out.value, out.c);
    });
  }
  if (KIND == REVERSE_KL) out.c = out.value;
  if (grad) {
    r.c = static_cast<A>(out.c);
    r.k = reverse_kl_offset(out.c, r.ls, r.ls2, r.lt, r.lt2);
    for_blocks(vv, block, [&](int64_t c0, int64_t len) {
      load(c0, len, zs, zt);
      emit(c0, len, zs, zt, r);
    });
  }
  return out;
}

// full_pass: the log-sum-exp parts [4, n] (max_s, log Σ_s, max_t, log Σ_t; undefined when given), value, c, and
// the tile skips planned for a later grad_pass (keep [n, tiles] bool, spent [n] float64; undefined unless planned).
// With `skip`, the fused-linear gradient tiles leave out their negligible blocks (BlockSkipper), counted in the
// result; without `scale`, `skip` plans the whole tiles a wide row may skip in a later grad_pass instead.
template <int KIND, typename A>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, SkipCount> full_impl(const Stream& s, const Stream& t, const Tensor& rows,
                                                        const std::optional<Tensor>& lse_s,
                                                        const std::optional<Tensor>& lse_t, double beta,
                                                        const std::optional<Tensor>& scale, Tiling tl,
                                                        const std::optional<Tensor>& grad_logits,
                                                        const std::optional<Tensor>& dh,
                                                        const std::optional<Tensor>& dw,
                                                        const std::optional<Tensor>& db, bool skip,
                                                        const std::optional<Tensor>& shares_s,
                                                        const std::optional<Tensor>& shares_t) {
  const int64_t n = rows.size(0), vv = s.valid_vocab;
  const bool given = lse_s.has_value() && lse_s->defined(), grad = scale.has_value() && scale->defined();
  const A inv_tau = static_cast<A>(s.inv_tau);
  const DivParams<A> P = div_params<A>(KIND, beta);
  const int64_t* rp = rows.data_ptr<int64_t>();
  Tensor value = at::zeros({n}, rows.options().dtype(at::kDouble)), c = at::zeros_like(value);
  Tensor parts = given ? Tensor() : at::empty({4, n}, rows.options().dtype(s.acc()));
  double *vp = value.data_ptr<double>(), *cp = c.data_ptr<double>();
  A* pp = given ? nullptr : parts.data_ptr<A>();
  auto keep = [&](int64_t q, const FullRow<A>& o) {
    vp[q] = o.value;
    cp[q] = o.c;
    if (given) return;
    pp[q] = o.s.m;
    pp[n + q] = lse_log_sum(o.s);
    pp[2 * n + q] = o.t.m;
    pp[3 * n + q] = lse_log_sum(o.t);
  };

  if (s.linear() && vv > tl.vocab_chunk) {
    // Rows wider than one tile: sweeps over row-chunk tiles (no [chunk, V] buffer).
    Tensor l2s = given ? *lse_s : at::empty({2, n}, rows.options().dtype(s.acc()));
    Tensor l2t = given ? *lse_t : at::empty_like(l2s);
    SkipCount count;
    const LinearPlan plan(n, vv, tl);
    const int64_t tiles = (vv + plan.block - 1) / plan.block;
    const bool contracts = (dh.has_value() && dh->defined()) || (dw.has_value() && dw->defined());
    // The δ the tiles are bounded with: the gradient sweep's own, or (no `scale`) that of a later grad_pass that
    // contracts, for whole tiles planned now and skipped then (the bounds are of the unscaled gradient).
    const double delta = grad ? skip_delta(skip, s, contracts) : skip_delta(skip, s, true);
    Tensor keep_out, spent_out;  // the planned tile skips (no `scale`)
    if (!grad && delta > 0) {
      keep_out = at::ones({n, tiles}, rows.options().dtype(at::kBool));
      spent_out = at::zeros({n}, rows.options().dtype(at::kDouble));
    }
    auto store = [&](int64_t r0, int64_t r, const TileSkips& pre) {
      std::copy(pre.keep.begin(), pre.keep.begin() + r * tiles, keep_out.data_ptr<bool>() + r0 * tiles);
      std::copy(pre.spent.begin(), pre.spent.begin() + r, spent_out.data_ptr<double>() + r0);
    };
    // With tiles to skip (delta > 0), JS and rows with given log-sum-exps take a value sweep that keeps each tile's
    // TileSums, then at once the gradient sweep, chunk by chunk, leaving out whole tiles (or, without `scale`, the
    // chunk's planned skips are stored). `vskip`: the JS tiles the value sweep leaves out (with their shares).
    std::vector<TileSums> sums(delta > 0 ? plan.rows_per_chunk * tiles : 0);
    auto value_then_grad = [&](int64_t r0, int64_t r, const TileSkips* vskip, const auto* shares) {
      const Tensor rr = rows.narrow(0, r0, r), l2s_c = l2s.narrow(1, r0, r), l2t_c = l2t.narrow(1, r0, r);
      Tensor value_c, c_c;
      int64_t projected = 0;  // by the value sweep and any correction sweep
      std::tie(value_c, c_c) = value_impl<KIND, A>(s, t, rr, l2s_c, l2t_c, beta, tl, sums.data(), vskip, &projected);
      const double* cp_c = c_c.data_ptr<double>();
      TileSkips pre;
      if (!vskip) {
        pre = plan_tile_skips(r, tiles, delta, [&](int64_t i, double* bound) {
          return value_bounds<KIND>(sums.data() + i * tiles, cp_c[i], tiles, bound);
        });
      } else {
        const JsGradientStart start = js_gradient_start(*vskip, *shares, cp_c, r, beta, delta);
        std::vector<uint8_t> failed;
        pre = plan_tile_skips(r, tiles, delta, [&](int64_t i, double* bound) {
          const double lower = value_bounds<KIND>(sums.data() + i * tiles, cp_c[i], tiles, bound);
          for (int64_t q = 0; q < tiles; ++q) bound[q] += start.ec[i] * sums[i * tiles + q].p;
          return lower - start.ec[i];
        }, &start.forced, &failed);
        // Rows whose divergence hides inside their tiles: a correction sweep of the tiles they left out (gathered
        // as the first sweep's, so their logits round alike), then the plan without value skips.
        TileSkips more{tiles, std::vector<uint8_t>(r * tiles, 0), std::vector<double>(r, 0.0)};
        bool any = false;
        for (int64_t i = 0; i < r; ++i)
          for (int64_t q = 0; q < tiles && failed[i]; ++q)
            if (!vskip->kept(i, q)) more.keep[i * tiles + q] = 1, any = true;
        if (any) {
          std::vector<TileSums> sums2(r * tiles);
          Tensor value_f, c_f;
          std::tie(value_f, c_f) = value_impl<KIND, A>(s, t, rr, l2s_c, l2t_c, beta, tl, sums2.data(), &more, &projected);
          value_c.add_(value_f);
          c_c.add_(c_f);
          for (int64_t q = 0; q < r * tiles; ++q)  // disjoint tiles: one of the two is zero
            sums[q] = {sums[q].p + sums2[q].p, sums[q].q + sums2[q].q, sums[q].pa + sums2[q].pa,
                       sums[q].pa_abs + sums2[q].pa_abs};
          const TileSkips again = plan_tile_skips(r, tiles, delta, [&](int64_t i, double* bound) {
            return value_bounds<KIND>(sums.data() + i * tiles, cp_c[i], tiles, bound);
          });
          for (int64_t i = 0; i < r; ++i) {
            if (!failed[i]) continue;
            std::copy_n(again.keep.begin() + i * tiles, tiles, pre.keep.begin() + i * tiles);
            pre.spent[i] = again.spent[i];
          }
        }
      }
      if (vskip) count.value_unformed += r * vv - projected;
      value.narrow(0, r0, r).copy_(value_c);
      c.narrow(0, r0, r).copy_(c_c);
      if (!grad) return store(r0, r, pre);
      count += grad_impl<KIND, true, A>(s, &t, rr, l2s_c, l2t_c, c_c, std::nullopt, std::nullopt, std::nullopt, false,
                                        scale->narrow(0, r0, r), beta, tl, grad_logits, dh, dw, db, skip, &pre);
    };
    if (!given) {
      // The online sweep, chunk by chunk. A reverse / forward KL row is complete after its chunk's sweep, so its
      // gradient sweep follows at once, leaving out whole tiles where the skip rule allows (TileSkips); a JS row
      // takes its value sweep first, leaving out whole tiles too (js_value_skips).
      const bool bounds = delta > 0;
      std::vector<KlState<A>> st(plan.rows_per_chunk);
      std::vector<TileMass<A>> mass(bounds ? plan.rows_per_chunk * tiles : 0);
      A *hs = l2s.data_ptr<A>(), *ht = l2t.data_ptr<A>();
      for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
        const int64_t r = std::min(plan.rows_per_chunk, n - r0);
        const Tensor rr = rows.narrow(0, r0, r);
        std::fill(st.begin(), st.end(), kl_empty<A>());
        linear_pair_sweep<A>(s, t, rr, tl, [&](int64_t q, A* zs, const A* zt, int64_t c0, int64_t len) {
          online_segment<KIND>(zs, zt, len, inv_tau, st[q], mass.empty() ? nullptr : &mass[q * tiles + c0 / plan.block]);
        });
        for (int64_t q = 0; q < r; ++q) {
          GradRow<A> g{};
          keep(r0 + q, finish_online<KIND>(st[q], g));
          hs[r0 + q] = g.ls, hs[n + r0 + q] = g.ls2, ht[r0 + q] = g.lt, ht[n + r0 + q] = g.lt2;
        }
        if (KIND == REVERSE_KL) c.narrow(0, r0, r).copy_(value.narrow(0, r0, r));  // reverse KL's constant: its value
        if constexpr (KIND == JS) {
          if (!bounds) continue;  // the value sweep of all rows follows
          const JsShares<A> shares{st.data(), mass.data(), tiles};
          const TileSkips vskip = js_value_skips(shares, r, beta, delta);
          value_then_grad(r0, r, &vskip, &shares);
          continue;
        }
        if (!grad && !bounds) continue;
        const std::optional<TileSkips> pre =
            bounds ? std::optional<TileSkips>(plan_tile_skips(r, tiles, delta, [&](int64_t i, double* bound) {
              return online_bounds<KIND>(st[i], mass.data() + i * tiles, tiles, bound);
            }))
                   : std::nullopt;
        if (!grad) {
          store(r0, r, *pre);
          continue;
        }
        count += grad_impl<KIND, true, A>(s, &t, rr, l2s.narrow(1, r0, r), l2t.narrow(1, r0, r), c.narrow(0, r0, r),
                                          std::nullopt, std::nullopt, std::nullopt, false, scale->narrow(0, r0, r), beta,
                                          tl, grad_logits, dh, dw, db, skip, pre ? &*pre : nullptr);
      }
    }
    if (!given && (KIND != JS || delta > 0)) return {parts, value, c, keep_out, spent_out, count};
    // JS without tiles to skip, or log-sum-exps given: a value sweep, then the gradient sweep.
    if (delta == 0) {
      std::tie(value, c) = value_impl<KIND, A>(s, t, rows, l2s, l2t, beta, tl);
      if (grad)
        count = grad_impl<KIND, true, A>(s, &t, rows, l2s, l2t, c, std::nullopt, std::nullopt, std::nullopt, false,
                                         *scale, beta, tl, grad_logits, dh, dw, db, skip);
      return {parts, value, c, keep_out, spent_out, count};
    }
    // Given log-sum-exps: JS rows with the stats pass's tile shares leave tiles out of their value sweep too.
    const bool by_shares = KIND == JS && shares_s.has_value() && shares_s->defined();
    if (by_shares)
      TORCH_CHECK(shares_s->size(1) == tiles && shares_t->size(1) == tiles,
                  "dopd cpu: full_pass's tile shares must be [n, ", tiles, "] (this tiling's vocabulary tiles)");
    for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
      const int64_t r = std::min(plan.rows_per_chunk, n - r0);
      if (!by_shares) {
        value_then_grad(r0, r, nullptr, static_cast<const LogShares*>(nullptr));
        continue;
      }
      const LogShares shares{shares_s->data_ptr<float>() + r0 * tiles, shares_t->data_ptr<float>() + r0 * tiles, tiles};
      const TileSkips vskip = js_value_skips(shares, r, beta, delta);
      value_then_grad(r0, r, &vskip, &shares);
    }
    return {parts, value, c, keep_out, spent_out, count};
  }

  // One pass over each row: logits mode (a row's logits are read in place, each phase re-reads them from
  // cache) and fused-linear rows that fit one tile (both streams' tiles hold whole rows).
  const std::optional<SplitLse<A>> ls = given ? std::optional<SplitLse<A>>(SplitLse<A>(*lse_s, s.acc(), n)) : std::nullopt;
  const std::optional<SplitLse<A>> lt = given ? std::optional<SplitLse<A>>(SplitLse<A>(*lse_t, s.acc(), n)) : std::nullopt;
  const Tensor sc = grad ? scale->to(s.acc()).contiguous() : Tensor();
  auto row_in = [&](int64_t q) {
    GradRow<A> r{};
    if (given) r.ls = ls->hi[q], r.ls2 = ls->lo[q], r.lt = lt->hi[q], r.lt2 = lt->lo[q];
    if (grad) r.scale = sc.data_ptr<A>()[q];
    return r;
  };

  if (!s.linear()) {
    const Rows<A> xs(s.x), xt(t.x);
    const std::optional<LogitsGrad<A>> out = grad ? std::optional<LogitsGrad<A>>(LogitsGrad<A>(grad_logits, s.acc())) : std::nullopt;
    const int64_t block = std::max<int64_t>(1, std::min(tl.vocab_chunk, vv));
    const Head<A> none = make_head<A>(1.0, 0.0);
#pragma omp parallel num_threads(num_threads())
    {
      Scratch<A> scr(block);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) {
        auto load = [&](int64_t c0, int64_t len, const A*& zs, const A*& zt) {
          zs = xs.segment(rp[i], c0, len, scr.s.data());
          zt = xt.segment(rp[i], c0, len, scr.t.data());
        };
        auto emit = [&](int64_t c0, int64_t len, const A* zs, const A* zt, const GradRow<A>& r) {
          A* g = out->target(rp[i], c0, scr.g.data());
          grad_segment<KIND, true>(zs, zt, g, c0, len, 0, inv_tau, r, P, none, static_cast<A*>(nullptr));
          out->commit(rp[i], c0, g, len);
        };
        keep(i, full_row<KIND>(vv, block, inv_tau, P, row_in(i), given, grad, load, emit));
      }
    }
    return {parts, value, c, Tensor(), Tensor(), SkipCount{}};  // logits mode: no contraction to skip
  }

  // Fused-linear rows that fit one tile: each row chunk's tiles hold whole rows (one block); the gradient
  // overwrites the student tile in place and is contracted at once. Chunks start at multiples of the plan's
  // rows_per_chunk (linear_pair_sweep), so row q is row q % rows_per_chunk of its chunk for the skipper.
  const Head<A> head_s = head_of<A>(s);
  const bool want_dh = dh.has_value() && dh->defined(), want_dw = dw.has_value() && dw->defined();
  const LinearPlan plan(n, vv, tl);
  BlockSkipper skipper(skip && grad, s, want_dh || want_dw, plan.rows_per_chunk, plan.block);
  // The head's jacobians of a row, per thread (linear_pair_sweep runs num_threads() threads).
  std::vector<A> jac(head_s.identity() || !grad ? 0 : num_threads() * plan.block);
  auto row = [&](int64_t q, A* zs_q, const A* zt_q, int64_t, int64_t) {
    auto load = [&](int64_t, int64_t, const A*& zs, const A*& zt) {
      zs = zs_q;
      zt = zt_q;
    };
    auto emit = [&](int64_t c0, int64_t len, const A* zs, const A* zt, const GradRow<A>& r) {
      A* jac_q = jac.empty() ? nullptr : jac.data() + omp_get_thread_num() * plan.block;
      grad_segment<KIND, true>(zs, zt, zs_q, c0, len, 0, inv_tau, r, P, head_s, jac_q, [&](const A* u, int64_t) {
        if (!skipper.on()) return;
        skipper.start_row(q % plan.rows_per_chunk, 0.0);
        skipper.decide(q % plan.rows_per_chunk, u, c0, len);
      });
    };
    keep(q, full_row<KIND>(vv, vv, inv_tau, P, row_in(q), given, grad, load, emit));
  };
  auto contract = [&](const Tensor& rr, const Tensor& hs, const Tensor& tile, int64_t c0, int64_t len) {
    if (!grad) return;
    const Tensor dh_rows = want_dh ? at::zeros({rr.size(0), s.x.size(1)}, rows.options().dtype(s.acc())) : Tensor();
    skipper.contract(s, tile, hs, c0, len, dh_rows, dw, db);
    if (want_dh) dh->index_add_(0, rr, dh_rows);
  };
  linear_pair_sweep<A>(s, t, rows, tl, row, contract);
  return {parts, value, c, Tensor(), Tensor(), skipper.count};
}

template <typename F>
void with_kind(int64_t kind, F&& f) {
  switch (kind) {
    case REVERSE_KL: f(std::integral_constant<int, REVERSE_KL>()); break;
    case FORWARD_KL: f(std::integral_constant<int, FORWARD_KL>()); break;
    case JS: f(std::integral_constant<int, JS>()); break;
    default: throw std::invalid_argument("dopd cpu: unknown divergence kind");
  }
}

template <typename F>
void with_acc(at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) {
    f(double(0));
  } else {
    f(float(0));
  }
}

void check_rows(const Tensor& rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
              "dopd cpu: rows must be a contiguous int64 CPU vector");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> stats_pass(const Stream& s, const Tensor& rows, int64_t k,
                                                                      Tiling tiling, const std::optional<Tensor>& tail_tokens,
                                                                      bool shares) {
  check_rows(rows);
  Tensor tokens;
  if (tail_tokens) {
    TORCH_CHECK(tail_tokens->dim() == 1 && tail_tokens->size(0) == rows.size(0) && tail_tokens->scalar_type() == at::kLong,
                "dopd cpu: tail_tokens must be int64 [n] for n rows");
    tokens = tail_tokens->contiguous();
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> out;
  with_acc(s.acc(), [&](auto a) {
    out = stats_impl<decltype(a)>(s, rows, k, tiling, nullptr, tail_tokens ? tokens.data_ptr<int64_t>() : nullptr, shares);
  });
  return out;
}

std::tuple<Tensor, Tensor> rest_lse_pass(const Stream& s, const Tensor& rows, const Tensor& cols, Tiling tiling) {
  check_rows(rows);
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == rows.size(0) && cols.scalar_type() == at::kLong,
              "dopd cpu: cols must be int64 [n, k] for n rows");
  const Tensor ex = cols.contiguous();
  std::tuple<Tensor, Tensor> out;
  with_acc(s.acc(), [&](auto a) {
    auto st = stats_impl<decltype(a)>(s, rows, 0, tiling, &ex);
    out = {std::get<0>(st), std::get<1>(st)};
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, std::optional<Tensor>, std::optional<Tensor>, std::tuple<int64_t, int64_t, int64_t, int64_t>>
full_pass(const Stream& s, const Stream& t, const Tensor& rows, const std::optional<Tensor>& lse_s,
          const std::optional<Tensor>& lse_t, int64_t kind, double beta, const std::optional<Tensor>& scale, Tiling tiling,
          const std::optional<Tensor>& grad_logits, const std::optional<Tensor>& dh, const std::optional<Tensor>& dw,
          const std::optional<Tensor>& db, bool skip, const std::optional<Tensor>& shares_s,
          const std::optional<Tensor>& shares_t) {
  check_rows(rows);
  TORCH_CHECK(lse_s.has_value() == lse_t.has_value(), "dopd cpu: full_pass takes both log-sum-exps or neither");
  TORCH_CHECK(shares_s.has_value() == shares_t.has_value(), "dopd cpu: full_pass takes both tile shares or neither");
  std::optional<Tensor> sh_s, sh_t;
  if (shares_s) {
    TORCH_CHECK(lse_s.has_value(), "dopd cpu: full_pass's tile shares come with the log-sum-exps they were taken from");
    for (const Tensor* x : {&*shares_s, &*shares_t})
      TORCH_CHECK(x->dim() == 2 && x->size(0) == rows.size(0) && x->scalar_type() == at::kFloat,
                  "dopd cpu: full_pass's tile shares must be float32 [n, tiles] for n rows");
    sh_s = shares_s->contiguous(), sh_t = shares_t->contiguous();
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, SkipCount> out;
  with_acc(s.acc(), [&](auto a) {
    with_kind(kind, [&](auto kc) {
      out = full_impl<decltype(kc)::value, decltype(a)>(s, t, rows, lse_s, lse_t, beta, scale, tiling, grad_logits, dh, dw,
                                                        db, skip, sh_s, sh_t);
    });
  });
  const SkipCount& n = std::get<5>(out);
  auto planned = [](const Tensor& x) { return x.defined() ? std::optional<Tensor>(x) : std::nullopt; };
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), planned(std::get<3>(out)), planned(std::get<4>(out)),
          {n.entries, n.skipped, n.unformed, n.value_unformed}};
}

int64_t matmul_flops() { return matmul_flops_counted.load(std::memory_order_relaxed); }

void reset_matmul_flops() { matmul_flops_counted.store(0, std::memory_order_relaxed); }

std::tuple<int64_t, int64_t, int64_t> grad_pass(const Stream& s, const std::optional<Stream>& t, const Tensor& rows,
                                                const Tensor& lse_s, const std::optional<Tensor>& lse_t,
                                                const std::optional<Tensor>& c, const std::optional<Tensor>& dense,
                                                const std::optional<Tensor>& cols, const std::optional<Tensor>& sparse,
                                                bool overwrite, const Tensor& scale, int64_t kind, double beta, Tiling tiling,
                                                const std::optional<Tensor>& grad_logits, const std::optional<Tensor>& dh,
                                                const std::optional<Tensor>& dw, const std::optional<Tensor>& db, bool skip,
                                                const std::optional<Tensor>& tile_keep,
                                                const std::optional<Tensor>& tile_spent) {
  check_rows(rows);
  const bool full = t.has_value();
  TORCH_CHECK(full || (dense.has_value() && cols.has_value() && sparse.has_value()),
              "dopd cpu: grad_pass needs a target stream or dense/cols/sparse coefficients");
  TORCH_CHECK(tile_keep.has_value() == tile_spent.has_value(), "dopd cpu: grad_pass takes tile_keep and tile_spent together");
  // Planned tile skips apply where this sweep skips at all (else every tile is formed: exact, as without them).
  const bool contracts = (dh.has_value() && dh->defined()) || (dw.has_value() && dw->defined());
  const bool planned = full && tile_keep.has_value() && skip_delta(skip, s, contracts) > 0;
  SkipCount n;
  with_acc(s.acc(), [&](auto a) {
    using A = decltype(a);
    with_kind(kind, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if (planned) {  // chunk by chunk: grad_impl takes one chunk's TileSkips
        const int64_t rows_n = rows.size(0);
        const LinearPlan plan(rows_n, s.valid_vocab, tiling);
        const Tensor keep = tile_keep->to(at::kByte).contiguous(), spent = tile_spent->to(at::kDouble).contiguous();
        const int64_t tiles = (s.valid_vocab + plan.block - 1) / plan.block, chunk = plan.rows_per_chunk;
        TORCH_CHECK(keep.dim() == 2 && keep.size(0) == rows_n && keep.size(1) == tiles && spent.numel() == rows_n,
                    "dopd cpu: tile_keep must be [rows, tiles] of this tiling and tile_spent [rows]");
        const uint8_t* kp = keep.data_ptr<uint8_t>();
        const double* spp = spent.data_ptr<double>();
        for (int64_t r0 = 0; r0 < rows_n; r0 += chunk) {
          const int64_t r = std::min(chunk, rows_n - r0);
          const TileSkips pre{tiles, std::vector<uint8_t>(kp + r0 * tiles, kp + (r0 + r) * tiles),
                              std::vector<double>(spp + r0, spp + r0 + r)};
          n += grad_impl<K, true, A>(s, &*t, rows.narrow(0, r0, r), lse_s.narrow(1, r0, r), lse_t->narrow(1, r0, r),
                                     c->narrow(0, r0, r), dense, cols, sparse, overwrite, scale.narrow(0, r0, r), beta,
                                     tiling, grad_logits, dh, dw, db, skip, &pre);
        }
      } else if (full) {
        n = grad_impl<K, true, A>(s, &*t, rows, lse_s, lse_t, c, dense, cols, sparse, overwrite, scale, beta, tiling,
                                  grad_logits, dh, dw, db, skip);
      } else {
        n = grad_impl<K, false, A>(s, nullptr, rows, lse_s, lse_t, c, dense, cols, sparse, overwrite, scale, beta, tiling,
                                   grad_logits, dh, dw, db, skip);
      }
    });
  });
  return {n.entries, n.skipped, n.unformed};
}

Tensor gather(const Stream& s, const Tensor& rows, const Tensor& cols_in) {
  check_rows(rows);
  const Tensor cols = cols_in.contiguous();
  const int64_t n = rows.size(0), k = cols.size(1), vv = s.valid_vocab;
  Tensor out = at::empty({n, k}, rows.options().dtype(s.acc()));
  with_acc(s.acc(), [&](auto a) {
    using A = decltype(a);
    const A inv_tau = static_cast<A>(s.inv_tau);
    const int64_t* rp = rows.data_ptr<int64_t>();
    const int64_t* cp = cols.data_ptr<int64_t>();
    A* op = out.data_ptr<A>();
    if (!s.linear()) {
      const Rows<A> x(s.x);
#pragma omp parallel for num_threads(num_threads()) schedule(static)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t q = 0; q < k; ++q) {
          const int64_t col = cp[i * k + q];
          A z;
          op[i * k + q] = col < vv ? *x.segment(rp[i], col, 1, &z) * inv_tau : neg_inf<A>();
        }
      return;
    }
    // K dot products per row against weight rows read in place, then the head transform.
    const ColumnDots<A> dots(s, rows);
    const Head<A> head = head_of<A>(s);
    int64_t count = 0;
#pragma omp parallel num_threads(num_threads())
    {
      std::vector<A> scratch(dots.hd);
#pragma omp for schedule(static) reduction(+ : count)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t q = 0; q < k; ++q) {
          const int64_t col = cp[i * k + q];
          count += col < vv;
          op[i * k + q] = col < vv ? head.logit(dots.raw(i, col, scratch.data())) * inv_tau : neg_inf<A>();
        }
    }
    count_flops(2 * dots.hd * count);
  });
  return out;
}

void sparse_grad(const Stream& s, const Tensor& rows, const Tensor& cols_in, const Tensor& coef_in,
                 const std::optional<Tensor>& dh, const std::optional<Tensor>& dw, const std::optional<Tensor>& db) {
  check_rows(rows);
  TORCH_CHECK(s.linear(), "dopd cpu: sparse_grad is for fused-linear streams");
  const Tensor cols = cols_in.contiguous();
  const int64_t n = cols.size(0), k = cols.size(1), hd = s.x.size(1);
  with_acc(s.acc(), [&](auto a) {
    using A = decltype(a);
    const int64_t* cp = cols.data_ptr<int64_t>();
    const int64_t* rp = rows.data_ptr<int64_t>();
    const ColumnDots<A> dots(s, rows);  // the rows' hidden states, and the raw logits the jacobian needs
    const Rows<A> w(*s.w);
    // coef is the gradient with respect to the transformed logits: times the head's jacobian at
    // (row, column), from the logit recomputed by one dot product, it is with respect to the raw ones.
    const Head<A> head = head_of<A>(s);
    Tensor coef = at::empty({n, k}, cols.options().dtype(s.acc()));
    coef.copy_(coef_in);
    A* cf = coef.data_ptr<A>();
    // Each nonzero coefficient costs one H-long dot product for its jacobian (with a head transform) and one
    // axpy each into dH and dW.
    const bool want_dh = dh.has_value() && dh->defined(), want_dw = dw.has_value() && dw->defined();
    const int64_t nonzero = (coef != 0).sum().item<int64_t>();
    count_flops(2 * hd * nonzero * (int64_t(!head.identity()) + want_dh + want_dw));
    if (!head.identity()) {
#pragma omp parallel num_threads(num_threads())
      {
        std::vector<A> scratch(hd);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t q = 0; q < k; ++q)
            if (cf[i * k + q] != A(0)) cf[i * k + q] *= head.jacobian(head.logit(dots.raw(i, cp[i * k + q], scratch.data())));
      }
    }
    if (want_dh) {
      // dH[row] += Σ_q coef · W[col]: one writer per row; weight rows read in place (or converted).
      TORCH_CHECK(dh->is_contiguous() && dh->scalar_type() == s.acc(), "dopd cpu: dh must be contiguous in the compute dtype");
      A* out = dh->data_ptr<A>();
#pragma omp parallel num_threads(num_threads())
      {
        std::vector<A> scratch(hd);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
          A* o = out + rp[i] * hd;
          for (int64_t q = 0; q < k; ++q) {
            const A c = cf[i * k + q];
            if (c == A(0)) continue;
            const A* wr = w.segment(cp[i * k + q], 0, hd, scratch.data());
#pragma omp simd
            for (int64_t e = 0; e < hd; ++e) o[e] += c * wr[e];
          }
        }
      }
    }
    const bool want_db = db.has_value() && db->defined();
    if (!want_dw && !want_db) return;  // a frozen head: no dW work
    // dW[col] += Σ coef · H[row] and db[col] += Σ coef over the entries sorted by column: each
    // column's run has one writer, so threads never share an output row.
    const Tensor order = std::get<1>(at::sort(cols.reshape(-1), /*stable=*/true, /*dim=*/0, /*descending=*/false));
    const int64_t* op = order.data_ptr<int64_t>();
    const int64_t m = n * k;
    std::vector<int64_t> starts;
    for (int64_t j = 0; j < m; ++j)
      if (j == 0 || cp[op[j]] != cp[op[j - 1]]) starts.push_back(j);
    starts.push_back(m);
    const A* hp = dots.hp;
    if (want_dw) TORCH_CHECK(dw->is_contiguous() && dw->scalar_type() == s.acc(), "dopd cpu: dw must be contiguous in the compute dtype");
    if (want_db) TORCH_CHECK(db->is_contiguous() && db->scalar_type() == s.acc(), "dopd cpu: db must be contiguous in the compute dtype");
    A* dwp = want_dw ? dw->data_ptr<A>() : nullptr;
    A* dbp = want_db ? db->data_ptr<A>() : nullptr;
    const int64_t runs = static_cast<int64_t>(starts.size()) - 1;
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic, 16)
    for (int64_t u = 0; u < runs; ++u) {
      const int64_t col = cp[op[starts[u]]];
      A bsum = 0;
      for (int64_t j = starts[u]; j < starts[u + 1]; ++j) {
        const A c = cf[op[j]];
        bsum += c;
        if (dwp && c != A(0)) {
          const A* hr = hp + (op[j] / k) * hd;
          A* o = dwp + col * hd;
#pragma omp simd
          for (int64_t e = 0; e < hd; ++e) o[e] += c * hr[e];
        }
      }
      if (dbp) dbp[col] += bsum;
    }
  });
}

Tensor assign_regimes(const Tensor& adv, const Tensor& q_t, const Tensor& q_p, const Tensor& valid, double adv_bar,
                      double qt_bar, double qp_bar) {
  const Tensor a = adv.to(at::kDouble).contiguous(), t = q_t.to(at::kDouble).contiguous(), p = q_p.to(at::kDouble).contiguous();
  const Tensor v = valid.to(at::kBool).contiguous();
  const int64_t n = a.numel();
  Tensor out = at::empty({n}, a.options().dtype(at::kChar));
  const double *ap = a.data_ptr<double>(), *tp = t.data_ptr<double>(), *pp = p.data_ptr<double>();
  const bool* vp = v.data_ptr<bool>();
  int8_t* op = out.data_ptr<int8_t>();
  for (int64_t i = 0; i < n; ++i)
    op[i] = static_cast<int8_t>(vp[i] ? select_regime(ap[i], tp[i], pp[i], adv_bar, qt_bar, qp_bar) : IGNORED);
  return out.view(adv.sizes());
}

}  // namespace dopd
