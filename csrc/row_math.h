// Per-row math of the fused DOPD / OPD passes (DESIGN.md sections 1, 2 and 4), shared by the CPU
// kernels (kernels_cpu.cpp), the CUDA kernels (kernels_cuda.cu) and the C++ unit tests.
//
// Everything here works on one row's scalars: online log-sum-exp merges, the top-K order and heap,
// per-column divergence and gradient terms, and DOPD regime selection. The loops over rows and
// vocabulary tiles live in the kernel files, each shaped for its hardware; the formulas live only here.
//
// Conventions (as in dopd_kernels/divergences.py): log-probabilities may be -inf (padding or
// underflow); 0 · log 0 = 0, so a column where the student has no mass contributes nothing and gets
// no gradient; the JS mixture is formed in log space. A = float or double is the compute type.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// Forced inline on the host too: the column loops vectorise only with exp_f / log_f inlined into them, and GCC's
// heuristics stopped inlining them once kernels_cpu.cpp grew (value_segment took 1.6x as long, exp_f a call).
#if defined(__CUDACC__)
#define DOPD_HD __host__ __device__ __forceinline__
#else
#define DOPD_HD inline __attribute__((always_inline))
#endif

namespace dopd {

// Divergence kinds: the values of dopd_kernels.codes.Divergence (exposed as the module's KINDS;
// tests/test_constants.py checks them).
enum Kind : int { REVERSE_KL = 0, FORWARD_KL = 1, JS = 2 };
// Regime codes of dopd_kernels.codes.Regime (exposed as REGIMES).
enum RegimeCode : int { IGNORED = -1, LH = 0, LL = 1, HT = 2, HS = 3 };

// Skipping negligible gradient blocks (dopd_kernels/skipping.py: the bound, the rule and the source of
// these values; exposed as SKIP_COLUMNS, SKIP_TOLERANCE and SKIP_VALUE_SHARE, which tests/test_constants.py
// checks): the width of a skippable column block, δ per storage dtype of the student's inputs (float64: never),
// and the share of δ·J a JS row's value sweep may leave out (VALUE_SHARE).
constexpr int64_t SKIP_COLUMNS = 256;
constexpr double SKIP_TOLERANCE_FP32 = 0x1p-20, SKIP_TOLERANCE_BF16 = 0x1p-12, SKIP_TOLERANCE_FP16 = 0x1p-15;
constexpr double SKIP_VALUE_SHARE = 0.25;
// Rows a gathered logit tile is padded to a multiple of (kernels_cpu.cpp, grad_impl): MKL's sgemm takes
// other kernels below ~12 rows and at row counts off multiples of 4, which round differently.
constexpr int64_t GATHER_ROWS = 16;

template <typename A>
DOPD_HD A neg_inf() { return static_cast<A>(-HUGE_VAL); }

// ---------------------------------------------------------------------------------------------
// exp / log. On the host a branch-free polynomial that compilers vectorise inside `omp simd` loops
// (libm calls would not be); on the device the hardware intrinsics. Relative error about 2 ulp.

DOPD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union { uint32_t u; float f; } v{u};  // GCC and Clang define union punning; memcpy would block vectorisation
  return v.f;
#endif
}

DOPD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union { float f; uint32_t u; } v{f};
  return v.u;
#endif
}

// exp(x): 0 for x below log(FLT_MIN) (so exp(-inf) = 0 and no denormals appear); x is at most ~0
// in every use here (arguments are log-probabilities or logits minus their running max).
DOPD_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  // Clamp with compares, not fminf/fmaxf: those are library calls (NaN rules) that block vectorisation.
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in two for an exact reduction (Cody-Waite).
  const float n = floorf(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  // Minimax polynomial for e^r on that interval (Cephes expf).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
#endif
}

// log(x) for finite x > 0 (the only use is log(1 + t), t in [0, 1]).
DOPD_HD float log_f(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  // x = 2^e · m with m in [sqrt(1/2), sqrt(2)); log x = e ln2 + log m, log m by a polynomial in m − 1.
  const uint32_t u = float_to_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - 127;
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // in [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  // Cephes logf polynomial: log(1 + f) = f − f²/2 + f³ P(f).
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float ef = static_cast<float>(e);
  float y = f * z * p - 0.5f * z + f;
  return y + ef * 0.693147180559945f;
#endif
}

DOPD_HD float fexp(float x) { return exp_f(x); }
DOPD_HD double fexp(double x) { return exp(x); }
DOPD_HD float flog(float x) { return log_f(x); }
DOPD_HD double flog(double x) { return log(x); }

template <typename A>
DOPD_HD A max_(A a, A b) { return a > b ? a : b; }
template <typename A>
DOPD_HD A min_(A a, A b) { return a < b ? a : b; }

DOPD_HD float ftanh(float x) { return tanhf(x); }
DOPD_HD double ftanh(double x) { return tanh(x); }

// ---------------------------------------------------------------------------------------------
// Output-head transform of fused-linear mode (dopd_kernels.sources.LinearSource.transform) on a raw
// logit z = h·Wᵀ + b, before the temperature: logit = scale·z, then cap·tanh(logit / cap) when a
// soft-cap is set (cap > 0). The gradient with respect to z is the gradient with respect to the logit
// times `jacobian(logit)` = scale·(1 − (logit / cap)²) = scale·(1 − tanh²).

template <typename A>
struct Head {
  A scale;
  A cap;      // 0: no soft-cap
  A inv_cap;  // 1 / cap (0 without a soft-cap)

  DOPD_HD bool identity() const { return scale == A(1) && cap == A(0); }
  DOPD_HD A logit(A z) const {
    const A x = scale * z;
    return cap > A(0) ? cap * ftanh(x * inv_cap) : x;
  }
  DOPD_HD A jacobian(A logit) const {
    const A u = logit * inv_cap;
    return cap > A(0) ? scale * (A(1) - u * u) : scale;
  }
};

template <typename A>
DOPD_HD Head<A> make_head(double scale, double cap) {
  return {A(scale), A(cap > 0 ? cap : 0), A(cap > 0 ? 1.0 / cap : 0)};
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp. A state (m, s) stands for m + log s with s = Σ exp(z − m); merging another
// (m2, s2) rescales both sums to the larger max. An all -inf state is (-inf, 0) and stays finite.
// A NaN value makes s NaN for good, and a +inf one m: the log-sum-exp of such a row is not finite,
// which is how the engine knows the row has no distribution (never a finite value hiding it).

template <typename A>
struct LseState {
  A m;
  A s;
};

template <typename A>
DOPD_HD LseState<A> lse_empty() { return {neg_inf<A>(), A(0)}; }

template <typename A>
DOPD_HD LseState<A> lse_merge(LseState<A> a, LseState<A> b) {
  const A m = max_(a.m, b.m);
  if (m == neg_inf<A>()) return {m, a.s + b.s};  // both empty (0), unless one holds a NaN
  return {m, a.s * fexp(a.m - m) + b.s * fexp(b.m - m)};
}

// Push one value (a single-pass stream: one exp per value, rescaling only when the max grows).
template <typename A>
DOPD_HD void lse_push(LseState<A>& a, A z) {
  if (z > a.m) {
    a.s = a.s * fexp(a.m - z) + A(1);
    a.m = z;
  } else if (z > neg_inf<A>()) {
    a.s += fexp(z - a.m);
  } else if (z != z) {
    a.s = z;  // NaN
  }
}

// The log-sum-exp as the pair (max, log Σ exp(z − max)), which the caller adds in float64: a
// single fp32 sum would round a log-sum-exp of ~1e4 to ~1e-3 (see dopd_kernels.engine.split_lse).
// An empty row is (-inf, 0).
template <typename A>
DOPD_HD A lse_log_sum(LseState<A> a) {
  if (a.s != a.s) return a.s;  // NaN (the host log_f has no NaN case)
  return a.m == neg_inf<A>() ? A(0) : flog(a.s);
}

// ---------------------------------------------------------------------------------------------
// Online KL(a‖b) of a row whose log-sum-exps are not known yet (full-vocabulary OPD: no stats pass ran).
// With running maxima M_a, M_b, sums S_a = Σ e^{a_v − M_a}, S_b = Σ e^{b_v − M_b} and D_v = a_v − b_v,
//   KL = K − (M_a + log S_a) + (M_b + log S_b),   K = E_p[D] = W / S_w,   W = Σ_v e^{a_v − M_a} D_v,
// with S_w the same weights as S_a summed in float64. D_v is formed in float64 (exact for fp32 logits) and
// W / S_w is a weighted mean whose weights' rounding cancels where one column dominates, so K keeps float64's
// precision where log-ratios are ~100 (logits ~N(0, 40²)): the reverse-KL gradient p_v(D_v − K) needs K to
// better than fp32's precision of the log-ratios (full_grad_term). a is the weighting stream: the student
// for reverse KL, the target for forward KL.

template <typename A>
struct KlState {
  LseState<A> a, b;
  double w, sw;  // W and S_w, relative to a.m
};

template <typename A>
DOPD_HD KlState<A> kl_empty() { return {lse_empty<A>(), lse_empty<A>(), 0.0, 0.0}; }

// Adds a part's (W, S_w) to out's, its weights rescaled to out's larger maximum; a part without a-mass adds 0.
template <typename A>
DOPD_HD void kl_add_rescaled(KlState<A>& out, const KlState<A>& part) {
  if (part.a.m == neg_inf<A>()) return;
  // In float64: a rounded weight would tilt the mean towards one part by its rounding times the parts' spread.
  const double e = exp(double(part.a.m) - double(out.a.m));
  out.w += e * part.w;
  out.sw += e * part.sw;
}

template <typename A>
DOPD_HD KlState<A> kl_merge(const KlState<A>& x, const KlState<A>& y) {
  KlState<A> out{lse_merge(x.a, y.a), lse_merge(x.b, y.b), 0.0, 0.0};
  kl_add_rescaled(out, x);
  kl_add_rescaled(out, y);
  return out;
}

// K = E_p[a − b] of a merged state.
template <typename A>
DOPD_HD double kl_mean_difference(const KlState<A>& x) { return x.w / x.sw; }

template <typename A>
DOPD_HD double kl_value(const KlState<A>& x) {
  const double la = double(x.a.m) + log(double(x.a.s)), lb = double(x.b.m) + log(double(x.b.s));
  return kl_mean_difference(x) - la + lb;
}

// log p of a scaled logit x from a row's log-sum-exp given as hi + lo (split_lse): x − hi is exact
// near the row's maximum, so log p keeps the precision of fp32 whatever the logits' magnitude.
template <typename A>
DOPD_HD A log_prob(A x, A hi, A lo) { return (x - hi) - lo; }

// ---------------------------------------------------------------------------------------------
// Top-K. Columns are ranked by value, ties by the smaller column index (so a row's top-K set is a
// pure function of its values, whatever the tiling). A running top-K is a binary min-heap on that
// rank (the root is the weakest kept column); tiles are merged by pushing every column that beats
// the root. Scanning columns in increasing order, a column equal in value to the root loses the
// tie, so candidates can be filtered with a strict `>` against the weakest kept value (topk_admits).

template <typename A>
DOPD_HD bool topk_before(A va, int64_t ia, A vb, int64_t ib) { return va > vb || (va == vb && ia < ib); }

template <typename A>
DOPD_HD void topk_sift_down(A* v, int64_t* idx, int n, int i) {
  for (;;) {
    int worst = i;
    const int l = 2 * i + 1, r = 2 * i + 2;
    if (l < n && topk_before(v[worst], idx[worst], v[l], idx[l])) worst = l;
    if (r < n && topk_before(v[worst], idx[worst], v[r], idx[r])) worst = r;
    if (worst == i) return;
    const A tv = v[i];
    v[i] = v[worst];
    v[worst] = tv;
    const int64_t ti = idx[i];
    idx[i] = idx[worst];
    idx[worst] = ti;
    i = worst;
  }
}

// Keep the k best of the heap (v, idx, *count) and (val, col).
template <typename A>
DOPD_HD void topk_push(A* v, int64_t* idx, int* count, int k, A val, int64_t col) {
  if (*count < k) {
    int i = (*count)++;
    v[i] = val;
    idx[i] = col;
    while (i > 0) {  // sift up: a parent must rank below its children
      const int parent = (i - 1) / 2;
      if (!topk_before(v[parent], idx[parent], v[i], idx[i])) return;
      const A tv = v[i];
      v[i] = v[parent];
      v[parent] = tv;
      const int64_t ti = idx[i];
      idx[i] = idx[parent];
      idx[parent] = ti;
      i = parent;
    }
  } else if (k > 0 && topk_before(val, col, v[0], idx[0])) {
    v[0] = val;
    idx[0] = col;
    topk_sift_down(v, idx, k, 0);
  }
}

// Whether a value may enter the heap: anything while it holds fewer than k (even -inf, so that a row
// with -inf logits still yields k columns, as torch.topk does), then only values strictly above
// the root (see above).
template <typename A>
DOPD_HD bool topk_admits(A val, const A* v, int count, int k) {
  return count < k || (k > 0 && val > v[0]);
}

// The same for a list kept sorted best first (the CUDA merge), whose weakest entry is the last.
template <typename A>
DOPD_HD bool topk_admits_sorted(A val, const A* v, int count, int k) {
  return count < k || (k > 0 && val > v[k - 1]);
}

// Turn the heap into a list sorted best first (heap sort: the weakest goes to the end each step).
template <typename A>
DOPD_HD void topk_sort(A* v, int64_t* idx, int count) {
  for (int end = count - 1; end > 0; --end) {
    const A tv = v[0];
    v[0] = v[end];
    v[end] = tv;
    const int64_t ti = idx[0];
    idx[0] = idx[end];
    idx[end] = ti;
    topk_sift_down(v, idx, end, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Divergence terms per column, from the student's and the target's log-probabilities lp, lq.
// Row sums of `value_term` give the divergence; of `js_c_term` the JS gradient constant β·KL(p‖m).

template <typename A>
struct DivParams {
  int kind;
  A beta;         // JS student weight β
  A log_beta;     // log β
  A log_1mbeta;   // log(1 − β)
};

template <typename A>
DOPD_HD DivParams<A> div_params(int kind, double beta) {
  return {kind, A(beta), A(log(beta)), A(log1p(-beta))};
}

// log m = log(β p + (1−β) q) = logaddexp(log β + lp, log(1−β) + lq).
template <typename A>
DOPD_HD A log_mixture(A lp, A lq, const DivParams<A>& P) {
  const A a = lp + P.log_beta, b = lq + P.log_1mbeta;
  const A hi = max_(a, b), lo = min_(a, b);
  // exp(lo − hi) is 0 when lo = -inf; both -inf only where neither stream has mass (unused then).
  return hi + flog(A(1) + fexp(lo - hi));
}

// The kind is a template argument so that the column loops of the kernels carry no branch on it.
template <int KIND, typename A>
DOPD_HD A value_term(A lp, A lq, const DivParams<A>& P) {
  const A ninf = neg_inf<A>();
  if constexpr (KIND == REVERSE_KL) {
    return lp > ninf ? fexp(lp) * (lp - lq) : A(0);
  } else if constexpr (KIND == FORWARD_KL) {
    return lq > ninf ? fexp(lq) * (lq - lp) : A(0);
  } else {
    const A lm = log_mixture(lp, lq, P);
    const A ps = lp > ninf ? P.beta * fexp(lp) * (lp - lm) : A(0);
    const A qs = lq > ninf ? (A(1) - P.beta) * fexp(lq) * (lq - lm) : A(0);
    return ps + qs;
  }
}

// β p (log p − log m): the per-column part of KL(p‖m) in the JS gradient constant.
template <typename A>
DOPD_HD A js_c_term(A lp, A lq, const DivParams<A>& P) {
  return lp > neg_inf<A>() ? P.beta * fexp(lp) * (lp - log_mixture(lp, lq, P)) : A(0);
}

// τ · ∂D/∂z_v of a full-vocabulary term, from log p, log q and the scaled logits xs, xt of the column:
// forward KL p − q; JS p(β(lp − log m) − c) with c = β KL(p‖m); reverse KL p(lp − lq − c) with c the KL, taken
// as p(D_v − k), D_v = xs − xt and k = c + lse_s − lse_t = E_p[D] (reverse_kl_offset), in float64: where
// log-ratios are ~100, lp − lq − c cancels to O(1) and fp32 would round each of its three terms at ~1e-5.
template <int KIND, typename A>
DOPD_HD A full_grad_term(A lp, A lq, A xs, A xt, A c, double k, const DivParams<A>& P) {
  if constexpr (KIND == FORWARD_KL) {
    return fexp(lp) - fexp(lq);
  } else {
    const A p = fexp(lp);
    A r;
    if constexpr (KIND == REVERSE_KL) {
      r = A(double(xs) - double(xt) - k);
    } else {
      r = P.beta * (lp - log_mixture(lp, lq, P)) - c;
    }
    return lp > neg_inf<A>() ? p * r : A(0);
  }
}

// Reverse KL's k = c + lse_s − lse_t (E_p[x_s − x_t]) from its constant and the log-sum-exps as (hi, lo) pairs.
template <typename A>
DOPD_HD double reverse_kl_offset(double c, A hs, A ls, A ht, A lt) {
  return c + (double(hs) + double(ls)) - (double(ht) + double(lt));
}

// τ · ∂D/∂z_v of a few-column term (row_terms.py): p_v · dense on every column; the caller adds the
// sparse coefficients on the explicit columns, or writes their whole gradient there. 0 where p_v
// underflows: dense may be ±inf when the rest bucket's own mass underflowed, and 0 · inf is NaN.
template <typename A>
DOPD_HD A dense_grad_term(A lp, A dense) {
  const A p = fexp(lp);
  return p > A(0) ? p * dense : A(0);
}

// ---------------------------------------------------------------------------------------------
// DOPD regime of a valid token from A = |ℓ_T − ℓ_P|, q_T, q_P and the batch thresholds (Ā, q̄_T, q̄_P):
// low A compares the summed confidence with the summed means; high A compares q_T with q_P.

DOPD_HD int select_regime(double adv, double q_t, double q_p, double adv_bar, double qt_bar, double qp_bar) {
  if (adv < adv_bar) return (q_p + q_t >= qp_bar + qt_bar) ? LH : LL;
  return q_t >= q_p ? HT : HS;
}

}  // namespace dopd
