"""Peak extra memory of one contender on one case: one warm-up call, then one measured call.

"Extra" is the peak during one forward+backward (forward only for `logprob`) above what is
resident with the inputs in place; it includes the gradients of the student's hidden states and
weight, which every contender must produce. The warm-up keeps one-time costs out (compilation,
autotuning, lazy initialisation).

- CPU: a fresh subprocess per contender (`python -m benchmarks.memory_probe`), so nothing another
  contender allocated or cached can hide in the figure. `MALLOC_MMAP_THRESHOLD_=65536` makes glibc
  return every freed buffer of 64 KiB or more to the OS, so RSS follows live memory; the peak is the
  kernel's high-water mark `VmHWM`, reset through `/proc/self/clear_refs` just before the measured
  call, minus `VmRSS` at that moment. The address space is capped at what is free, so running out
  raises in the probe (recorded as OOM) instead of waking the OOM killer.
- CUDA: in the benchmark process (after its warm-up call), `torch.cuda.max_memory_allocated()` after
  `reset_peak_memory_stats()`, minus `memory_allocated()` before the measured call (the caching
  allocator's own statistics are per process and exact).

Run by hand to check a figure independently:
    python -m benchmarks.memory_probe --case '{"workload": "dopd", "n": 256, "v": 32000, "h": 512}' --contender naive
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def is_oom(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MARKERS))


def step(fn: Callable, inputs, forward_only: bool):
    """One call of a contender: forward (and backward), gradients of the previous call dropped."""
    inputs.zero_grad()
    if forward_only:
        with torch.no_grad():
            return fn()
    out = fn()
    out.backward()
    return out


def measure_cpu(fn: Callable, inputs, forward_only: bool, warm: bool = True) -> dict:
    if warm:
        step(fn, inputs, forward_only)
    inputs.zero_grad()
    gc.collect()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step(fn, inputs, forward_only)
    return {"peak_extra_bytes": (_status_kib("VmHWM") - base) * 1024, "baseline_bytes": base * 1024,
            "method": "cpu: VmHWM - VmRSS in a fresh subprocess"}


def measure_cuda(fn: Callable, inputs, forward_only: bool, warm: bool = True) -> dict:
    if warm:
        step(fn, inputs, forward_only)
    inputs.zero_grad()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, inputs, forward_only)
    torch.cuda.synchronize()
    return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "baseline_bytes": base,
            "method": "cuda: max_memory_allocated delta, in process"}


def probe_subprocess(case, contender: str, inputs_file: Optional[str], timeout_s: float) -> dict:
    """Run this module for one contender in a fresh interpreter; its JSON result (with `status`)."""
    cmd = [sys.executable, "-m", "benchmarks.memory_probe", "--case", json.dumps(case.as_dict()), "--contender", contender]
    if inputs_file:
        cmd += ["--inputs", inputs_file]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"error: memory probe timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode < 0:
        return {"status": f"oom: memory probe killed by signal {-proc.returncode}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: memory probe failed ({tail[:300]})"}


def main(argv=None) -> int:
    from . import contenders
    from .inputs import Case, load_inputs, make_inputs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True, help="JSON of a benchmarks.inputs.Case")
    parser.add_argument("--contender", required=True)
    parser.add_argument("--inputs", help="file saved by benchmarks.inputs.save_inputs (else generated here)")
    args = parser.parse_args(argv)
    case = Case(**json.loads(args.case))
    x = load_inputs(args.inputs, case) if args.inputs else make_inputs(case)
    fn = contenders.build(args.contender, x, case)
    forward_only = case.workload in contenders.FORWARD_ONLY
    if case.device == "cpu":  # running out of memory raises here rather than invoking the OOM killer
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cap = _status_kib("VmSize") * 1024 + _available_bytes()
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        result = (measure_cuda if case.device == "cuda" else measure_cpu)(fn, x, forward_only)
    except Exception as err:
        if not is_oom(err):
            raise
        result = {"status": f"oom: {str(err).splitlines()[0][:200]}"}
    result.setdefault("status", "ok")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
