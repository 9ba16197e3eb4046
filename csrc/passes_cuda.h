// The CUDA passes (cuda_glue.cpp): the functions of passes_cpu.h for CUDA tensors, bound by
// bindings.cpp into the `cuda` submodule when the extension is built with DOPD_WITH_CUDA.
#pragma once

#include <torch/extension.h>

namespace dopd {

void bind_cuda(pybind11::module& m);

}  // namespace dopd
