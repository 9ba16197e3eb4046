"""Building and loading the compiled extension (`csrc/`).

The extension is built just in time, on first use, with `torch.utils.cpp_extension.load` and ninja
against the torch that is imported, into a cache directory keyed by the torch version, the sources,
the flags and the CPU (so a changed source or a different machine triggers a rebuild):
`$DOPD_KERNELS_CACHE` or `~/.cache/dopd_kernels/<key>`. The first build takes about half a minute;
later loads take about a second. An ahead-of-time build made by `setup.py` (`DOPD_KERNELS_AOT=1`)
is used instead when present.

Sources: `csrc/` next to the package (a source checkout, editable install) or `dopd_kernels/csrc`
(a regular install: setup.py copies them into the package).

`DOPD_KERNELS_NO_BUILD=1` disables building; the compiled backends then report themselves
unavailable and `backend="auto"` falls back to the next backend.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
from pathlib import Path
from typing import List

import torch

CPU_SOURCES = ("bindings.cpp", "kernels_cpu.cpp")
CUDA_SOURCES = ("cuda_glue.cpp", "kernels_cuda.cu")
HEADERS = ("row_math.h", "passes_cpu.h", "passes_cuda.h")
# -fno-trapping-math and -fno-math-errno (as torch itself is built) let the branch-free exp/log and
# the masked selects of row_math.h vectorise; IEEE results are unchanged (no -ffast-math).
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
CPU_LDFLAGS = ["-fopenmp"]


def csrc_dir() -> Path:
    """Directory holding the C++/CUDA sources."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "row_math.h").is_file():
            return candidate
    raise RuntimeError(f"dopd_kernels: C++ sources not found (looked in {here / 'csrc'} and {here.parent / 'csrc'})")


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _cache_dir(name: str, files: List[Path], flags: List[str]) -> Path:
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), platform.machine(), _cpu_signature(), " ".join(flags)):
        h.update(part.encode())
    for f in files:
        h.update(f.read_bytes())
    root = Path(os.environ.get("DOPD_KERNELS_CACHE", Path.home() / ".cache" / "dopd_kernels"))
    return root / f"{name}-torch{torch.__version__.replace('+', '_')}-{h.hexdigest()[:12]}"


def _check_can_build() -> None:
    if os.environ.get("DOPD_KERNELS_NO_BUILD", "0") not in ("", "0"):
        raise RuntimeError("building the compiled extension is disabled (DOPD_KERNELS_NO_BUILD is set)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("the compiled extension needs ninja to build (pip install ninja)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("the compiled extension needs a C++ compiler (c++ or $CXX) to build")


def _jit(name: str, sources: List[str], cuda: bool):
    _check_can_build()
    from torch.utils import cpp_extension

    src = csrc_dir()
    files = [src / s for s in sources] + [src / h for h in HEADERS if (src / h).is_file()]
    cflags = CPU_CFLAGS + (["-DDOPD_WITH_CUDA"] if cuda else [])
    cuda_flags = ["-O3"] if cuda else None
    build_dir = _cache_dir(name, files, cflags + (cuda_flags or []))
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name, sources=[str(src / s) for s in sources], extra_include_paths=[str(src)],
            extra_cflags=cflags, extra_cuda_cflags=cuda_flags, extra_ldflags=CPU_LDFLAGS,
            build_directory=str(build_dir), with_cuda=cuda, verbose=os.environ.get("DOPD_KERNELS_VERBOSE") == "1")
    except Exception as e:  # compiler errors surface as several exception types
        raise RuntimeError(f"building the compiled extension {name} failed: {e}") from e


@functools.lru_cache(maxsize=None)
def _load_cached(kind: str):
    """The extension module, or the RuntimeError saying why it cannot be had (cached: one try per process)."""
    try:
        if kind == "cpu":
            try:
                from . import _C_cpu  # built ahead of time by setup.py

                return _C_cpu
            except ImportError:
                return _jit("dopd_kernels_cpu", list(CPU_SOURCES), cuda=False)
        if not (torch.version.cuda and torch.cuda.is_available()):
            raise RuntimeError("the cuda backend needs a CUDA build of torch and a GPU")
        try:
            from . import _C_cuda  # built ahead of time by setup.py

            return _C_cuda
        except ImportError:
            return _jit("dopd_kernels_cuda", list(CPU_SOURCES + CUDA_SOURCES), cuda=True)
    except RuntimeError as e:
        return e


def load_extension(kind: str = "cpu"):
    """The compiled module for `kind` ("cpu" or "cuda"); RuntimeError with the reason if unavailable."""
    mod = _load_cached(kind)
    if isinstance(mod, RuntimeError):
        raise mod
    return mod
