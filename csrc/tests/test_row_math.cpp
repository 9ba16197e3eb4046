// Unit tests of csrc/row_math.h, the per-row math shared by the CPU and CUDA kernels (run by ctest).
// Plain C++ (no torch): each test checks the header against a direct float64 computation.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "row_math.h"

using namespace dopd;

static int failures = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

static const double NINF = -HUGE_VAL;

static void test_exp_log() {
  double worst = 0;
  for (double x = -87.0; x <= 0.5; x += 1e-3) {
    const double e = std::exp(x), got = exp_f(static_cast<float>(x));
    worst = std::max(worst, std::abs(got - std::exp(double(float(x)))) / e);
  }
  CHECK(worst < 4e-7, "exp_f max relative error %.3g", worst);
  CHECK(exp_f(-HUGE_VALF) == 0.0f, "exp(-inf) must be 0");
  CHECK(exp_f(-100.0f) == 0.0f, "exp(-100) flushes to 0");
  CHECK(exp_f(0.0f) == 1.0f, "exp(0) = %.9g", exp_f(0.0f));
  worst = 0;
  for (double x = 1e-30; x < 1e30; x *= 1.0007) {
    const float xf = static_cast<float>(x);
    worst = std::max(worst, std::abs(log_f(xf) - std::log(double(xf))) / std::max(1.0, std::abs(std::log(double(xf)))));
  }
  CHECK(worst < 3e-7, "log_f max error %.3g", worst);
  CHECK(log_f(1.0f) == 0.0f, "log(1) = %.9g", log_f(1.0f));
}

static void test_logsumexp() {
  std::mt19937 rng(1);
  std::normal_distribution<double> nd(0, 5);
  for (int trial = 0; trial < 50; ++trial) {
    const int n = 1 + trial * 37;
    std::vector<double> z(n);
    for (auto& v : z) v = nd(rng);
    if (trial % 5 == 0) z[0] = NINF;  // -inf entries (padding) contribute nothing
    double mx = NINF;
    for (double v : z) mx = std::max(mx, v);
    double s = 0;
    for (double v : z) s += v > NINF ? std::exp(v - mx) : 0.0;
    const double truth = mx > NINF ? mx + std::log(s) : NINF;
    auto close = [&](double got, double tol) { return got == truth || std::abs(got - truth) < tol * std::max(1.0, std::abs(truth)); };
    // Blocks of any size merged in order, and single pushes, agree with the direct sum.
    for (int block : {1, 3, 64, n}) {
      LseState<double> st = lse_empty<double>();
      for (int b0 = 0; b0 < n; b0 += block) {
        LseState<double> part = lse_empty<double>();
        for (int j = b0; j < std::min(n, b0 + block); ++j) lse_push(part, z[j]);
        st = lse_merge(st, part);
      }
      CHECK(close(st.m + lse_log_sum(st), 1e-12), "block %d: %.17g vs %.17g", block,
            st.m + lse_log_sum(st), truth);
    }
    LseState<float> sf = lse_empty<float>();
    for (double v : z) lse_push(sf, static_cast<float>(v));
    // The pair (max, log-sum) added in float64: accurate to fp32 precision of the log-sum alone.
    const double got = double(sf.m) + double(lse_log_sum(sf));
    CHECK(close(got, 2e-6), "float: %.9g vs %.9g", got, truth);
  }
  LseState<double> empty = lse_merge(lse_empty<double>(), lse_empty<double>());
  lse_push(empty, NINF);
  CHECK(empty.m == NINF && lse_log_sum(empty) == 0.0, "all -inf row must give (-inf, 0)");
  // A NaN anywhere in a row makes its log-sum-exp NaN, whatever is merged in afterwards; +inf makes it
  // not finite: the engine then knows the row has no distribution.
  LseState<float> bad = lse_empty<float>();
  lse_push(bad, 1.0f);
  lse_push(bad, std::nanf(""));
  LseState<float> more = lse_empty<float>();
  lse_push(more, 5.0f);
  bad = lse_merge(lse_merge(bad, more), lse_empty<float>());
  CHECK(std::isnan(bad.m + lse_log_sum(bad)), "a NaN logit must give a NaN log-sum-exp");
  LseState<float> only_nan = lse_empty<float>();
  lse_push(only_nan, std::nanf(""));
  only_nan = lse_merge(only_nan, lse_empty<float>());
  CHECK(std::isnan(lse_log_sum(only_nan)), "an all-NaN row must give a NaN log-sum-exp");
  LseState<float> inf = lse_empty<float>();
  lse_push(inf, 2.0f);
  lse_push(inf, HUGE_VALF);
  CHECK(!std::isfinite(inf.m + lse_log_sum(inf)), "a +inf logit must give a non-finite log-sum-exp");
  // At logits ~1e4 the pair keeps log p to fp32 precision where one fp32 log-sum-exp would not.
  std::vector<double> big(1000);
  for (size_t j = 0; j < big.size(); ++j) big[j] = 1e4 + 3.0 * std::sin(double(j));
  LseState<float> sb = lse_empty<float>();
  for (double v : big) lse_push(sb, static_cast<float>(v));
  double mx = NINF, s = 0;
  for (double v : big) mx = std::max(mx, double(float(v)));
  for (double v : big) s += std::exp(double(float(v)) - mx);
  const double lse64 = mx + std::log(s);
  const float hi = static_cast<float>(double(sb.m) + double(lse_log_sum(sb)));
  const float lo = static_cast<float>(double(sb.m) + double(lse_log_sum(sb)) - double(hi));
  double worst = 0;
  for (double v : big)
    worst = std::max(worst, std::abs(double(log_prob(static_cast<float>(v), hi, lo)) - (double(float(v)) - lse64)));
  CHECK(worst < 2e-6, "log p at logits ~1e4: error %.3g", worst);
}

static void test_head() {
  // logit = cap·tanh(scale·z / cap) and its derivative scale·(1 − tanh²), against float64 finite differences.
  const Head<double> h = make_head<double>(0.7, 30.0);
  for (double z = -200; z <= 200; z += 0.37) {
    const double want = 30.0 * std::tanh(0.7 * z / 30.0), eps = 1e-6;
    CHECK(std::abs(h.logit(z) - want) < 1e-12, "soft-capped logit at %g", z);
    const double fd = (h.logit(z + eps) - h.logit(z - eps)) / (2 * eps);
    CHECK(std::abs(h.jacobian(h.logit(z)) - fd) < 1e-6, "jacobian at %g: %.9g vs %.9g", z, h.jacobian(h.logit(z)), fd);
  }
  const Head<float> plain = make_head<float>(2.5, 0.0);
  CHECK(plain.logit(3.0f) == 7.5f && plain.jacobian(7.5f) == 2.5f, "scale-only head");
  CHECK(make_head<float>(1.0, 0.0).identity() && !plain.identity(), "identity head");
}

static void test_topk() {
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> small(0, 7);  // many ties
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + trial % 53, k = trial % 9;
    std::vector<double> z(n);
    for (auto& v : z) v = small(rng);
    if (trial % 7 == 0) z[trial % n] = NINF;
    std::vector<double> hv(std::max(k, 1));
    std::vector<int64_t> hi(std::max(k, 1));
    int count = 0;
    // Stream the row, filtering as the kernels do.
    for (int j = 0; j < n; ++j)
      if (topk_admits(z[j], hv.data(), count, k)) topk_push(hv.data(), hi.data(), &count, k, z[j], j);
    topk_sort(hv.data(), hi.data(), count);
    std::vector<int> order(n);
    for (int j = 0; j < n; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });  // ties: smaller index
    CHECK(count == std::min(k, n), "count %d for k %d n %d", count, k, n);
    for (int q = 0; q < count; ++q)
      CHECK(hi[q] == order[q] && hv[q] == z[order[q]], "trial %d rank %d: col %lld vs %d", trial, q, (long long)hi[q],
            order[q]);
    // The sorted list admits exactly what beats its last entry.
    if (count == k && k > 0) {
      CHECK(!topk_admits_sorted(hv[k - 1], hv.data(), count, k) && topk_admits_sorted(hv[k - 1] + 1, hv.data(), count, k),
            "sorted admission");
    }
  }
  double v[1] = {0};
  CHECK(!topk_admits(1e300, v, 0, 0) && !topk_admits_sorted(1e300, v, 0, 0), "k = 0 admits nothing");
  CHECK(topk_admits(NINF, v, 0, 1), "a heap with room admits -inf");
}

// Divergence of log-prob vectors computed directly in double.
static double direct_div(const std::vector<double>& lp, const std::vector<double>& lq, int kind, double beta) {
  double out = 0;
  for (size_t j = 0; j < lp.size(); ++j) {
    const double p = std::exp(lp[j]), q = std::exp(lq[j]);
    if (kind == REVERSE_KL) out += p > 0 ? p * (lp[j] - lq[j]) : 0;
    if (kind == FORWARD_KL) out += q > 0 ? q * (lq[j] - lp[j]) : 0;
    if (kind == JS) {
      const double m = beta * p + (1 - beta) * q;
      out += (p > 0 ? beta * p * std::log(p / m) : 0) + (q > 0 ? (1 - beta) * q * std::log(q / m) : 0);
    }
  }
  return out;
}

static std::vector<double> log_softmax(const std::vector<double>& z) {
  double mx = NINF;
  for (double v : z) mx = std::max(mx, v);
  double s = 0;
  for (double v : z) s += std::exp(v - mx);
  std::vector<double> out(z.size());
  for (size_t j = 0; j < z.size(); ++j) out[j] = z[j] - mx - std::log(s);
  return out;
}

template <int KIND>
static void check_kind(std::mt19937& rng, double beta) {
  std::normal_distribution<double> nd(0, 2);
  const int v = 23;
  std::vector<double> zs(v), zt(v);
  for (int j = 0; j < v; ++j) {
    zs[j] = nd(rng);
    zt[j] = zs[j] + nd(rng);
  }
  zs[3] = NINF;  // a column with no student mass (none of the target's either, or forward KL is infinite)
  if (KIND == FORWARD_KL) zt[3] = NINF;
  const DivParams<double> P = div_params<double>(KIND, beta);
  const auto lp = log_softmax(zs), lq = log_softmax(zt);
  double value = 0, c = 0;
  for (int j = 0; j < v; ++j) {
    value += value_term<KIND>(lp[j], lq[j], P);
    if (KIND == JS) c += js_c_term(lp[j], lq[j], P);
  }
  const double truth = direct_div(lp, lq, KIND, beta);
  CHECK(std::abs(value - truth) < 1e-12, "kind %d value %.17g vs %.17g", KIND, value, truth);
  if (KIND == REVERSE_KL) c = value;
  const double k = reverse_kl_offset(c, zs[0] - lp[0], 0.0, zt[0] - lq[0], 0.0);
  // τ ∂D/∂z_v against central differences of the direct divergence (τ = 1).
  for (int j = 0; j < v; ++j) {
    if (j == 3) continue;
    const double h = 1e-6;
    auto zp = zs, zm = zs;
    zp[j] += h;
    zm[j] -= h;
    const double fd = (direct_div(log_softmax(zp), lq, KIND, beta) - direct_div(log_softmax(zm), lq, KIND, beta)) / (2 * h);
    const double got = full_grad_term<KIND>(lp[j], lq[j], zs[j], zt[j], c, k, P);
    CHECK(std::abs(got - fd) < 1e-6, "kind %d column %d: gradient %.10g vs finite difference %.10g", KIND, j, got, fd);
  }
  CHECK(full_grad_term<KIND>(NINF, lq[3], NINF, zt[3], c, k, P) == (KIND == FORWARD_KL ? -std::exp(lq[3]) : 0.0), "no-mass column");
}

// The online KL of blocks merged in any order (KlState) against the direct one, at logits ~N(0, 40²) where the
// log-ratios are ~100: value to 1e-12 relative, K = E_p[a − b] to 1e-12 of its size.
static void test_online_kl() {
  std::mt19937 rng(5);
  std::normal_distribution<double> nd(0, 40);
  const int v = 61;
  std::vector<float> za(v), zb(v);
  for (int j = 0; j < v; ++j) {
    za[j] = float(nd(rng));
    zb[j] = float(0.6 * za[j] + 0.8 * nd(rng));
  }
  std::vector<double> a(za.begin(), za.end()), b(zb.begin(), zb.end());
  const auto la = log_softmax(a), lb = log_softmax(b);
  double kl = 0, k = 0;
  for (int j = 0; j < v; ++j) {
    kl += std::exp(la[j]) * (la[j] - lb[j]);
    k += std::exp(la[j]) * (a[j] - b[j]);
  }
  for (int block : {1, 7, 61}) {
    KlState<float> st = kl_empty<float>();
    for (int c0 = v; c0 > 0; c0 -= block) {  // blocks last to first: the maxima move both ways
      const int lo = std::max(0, c0 - block);
      KlState<float> seg = kl_empty<float>();
      for (int j = lo; j < c0; ++j) seg.a.m = std::max(seg.a.m, za[j]), seg.b.m = std::max(seg.b.m, zb[j]);
      for (int j = lo; j < c0; ++j) {
        const double e = std::exp(double(za[j] - seg.a.m));
        seg.a.s += float(e);
        seg.b.s += std::exp(zb[j] - seg.b.m);
        seg.w += e * (double(za[j]) - double(zb[j]));
        seg.sw += e;
      }
      st = kl_merge(st, seg);
    }
    CHECK(std::abs(kl_mean_difference(st) - k) < 1e-12 * std::abs(k) + 1e-12, "block %d: K %.17g vs %.17g", block,
          kl_mean_difference(st), k);
    CHECK(std::abs(kl_value(st) - kl) < 1e-6 * kl, "block %d: KL %.17g vs %.17g", block, kl_value(st), kl);
  }
}

static void test_divergences() {
  std::mt19937 rng(3);
  for (int t = 0; t < 5; ++t) {
    check_kind<REVERSE_KL>(rng, 0.5);
    check_kind<FORWARD_KL>(rng, 0.5);
    check_kind<JS>(rng, 0.5);
    check_kind<JS>(rng, 0.3);
  }
  const DivParams<float> P = div_params<float>(JS, 0.5);
  const float ninf = -HUGE_VALF;
  CHECK(value_term<JS>(ninf, ninf, P) == 0.0f, "JS of two empty columns");
  CHECK(std::isfinite(value_term<JS>(-1e4f, ninf, P)), "JS with an empty target column");
  CHECK(std::isfinite(full_grad_term<JS>(-2.0f, ninf, 1.0f, ninf, 0.1f, 0.0, P)), "JS gradient with an empty target column");
  CHECK(std::abs(log_mixture(0.0f, 0.0f, P)) < 1e-7f, "log m of two certain columns = %.9g", log_mixture(0.0f, 0.0f, P));
  CHECK(dense_grad_term(std::log(0.25), 2.0) == 0.5, "dense term p · dense");
}

static void test_regimes() {
  // Ā = 0.5, q̄_T = 0.3, q̄_P = 0.2: low gaps compare q_T + q_P with 0.5; high gaps compare q_T with q_P.
  CHECK(select_regime(0.1, 0.3, 0.2, 0.5, 0.3, 0.2) == LH, "sum equal to the bar is LH");
  CHECK(select_regime(0.1, 0.1, 0.1, 0.5, 0.3, 0.2) == LL, "LL");
  CHECK(select_regime(0.5, 0.4, 0.4, 0.5, 0.3, 0.2) == HT, "gap equal to Ā is high; q_T = q_P is HT");
  CHECK(select_regime(0.9, 0.1, 0.4, 0.5, 0.3, 0.2) == HS, "HS");
}

int main() {
  test_exp_log();
  test_logsumexp();
  test_head();
  test_topk();
  test_divergences();
  test_online_kl();
  test_regimes();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("row_math: all checks passed\n");
  return 0;
}
