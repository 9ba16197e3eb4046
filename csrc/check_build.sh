#!/usr/bin/env bash
# CI check of the C++/CUDA sources without Python: the header math unit tests (ctest) and an nvcc
# compile of the torch-free CUDA kernels for sm_90 (skipped with a notice when nvcc is absent).
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
if command -v nvcc >/dev/null 2>&1; then
  nvcc -arch=sm_90 -std=c++17 -O3 -Icsrc -c csrc/kernels_cuda.cu -o "$build/kernels_cuda_sm90.o"
  echo "nvcc: csrc/kernels_cuda.cu compiled for sm_90"
else
  echo "nvcc not found: CUDA compile check skipped"
fi
