"""Ahead-of-time compile check of the Triton kernels for Hopper (sm_90a) and Ampere (sm_80), without a GPU.

The interpreter (`TRITON_INTERPRET=1`) runs the kernels' Python, not Triton's compiler: a kernel
that the interpreter accepts can still fail to lower to PTX, overflow shared memory, or spill
registers on a real GPU. This module closes part of that gap without a GPU, in two steps:

1. `record(cases)` — in a process whose kernels are interpreted, run the `triton` backend through
   the public API with the tile configuration it chooses on CUDA (Hopper defaults, not the
   interpreter's small blocks) and record every distinct kernel launch: argument dtypes, scalar
   types, constexpr values, num_warps/stages/maxnreg. `default_cases()` spans every configuration the API
   admits (issue 17 point 2): DOPD and the nine OPD losses, `token_logprobs`, logits and
   fused-linear mode, both `topk_from`, `topk_renorm` both ways, K from 1 past the vocabulary,
   bf16 / fp16 / fp32 and mixed dtypes, biases, head transforms and the deterministic mode.
2. `compile_specs(specs)` — in a process whose kernels are *not* interpreted, compile each distinct
   launch with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` to PTX and a
   cubin (Triton's bundled ptxas needs no driver), then ask ptxas for the register, spill and stack
   figures. This step imports only `triton` (the kernel modules are loaded without the package's
   `__init__`, which imports torch), so it runs in an environment holding nothing but one Triton
   version: `tests/triton_matrix.py` replays one recording under several Triton versions.

    python tests/triton_sm90.py [--capability 90] [--json OUT]      record + compile, one line per variant
    python tests/triton_sm90.py --step record --specs S.json         record only (sets TRITON_INTERPRET itself)
    <python of another env> tests/triton_sm90.py --step compile --specs S.json --json R.json --capability 80

`tests/test_triton_sm90_compile.py` runs it in CI. Nothing here launches a kernel on a GPU: the
numbers say that the kernels compile and what they cost in registers and shared memory, not speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("stats", "tail", "sparse", "divergence")
# Bytes of shared memory one block may use (opt-in maximum) per compute capability.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
                   "int64": "i64", "int32": "i32", "bool": "i1"}
SHORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# -- the configurations the API admits ---------------------------------------------------------------

def _case(kind: str, mode: str, dtypes, **opts) -> dict:
    """One API call. `dtypes`: one dtype for every stream, or one per stream (student, teacher,
    priv_student)."""
    streams = [dtypes] * 3 if isinstance(dtypes, str) else list(dtypes)
    return dict(kind=kind, mode=mode, dtypes=streams, **opts)


def label(case: dict) -> str:
    """A short human-readable name of a case, e.g. `dopd linear bf16 K=512 from=target`."""
    dts = case["dtypes"]
    parts = [case["kind"], case.get("divergence", ""), case.get("granularity", ""), case["mode"],
             dts[0] if len(set(dts)) == 1 else "/".join(dts)]
    if case["kind"] == "dopd" or case.get("granularity") == "topk":
        parts += [f"K={case.get('top_k', 128)}", f"from={case.get('topk_from', 'student')}",
                  "renorm" if case.get("topk_renorm", True) else "tail"]
    for key in ("bias", "scale", "softcap", "deterministic", "wide"):
        if case.get(key) not in (None, False):
            parts.append(f"{key}={case[key]}")
    return " ".join(p for p in parts if p)


# K values: 1, small and non-power-of-two ones, the paper's 128, the largest the kernels keep
# (MAX_TOPK = 256), the larger ones the backend hands to the torch backend, and one past the
# vocabulary (clipped to it by the API).
TOP_KS = (1, 3, 16, 100, 128, 256, 512, 1000, 1024, 4096, 10**6)
DIVERGENCES = ("reverse_kl", "forward_kl", "js")


def _losses(mode: str, dts, every_topk: bool = False, **opts) -> List[dict]:
    """The calls that launch every kernel a dtype setting has: `token_logprobs`; DOPD with one
    running top-K (student, renormalized) and with two (target, tail bucket); full OPD of each
    divergence (the kernels' KIND); sampled OPD of each (reverse KL's sparse d, the others' tail
    bucket); top-K OPD renormalized and with a tail bucket. The divergence of a top-K OPD changes only
    the O(n·K) row terms, not a kernel, so `every_topk` (all 3 × 2 × 2) is kept for one dtype."""
    out = [_case("logprob", mode, dts, **opts),
           _case("dopd", mode, dts, top_k=128, **opts),
           _case("dopd", mode, dts, top_k=128, topk_from="target", topk_renorm=False, **opts)]
    for div in DIVERGENCES:
        out.append(_case("opd", mode, dts[:2], divergence=div, granularity="full", **opts))
        out.append(_case("opd", mode, dts[:2], divergence=div, granularity="sampled", **opts))
    topk = [(d, f, r) for d in DIVERGENCES for f in ("student", "target") for r in (True, False)] if every_topk \
        else [("reverse_kl", "student", True), ("js", "target", False)]
    for div, frm, renorm in topk:
        out.append(_case("opd", mode, dts[:2], divergence=div, granularity="topk", top_k=128, topk_from=frm,
                         topk_renorm=renorm, **opts))
    return out


def default_cases() -> List[dict]:
    """Every kernel configuration the API can produce (issue 17 point 2), each launch variant at
    least once. Kernels see: the mode (logits / fused-linear), the dtype of every operand, bias
    and head-transform flags, which streams keep a running top-K (`topk_from`), K_PAD (from K),
    the tail-bucket path (`topk_renorm=False`), the divergence and granularity, and the
    deterministic mode; other arguments (temperature, β, valid_vocab) are runtime scalars."""
    cases = []
    for mode in ("logits", "linear"):
        for dt in ("bf16", "fp16", "fp32"):  # every loss in each uniform dtype
            cases += _losses(mode, [dt] * 3, every_topk=dt == "bf16")
        for k in TOP_KS:  # K from 1 past the vocabulary: one and two running top-Ks
            for dt in ("bf16", "fp32") + (("fp16",) if k == 256 else ()):
                wide = mode == "linear" and k <= 256
                cases.append(_case("dopd", mode, dt, top_k=k, topk_from="target", topk_renorm=False, wide=wide))
                if k <= 256:
                    cases.append(_case("opd", mode, dt, divergence="js", granularity="topk", top_k=k, wide=wide))
        # Mixed dtypes across streams (within one stream the API requires one dtype).
        for mix in (("bf16", "fp32", "fp16"), ("fp32", "bf16", "bf16"), ("fp16", "bf16", "fp32")):
            cases += [c for c in _losses(mode, list(mix)) if c.get("granularity") != "sampled"
                      or c["divergence"] == "js"]
        # The deterministic mode (no float atomics in the gradient).
        for dt in ("bf16", "fp32") if mode == "linear" else ("bf16",):
            cases += [c for c in _losses(mode, [dt] * 3, deterministic=True) if c["kind"] != "logprob"]
    # Fused-linear only: biases (every stream, or the student's alone) and head transforms.
    for dt in ("bf16", "fp32"):
        cases += _losses("linear", [dt] * 3, bias=True)
        cases.append(_case("dopd", "linear", dt, top_k=128, topk_from="target", topk_renorm=False, bias="student"))
        cases.append(_case("opd", "linear", dt, divergence="js", granularity="full", bias="student"))
        cases += _losses("linear", [dt] * 3, bias=True, scale=2.0, softcap=15.0)
        for scale, softcap in ((0.5, None), (1.0, 30.0)):
            cases.append(_case("dopd", "linear", dt, top_k=128, topk_from="target", topk_renorm=False, scale=scale,
                               softcap=softcap))
            cases.append(_case("opd", "linear", dt, divergence="js", granularity="full", scale=scale, softcap=softcap))
    return cases


def ci_cases() -> List[dict]:
    """The subset CI records (a few minutes of interpreter time on two cores instead of ~15): every
    kernel and every axis of `default_cases` at least once — bf16 and fp32 losses in both modes, K
    = 1, 16, 256 and 512, one mixed-dtype setting, the deterministic mode, biases and head
    transforms — but not every combination of them."""
    cases = []
    for mode in ("logits", "linear"):
        for dt in ("bf16", "fp32"):
            cases += _losses(mode, [dt] * 3)
            for k in (1, 16, 256, 512):
                cases.append(_case("dopd", mode, dt, top_k=k, topk_from="target", topk_renorm=False,
                                   wide=mode == "linear" and k <= 256))
        cases += [c for c in _losses(mode, ["bf16", "fp32", "fp16"]) if c.get("granularity") not in ("sampled", "topk")]
    for dt in ("bf16", "fp32"):
        cases += [c for c in _losses("linear", [dt] * 3, deterministic=True)
                  if c["kind"] == "dopd" or c.get("granularity") == "full"]
    cases += _losses("linear", ["bf16"] * 3, bias=True, scale=2.0, softcap=15.0)
    return cases


CASE_SETS = {"full": default_cases, "ci": ci_cases}


def representatives(specs: List[dict]) -> List[dict]:
    """One launch per tile class: kernel, warps/stages, block sizes, K_PAD, mode, divergence KIND,
    explicit columns, number of running top-Ks and fp32-or-half operands. Compile errors depend on
    these; register use also depends on the flags left out (biases, head transforms, gradient
    outputs), which only the full check (`triton_matrix.py`, all variants) sees."""
    classes: Dict[str, dict] = {}
    for spec in specs:
        a = spec["args"]
        shape = {k: d[1] for k, d in a.items() if k.startswith("BLOCK") or k in ("K_PAD", "LINEAR", "KIND", "EXPLICIT")}
        shape["TOPK_STREAMS"] = bin(a.get("TOPK_MASK", ["int", 0])[1]).count("1")
        half = any(d[0] == "tensor" and d[1] in ("bf16", "fp16") for d in a.values())  # else fp32 operands
        classes.setdefault(json.dumps([spec["module"], spec["kernel"], spec["options"], shape, half], sort_keys=True), spec)
    return list(classes.values())


# -- step 1: record launches (interpreted kernels) ----------------------------------------------------

def _describe(value):
    """A launch argument as (kind, value): tensors by dtype, scalars by Python type and value."""
    import torch
    if isinstance(value, torch.Tensor):
        return ["tensor", TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if isinstance(value, str):  # a constexpr such as DOT_PRECISION
        return ["str", value]
    raise TypeError(f"unexpected kernel argument {type(value).__name__}")


def _run_case(case: dict, n: int = 8) -> None:
    """Run `case` through the public API (forward and backward) with the triton backend.

    The vocabulary is at least 160 columns and 45 more than K (so K is not clipped, except for a K
    past it). The CUDA tiles do not depend on H except the sparse kernels' H block (min(H, 4096 /
    K_PAD, 128)): H = 16 keeps the interpreter's work small, and the fused-linear K sweep (`wide`)
    uses H = 128 so that those blocks reach their CUDA sizes for every K."""
    import inspect

    import torch

    import dopd_kernels as dk
    from dopd_kernels.backends.triton_backend import TritonBackend
    from dopd_kernels.heads import LMHead

    g = torch.Generator().manual_seed(0)
    top_k = case.get("top_k", 128)
    v = max(160, top_k + 45) if top_k < 10**5 else 160
    h = 128 if case.get("wide") else 16
    deterministic = bool(case.get("deterministic"))
    kwargs = {"deterministic": True} if deterministic and "deterministic" in inspect.signature(TritonBackend).parameters else {}
    backend = TritonBackend(**kwargs)
    tokens = torch.randint(0, v, (n,), generator=g)
    bias = case.get("bias", False)
    streams = []
    for i, name in enumerate(case["dtypes"]):
        dt = getattr(torch, SHORT_DTYPES[name])
        hidden = torch.randn(n, h, generator=g).to(dt).requires_grad_(i == 0)
        weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dt).requires_grad_(i == 0)
        b = None
        if bias is True or (bias == "student" and i == 0):
            b = torch.randn(v, generator=g).to(dt).requires_grad_(i == 0)
        if case.get("scale") is not None or case.get("softcap") is not None:  # the head carries the bias
            weight, b = LMHead(weight, b, scale=case.get("scale", 1.0), softcap=case.get("softcap")), None
        streams.append((hidden, weight, b))
    if case["mode"] == "logits":
        logits = [(hs.detach().float() @ (w.weight if hasattr(w, "weight") else w).detach().float().T)
                  .to(hs.dtype).requires_grad_(i == 0) for i, (hs, w, _) in enumerate(streams)]
    if case["kind"] == "logprob":
        if case["mode"] == "logits":
            dk.token_logprobs(logits[0], tokens, backend=backend)
        else:
            dk.token_logprobs(streams[0][0], tokens, streams[0][1], streams[0][2], backend=backend)
        return
    old_flag = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or old_flag, warn_only=True)
    try:
        if case["kind"] == "dopd":
            cfg = dk.DOPDConfig(top_k=top_k, topk_from=case.get("topk_from", "student"),
                                topk_renorm=case.get("topk_renorm", True))
            if case["mode"] == "logits":
                out = dk.dopd_loss(*logits, tokens, config=cfg, backend=backend)
            else:
                (hs, ws, bs), (ht, wt, bt), (hp, wp, bp) = streams
                out = dk.fused_linear_dopd_loss(hs, ws, ht, wt, hp, tokens, priv_student_weight=wp, student_bias=bs,
                                                teacher_bias=bt, priv_student_bias=bp, config=cfg, backend=backend)
        else:
            opts = dict(divergence=case["divergence"], granularity=case["granularity"], top_k=top_k,
                        topk_from=case.get("topk_from", "student"), topk_renorm=case.get("topk_renorm", True),
                        backend=backend)
            if case["mode"] == "logits":
                out = dk.opd_loss(logits[0], logits[1], tokens, **opts)
            else:
                (hs, ws, bs), (ht, wt, bt) = streams[:2]
                out = dk.fused_linear_opd_loss(hs, ws, ht, wt, tokens, student_bias=bs, teacher_bias=bt, **opts)
        out.loss.backward()
    finally:
        torch.use_deterministic_algorithms(old_flag)


def spec_key(spec: dict) -> str:
    """What makes two launches the same compiled variant: kernel, options, constexprs, tensor dtypes."""
    return json.dumps([spec["module"], spec["kernel"], spec["options"],
                       {k: d for k, d in spec["args"].items() if k.isupper()},
                       {k: d[1] for k, d in spec["args"].items() if d[0] == "tensor"}], sort_keys=True)


@dataclasses.dataclass
class Launch:
    """One kernel launch: `kernels.<module>.<kernel>[grid](**args)` with launch `options`
    (num_warps / num_stages / maxnreg); `args` maps every parameter name to the value passed, constexprs included."""

    module: str
    kernel: str
    grid: tuple
    args: dict
    options: dict


def backend_kernels() -> List[tuple]:
    """(module name, kernel name, kernel object) of every kernel of KERNEL_MODULES."""
    out = []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"dopd_kernels.kernels.{mod_name}")
        out += [(mod_name, attr, obj) for attr, obj in vars(mod).items()
                if attr.endswith("_kernel") and hasattr(obj, "run")]
    return out


@contextlib.contextmanager
def launches(on_launch: Optional[Callable[[Launch], None]] = None):
    """Inside the block, every launch of a kernel of KERNEL_MODULES (interpreted or compiled) is
    appended to the yielded list as a `Launch`, and passed to `on_launch`, before it runs unchanged."""
    from unittest import mock

    seen: List[Launch] = []

    def recorder(mod_name, attr, kernel, run):
        def wrapped(*args, grid, warmup, **kwargs):
            options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
            named = dict(zip(kernel.arg_names, args), **{k: v for k, v in kwargs.items() if k not in options})
            launch = Launch(mod_name, attr, tuple(grid), named, options)
            seen.append(launch)
            if on_launch is not None:
                on_launch(launch)
            return run(*args, grid=grid, warmup=warmup, **kwargs)
        return wrapped

    with contextlib.ExitStack() as stack:
        for m, a, obj in backend_kernels():
            stack.enter_context(mock.patch.object(obj, "run", recorder(m, a, obj, obj.run)))
        yield seen


def record(cases: List[dict], progress: bool = False) -> dict:
    """Distinct kernel launches of `cases`, run with the backend's CUDA tile configuration, and the
    outcome of each case. The kernels must be interpreted in this process; their results are not
    checked here (with the CUDA configuration the interpreter multiplies bf16 operands as raw
    bits), only their launches kept. Returns `{"triton", "cases": [{case, label, launches, error}],
    "specs": [{module, kernel, options, args, case}]}`; a case that raises (a refusal at
    validation, or a failure) is kept with its error, not fatal."""
    import traceback
    from unittest import mock

    import triton

    from dopd_kernels.backends import triton_backend

    specs: Dict[str, dict] = {}
    kernels = backend_kernels()
    if not kernels or not type(kernels[0][2]).__name__.startswith("Interpreted"):
        raise RuntimeError("record() needs kernels decorated under TRITON_INTERPRET=1")
    current = {"label": None, "launches": 0}

    def keep(launch: Launch) -> None:
        spec = dict(module=launch.module, kernel=launch.kernel, options=launch.options,
                    args={k: _describe(val) for k, val in launch.args.items()}, case=current["label"])
        specs.setdefault(spec_key(spec), spec)
        current["launches"] += 1

    outcomes = []
    with mock.patch.object(triton_backend, "_interpreting", lambda: False), launches(keep):
        t_start = time.time()
        for case in cases:
            current.update(label=label(case), launches=0)
            t0 = time.time()
            error = None
            try:
                _run_case(case)
            except Exception as e:  # noqa: BLE001 — a refusal at validation or a failure, reported per case
                where = traceback.extract_tb(e.__traceback__)[-1]
                error = f"{type(e).__name__}: {e} [{os.path.basename(where.filename)}:{where.lineno}]"
            outcomes.append(dict(case=case, index=case.get("index", len(outcomes)), label=current["label"],
                                 launches=current["launches"], error=error, seconds=round(time.time() - t0, 2)))
            if progress:
                print(f"[{len(outcomes)}/{len(cases)} {time.time() - t_start:.0f}s] {current['label']}: "
                      f"{current['launches']} launches, {len(specs)} distinct so far, {outcomes[-1]['seconds']} s"
                      + (f"; {error}" if error else ""), file=sys.stderr, flush=True)
    return dict(triton=triton.__version__, cases=outcomes, specs=list(specs.values()))


# -- step 2: compile (JIT-decorated kernels, no torch needed) ----------------------------------------

def kernel_module(name: str):
    """`dopd_kernels.kernels.<name>` of this tree. When the package is not imported yet, it is
    registered as a bare namespace so that its `__init__` (which imports torch) does not run: the
    kernel modules import only triton, and the compile step must run where only triton is installed."""
    if "dopd_kernels" not in sys.modules:
        pkg = types.ModuleType("dopd_kernels")
        pkg.__path__ = [os.path.join(ROOT, "dopd_kernels")]
        sys.modules["dopd_kernels"] = pkg
    return importlib.import_module(f"dopd_kernels.kernels.{name}")


def _signature(kernel, spec: dict):
    """Triton signature and constexprs of a recorded launch."""
    sig, constexprs = {}, {}
    for p in kernel.params:
        if p.name not in spec["args"]:
            raise KeyError(f"the recorded launch has no argument {p.name!r}: record and compile ran on different kernels")
        kind, value = spec["args"][p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = value
        elif kind == "tensor":
            sig[p.name] = "*" + value
        elif kind == "bool":
            sig[p.name] = "i1"
        elif kind == "int":
            sig[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    return sig, constexprs


def arch(capability: int) -> str:
    """ptxas's name of the target Triton compiles for (Hopper with the wgmma-enabled `a` suffix)."""
    return f"sm_{capability}a" if capability == 90 else f"sm_{capability}"


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton itself uses for `capability` (`get_ptxas()` takes the arch from Triton 3.6 on)."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        return get_ptxas(capability).path
    except TypeError:
        return get_ptxas().path


def _ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and stack of the kernel, from `ptxas -v` on its PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas_path(capability), f"-arch={arch(capability)}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else None,
                spill_loads=int(spill.group(2)) if spill else None,
                stack=int(stack.group(1)) if stack else None)


def _last_line(e: Exception) -> str:
    """The line of a compiler error that names the problem (Triton's messages end with it)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def compile_spec(spec: dict, capability: int = 90) -> dict:
    """Compile one recorded launch for `sm_<capability>`: its registers, spills and shared memory
    (or `error` when it does not compile). Kernels must not be interpreted in this process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = dict(kernel=spec["kernel"], options=spec["options"], case=spec.get("case"),
               constexprs={k: d[1] for k, d in spec["args"].items() if k.isupper() and k != "DOT_PRECISION"},
               dtypes=sorted({"*" + d[1] for d in spec["args"].values() if d[0] == "tensor"}))
    try:
        kernel = getattr(kernel_module(spec["module"]), spec["kernel"])
        sig, constexprs = _signature(kernel, spec)
        compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", capability, 32),
                                  options=spec["options"])
        res["shared"] = compiled.metadata.shared
        res.update(_ptxas_usage(compiled.asm["ptx"], capability))
    except Exception as e:  # noqa: BLE001 — reported per variant; the caller decides what fails
        res["error"] = _last_line(e)
    return res


def _pool_map(indices: List[int], specs: List[dict], capability: int, processes: int, results: List[dict]) -> List[int]:
    """Compile `specs[i]` for i in `indices` into `results`; returns the indices lost to a worker
    that died (the pool breaks and every unfinished future with it)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    lost = []
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(i, pool.submit(compile_spec, specs[i], capability)) for i in indices]
        for i, fut in futures:
            try:
                results[i] = fut.result()
            except BrokenProcessPool:
                lost.append(i)
    return lost


def compile_specs(specs: List[dict], capability: int = 90, processes: Optional[int] = None) -> List[dict]:
    """`compile_spec` of each spec, over `processes` worker processes (default: the CPU count, at
    most 8). A spec whose compilation kills its worker (the compiler crashing) is reported with an
    `error`, not lost: the specs a broken pool took down are retried one worker at a time, where
    the first lost one is the culprit."""
    processes = processes or max(1, min(8, os.cpu_count() or 1))
    results: List[dict] = [None] * len(specs)
    lost = _pool_map(list(range(len(specs))), specs, capability, processes, results)
    while lost:
        lost = _pool_map(lost, specs, capability, 1, results)
        if lost:
            spec = specs[lost[0]]
            results[lost[0]] = dict(kernel=spec["kernel"], options=spec["options"], case=spec.get("case"),
                                    constexprs={}, dtypes=[], error="the compiler process died")
            lost = lost[1:]
    return results


# -- verdicts and output ---------------------------------------------------------------------------

def problems(res: dict, capability: int, spills: bool = True) -> List[str]:
    """What is wrong with one compiled variant: an error, shared memory over the block limit of
    `capability`, or (when `spills`) register spills."""
    if "error" in res:
        return [res["error"]]
    out = []
    if res["shared"] > SHARED_LIMITS[capability]:
        out.append(f"shared memory {res['shared']} B > {SHARED_LIMITS[capability]} B")
    if spills and res["spill_stores"]:
        out.append(f"spills {res['spill_stores']}/{res['spill_loads']} B at {res['registers']} registers")
    return out


def variant_name(res: dict) -> str:
    """A variant as `kernel dtypes constexprs w<warps>s<stages>[r<maxnreg>]`, constexprs that are 0/False
    left out."""
    cx = ",".join(f"{k}={v}" for k, v in res["constexprs"].items() if v not in (0, False) or k == "KIND")
    opts = res["options"]
    return (f"{res['kernel']} {'/'.join(d[1:] for d in res['dtypes'])} {cx} "
            f"w{opts.get('num_warps', '-')}s{opts.get('num_stages', '-')}"
            + (f"r{opts['maxnreg']}" if "maxnreg" in opts else ""))


def _format(res: dict) -> str:
    head = variant_name(res)
    if "error" in res:
        return f"{head}  ERROR {res['error']}  (from: {res.get('case')})"
    return (f"{head}  regs={res['registers']} spill={res['spill_stores']}/{res['spill_loads']} "
            f"smem={res['shared']}")


def record_subprocess(specs_path: str, python: str = sys.executable, only: Optional[str] = None,
                      processes: Optional[int] = None, cases: str = "full") -> dict:
    """Run the record step in `processes` child processes (default: the CPU count, at most 8), each
    with `TRITON_INTERPRET=1` (the kernels must be decorated interpreted, which cannot be undone in
    a process that already imported them) and every `processes`-th case; merge their recordings
    into `specs_path` and return it."""
    processes = processes or max(1, min(8, os.cpu_count() or 1))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    children = [subprocess.Popen([python, os.path.abspath(__file__), "--step", "record", "--specs", f"{specs_path}.{i}",
                                  "--shard", f"{i}/{processes}", "--cases", cases] + (["--only", only] if only else []),
                                 env=env)
                for i in range(processes)]
    if any(child.wait() for child in children):
        raise RuntimeError("a record process failed (its output is above)")
    parts = []
    for i in range(processes):
        with open(f"{specs_path}.{i}") as f:
            parts.append(json.load(f))
        os.remove(f"{specs_path}.{i}")
    specs: Dict[str, dict] = {}
    for part in parts:
        for spec in part["specs"]:
            specs.setdefault(spec_key(spec), spec)
    rec = dict(triton=parts[0]["triton"], record_s=round(time.time() - t0, 1), processes=processes,
               cases=sorted((c for part in parts for c in part["cases"]), key=lambda c: c["index"]),
               specs=list(specs.values()))
    with open(specs_path, "w") as f:
        json.dump(rec, f)
    return rec


def compile_subprocess(specs_path: str, out_path: str, capability: int, python: str = sys.executable,
                       log=None, representatives_only: bool = False) -> List[dict]:
    """Run the compile step with `python` (any environment with a Triton), without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    subprocess.run([python, os.path.abspath(__file__), "--step", "compile", "--specs", specs_path, "--json", out_path,
                    "--capability", str(capability)] + (["--representatives"] if representatives_only else []),
                   env=env, check=True, stdout=log, stderr=log)
    with open(out_path) as f:
        return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the per-variant results here")
    ap.add_argument("--capability", type=int, default=90, choices=sorted(SHARED_LIMITS),
                    help="compute capability to compile for (default 90: H100/H200)")
    ap.add_argument("--step", choices=("all", "record", "compile"), default="all",
                    help="record only (in a TRITON_INTERPRET=1 process), compile only, or both (default)")
    ap.add_argument("--specs", help="the recorded launches (written by --step record, read by --step compile)")
    ap.add_argument("--only", help="record only the API calls whose label matches this regular expression")
    ap.add_argument("--cases", choices=sorted(CASE_SETS), default="full",
                    help="API calls to record: every configuration (full, default) or CI's subset")
    ap.add_argument("--representatives", action="store_true",
                    help="compile one launch per tile class (see representatives()) instead of every one")
    ap.add_argument("--shard", default="0/1", help="I/N: record every N-th API call from the I-th (set by the parent)")
    args = ap.parse_args()
    if args.step == "record":
        if os.environ.get("TRITON_INTERPRET") != "1":
            rec = record_subprocess(args.specs, only=args.only, cases=args.cases)
            failed = [c for c in rec["cases"] if c["error"]]
            print(f"recorded {len(rec['specs'])} distinct launches from {len(rec['cases'])} API calls "
                  f"({len(failed)} raised) in {rec['record_s']} s with Triton {rec['triton']}")
            for c in failed:
                print(f"  {c['label']}: {c['error']}")
            return 0
        sys.path.insert(0, ROOT)
        shard, shards = map(int, args.shard.split("/"))
        cases = [dict(c, index=i) for i, c in enumerate(CASE_SETS[args.cases]()) if re.search(args.only or "", label(c))]
        rec = record(cases[shard::shards], progress=True)
        with open(args.specs, "w") as f:
            json.dump(rec, f)
        return 0
    if args.step == "compile":
        with open(args.specs) as f:
            rec = json.load(f)
        specs = rec["specs"] if isinstance(rec, dict) else rec
        results = compile_specs(representatives(specs) if args.representatives else specs, args.capability)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        specs, out = os.path.join(tmp, "specs.json"), args.json or os.path.join(tmp, "results.json")
        rec = record_subprocess(specs)
        results = compile_subprocess(specs, out, args.capability)
    for res in results:
        print(_format(res))
    bad = [r for r in results if problems(r, args.capability)]
    raised = [c for c in rec["cases"] if c["error"]]
    print(f"{len(rec['cases'])} API calls ({len(raised)} raised), {len(results)} kernel variants compiled for "
          f"{arch(args.capability)}; {len(bad)} failed, spill or exceed its {SHARED_LIMITS[args.capability]} B of shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
