// pybind11 module of the compiled backends. The CPU passes are always bound; with DOPD_WITH_CUDA
// (a CUDA torch and nvcc) the CUDA passes of cuda_glue.cpp are bound too, under the same names
// with a `cuda_` prefix. dopd_kernels/backends/compiled.py drives them.
#include <torch/extension.h>

#include "passes_cpu.h"
#include "row_math.h"
#ifdef DOPD_WITH_CUDA
#include "passes_cuda.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dopd-kernels compiled passes (C++/OpenMP; CUDA when built with it)";
  // The codes of row_math.h, for tests/test_constants.py to compare with dopd_kernels.codes.
  m.attr("KINDS") = py::dict(py::arg("REVERSE_KL") = int(dopd::REVERSE_KL), py::arg("FORWARD_KL") = int(dopd::FORWARD_KL),
                             py::arg("JS") = int(dopd::JS));
  m.attr("REGIMES") = py::dict(py::arg("IGNORED") = int(dopd::IGNORED), py::arg("LH") = int(dopd::LH),
                               py::arg("LL") = int(dopd::LL), py::arg("HT") = int(dopd::HT), py::arg("HS") = int(dopd::HS));
  // The skip rule's block width and δ per student dtype (dopd_kernels.skipping's SKIP_COLUMNS and TOLERANCE).
  m.attr("SKIP_COLUMNS") = dopd::SKIP_COLUMNS;
  m.attr("SKIP_TOLERANCE") = py::dict(py::arg("float32") = dopd::SKIP_TOLERANCE_FP32,
                                      py::arg("bfloat16") = dopd::SKIP_TOLERANCE_BF16,
                                      py::arg("float16") = dopd::SKIP_TOLERANCE_FP16);
  m.attr("SKIP_VALUE_SHARE") = dopd::SKIP_VALUE_SHARE;

  py::class_<dopd::Stream>(m, "Stream")
      .def(py::init([](at::Tensor x, std::optional<at::Tensor> w, std::optional<at::Tensor> b, double inv_tau,
                       int64_t valid_vocab, double scale, double softcap) {
             return dopd::Stream{x, w, b, inv_tau, valid_vocab, scale, softcap};
           }),
           py::arg("x"), py::arg("w"), py::arg("b"), py::arg("inv_tau"), py::arg("valid_vocab"), py::arg("scale") = 1.0,
           py::arg("softcap") = 0.0);
  py::class_<dopd::Tiling>(m, "Tiling")
      .def(py::init([](int64_t row_chunk, int64_t vocab_chunk) { return dopd::Tiling{row_chunk, vocab_chunk}; }),
           py::arg("row_chunk"), py::arg("vocab_chunk"));

  m.def("stats_pass", &dopd::stats_pass, py::arg("stream"), py::arg("rows"), py::arg("k"), py::arg("tiling"),
        py::arg("tail_tokens") = py::none(), py::arg("shares") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("rest_lse_pass", &dopd::rest_lse_pass, py::arg("stream"), py::arg("rows"), py::arg("cols"), py::arg("tiling"),
        py::call_guard<py::gil_scoped_release>());
  m.def("full_pass", &dopd::full_pass, py::arg("student"), py::arg("target"), py::arg("rows"), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("kind"), py::arg("beta"), py::arg("scale"), py::arg("tiling"), py::arg("grad_logits"),
        py::arg("dh"), py::arg("dw"), py::arg("db"), py::arg("skip") = false, py::arg("shares_s") = py::none(),
        py::arg("shares_t") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("grad_pass", &dopd::grad_pass, py::arg("student"), py::arg("target"), py::arg("rows"), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("c"), py::arg("dense"), py::arg("cols"), py::arg("sparse"), py::arg("overwrite"), py::arg("scale"),
        py::arg("kind"), py::arg("beta"), py::arg("tiling"), py::arg("grad_logits"), py::arg("dh"), py::arg("dw"),
        py::arg("db"), py::arg("skip") = false, py::arg("tile_keep") = py::none(), py::arg("tile_spent") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("sparse_grad", &dopd::sparse_grad, py::arg("stream"), py::arg("rows"), py::arg("cols"), py::arg("coef"),
        py::arg("dh"), py::arg("dw"), py::arg("db"), py::call_guard<py::gil_scoped_release>());
  m.def("gather", &dopd::gather, py::arg("stream"), py::arg("rows"), py::arg("cols"),
        py::call_guard<py::gil_scoped_release>());
  m.def("matmul_flops", &dopd::matmul_flops);
  m.def("reset_matmul_flops", &dopd::reset_matmul_flops);
  m.def("assign_regimes", &dopd::assign_regimes, py::arg("adv_gap"), py::arg("q_teacher"), py::arg("q_priv_student"),
        py::arg("valid"), py::arg("adv_bar"), py::arg("qt_bar"), py::arg("qp_bar"));

#ifdef DOPD_WITH_CUDA
  dopd::bind_cuda(m);
#endif
}
