"""Building and loading the compiled extension (`csrc/`).

The extension is built just in time, on first use, with `torch.utils.cpp_extension.load` and ninja
against the torch that is imported, into a cache directory keyed by the torch version, the sources,
the flags and the CPU (so a changed source or a different machine triggers a rebuild):
`$DOPD_KERNELS_CACHE/<key>` or `~/.cache/dopd_kernels/<key>`. The first build takes about half a
minute; later loads take about a second. An ahead-of-time build made by `setup.py`
(`DOPD_KERNELS_AOT=1`) is used instead when present.

Sources: `csrc/` next to the package (a source checkout, editable install) or `dopd_kernels/csrc`
(a regular install: setup.py copies them into the package).

Failures never break the library: a cache directory that cannot be created, a build lock that cannot
be had, a failed build or a module that does not load make the compiled backends unavailable, with
one warning per process saying why and how to fix it, and `backend="auto"` falls back to the next
backend (`torch` on CPU). Builds and loads of one cache entry are serialised by an OS lock (`flock`)
on `<key>/build.flock`, which the kernel releases when its holder dies, even by `kill -9`; a
waiter gives up after `$DOPD_KERNELS_BUILD_TIMEOUT` seconds (default 900) with a message.

`DOPD_KERNELS_NO_BUILD=1` disables building (silently); the compiled backends then report
themselves unavailable and `backend="auto"` falls back to the next backend.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator, List, NamedTuple

import torch

try:
    import fcntl
except ImportError:  # not POSIX (Windows): torch's own lock file only
    fcntl = None

CPU_SOURCES = ("bindings.cpp", "kernels_cpu.cpp")
CUDA_SOURCES = ("cuda_glue.cpp", "kernels_cuda.cu")
# Headers each build includes (part of the cache key: a changed header rebuilds only what uses it).
CPU_HEADERS = ("row_math.h", "passes_cpu.h", "linear_tiles.h")
CUDA_HEADERS = CPU_HEADERS + ("passes_cuda.h", "kernels_cuda.h")
# -fno-trapping-math and -fno-math-errno (as torch itself is built) let the branch-free exp/log and
# the masked selects of row_math.h vectorise; IEEE results are unchanged (no -ffast-math).
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]
LOCK_NAME = "build.flock"
DEFAULT_BUILD_TIMEOUT_S = 900.0

FIX_CACHE = "set DOPD_KERNELS_CACHE to a writable local directory"
FIX_QUIET = "set DOPD_KERNELS_NO_BUILD=1 to use the other backends without this warning"


class _Unwanted(RuntimeError):
    """The compiled extension is not wanted or cannot apply here (opt-out, no GPU): no warning."""


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


class BuildSpec(NamedTuple):
    """What `cpp_extension.load` is given for one extension, and where it builds."""

    name: str
    sources: List[str]
    cflags: List[str]
    cuda_flags: List[str]
    directory: Path


def build_spec(kind: str) -> BuildSpec:
    """The JIT build of extension `kind` ("cpu" or "cuda"); `directory` is its cache entry."""
    cuda = kind == "cuda"
    name = f"dopd_kernels_{kind}"
    src = csrc_dir()
    sources = list(CPU_SOURCES + CUDA_SOURCES) if cuda else list(CPU_SOURCES)
    cflags = CPU_CFLAGS + (["-DDOPD_WITH_CUDA"] if cuda else [])
    cuda_flags = CUDA_CFLAGS if cuda else []
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), platform.machine(), _cpu_signature(),
                 " ".join(cflags + cuda_flags)):
        h.update(part.encode())
    for f in [src / s for s in sources] + [src / x for x in (CUDA_HEADERS if cuda else CPU_HEADERS)]:
        h.update(f.read_bytes())
    root = Path(os.environ.get("DOPD_KERNELS_CACHE") or Path.home() / ".cache" / "dopd_kernels")
    directory = root / f"{name}-torch{torch.__version__.replace('+', '_')}-{h.hexdigest()[:12]}"
    return BuildSpec(name, [str(src / s) for s in sources], cflags, cuda_flags, directory)


def _build_timeout() -> float:
    raw = os.environ.get("DOPD_KERNELS_BUILD_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_BUILD_TIMEOUT_S
    except ValueError:
        raise RuntimeError(f"DOPD_KERNELS_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive build lock of the cache entry `directory` (created if missing).

    An `flock` is released by the kernel when its holder exits, however it exits, so a killed build
    never blocks the next one. torch's own lock file (`<directory>/lock`, created with O_EXCL and
    removed by its creator) is not: a builder killed by `kill -9` leaves it behind and every later
    `cpp_extension.load` waits on it forever. Under this lock no other process of this library is
    building, so such a file is stale and is removed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK_NAME, "a+")
    except OSError as e:
        raise RuntimeError(f"cannot create the build cache directory {directory} ({e}); {FIX_CACHE}") from e
    with handle:
        if fcntl is not None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RuntimeError(
                            f"another running process has held the build lock {directory / LOCK_NAME} for over "
                            f"{timeout:.0f} s; wait for it to finish or end it, raise DOPD_KERNELS_BUILD_TIMEOUT, "
                            f"or {FIX_CACHE}") from None
                    time.sleep(0.1)
                except OSError as e:  # e.g. a file system without locks
                    raise RuntimeError(f"cannot lock {directory / LOCK_NAME} ({e}); {FIX_CACHE}") from e
            (directory / "lock").unlink(missing_ok=True)
        yield  # the lock is released when the file is closed


def _check_can_build() -> None:
    if os.environ.get("DOPD_KERNELS_NO_BUILD", "0") not in ("", "0"):
        raise _Unwanted("building the compiled extension is disabled (DOPD_KERNELS_NO_BUILD is set)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"the compiled extension needs ninja to build (pip install ninja), or {FIX_QUIET}")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError(f"the compiled extension needs a C++ compiler (c++ or $CXX) to build, or {FIX_QUIET}")


def _jit(kind: str):
    _check_can_build()
    from torch.utils import cpp_extension

    spec = build_spec(kind)
    with build_lock(spec.directory, _build_timeout()):
        try:
            return cpp_extension.load(
                name=spec.name, sources=spec.sources, extra_include_paths=[str(csrc_dir())],
                extra_cflags=spec.cflags, extra_cuda_cflags=spec.cuda_flags or None, extra_ldflags=CPU_LDFLAGS,
                build_directory=str(spec.directory), with_cuda=kind == "cuda",
                verbose=os.environ.get("DOPD_KERNELS_VERBOSE") == "1")
        except (ImportError, OSError) as e:  # built, but the module does not load
            raise RuntimeError(f"loading the compiled extension {spec.name} from {spec.directory} failed ({e}); "
                               f"delete that directory to rebuild it, or {FIX_CACHE}") from e
        except Exception as e:  # compiler errors surface as several exception types
            raise RuntimeError(f"building the compiled extension {spec.name} failed ({e}); rerun with "
                               f"DOPD_KERNELS_VERBOSE=1 to see the compiler's output, or {FIX_QUIET}") from e


def _load(kind: str):
    if kind == "cpu":
        try:
            from . import _C_cpu  # built ahead of time by setup.py

            return _C_cpu
        except ImportError:
            return _jit("cpu")
    if not (torch.version.cuda and torch.cuda.is_available()):
        raise _Unwanted("the cuda backend needs a CUDA build of torch and a GPU")
    try:
        from . import _C_cuda  # built ahead of time by setup.py

        return _C_cuda
    except ImportError:
        return _jit("cuda")


@functools.lru_cache(maxsize=None)
def _load_cached(kind: str):
    """The extension module, or the RuntimeError saying why it cannot be had (cached: one try, and at
    most one warning, per process and kind)."""
    try:
        return _load(kind)
    except _Unwanted as e:
        return RuntimeError(str(e))
    except Exception as e:  # OSError, ImportError, ... : every failure makes the backend unavailable
        err = e if isinstance(e, RuntimeError) else RuntimeError(f"the compiled extension failed to load ({e!r})")
        backend = "cpp" if kind == "cpu" else "cuda"
        warnings.warn(f"dopd_kernels: backend {backend!r} is unavailable: {err}. backend='auto' uses the next "
                      f"backend ('torch' on CPU).", RuntimeWarning, stacklevel=2)
        return err


def load_extension(kind: str = "cpu"):
    """The compiled module for `kind` ("cpu" or "cuda"); RuntimeError with the reason if unavailable."""
    mod = _load_cached(kind)
    if isinstance(mod, RuntimeError):
        raise mod
    return mod
