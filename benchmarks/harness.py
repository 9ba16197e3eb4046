"""One benchmark: availability, peak memory, timed rounds and the figures stored with them.

`run(benchmark, settings, case, contender)` is the body of every `test_bench_*` test. Speed is
measured by pytest-benchmark (`benchmark.pedantic`, one call per round after one untimed warm-up
call); each round also times its forward and backward halves separately (device synchronised
between them), so forward, backward and forward+backward come from the same rounds. Nothing here
asserts a speed: the figures are recorded in `benchmark.extra_info` for `report.py`, among them
`times_floor`, the time divided by the matmul floor priced at the matmul rate measured in the same
process. Smoke mode also checks that every contender computes the library's float64 reference value
(`check_value`).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from . import contenders
from .inputs import Case, Inputs, make_inputs, save_inputs
from .memory_probe import is_oom, measure_cpu, measure_cuda, probe_subprocess, step

PROBE_TIMEOUT_S = 900
COMPILE_RESERVE_S = 45  # with a time budget, torch.compile is not started with less than this left
VALUE_RTOL = 1e-4  # an fp32 contender against the float64 reference, relative to max |reference|
# JS weight at which the library's JS and the peers' mirrored convention differ (at 0.5 they coincide)
ASYMMETRIC_JS_BETA = 0.2

_cache: Dict[tuple, Tuple[Inputs, dict, Optional[str]]] = {}  # one size at a time
_naive_values: Dict[str, torch.Tensor] = {}  # case label -> the naive baseline's output
_reference_values: Dict[tuple, torch.Tensor] = {}  # (case label, js_beta) -> the float64 reference output


def _relative_diff(value: torch.Tensor, naive: Optional[torch.Tensor]) -> Optional[float]:
    """max |value − naive| / max |naive|: every contender is checked to compute what naive computes."""
    if naive is None or value.shape != naive.shape:
        return None
    return float((value - naive).abs().max() / naive.abs().max().clamp_min(1e-30))


def reference_value(case: Case, x: Inputs, js_beta: float) -> torch.Tensor:
    """The library's float64 `reference` backend on the case's workload (the ground truth)."""
    key = (case.label, js_beta)
    if key not in _reference_values:
        with torch.no_grad():
            _reference_values[key] = contenders._library(case.workload, "reference", x, js_beta=js_beta)().double()
    return _reference_values[key]


def check_value(case: Case, name: str, x: Inputs, value: torch.Tensor) -> None:
    """Fail unless the contender's output `value` (its warm-up call) is the reference's within fp32
    rounding; a peer of the `js` workload is also called at an asymmetric β, where a mirrored β
    convention (`contenders.peer_beta`) would give a different value."""
    checks = [(contenders.JS_BETA, value)]
    if case.workload == "js" and contenders.kind(name) == "peer":
        checks.append((ASYMMETRIC_JS_BETA, contenders.build(name, x, case, ASYMMETRIC_JS_BETA)().detach()))
    for beta, got in checks:
        ref = reference_value(case, x, beta)
        diff = _relative_diff(got.double(), ref)
        if diff is None or diff > VALUE_RTOL:
            pytest.fail(f"{name} on {case.label} (js_beta={beta}): output {tuple(got.shape)} differs from the "
                        f"float64 reference {tuple(ref.shape)} by {diff} (relative), tolerance {VALUE_RTOL}")


def _size_key(case: Case) -> tuple:
    return (case.n, case.v, case.h, case.dtype, case.device, case.seed)


def regime_mix(x: Inputs) -> Dict[str, float]:
    """Fraction of tokens in each DOPD regime for these inputs (the library's routing)."""
    from dopd_kernels import Regime, route, token_logprobs

    with torch.no_grad():
        lt = token_logprobs(x.ht, x.tokens, weight=x.wt, backend="torch")
        lp = token_logprobs(x.hp, x.tokens, weight=x.ws.detach(), backend="torch")
        regime, _ = route(lt, lp, torch.ones_like(x.tokens, dtype=torch.bool))
    return {r.name: round(float((regime == r).float().mean()), 4) for r in Regime if r >= 0}


def inputs_for(case: Case, settings) -> Tuple[Inputs, dict, Optional[str]]:
    """(inputs, their description, file for probe subprocesses or None), made once per size."""
    key = _size_key(case)
    if key not in _cache:
        _cache.clear()
        gc.collect()
        x = make_inputs(case)
        meta = {"regime_mix": regime_mix(x), "input_stats": x.stats}
        path = None
        if case.device == "cpu":
            path = os.path.join(settings.workdir, "inputs-%s.pt" % "-".join(map(str, key)))
            save_inputs(x, path)
        _cache[key] = (x, meta, path)
    return _cache[key]


def matmul_tflops(case: Case, settings) -> float:
    """Best-of-5 rate of a [M, H] x [H, 8192] matmul in the case's dtype on its device (M = 4096 on
    CUDA, 512 on CPU): the rate the matmul floor is priced at, measured in this run."""
    key = f"{case.device}-{case.dtype}-H{case.h}"
    if key not in settings.matmul_tflops:
        m = 4096 if case.device == "cuda" else 512
        a = torch.randn(m, case.h, device=case.device).to(case.torch_dtype)
        b = torch.randn(case.h, 8192, device=case.device).to(case.torch_dtype)
        best = float("inf")
        for _ in range(6):
            _sync(case)
            t0 = time.perf_counter()
            a @ b
            _sync(case)
            best = min(best, time.perf_counter() - t0)
        settings.matmul_tflops[key] = 2 * m * case.h * 8192 / best / 1e12
    return settings.matmul_tflops[key]


def floor_flops(case: Case, mix: Dict[str, float]) -> float:
    """DESIGN.md section 4: stats pass 2·N·V·(H_s + H_t + H_s) plus 4·N_full·V·H for the rows with a
    full-vocabulary term (HT rows of DOPD; every row of full-vocabulary JS/KL). The stats pass
    covers only the streams a workload has (JS/KL: student and teacher; log-prob: one stream, no
    divergence pass)."""
    n, v, h = case.n, case.v, case.h
    if case.workload == "dopd":
        return 2 * n * v * 3 * h + 4 * round(mix["HT"] * n) * v * h
    if case.workload in ("js", "kl"):
        return 2 * n * v * 2 * h + 4 * n * v * h
    return 2 * n * v * h


def _sync(case: Case) -> None:
    if case.device == "cuda":
        torch.cuda.synchronize()


def _spread(xs: List[float]) -> Dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median_s": statistics.median(xs), "iqr_s": q[2] - q[0], "min_s": xs[0], "max_s": xs[-1]}


def _must_work(name: str) -> bool:
    return name == "naive" or contenders.kind(name) == "library"


def _not_run(settings, case: Case, name: str, status: str) -> None:
    """Record why a contender did not run; skip, or fail if the naive baseline or this library erred."""
    settings.record(case, name, status)
    if status.startswith("error") and _must_work(name):
        pytest.fail(status)
    pytest.skip(status)


def run(benchmark, settings, case: Case, name: str) -> None:
    benchmark.group = case.label
    status = contenders.availability(name, case)
    if status is None and settings.out_of_time(COMPILE_RESERVE_S if name == "naive_compiled" else 0.0):
        status = f"skipped: time budget of {settings.budget_s:.0f} s spent"
    if status:
        _not_run(settings, case, name, status)
    x, meta, path = inputs_for(case, settings)
    forward_only = case.workload in contenders.FORWARD_ONLY

    # CPU: a fresh subprocess per contender; smoke mode keeps one per case (naive) to stay fast
    in_subprocess = case.device == "cpu" and (not settings.smoke or name == "naive")
    if in_subprocess:
        memory = probe_subprocess(case, name, path, PROBE_TIMEOUT_S)
        if memory.get("status") != "ok":
            _not_run(settings, case, name, memory["status"])
    failure = None
    try:
        fn = contenders.build(name, x, case)
        t0 = time.perf_counter()
        value = step(fn, x, forward_only).detach().float()  # warm-up: compilation, autotuning, lazy init
        _sync(case)
        first_call_s = time.perf_counter() - t0
        if not in_subprocess:
            memory = (measure_cuda if case.device == "cuda" else measure_cpu)(fn, x, forward_only, warm=False)
    except Exception as err:
        # Out of memory is a result; so is a peer or torch.compile failing here. An error in the
        # naive baseline or in this library is a bug and fails the test.
        if not is_oom(err) and _must_work(name):
            raise
        what = "oom" if is_oom(err) else f"error: {type(err).__name__}"
        failure = f"{what}: {str(err).strip().splitlines()[0][:200]}"
    if failure:  # outside the except block, so the traceback (and the tensors it holds) is released
        x.zero_grad()
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()
        _not_run(settings, case, name, failure)
    if settings.smoke:
        check_value(case, name, x, value)

    fwd: List[float] = []
    bwd: List[float] = []

    def one_round():
        x.zero_grad()
        _sync(case)
        t0 = time.perf_counter()
        if forward_only:
            with torch.no_grad():
                fn()
        else:
            out = fn()
        _sync(case)
        t1 = time.perf_counter()
        if not forward_only:
            out.backward()
            _sync(case)
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)

    benchmark.pedantic(one_round, rounds=settings.rounds, iterations=1, warmup_rounds=0)
    x.zero_grad()

    if name == "naive":
        _naive_values[case.label] = value
    flops = floor_flops(case, meta["regime_mix"])
    rate = matmul_tflops(case, settings)
    floor_s = flops / (rate * 1e12)  # the matmul floor's time at this process's measured matmul rate
    stats = getattr(benchmark.stats, "stats", None) if benchmark.stats else None
    total = stats.median if stats else None
    benchmark.extra_info.update(
        case.as_dict(),
        contender=name,
        kind=contenders.kind(name),
        status="ok",
        forward_only=forward_only,
        forward=_spread(fwd),
        backward=None if forward_only else _spread(bwd),
        first_call_s=first_call_s,
        peak_extra_bytes=memory["peak_extra_bytes"],
        memory_method=memory["method"],
        floor_flops=flops,
        matmul_tflops=rate,
        floor_s=floor_s,
        times_floor=(total / floor_s) if total else None,  # "× floor": 1.0 would be the matmuls alone
        diff_vs_naive=_relative_diff(value, _naive_values.get(case.label)),
        **meta,
    )
