"""Ahead-of-time compile check of the Triton kernels for Hopper (sm_90a), on a machine without a GPU.

The interpreter (`TRITON_INTERPRET=1`) runs the kernels' Python, not Triton's compiler: a kernel
that the interpreter accepts can still fail to lower to PTX, overflow shared memory, or spill
registers on a real GPU. This module closes part of that gap without a GPU, in two steps:

1. `record(cases)` — in a process whose kernels are interpreted, run the `triton` backend with the
   tile configuration it chooses on CUDA (Hopper defaults, not the interpreter's small blocks) and
   record every kernel launch: argument dtypes, scalar types, constexpr values, num_warps/stages.
2. `compile_specs(specs)` — in a process whose kernels are *not* interpreted, compile each distinct
   launch with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` to PTX and a cubin
   (Triton's bundled ptxas needs no driver), then ask ptxas for the register, spill and stack figures.

`python tests/triton_sm90.py [--json OUT]` runs both and prints one line per compiled variant.
`tests/test_triton_sm90_compile.py` runs it in CI. Nothing here launches a kernel on a GPU: the
numbers say that the kernels compile and what they cost in registers and shared memory, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

KERNEL_MODULES = ("stats", "tail", "sparse", "divergence")
# Bytes of shared memory one block may use (opt-in maximum) per compute capability.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
                   "int64": "i64", "int32": "i32", "bool": "i1"}


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


def default_cases() -> List[dict]:
    """Every kernel variant the backend launches for the issue's target workloads: DOPD and each
    OPD divergence × granularity, logits (bf16, fp32) and fused-linear (bf16, fp32, with a bias),
    top-K of 128 (paper default) and 256, and `token_logprobs`."""
    cases = []
    for mode in ("logits", "linear"):
        for dtype in ("bfloat16", "float32"):
            cases.append(dict(kind="dopd", mode=mode, dtype=dtype, top_k=128, bias=mode == "linear" and dtype == "float32"))
            cases.append(dict(kind="logprob", mode=mode, dtype=dtype))
            for div in ("reverse_kl", "forward_kl", "js"):
                for gran in ("full", "topk", "sampled"):
                    cases.append(dict(kind="opd", mode=mode, dtype=dtype, divergence=div, granularity=gran, top_k=128))
        cases.append(dict(kind="dopd", mode=mode, dtype="bfloat16", top_k=256, bias=False))
    return cases


def _run_case(case: dict, n: int = 8, v: int = 300, h: int = 64) -> None:
    import torch

    import dopd_kernels as dk
    from dopd_kernels.backends.triton_backend import TritonBackend

    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    backend = TritonBackend()
    tokens = torch.randint(0, v, (n,), generator=g)
    streams = []
    for i in range(3):
        hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_(i == 0)
        weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).requires_grad_(i == 0)
        bias = torch.randn(v, generator=g).to(dtype).requires_grad_(i == 0) if case.get("bias") else None
        streams.append((hidden, weight, bias))
    logits = [(s[0].detach().float() @ s[1].detach().float().T).to(dtype).requires_grad_(i == 0)
              for i, s in enumerate(streams)]
    if case["kind"] == "logprob":
        if case["mode"] == "logits":
            dk.token_logprobs(logits[0], tokens, backend=backend)
        else:
            dk.token_logprobs(streams[0][0], tokens, streams[0][1], streams[0][2], backend=backend)
        return
    if case["kind"] == "dopd":
        cfg = dk.DOPDConfig(top_k=case["top_k"])
        if case["mode"] == "logits":
            out = dk.dopd_loss(*logits, tokens, config=cfg, backend=backend)
        else:
            (hs, ws, bs), (ht, wt, bt), (hp, _, _) = streams
            out = dk.fused_linear_dopd_loss(hs, ws, ht, wt, hp, tokens, student_bias=bs, teacher_bias=bt,
                                            config=cfg, backend=backend)
    else:
        opts = dict(divergence=case["divergence"], granularity=case["granularity"], top_k=case["top_k"],
                    backend=backend)
        if case["mode"] == "logits":
            out = dk.opd_loss(logits[0], logits[1], tokens, **opts)
        else:
            (hs, ws, bs), (ht, wt, bt), _ = streams
            out = dk.fused_linear_opd_loss(hs, ws, ht, wt, tokens, student_bias=bs, teacher_bias=bt, **opts)
    out.loss.backward()


def record(cases: List[dict]) -> List[dict]:
    """Distinct kernel launches of `cases`, run with the backend's CUDA tile configuration. The
    kernels must be interpreted in this process; their results are not checked here (with the CUDA
    configuration the interpreter multiplies bf16 operands as raw bits), only their launches kept."""
    import importlib
    from unittest import mock

    from dopd_kernels.backends import triton_backend

    specs: Dict[str, dict] = {}
    kernels = []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"dopd_kernels.kernels.{mod_name}")
        for attr, obj in vars(mod).items():
            if attr.endswith("_kernel") and hasattr(obj, "run"):
                kernels.append((mod_name, attr, obj))
    if not kernels or not type(kernels[0][2]).__name__.startswith("Interpreted"):
        raise RuntimeError("record() needs kernels decorated under TRITON_INTERPRET=1")

    def recorder(mod_name, attr, kernel, run):
        def wrapped(*args, grid, warmup, **kwargs):
            extra = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            named = dict(zip(kernel.arg_names, args), **kwargs)
            spec = dict(module=mod_name, kernel=attr, options=extra,
                        args={k: _describe(val) for k, val in named.items()})
            constexpr_like = {k: d for k, d in spec["args"].items() if k.isupper()}
            key = json.dumps([mod_name, attr, extra, constexpr_like,
                              {k: d[1] for k, d in spec["args"].items() if d[0] == "tensor"}], sort_keys=True)
            specs.setdefault(key, spec)
            return run(*args, grid=grid, warmup=warmup, **kwargs)
        return wrapped

    with mock.patch.object(triton_backend, "_interpreting", lambda: False):
        patches = [mock.patch.object(obj, "run", recorder(m, a, obj, obj.run)) for m, a, obj in kernels]
        for p in patches:
            p.start()
        try:
            for case in cases:
                _run_case(case)
        finally:
            for p in patches:
                p.stop()
    return list(specs.values())


# -- step 2: compile for sm_90a (JIT-decorated kernels) ---------------------------------------------

def _signature(kernel, spec: dict):
    """Triton signature and constexprs of a recorded launch."""
    sig, constexprs = {}, {}
    for p in kernel.params:
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


def _arch(capability: int) -> str:
    """ptxas's name of the target Triton compiles for (Hopper with the wgmma-enabled `a` suffix)."""
    return f"sm_{capability}a" if capability == 90 else f"sm_{capability}"


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers, spill bytes and stack of the kernel, from `ptxas -v` on its PTX."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path  # the ptxas Triton itself uses for this arch
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else None,
                spill_loads=int(spill.group(2)) if spill else None,
                stack=int(stack.group(1)) if stack else None)


def compile_spec(spec: dict, capability: int = 90) -> dict:
    """Compile one recorded launch for `sm_<capability>`: its registers, spills and shared memory
    (or `error` when it does not compile). Kernels must not be interpreted in this process."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(f"dopd_kernels.kernels.{spec['module']}"), spec["kernel"])
    sig, constexprs = _signature(kernel, spec)
    res = dict(kernel=spec["kernel"], options=spec["options"],
               constexprs={k: v for k, v in constexprs.items() if k != "DOT_PRECISION"},
               dtypes=sorted({v for v in sig.values() if v.startswith("*")}))
    try:
        compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", capability, 32),
                                  options=spec["options"])
        res["shared"] = compiled.metadata.shared
        res.update(_ptxas_usage(compiled.asm["ptx"], _arch(capability)))
    except Exception as e:  # reported per variant; the caller decides what fails
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
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


def compile_specs(specs: List[dict], capability: int = 90, processes: int = 2) -> List[dict]:
    """`compile_spec` of each spec, over `processes` worker processes. A spec whose compilation
    kills its worker (the compiler crashing) is reported with an `error`, not lost: the specs a
    broken pool took down are retried one worker at a time, where the first lost one is the culprit."""
    results: List[dict] = [None] * len(specs)
    lost = _pool_map(list(range(len(specs))), specs, capability, processes, results)
    while lost:
        lost = _pool_map(lost, specs, capability, 1, results)
        if lost:
            spec = specs[lost[0]]
            results[lost[0]] = dict(kernel=spec["kernel"], options=spec["options"], constexprs={}, dtypes=[],
                                    error="the compiler process died")
            lost = lost[1:]
    return results


def _format(res: dict) -> str:
    cx = ",".join(f"{k}={v}" for k, v in res["constexprs"].items() if not k.endswith("MASK") or v)
    head = f"{res['kernel']:<19} {'/'.join(d[1:] for d in res['dtypes']):<16} {cx}"
    if "error" in res:
        return f"{head}  ERROR {res['error']}"
    return (f"{head}  warps={res['options'].get('num_warps')} stages={res['options'].get('num_stages')}"
            f"  regs={res['registers']} spill={res['spill_stores']}/{res['spill_loads']} smem={res['shared']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the per-variant results here")
    ap.add_argument("--capability", type=int, default=90, choices=sorted(SHARED_LIMITS),
                    help="compute capability to compile for (default 90: H100/H200)")
    ap.add_argument("--step", choices=("all", "record", "compile"), default="all", help=argparse.SUPPRESS)
    ap.add_argument("--specs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step == "record":  # child process: kernels interpreted
        with open(args.specs, "w") as f:
            json.dump(record(default_cases()), f)
        return 0
    if args.step == "compile":  # child process: kernels JIT-decorated
        with open(args.specs) as f:
            results = compile_specs(json.load(f), args.capability)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        specs, out = os.path.join(tmp, "specs.json"), args.json or os.path.join(tmp, "results.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, __file__, "--step", "record", "--specs", specs], env=env, check=True)
        env.pop("TRITON_INTERPRET")
        subprocess.run([sys.executable, __file__, "--step", "compile", "--specs", specs, "--json", out,
                        "--capability", str(args.capability)], env=env, check=True)
        with open(out) as f:
            results = json.load(f)
    for res in results:
        print(_format(res))
    limit = SHARED_LIMITS[args.capability]
    bad = [r for r in results if "error" in r or r["shared"] > limit]
    print(f"{len(results)} kernel variants compiled for {_arch(args.capability)}; "
          f"{len(bad)} failed or exceed its {limit} B of shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
