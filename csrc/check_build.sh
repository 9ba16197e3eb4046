#!/usr/bin/env bash
# CI check of the C++/CUDA sources without Python: the header math unit tests (ctest) and an nvcc
# compile of the torch-free CUDA kernels for sm_90 (skipped with a notice when nvcc is absent).
# The torch-facing CUDA glue (cuda_glue.cpp) needs a CUDA build of torch; with a CPU torch, which
# lacks the CUDA configuration and cusparse.h its c10/cuda headers need, it gets a syntax-only compile
# against two stub headers (the current stream and the device guard), which still checks every ATen
# call and the launchers' signatures.
# Usage: csrc/check_build.sh [build-dir]   (from the repository root; default build/cmake)
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build/cmake}"
prefix=()
if python -c "import torch" 2>/dev/null; then
  prefix=(-DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')")
fi
cmake -S . -B "$build" "${prefix[@]}"
cmake --build "$build" -j2
ctest --test-dir "$build" --output-on-failure
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: CUDA compile checks skipped"
  exit 0
fi
nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc -c csrc/kernels_cuda.cu -o "$build/kernels_cuda_sm90.o"
echo "nvcc: csrc/kernels_cuda.cu compiled for sm_90"
cuda_include=""
for d in "${CUDA_HOME:-/nonexistent}/include" "$(dirname "$(readlink -f "$(command -v nvcc)")")/../include" \
         /usr/local/cuda/include /usr/local/cuda-*/include; do
  if [ -f "$d/cuda_runtime.h" ]; then
    cuda_include="$d"
    break
  fi
done
if ! python -c "import torch" 2>/dev/null || [ -z "$cuda_include" ]; then
  echo "torch or cuda_runtime.h not found: CUDA glue check skipped"
  exit 0
fi
torch_include="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
# The stubs shadow torch's own headers, which pull in what a CPU torch lacks (its CUDA config, cusparse.h).
stubs="$build/cuda_stubs"
mkdir -p "$stubs/ATen/cuda" "$stubs/c10/cuda"
printf '%s\n' '#pragma once' '#include <cuda_runtime.h>' \
  'namespace at { namespace cuda { inline cudaStream_t getCurrentCUDAStream() { return nullptr; } } }' \
  > "$stubs/ATen/cuda/CUDAContext.h"
printf '%s\n' '#pragma once' '#include <c10/core/Device.h>' \
  'namespace c10 { namespace cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; } }' \
  > "$stubs/c10/cuda/CUDAGuard.h"
python_include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
"${CXX:-c++}" -fsyntax-only -std=c++17 -Wno-c++20-extensions -DDOPD_WITH_CUDA -DTORCH_EXTENSION_NAME=dopd_check \
  -I"$stubs" -I"$cuda_include" -I"$torch_include" -I"$torch_include/torch/csrc/api/include" -I"$python_include" \
  -Icsrc csrc/cuda_glue.cpp csrc/bindings.cpp
echo "c++: csrc/cuda_glue.cpp and csrc/bindings.cpp (DOPD_WITH_CUDA) pass a syntax-only compile"
