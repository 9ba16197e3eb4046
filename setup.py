"""Packaging metadata lives in pyproject.toml; this file adds the compiled backends' sources.

- Every build copies csrc/ into the built package as dopd_kernels/csrc, so an installed copy can
  build the `cpp` (and `cuda`) backends just in time on first use (dopd_kernels/_build.py). An
  editable install uses csrc/ in place. No compiler is needed to install: without one the compiled
  backends report themselves unavailable and backend="auto" uses the others.
- With DOPD_KERNELS_AOT=1 and torch importable at build time (pip install --no-build-isolation .),
  the extension is built ahead of time with torch's cpp_extension and ninja against the installed
  torch, as dopd_kernels._C_cpu, plus dopd_kernels._C_cuda when nvcc and a CUDA build of torch are
  present (skipped with a one-line notice otherwise).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE_SUFFIXES = (".h", ".cpp", ".cu")


class BuildPyWithSources(build_py):
    """build_py that also ships csrc/ (headers and sources, not tests) as dopd_kernels/csrc."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "dopd_kernels" / "csrc"
        for f in sorted(CSRC.iterdir()):
            if f.is_file() and f.suffix in SOURCE_SUFFIXES:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target / f.name)


def ahead_of_time_extensions():
    if os.environ.get("DOPD_KERNELS_AOT", "0") in ("", "0"):
        return [], {}
    from torch.utils import cpp_extension

    flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    cpu = ["csrc/bindings.cpp", "csrc/kernels_cpu.cpp"]
    exts = [cpp_extension.CppExtension("dopd_kernels._C_cpu", cpu, include_dirs=[str(CSRC)],
                                       extra_compile_args=flags, extra_link_args=["-fopenmp"])]
    import torch

    if torch.version.cuda and cpp_extension.CUDA_HOME and shutil.which("nvcc"):
        exts.append(cpp_extension.CUDAExtension(
            "dopd_kernels._C_cuda", cpu + ["csrc/cuda_glue.cpp", "csrc/kernels_cuda.cu"], include_dirs=[str(CSRC)],
            define_macros=[("DOPD_WITH_CUDA", None)], extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": flags, "nvcc": ["-O3"]}))
    else:
        print("dopd-kernels: CUDA extension skipped (needs nvcc and a CUDA build of torch)")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, ext_cmds = ahead_of_time_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **ext_cmds})
