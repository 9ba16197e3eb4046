"""Backend registry and automatic selection.

`backend=` accepts a name (`"auto"`, `"reference"`, `"torch"`, ...) or a backend instance such as
`TorchBackend(row_chunk=512, vocab_chunk=4096)` to set its tile sizes.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Union

import torch

from ..passes import Passes
from .compiled import CppBackend, CudaBackend
from .reference import ReferenceBackend
from .torch_chunked import TorchBackend


def _triton_backend():
    """The Triton backend, imported only when asked for: triton (and the kernels, which read
    TRITON_INTERPRET when they are decorated) stays out of `import dopd_kernels`."""
    try:
        from .triton_backend import TritonBackend
    except ImportError as err:
        raise RuntimeError(f"backend 'triton' needs the triton package ({err})") from err
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 to interpret it on CPU tensors)")
    return TritonBackend()


# name -> factory returning a backend, or raising RuntimeError saying why it is unavailable here.
_FACTORIES: Dict[str, Callable[[], object]] = {
    "reference": ReferenceBackend,
    "torch": TorchBackend,
    "triton": _triton_backend,  # CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    "cpp": CppBackend,  # built on first use (dopd_kernels/_build.py); unavailable without a compiler
    "cuda": CudaBackend,  # needs a CUDA torch and nvcc
}
# Preference order of backend="auto", fastest first; the first that loads and supports the device wins.
_AUTO_ORDER = ("triton", "cuda", "cpp", "torch")


def _load(name: str):
    return _FACTORIES[name]()


def available_backends() -> List[str]:
    """Names of the backends that can run in this environment (on some device)."""
    names = []
    for name in _FACTORIES:
        try:
            _load(name)
        except RuntimeError:
            continue
        names.append(name)
    return names


def resolve_backend(backend: Union[str, object], device: torch.device):
    """The backend object for a `backend=` argument and the inputs' device."""
    if not isinstance(backend, str):
        # A pass backend (`passes.Passes`, e.g. TorchBackend(row_chunk=512)) runs under the engine; any other
        # object must provide the entry points itself, as the reference backend does.
        if not (isinstance(backend, Passes) or all(hasattr(backend, m) for m in ("dopd", "opd", "token_logprobs"))):
            raise TypeError(f"backend must be a name or a backend object, got {type(backend).__name__}")
        return backend
    if backend == "auto":
        for name in _AUTO_ORDER:
            try:
                candidate = _load(name)
            except RuntimeError:
                continue
            if candidate.supports(device):
                return candidate
        raise RuntimeError(f"no backend supports device {device}")  # unreachable: torch supports all
    if backend not in _FACTORIES:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_FACTORIES)}, got {backend!r}")
    chosen = _load(backend)
    if not chosen.supports(device):
        raise ValueError(f"backend {backend!r} cannot run on device {device}")
    return chosen
