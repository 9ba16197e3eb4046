"""Issue 4's CPU target: fp32 fused-linear DOPD forward+backward, N=2048, H=1024, V=151936.

Each measurement runs in its own subprocess (time, and peak extra RSS = peak RSS (VmHWM, reset once the inputs
exist) − RSS at that point, so gradients such as dW count as extra):

    naive   materialized PyTorch: three [N, V] logit tensors, log-softmax, routing, top-K, JS; autograd
    torch   the library's vocabulary-chunked `torch` backend
    cpp     the compiled `cpp` backend; afterwards, in the same process, the matmuls its passes
            perform (same tile shapes and counts, the epilogues left out) are timed alone

    python benchmarks/bench_cpp_target.py                 # all three, default sizes, 2 threads
    python benchmarks/bench_cpp_target.py --n 512 --modes cpp torch

Prints one JSON line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time


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


def make_inputs(n, h, v, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g)
    ws = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    ht = hs + 0.5 * torch.randn(n, h, generator=g)
    wt = ws + 0.5 * torch.randn(v, h, generator=g) / h**0.5
    hp = hs + 0.5 * torch.randn(n, h, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
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


def own_matmuls(backend, hs, ws, ht, wt, hp, n_full):
    """The matmuls of the cpp passes alone: stats (3 streams × all rows), value pass (student and
    teacher tiles of the full-vocabulary rows), gradient pass (both tiles again, then dH += G·W and
    dW += Gᵀ·H), with the backend's tile sizes."""
    import torch

    v, rc, vc = ws.shape[0], backend.row_chunk, backend.vocab_chunk
    buf = torch.empty(rc * vc)
    dw = torch.zeros_like(ws)

    def sweep(h, w, contract=False):
        for r0 in range(0, h.shape[0], rc):
            hr = h[r0:r0 + rc]
            dh = torch.zeros_like(hr)
            for c0 in range(0, v, vc):
                wb = w[c0:c0 + vc]
                out = buf[: hr.shape[0] * wb.shape[0]].view(hr.shape[0], wb.shape[0])
                torch.mm(hr, wb.T, out=out)
                if contract:
                    dh.addmm_(out, wb)
                    dw[c0:c0 + vc].addmm_(out.T, hr)

    with torch.no_grad():
        t0 = time.perf_counter()
        for h, w in ((hs, ws), (ht, wt), (hp, ws)):  # stats pass
            sweep(h, w)
        full = slice(0, n_full)
        sweep(hs[full], ws)  # value pass
        sweep(ht[full], wt)
        sweep(ht[full], wt)  # gradient pass
        sweep(hs[full], ws, contract=True)
        return time.perf_counter() - t0


def child(mode, n, h, v, threads, tiles):
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, ".")
    import dopd_kernels as dk
    from dopd_kernels import DOPDConfig
    from dopd_kernels.backends.compiled import CppBackend

    cpp = CppBackend(*tiles) if tiles else CppBackend()
    if mode == "cpp":  # load the extension (and warm MKL) outside the measurement
        b = cpp
        x = make_inputs(16, 32, 300)
        dk.fused_linear_dopd_loss(x[0], x[1], x[2], x[3], x[4], x[5], backend=b).loss.backward()
    hs, ws, ht, wt, hp, y = make_inputs(n, h, v)
    reset_peak_rss()
    base = status_bytes("VmRSS")
    c0, t0 = cpu_seconds(), time.perf_counter()
    if mode == "naive":
        loss, regime = naive_dopd(hs, ws, ht, wt, hp, y)
    else:
        out = dk.fused_linear_dopd_loss(hs, ws, ht, wt, hp, y, config=DOPDConfig(),
                                        backend=cpp if mode == "cpp" else "torch")
        loss, regime = out.loss, out.regime
    loss.backward()
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = status_bytes("VmHWM")
    res = dict(mode=mode, n=n, h=h, v=v, threads=threads, tiles=[cpp.row_chunk, cpp.vocab_chunk] if mode == "cpp" else None, seconds=round(elapsed, 3), cpu_seconds=round(cpu, 3), loss=float(loss),
               peak_extra_mib=round((peak - base) / 2**20, 1), base_rss_mib=round(base / 2**20, 1),
               ht_fraction=round(float((regime == 2).float().mean()), 4))
    if mode == "cpp":
        n_full = int((regime == 2).sum())
        hs.grad = ws.grad = None
        c0 = cpu_seconds()
        res["own_matmuls_seconds"] = round(own_matmuls(cpp, hs.detach(), ws.detach(), ht, wt, hp, n_full), 3)
        res["own_matmuls_cpu_seconds"] = round(cpu_seconds() - c0, 3)
        # The DESIGN.md floor: the stats pass and the dH / dW contractions of the full-vocabulary rows.
        flops = 2 * n * v * 3 * h + 4 * n_full * v * h
        res["floor_tflop"] = round(flops / 1e12, 3)
    print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["cpp", "torch", "naive"])
    ap.add_argument("--tiles", type=int, nargs=2, default=None, help="cpp row_chunk vocab_chunk")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.n, a.h, a.v, a.threads, a.tiles)
        return
    results = {}
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--n", str(a.n), "--h", str(a.h), "--v", str(a.v),
               "--threads", str(a.threads)] + (["--tiles", *map(str, a.tiles)] if a.tiles else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = (p.stdout.strip().splitlines() or [""])[-1]
        if p.returncode != 0 or not line.startswith("{"):
            print(json.dumps(dict(mode=mode, error=p.returncode, stderr=p.stderr[-500:])), flush=True)
            continue
        print(line, flush=True)
        results[mode] = json.loads(line)
    if "cpp" in results:
        c = results["cpp"]
        print(f"cpp: {c['seconds']:.2f} s wall / {c['cpu_seconds']:.2f} s CPU; its matmuls alone "
              f"{c['own_matmuls_seconds']:.2f} s / {c['own_matmuls_cpu_seconds']:.2f} s (ratio "
              f"{c['seconds'] / c['own_matmuls_seconds']:.2f} wall, {c['cpu_seconds'] / c['own_matmuls_cpu_seconds']:.2f} CPU); "
              f"peak extra {c['peak_extra_mib']:.0f} MiB")
        for other in ("torch", "naive"):
            if other in results:
                o = results[other]
                print(f"  vs {other}: {o['seconds']:.2f} s wall / {o['cpu_seconds']:.2f} s CPU "
                      f"({o['seconds'] / c['seconds']:.2f}x / {o['cpu_seconds'] / c['cpu_seconds']:.2f}x cpp), peak extra "
                      f"{o['peak_extra_mib']:.0f} MiB ({o['peak_extra_mib'] / max(c['peak_extra_mib'], 1):.1f}x cpp)")


if __name__ == "__main__":
    main()
