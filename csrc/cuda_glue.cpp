// Torch-facing side of the CUDA backend: tensors in, raw pointers and the current stream out to the
// launchers of kernels_cuda.cu. Fused-linear tiles of raw logits come from cuBLAS (ATen matmul) into
// a fixed-size fp32 buffer; the kernels are their epilogue (head transform, statistics, gradient times
// the head's jacobian into a second buffer); the gradient tile is contracted into dH and dW with cuBLAS
// too. Log-sum-exps arrive as (hi, lo) [2, n] (split_lse); the stats pass returns (max, log-sum).
// Built only against a CUDA torch (see dopd_kernels/_build.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels_cuda.h"
#include "linear_tiles.h"
#include "passes_cpu.h"
#include "passes_cuda.h"
#include "row_math.h"

namespace dopd {
namespace gpu {

using at::Tensor;
namespace cu = dopd::cuda;

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "dopd cuda ", what, ": ", cudaGetErrorString(e));
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cu::F32;
    case at::kBFloat16: return cu::BF16;
    case at::kHalf: return cu::F16;
    default: TORCH_CHECK(false, "dopd cuda: logits must be float32, bfloat16 or float16, got ", t);
  }
  return -1;
}

void check_stream(const Stream& s) {
  TORCH_CHECK(s.x.is_cuda(), "dopd cuda: inputs must be CUDA tensors");
  TORCH_CHECK(s.acc() == at::kFloat, "dopd cuda: float64 inputs are not supported (use the torch backend)");
}

const Head<float> NO_HEAD = make_head<float>(1.0, 0.0);

// Whole rows [0, valid_vocab) of a logits-mode stream (any strides).
cu::Tile logits_tile(const Stream& s, const Tensor& rows) {
  TORCH_CHECK(s.x.dim() == 2, "dopd cuda: logits must be [N, V]");
  return cu::Tile{s.x.data_ptr(), dtype_code(s.x.scalar_type()), rows.data_ptr<int64_t>(), s.x.stride(0), 0, 0,
                  s.valid_vocab, s.x.stride(1), NO_HEAD};
}

// A dense fp32 tile [r, len] of raw logits of stream s at vocabulary columns [c0, c0 + len).
cu::Tile buffer_tile(const Stream& s, const Tensor& t, int64_t c0) {
  return cu::Tile{t.data_ptr(), cu::F32, nullptr, t.size(1), 0, c0, t.size(1), 1, make_head<float>(s.scale, s.softcap)};
}

const cu::Tile NO_TILE{nullptr, cu::F32, nullptr, 0, 0, 0, 0, 1, NO_HEAD};

// Rows [r0, r0 + r) of a log-sum-exp given as (hi, lo) [2, n] in fp32 (contiguous).
cu::RowLse row_lse(const Tensor& lse, int64_t r0) {
  const float* hi = lse.data_ptr<float>();
  return cu::RowLse{hi + r0, hi + lse.size(1) + r0};
}

Tensor split_lse_f32(const Tensor& lse, int64_t n) {
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == n, "dopd cuda: a log-sum-exp must be (hi, lo) [2, n]");
  return lse.to(at::kFloat).contiguous();
}

Tensor as_float(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : Tensor();
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor> stats_pass(const Stream& s, const Tensor& rows, int64_t k, Tiling tl) {
  check_stream(s);
  c10::cuda::CUDAGuard guard(rows.device());
  const int64_t n = rows.size(0), vv = s.valid_vocab;
  const auto f32 = rows.options().dtype(at::kFloat);
  Tensor m = at::empty({n}, f32), sum = at::empty({n}, f32), log_sum = at::empty({n}, f32);
  Tensor tv = at::empty({n, k}, f32), ti = at::empty({n, k}, rows.options().dtype(at::kLong));
  Tensor count = at::empty({n}, rows.options().dtype(at::kInt));
  const cudaStream_t st = current_stream();
  const float inv_tau = static_cast<float>(s.inv_tau);
  const int kk = static_cast<int>(k);
  check(cu::init_stats(n, kk, m.data_ptr<float>(), sum.data_ptr<float>(), tv.data_ptr<float>(), ti.data_ptr<int64_t>(),
                       count.data_ptr<int>(), st), "init_stats");
  if (!s.linear()) {
    check(cu::merge_stats(logits_tile(s, rows), n, inv_tau, m.data_ptr<float>(), sum.data_ptr<float>(), kk,
                          tv.data_ptr<float>(), ti.data_ptr<int64_t>(), count.data_ptr<int>(), st), "merge_stats");
  } else {
    const LinearPlan plan(n, vv, tl);
    Tensor buf = at::empty({plan.buffer()}, f32);
    for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
      const int64_t r = std::min(plan.rows_per_chunk, n - r0);
      const Tensor h = hidden_rows(s, rows.narrow(0, r0, r));
      for (int64_t c0 = 0; c0 < vv; c0 += plan.block) {
        const int64_t len = std::min(plan.block, vv - c0);
        const Tensor tile = linear_tile(s, h, c0, len, buf);
        check(cu::merge_stats(buffer_tile(s, tile, c0), r, inv_tau, m.data_ptr<float>() + r0, sum.data_ptr<float>() + r0, kk,
                              tv.data_ptr<float>() + r0 * k, ti.data_ptr<int64_t>() + r0 * k, count.data_ptr<int>() + r0, st),
              "merge_stats");
      }
    }
  }
  check(cu::finish_stats(n, m.data_ptr<float>(), sum.data_ptr<float>(), log_sum.data_ptr<float>(), st), "finish_stats");
  return {m, log_sum, ti};
}

std::tuple<Tensor, Tensor> full_value_pass(const Stream& s, const Stream& t, const Tensor& rows, const Tensor& lse_s,
                                           const Tensor& lse_t, int64_t kind, double beta, Tiling tl) {
  check_stream(s);
  check_stream(t);
  c10::cuda::CUDAGuard guard(rows.device());
  const int64_t n = rows.size(0), vv = s.valid_vocab;
  const Tensor ls = split_lse_f32(lse_s, n), lt = split_lse_f32(lse_t, n);
  Tensor value = at::zeros({n}, rows.options().dtype(at::kDouble)), c = at::zeros_like(value);
  const cudaStream_t st = current_stream();
  const float inv_tau = static_cast<float>(s.inv_tau);
  if (!s.linear()) {
    check(cu::add_value(logits_tile(s, rows), logits_tile(t, rows), n, inv_tau, row_lse(ls, 0), row_lse(lt, 0),
                        static_cast<int>(kind), static_cast<float>(beta), value.data_ptr<double>(), c.data_ptr<double>(), st),
          "add_value");
  } else {
    const LinearPlan plan(n, vv, tl);
    Tensor buf_s = at::empty({plan.buffer()}, rows.options().dtype(at::kFloat)), buf_t = at::empty_like(buf_s);
    for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
      const int64_t r = std::min(plan.rows_per_chunk, n - r0);
      const Tensor rr = rows.narrow(0, r0, r);
      const Tensor hs = hidden_rows(s, rr), ht = hidden_rows(t, rr);
      for (int64_t c0 = 0; c0 < vv; c0 += plan.block) {
        const int64_t len = std::min(plan.block, vv - c0);
        const Tensor ts = linear_tile(s, hs, c0, len, buf_s), tt = linear_tile(t, ht, c0, len, buf_t);
        check(cu::add_value(buffer_tile(s, ts, c0), buffer_tile(t, tt, c0), r, inv_tau, row_lse(ls, r0),
                            row_lse(lt, r0), static_cast<int>(kind), static_cast<float>(beta),
                            value.data_ptr<double>() + r0, c.data_ptr<double>() + r0, st),
              "add_value");
      }
    }
  }
  if (kind == REVERSE_KL) c.copy_(value);
  return {value, c};
}

void grad_pass(const Stream& s, const std::optional<Stream>& t, const Tensor& rows, const Tensor& lse_s,
               const std::optional<Tensor>& lse_t, const std::optional<Tensor>& c, const std::optional<Tensor>& dense,
               const std::optional<Tensor>& cols, const std::optional<Tensor>& sparse, bool overwrite, const Tensor& scale,
               int64_t kind, double beta, Tiling tl, const std::optional<Tensor>& grad_logits, const std::optional<Tensor>& dh,
               const std::optional<Tensor>& dw, const std::optional<Tensor>& db) {
  check_stream(s);
  c10::cuda::CUDAGuard guard(rows.device());
  const bool full = t.has_value();
  if (full) check_stream(*t);
  const int64_t n = rows.size(0), vv = s.valid_vocab;
  const Tensor ls = split_lse_f32(lse_s, n), sc = scale.to(at::kFloat).contiguous();
  const Tensor lt = full ? split_lse_f32(*lse_t, n) : Tensor();
  // The constant stays float64: reverse KL's k = c + lse_s − lse_t (reverse_kl_offset) needs it unrounded.
  const Tensor cc = c.has_value() && c->defined() ? c->to(at::kDouble).contiguous() : Tensor();
  const Tensor dn = as_float(dense), sp = as_float(sparse);
  const Tensor cl = cols.has_value() && cols->defined() ? cols->contiguous() : Tensor();
  const int k = cl.defined() ? static_cast<int>(cl.size(1)) : 0;
  const cudaStream_t st = current_stream();
  const float inv_tau = static_cast<float>(s.inv_tau), b = static_cast<float>(beta);
  const int kd = static_cast<int>(kind);
  // Per-row arrays of rows [r0, r0 + r): offsets into the group's arrays.
  auto launch = [&](const cu::Tile& zs, const cu::Tile& zt, int64_t r0, int64_t r, cu::Out out) {
    check(cu::grad_tile(zs, zt, r, inv_tau, row_lse(ls, r0), full ? row_lse(lt, r0) : cu::RowLse{nullptr, nullptr},
                        cc.defined() ? cc.data_ptr<double>() + r0 : nullptr, dn.defined() ? dn.data_ptr<float>() + r0 : nullptr,
                        cl.defined() ? cl.data_ptr<int64_t>() + r0 * k : nullptr, sp.defined() ? sp.data_ptr<float>() + r0 * k : nullptr,
                        k, overwrite, sc.data_ptr<float>() + r0, kd, b, out, st),
          "grad_tile");
  };

  if (!s.linear()) {
    TORCH_CHECK(grad_logits.has_value() && grad_logits->defined(), "dopd cuda: logits mode needs grad_logits");
    const Tensor& g = *grad_logits;
    TORCH_CHECK(g.dim() == 2 && g.scalar_type() == s.x.scalar_type(), "dopd cuda: grad_logits must be [N, V] of the logits' dtype");
    launch(logits_tile(s, rows), full ? logits_tile(*t, rows) : NO_TILE, 0, n,
           cu::Out{g.data_ptr(), rows.data_ptr<int64_t>(), g.stride(0), 0, g.stride(1)});
    return;
  }
  const bool want_dh = dh.has_value() && dh->defined(), want_dw = dw.has_value() && dw->defined(),
             want_db = db.has_value() && db->defined();
  const LinearPlan plan(n, vv, tl);
  Tensor buf_s = at::empty({plan.buffer()}, rows.options().dtype(at::kFloat)), buf_g = at::empty_like(buf_s);
  Tensor buf_t = full ? at::empty_like(buf_s) : Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += plan.rows_per_chunk) {
    const int64_t r = std::min(plan.rows_per_chunk, n - r0);
    const Tensor rr = rows.narrow(0, r0, r);
    const Tensor hs = hidden_rows(s, rr);
    const Tensor ht = full ? hidden_rows(*t, rr) : Tensor();
    Tensor dh_rows = want_dh ? at::zeros({r, s.x.size(1)}, rows.options().dtype(at::kFloat)) : Tensor();
    for (int64_t c0 = 0; c0 < vv; c0 += plan.block) {
      const int64_t len = std::min(plan.block, vv - c0);
      const Tensor tile = linear_tile(s, hs, c0, len, buf_s);
      const cu::Tile zt = full ? buffer_tile(*t, linear_tile(*t, ht, c0, len, buf_t), c0) : NO_TILE;
      // The gradient tile G [r, len] (with respect to the raw logits) is contracted at once: dH += G·W,
      // dW += Gᵀ·H, db += Σ G. It has its own buffer: the sparse columns read the logits after the dense write.
      Tensor grad = buf_g.narrow(0, 0, r * len).view({r, len});
      launch(buffer_tile(s, tile, c0), zt, r0, r, cu::Out{grad.data_ptr(), nullptr, len, 0, 1});
      if (want_dh) contract_into(s, dh_rows, grad, weight_block(s, c0, len));
      if (want_dw) contract_into(s, dw->narrow(0, c0, len), grad.t(), hs);
      if (want_db) db->narrow(0, c0, len).add_(grad.sum(0));
    }
    if (want_dh) dh->index_add_(0, rr, dh_rows);
  }
}

// Scaled logits at a few columns per row with ATen ops (O(n·K) work; chunked so that the gathered
// weight rows [r, K, H] stay within GATHER_BUDGET elements in fused-linear mode).
constexpr int64_t GATHER_BUDGET = int64_t(1) << 22;

Tensor gather(const Stream& s, const Tensor& rows, const Tensor& cols) {
  check_stream(s);
  c10::cuda::CUDAGuard guard(rows.device());
  Tensor out;
  if (!s.linear()) {
    out = s.x.index({rows.unsqueeze(1), cols}).to(at::kFloat) * s.inv_tau;
  } else {
    const int64_t k = cols.size(1), h = s.x.size(1);
    const int64_t step = std::max<int64_t>(1, GATHER_BUDGET / std::max<int64_t>(1, k * h));
    std::vector<Tensor> parts;
    for (int64_t r0 = 0; r0 < rows.size(0); r0 += step) {
      const int64_t r = std::min(step, rows.size(0) - r0);
      const Tensor c = cols.narrow(0, r0, r);
      // The gathered weight rows stay in the operand dtype (16-bit on tensor cores with an fp32
      // output under half_operands, as linear_tile does: no fp32 copy of them).
      const Tensor w = s.w->index_select(0, c.reshape(-1)).view({r, k, h}).to(operand_dtype(s));
      const Tensor x = hidden_rows(s, rows.narrow(0, r0, r)).unsqueeze(2);
      Tensor z = (half_operands(s) ? at::bmm(w, x, s.acc()) : at::bmm(w, x)).squeeze(2).to(at::kFloat);
      if (s.b.has_value() && s.b->defined()) z = z + s.b->index_select(0, c.reshape(-1)).view({r, k}).to(at::kFloat);
      parts.push_back(z);
    }
    out = parts.empty() ? at::empty({0, k}, rows.options().dtype(at::kFloat)) : at::cat(parts);
    out = out * s.scale;  // the output-head transform (LinearSource.transform), then 1/τ
    if (s.softcap > 0) out = at::tanh(out / s.softcap) * s.softcap;
    out = out * s.inv_tau;
  }
  return out.masked_fill(cols >= s.valid_vocab, -std::numeric_limits<float>::infinity());
}

}  // namespace gpu

void bind_cuda(pybind11::module& m) {
  namespace py = pybind11;
  py::module cm = m.def_submodule("cuda", "CUDA passes (same signatures as the CPU ones)");
  cm.attr("MAX_TOPK") = cuda::MAX_TOPK;  // CudaBackend.select hands larger top-Ks to the torch backend
  cm.def("stats_pass", &gpu::stats_pass, py::arg("stream"), py::arg("rows"), py::arg("k"), py::arg("tiling"));
  cm.def("full_value_pass", &gpu::full_value_pass, py::arg("student"), py::arg("target"), py::arg("rows"), py::arg("lse_s"),
         py::arg("lse_t"), py::arg("kind"), py::arg("beta"), py::arg("tiling"));
  cm.def("grad_pass", &gpu::grad_pass, py::arg("student"), py::arg("target"), py::arg("rows"), py::arg("lse_s"),
         py::arg("lse_t"), py::arg("c"), py::arg("dense"), py::arg("cols"), py::arg("sparse"), py::arg("overwrite"), py::arg("scale"),
         py::arg("kind"), py::arg("beta"), py::arg("tiling"), py::arg("grad_logits"), py::arg("dh"), py::arg("dw"),
         py::arg("db"));
  cm.def("gather", &gpu::gather, py::arg("stream"), py::arg("rows"), py::arg("cols"));
}

}  // namespace dopd
