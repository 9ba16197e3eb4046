"""Issue 4's and issue 14's CPU targets: fp32 fused-linear forward+backward at H=1024, V=151936, for DOPD
(N=2048, the default) or full-vocabulary OPD (`--workload opd-js`, the issue 14 headline, or `opd-kl`,
reverse KL).

Each measurement runs in its own subprocess (time, and peak extra RSS = peak RSS (VmHWM, reset once the inputs
exist) − RSS at that point, so gradients such as dW count as extra):

    naive   materialized PyTorch: the [N, V] logit tensors, log-softmax, (routing, top-K,) the divergence; autograd
    torch   the library's vocabulary-chunked `torch` backend
    cpp     the compiled `cpp` backend, with the matmul FLOPs its extension counted (`matmul_flops`) against the
            floor; afterwards, in the same process, the matmuls of its pass plan (same tile shapes and
            sweeps, the epilogues left out) are timed alone
    trl     (`opd-js` only) TRL's own distillation loss, `_chunked_divergence_loss` (its PyTorch path)
    liger   (`opd-js` only) Liger-Kernel's chunked `LigerFusedLinearJSDLoss`, not compiled
    (the two peers are called as `benchmarks/contenders.py` calls them, with its mirrored β)

    python benchmarks/bench_cpp_target.py                 # DOPD, all three, default sizes, 2 threads
    python benchmarks/bench_cpp_target.py --n 512 --modes cpp torch
    python benchmarks/bench_cpp_target.py --workload opd-js --n 1024 --modes cpp
    python benchmarks/bench_cpp_target.py --workload opd-js --n 1024 --modes cpp torch naive trl liger
    python benchmarks/bench_cpp_target.py --workload opd-js --n 1024 --modes cpp torch --tiles 16 151936
                                                          # whole-row tiles (16 × V fp32 per stream): one sweep
    python benchmarks/bench_cpp_target.py --workload opd-kl --n 256 --v 151665 --pad-rows 271 --modes cpp torch
                                                          # a padded student head (Qwen2.5: 151936 rows, 151665 tokens)
    python benchmarks/bench_cpp_target.py --workload opd-kl --n 1024 --modes cpp --inputs peaked [--no-skip]
                                                          # LLM-like rows: negligible gradient tiles skipped (or not)
    python benchmarks/bench_cpp_target.py --workload opd-kl --n 1024 --modes cpp torch --inputs peaked --reduction none
                                                          # the deferred gradient (backward with unit upstream)

Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from types import SimpleNamespace

PEERS = {"trl": "trl_chunked_divergence", "liger": "liger_chunked_jsd"}  # modes timed with benchmarks/contenders.py


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine, steadier than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux clear_refs), so the input set-up's temporaries do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_inputs(n, h, v, seed=0, pad_rows=0, inputs="gaussian"):
    """Hidden states, heads and tokens; with `pad_rows`, the student's head gains that many padding rows
    past its V tokens and the teacher's twice as many (a checkpoint's padded embedding). `inputs`:
    "gaussian" (random heads and hidden states: softmax entropies near log V, nothing negligible) or
    "peaked" (`skipping_report.peaked_streams`, without its biases: LLM-like entropies over a floor ~25
    nats below 8 candidates per row, where most of a row's gradient tiles are negligible)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if inputs == "peaked":
        from benchmarks.skipping_report import peaked_streams

        torch.manual_seed(seed)
        t = peaked_streams(n, h, v)
        hs, ws, ht, wt, hp = (t[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                             "priv_student_hidden"))
    else:
        hs = torch.randn(n, h, generator=g)
        ws = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
        ht = hs + 0.5 * torch.randn(n, h, generator=g)
        wt = ws + 0.5 * torch.randn(v, h, generator=g) / h**0.5
        hp = hs + 0.5 * torch.randn(n, h, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    if pad_rows:
        ws = torch.cat([ws, torch.randn(pad_rows, h, generator=g)])
        wt = torch.cat([wt, torch.randn(2 * pad_rows, h, generator=g)])
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt, hp, y


def naive_dopd(hs, ws, ht, wt, hp, y, k=128, beta_l=0.6, beta_w=0.3, trim=0.05):
    """Materialized fp32 DOPD as a user would write it (paper defaults, student top-K renormalized)."""
    import torch

    ls = torch.log_softmax(hs @ ws.T, dim=-1)
    with torch.no_grad():
        lt = torch.log_softmax(ht @ wt.T, dim=-1)
        lp = torch.log_softmax(hp @ ws.T, dim=-1)
        lt_y, lp_y = lt.gather(1, y[:, None])[:, 0].double(), lp.gather(1, y[:, None])[:, 0].double()
        a, qt, qp = (lt_y - lp_y).abs(), lt_y.exp(), lp_y.exp()

        def tmean(x):
            return torch.sort(x).values[: x.numel() - math.floor(trim * x.numel())].mean()

        low = a < tmean(a)
        regime = torch.where(low, torch.where(qp + qt >= tmean(qp) + tmean(qt), 0, 1), torch.where(qt >= qp, 2, 3))
        cols = ls.topk(k, dim=-1).indices
    ks = torch.log_softmax(ls.gather(1, cols), -1)

    def rkl(target):
        kt = torch.log_softmax(target.gather(1, cols), -1)
        return (ks.exp() * (ks - kt)).sum(-1)

    lm = torch.logaddexp(ls + math.log(0.5), lt + math.log(0.5))
    js = 0.5 * (ls.exp() * (ls - lm)).sum(-1) + 0.5 * (lt.exp() * (lt - lm)).sum(-1)
    per = torch.stack([beta_l * rkl(lt), beta_w * rkl(lp), js, beta_l * rkl(lp)], 1).gather(1, regime[:, None])[:, 0]
    return per.mean(), regime


def naive_opd(hs, ws, ht, wt, kind):
    """Materialized fp32 full-vocabulary OPD (JS with β = 0.5, or reverse KL), mean over tokens."""
    import torch

    ls = torch.log_softmax(hs @ ws.T, dim=-1)
    with torch.no_grad():
        lt = torch.log_softmax(ht @ wt.T, dim=-1)
    if kind == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1).mean()
    lm = torch.logaddexp(ls + math.log(0.5), lt + math.log(0.5))
    return (0.5 * (ls.exp() * (ls - lm)).sum(-1) + 0.5 * (lt.exp() * (lt - lm)).sum(-1)).mean()


def plan_sweeps(workload, fits, hs, ws, ht, wt, hp, n_full):
    """The cpp pass plan as sweeps (hidden, weight, contract): every stream's tiles of a set of rows, the
    student's gradient tiles contracted into dH and dW. DOPD: stats of all three streams, then for the
    full-vocabulary (HT) rows a value sweep and a gradient sweep (its log-sum-exps are given; the JS
    constant needs the whole row). Full-vocabulary OPD: one sweep when a row fits one tile; otherwise the
    statistics with (reverse KL) the value online, (JS) a value sweep, then the gradient sweep."""
    full = slice(0, n_full)
    both = [(ht[full], wt, False), (hs[full], ws, False)]
    grad = [(ht[full], wt, False), (hs[full], ws, True)]
    if workload == "dopd":
        return [(hs, ws, False), (ht, wt, False), (hp, ws, False)] + both + grad
    if fits:
        return grad
    return both + (both if workload == "opd-js" else []) + grad


def own_matmuls(backend, sweeps, v):
    """Time the matmuls of `sweeps` alone, with the backend's tile sizes; returns (seconds, FLOPs)."""
    import torch

    rc, vc = backend.row_chunk, backend.vocab_chunk
    buf = torch.empty(rc * vc)
    flops = 0
    with torch.no_grad():
        t0 = time.perf_counter()
        for h, w, contract in sweeps:
            dw = torch.zeros_like(w) if contract else None
            for r0 in range(0, h.shape[0], rc):
                hr = h[r0:r0 + rc]
                dh = torch.zeros_like(hr)
                for c0 in range(0, v, vc):
                    wb = w[c0:c0 + vc]
                    out = buf[: hr.shape[0] * wb.shape[0]].view(hr.shape[0], wb.shape[0])
                    torch.mm(hr, wb.T, out=out)
                    flops += 2 * out.numel() * hr.shape[1] * (3 if contract else 1)
                    if contract:
                        dh.addmm_(out, wb)
                        dw[c0:c0 + vc].addmm_(out.T, hr)
        return time.perf_counter() - t0, flops


def child(mode, workload, n, h, v, threads, tiles, pad_rows=0, inputs="gaussian", skip=True, reduction="mean"):
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, ".")
    import dopd_kernels as dk
    from dopd_kernels import DOPDConfig
    from dopd_kernels.backends.compiled import CppBackend
    from dopd_kernels.backends.torch_chunked import TorchBackend

    options = dict(zip(("row_chunk", "vocab_chunk"), tiles or ()), skip_negligible=skip)
    cpp, torch_backend = CppBackend(**options), TorchBackend(**options)
    backend = cpp if mode == "cpp" else torch_backend
    kind = "reverse_kl" if workload == "opd-kl" else "js"

    def run(hs, ws, ht, wt, hp, y):
        """(loss, regime or None) of the workload; regime 2 = HT. Heads with `pad_rows` padding rows declare
        their vocabulary (`LMHead(vocab_size=...)`)."""
        if pad_rows:
            vocab = ws.shape[0] - pad_rows
            ws, wt = dk.LMHead(ws, vocab_size=vocab), dk.LMHead(wt, vocab_size=vocab)
        if workload == "dopd":
            if mode == "naive":
                return naive_dopd(hs, ws, ht, wt, hp, y)
            out = dk.fused_linear_dopd_loss(hs, ws, ht, wt, hp, y, config=DOPDConfig(reduction=reduction),
                                            backend=backend)
            return out.loss, out.regime
        if mode == "naive":
            return naive_opd(hs, ws, ht, wt, kind), None
        if mode in PEERS:
            from benchmarks.contenders import build
            from benchmarks.inputs import Case

            case = Case("js", hs.shape[0], ws.shape[0], hs.shape[1])
            return build(PEERS[mode], SimpleNamespace(hs=hs, ws=ws, ht=ht, wt=wt, tokens=y), case)(), None
        return dk.fused_linear_opd_loss(hs, ws, ht, wt, y, divergence=kind, granularity="full", reduction=reduction,
                                        backend=backend).loss, None

    # Imports (TRL's alone take seconds), the extension's load and MKL's warm-up stay outside the measurement.
    warm = run(*make_inputs(16, 32, 300, pad_rows=pad_rows))[0]
    warm.backward(torch.ones_like(warm))
    cpp.reset_matmul_flops()
    backend.skip_counter = type(backend.skip_counter)()
    hs, ws, ht, wt, hp, y = make_inputs(n, h, v, pad_rows=pad_rows, inputs=inputs)
    reset_peak_rss()
    base = status_bytes("VmRSS")
    c0, t0 = cpu_seconds(), time.perf_counter()
    loss, regime = run(hs, ws, ht, wt, hp, y)
    loss.backward(torch.ones_like(loss))  # reduction="none": a unit upstream gradient per token (deferred backward)
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    loss = loss.sum()
    peak = status_bytes("VmHWM")
    n_full = int((regime == 2).sum()) if regime is not None else n
    res = dict(mode=mode, workload=workload, n=n, h=h, v=v, threads=threads, pad_rows=pad_rows, inputs=inputs,
               tiles=list(backend.tile_shape()) if mode in ("cpp", "torch") else None, reduction=reduction,
               seconds=round(elapsed, 3),
               cpu_seconds=round(cpu, 3), loss=float(loss), peak_extra_mib=round((peak - base) / 2**20, 1),
               base_rss_mib=round(base / 2**20, 1), full_rows=n_full)
    if mode in ("cpp", "torch"):
        k = backend.skip_counter
        res["skip_negligible"] = skip
        res["skipped"] = round(k.fraction, 4)  # share of the gradient entries whose contractions were skipped
        res["unformed"] = round(k.unformed / k.entries, 4) if k.entries else 0.0  # ... not even recomputed
        res["value_unformed"] = round(k.value_unformed / (n_full * v), 4) if n_full else 0.0  # JS value sweeps
    if mode == "cpp":
        res["counted_gflop"] = round(cpp.matmul_flops() / 1e9, 3)
        # The README's floor: one projection per stream per row (3 streams for DOPD, 2 for OPD), plus the dH / dW
        # contractions of the full-vocabulary rows (DOPD's HT rows also need one recomputation of both streams).
        proj = 2 * v * h
        floor = proj * (3 * n + 4 * n_full) if workload == "dopd" else proj * 4 * n
        res["floor_gflop"] = round(floor / 1e9, 3)
        res["counted_over_floor"] = round(cpp.matmul_flops() / floor, 3)
        hs.grad = ws.grad = None
        sweeps = plan_sweeps(workload, v <= cpp.vocab_chunk, hs.detach(), ws.detach()[:v], ht, wt[:v], hp, n_full)
        c0 = cpu_seconds()
        secs, flops = own_matmuls(cpp, sweeps, v)
        res["own_matmuls_seconds"] = round(secs, 3)
        res["own_matmuls_cpu_seconds"] = round(cpu_seconds() - c0, 3)
        res["plan_gflop"] = round(flops / 1e9, 3)  # the sweeps timed: counted_gflop less the K-column dot products
    print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=["dopd", "opd-js", "opd-kl"], default="dopd")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["cpp", "torch", "naive"], choices=["cpp", "torch", "naive", *PEERS])
    ap.add_argument("--tiles", type=int, nargs=2, default=None, help="row_chunk vocab_chunk of the cpp and torch backends (vocab_chunk >= V: one sweep per row chunk)")
    ap.add_argument("--pad-rows", type=int, default=0, help="padding rows on the student's head (the teacher's: twice "
                    "as many), declared by LMHead(vocab_size=V); cpp and torch modes only")
    ap.add_argument("--inputs", choices=["gaussian", "peaked"], default="gaussian",
                    help="peaked: LLM-like rows whose gradient tiles are mostly negligible (make_inputs)")
    ap.add_argument("--no-skip", action="store_true", help="the cpp and torch backends with skip_negligible=False")
    ap.add_argument("--reduction", choices=["mean", "none"], default="mean",
                    help="none: per-token losses, backward with a unit upstream gradient (the library's deferred "
                         "gradient: a backend object runs the gradient sweep in the backward); cpp and torch modes only")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.workload != "opd-js" and set(a.modes) & set(PEERS):
        ap.error(f"--modes {' '.join(sorted(set(a.modes) & set(PEERS)))}: the peers run the opd-js workload only")
    if a.pad_rows and not a.child and set(a.modes) - {"cpp", "torch"}:
        ap.error("--pad-rows: the cpp and torch modes only (the others take no LMHead)")
    if a.reduction != "mean" and not a.child and set(a.modes) - {"cpp", "torch"}:
        ap.error("--reduction none: the cpp and torch modes only")
    if a.child:
        child(a.child, a.workload, a.n, a.h, a.v, a.threads, a.tiles, a.pad_rows, a.inputs, not a.no_skip, a.reduction)
        return
    results = {}
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--workload", a.workload, "--n", str(a.n), "--h", str(a.h), "--v", str(a.v),
               "--threads", str(a.threads), "--pad-rows", str(a.pad_rows), "--inputs", a.inputs,
               "--reduction", a.reduction] + (
                   ["--tiles", *map(str, a.tiles)] if a.tiles else []) + (["--no-skip"] if a.no_skip else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = (p.stdout.strip().splitlines() or [""])[-1]
        if p.returncode != 0 or not line.startswith("{"):
            print(json.dumps(dict(mode=mode, error=p.returncode, stderr=p.stderr[-500:])), flush=True)
            continue
        print(line, flush=True)
        results[mode] = json.loads(line)
    if "cpp" in results and results["cpp"]["own_matmuls_seconds"] > 0:
        c = results["cpp"]
        # The floor's time: the floor's FLOPs at the matmul rate of cpp's own plan, timed alone in its process.
        floor_s = c["own_matmuls_seconds"] * c["floor_gflop"] / c["plan_gflop"]
        print(f"cpp: {c['seconds']:.2f} s wall / {c['cpu_seconds']:.2f} s CPU; its matmuls alone "
              f"{c['own_matmuls_seconds']:.2f} s / {c['own_matmuls_cpu_seconds']:.2f} s (ratio "
              f"{c['seconds'] / c['own_matmuls_seconds']:.2f} wall, {c['cpu_seconds'] / c['own_matmuls_cpu_seconds']:.2f} CPU); "
              f"counted {c['counted_gflop']:.1f} GFLOP = {c['counted_over_floor']:.2f}x the floor; "
              f"peak extra {c['peak_extra_mib']:.0f} MiB; the floor at that rate {floor_s:.2f} s, cpp at "
              f"{c['seconds'] / floor_s:.2f}x it")
        for other in ("torch", "naive", *PEERS):
            if other in results:
                o = results[other]
                print(f"  vs {other}: {o['seconds']:.2f} s wall / {o['cpu_seconds']:.2f} s CPU "
                      f"({o['seconds'] / c['seconds']:.2f}x / {o['cpu_seconds'] / c['cpu_seconds']:.2f}x cpp, "
                      f"{o['seconds'] / floor_s:.2f}x the floor), peak extra "
                      f"{o['peak_extra_mib']:.0f} MiB ({o['peak_extra_mib'] / max(c['peak_extra_mib'], 1):.1f}x cpp)")


if __name__ == "__main__":
    main()
