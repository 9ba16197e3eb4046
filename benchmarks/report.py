"""Turn saved pytest-benchmark JSON of this suite into a Markdown report and PNG plots.

    python benchmarks/report.py RESULTS.json [MORE.json ...] --out DIR

Writes `DIR/report.md` (machine, run settings, a summary of time and memory relative to naive
PyTorch, a summary of time relative to the matmul floor ("× floor"), then every figure per case, including contenders that did not run and why) and one
`DIR/<workload>.png` per workload (forward+backward time and peak extra memory against N, one
column per vocabulary size). Several JSON files (e.g. the stages of `gpu_check.sh`) are merged.
Prints the summary tables to stdout. Standalone: needs only the standard library and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

WORKLOAD_TITLES = {
    "dopd": "DOPD loss (fused-linear, K=128), forward+backward",
    "js": "full-vocabulary JS (β=0.5), forward+backward",
    "kl": "full-vocabulary forward KL, forward+backward",
    "logprob": "sampled-token log-prob (log-sum-exp pass), forward only",
}
ORDER = ["naive", "naive_compiled", "lib_torch", "lib_cpp", "lib_triton", "lib_cuda"]
MIB = 2 ** 20


def load(paths: List[str]) -> dict:
    """Merge result files: their benchmarks and not-run records; machine and settings of the first."""
    merged = {"benchmarks": [], "not_run": [], "machine_info": {}, "commit_info": {}, "datetime": "", "runs": []}
    for p in paths:
        data = json.loads(Path(p).read_text())
        bench = data.get("dopd_bench", {})
        merged["benchmarks"] += [b for b in data.get("benchmarks", []) if "contender" in b.get("extra_info", {})]
        merged["not_run"] += bench.get("not_run", [])
        merged["runs"].append(bench)
        for key in ("machine_info", "commit_info", "datetime"):
            merged[key] = merged[key] or data.get(key, {})
    return merged


def rows_by_case(data: dict) -> Dict[tuple, Dict[str, dict]]:
    """(workload, V, H, N, dtype) -> contender -> row (figures, or a status for contenders that did not run)."""
    cases: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        e, s = b["extra_info"], b["stats"]
        cases[(e["workload"], e["v"], e["h"], e["n"], e["dtype"])][e["contender"]] = {
            "status": "ok", "time": s["median"], "iqr": s["iqr"], "rounds": s["rounds"],
            "fwd": e["forward"]["median_s"], "bwd": (e["backward"] or {}).get("median_s"),
            "mem": e["peak_extra_bytes"], "times_floor": times_floor(e), "kind": e["kind"],
            "regime_mix": e["regime_mix"], "input_stats": e["input_stats"], "first_call": e["first_call_s"],
            "diff": e.get("diff_vs_naive"), "grads": grad_bytes(e),
        }
    for r in data["not_run"]:
        cases[(r["workload"], r["v"], r["h"], r["n"], r["dtype"])].setdefault(r["contender"], {"status": r["status"]})
    return cases


def times_floor(e: dict) -> Optional[float]:
    """Time ÷ matmul floor ("× floor"). Results written before the suite stored `times_floor` kept its
    reciprocal, `floor_fraction`."""
    if "times_floor" in e:
        return e["times_floor"]
    return 1 / e["floor_fraction"] if e.get("floor_fraction") else None


def fmt_floor(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def grad_bytes(e: dict) -> int:
    """Bytes of the gradients every forward+backward contender must produce: dW [V, H] and dH [N, H]."""
    if e["forward_only"]:
        return 0
    return (e["v"] + e["n"]) * e["h"] * {"float32": 4, "float64": 8}.get(e["dtype"], 2)


def grad_bytes_of(rows: Dict[str, dict]) -> int:
    return next((r["grads"] for r in rows.values() if r["status"] == "ok"), 0)


def contender_order(names) -> List[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def ratio(row: dict, base: Optional[dict], key: str) -> str:
    if row.get("status") != "ok" or not base or base.get("status") != "ok" or not base[key]:
        return "–"
    return f"{row[key] / base[key]:.2f}×"


def short_status(status: str) -> str:
    return status.split(":")[0].replace("unavailable", "n/a")


def fmt_ms(s: Optional[float]) -> str:
    return "–" if s is None else f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def machine_lines(data: dict) -> List[str]:
    m = data["machine_info"]
    d = m.get("dopd", {})
    runs = data["runs"]
    hw = f"{d.get('cpu_model', m.get('cpu', {}).get('brand_raw', '?'))}, {d.get('cpu_count', '?')} cores " \
         f"(torch threads {d.get('torch_threads', '?')})"
    if d.get("gpu"):
        hw = f"{d['gpu']} ({d.get('gpu_memory_gib', '?')} GiB, CUDA {d.get('cuda')}); host {hw}"
    commit = data["commit_info"]
    lines = [
        f"- Machine: {hw}; {m.get('python_implementation', 'Python')} {m.get('python_version', '')}, "
        f"torch {d.get('torch', '?')}, triton {d.get('triton') or 'not installed'}.",
        f"- Run finished {data['datetime'][:19]} UTC at commit {commit.get('id', '?')[:10]}"
        f"{' (uncommitted changes)' if commit.get('dirty') else ''}; device {runs[0].get('device')}, "
        f"{runs[0].get('dtype')}, {runs[0].get('rounds')} timed round(s) per contender after one warm-up call"
        f"{', SMOKE MODE (sizes too small to mean anything)' if runs[0].get('smoke') else ''}.",
        f"- Wall time {sum(r.get('wall_s', 0) for r in runs):.0f} s; load average at start "
        f"{d.get('load_average_start', ['?'])[0]}, at end {runs[-1].get('load_average_end', ['?'])[0]} "
        f"(1-minute; above the core count means other work shared the machine and absolute times are "
        f"inflated — ratios measured in the same run are the figures to read).",
    ]
    rates = {k: v for r in runs for k, v in r.get("matmul_tflops", {}).items()}
    if rates:
        lines.append("- Matmul rate measured in this run (prices the floor): "
                     + ", ".join(f"{k}: {v:.3g} TFLOP/s" for k, v in sorted(rates.items())) + ".")
    if d.get("note"):
        lines.append(f"- Note: {d['note']}")
    return lines


def _per_workload_tables(cases, title: str, first_header: str, first_cell, cell, exclude=frozenset()) -> List[str]:
    """One table per workload, one line per case (V, H, N): `first_cell(row)` in the `first_header`
    column, then `cell(result, row)` for each contender that ran (a status when it did not)."""
    out = []
    for workload in WORKLOAD_TITLES:
        keys = sorted(k for k in cases if k[0] == workload)
        if not keys:
            continue
        names = contender_order({n for k in keys for n in cases[k]} - set(exclude))
        out += [f"**{workload}** — {title(workload)}", "",
                f"| V | H | N | {first_header} | " + " | ".join(names) + " |",
                "|---|---|---|---|" + "---|" * len(names)]
        for k in keys:
            row = cases[k]
            cells = []
            for n in names:
                r = row.get(n)
                cells.append("–" if r is None else short_status(r["status"]) if r["status"] != "ok" else cell(r, row))
            out.append(f"| {k[1]} | {k[2]} | {k[3]} | {first_cell(row)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def summary_table(cases) -> List[str]:
    """One line per case: each contender's time and memory relative to naive PyTorch."""
    def naive_cell(row) -> str:
        base = row.get("naive")
        if base is None:
            return "–"
        return f"{fmt_ms(base['time'])} / {base['mem'] / MIB:.0f}" if base["status"] == "ok" else short_status(base["status"])

    return _per_workload_tables(
        cases, lambda w: f"{WORKLOAD_TITLES[w]}; cells: time× / memory× of naive (lower is better)",
        "naive time ms / MiB", naive_cell,
        lambda r, row: f"{ratio(r, row.get('naive'), 'time')} / {ratio(r, row.get('naive'), 'mem')}", exclude={"naive"})


def floor_table(cases) -> List[str]:
    """One line per case: each contender's time ÷ the matmul floor priced at the run's matmul rate."""
    def floor_cell(row) -> str:
        ok = [r for r in row.values() if r["status"] == "ok" and r["times_floor"]]
        return fmt_ms(ok[0]["time"] / ok[0]["times_floor"]) if ok else "–"

    return _per_workload_tables(
        cases, lambda w: "time ÷ matmul floor (× floor; 1.00× would be the unavoidable matmuls alone)", "floor ms",
        floor_cell, lambda r, row: fmt_floor(r["times_floor"]))


def detail_tables(cases) -> List[str]:
    out = []
    for k in sorted(cases, key=lambda k: (list(WORKLOAD_TITLES).index(k[0]), k[1:])):
        workload, v, h, n, dtype = k
        rows = cases[k]
        any_ok = next((r for r in rows.values() if r["status"] == "ok"), None)
        mix = ""
        if any_ok:
            rm, st = any_ok["regime_mix"], any_ok["input_stats"]
            mix = (" Regime mix " + " ".join(f"{r} {p:.0%}" for r, p in rm.items())
                   + f"; student entropy p10/p50/p90 {st['entropy_p10']:.2f}/{st['entropy_p50']:.2f}/"
                     f"{st['entropy_p90']:.2f} nats, mean π(y) {st['mean_q_sampled']:.2f}.")
        out += [f"### {workload}: V={v}, H={h}, N={n}, {dtype}", "", mix.strip(), "",
                "| contender | status | fwd ms | bwd ms | fwd+bwd ms (IQR) | time vs naive | peak extra MiB "
                "| memory vs naive | beyond gradients MiB | × floor | first call ms | value Δ vs naive |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = rows.get("naive")
        for name in contender_order(rows):
            r = rows[name]
            if r["status"] != "ok":
                out.append(f"| {name} | {r['status']} |" + " |" * 10)
                continue
            diff = "–" if r["diff"] is None else f"{r['diff']:.1e}"
            out.append(f"| {name} | ok | {fmt_ms(r['fwd'])} | {fmt_ms(r['bwd'])} | {fmt_ms(r['time'])} "
                       f"({fmt_ms(r['iqr'])}) | {ratio(r, base, 'time')} | {r['mem'] / MIB:.1f} | "
                       f"{ratio(r, base, 'mem')} | {(r['mem'] - r['grads']) / MIB:.1f} | {fmt_floor(r['times_floor'])} | "
                       f"{fmt_ms(r['first_call'])} | {diff} |")
        out.append("")
    return out


def plot(cases, out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for workload in WORKLOAD_TITLES:
        keys = [k for k in cases if k[0] == workload]
        if not keys:
            continue
        vocabs = sorted({(k[1], k[2]) for k in keys})
        fig, axes = plt.subplots(2, len(vocabs), figsize=(5.2 * len(vocabs), 7.5), squeeze=False)
        names = contender_order({n for k in keys for n, r in cases[k].items() if r["status"] == "ok"})
        for col, (v, h) in enumerate(vocabs):
            for name in names:
                pts = sorted((k[3], cases[k][name]) for k in keys
                             if (k[1], k[2]) == (v, h) and cases[k].get(name, {}).get("status") == "ok")
                if not pts:
                    continue
                ns = [p[0] for p in pts]
                style = dict(marker="o", linestyle="--" if name.startswith("naive") else "-", label=name)
                axes[0][col].errorbar(ns, [p[1]["time"] * 1e3 for p in pts],
                                      yerr=[[p[1]["iqr"] * 1e3 / 2 for p in pts]] * 2, capsize=3, **style)
                axes[1][col].plot(ns, [max(p[1]["mem"], 1) / MIB for p in pts], **style)
            for row, label in enumerate(("fwd+bwd time, median (ms)" if workload != "logprob" else "forward time, median (ms)",
                                         "peak extra memory (MiB)")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (tokens)")
                ax.set_ylabel(label)
                ax.grid(True, which="both", alpha=0.3)
            axes[0][col].set_title(f"V={v}, H={h}")
            grads = [grad_bytes_of(cases[k]) for k in keys if (k[1], k[2]) == (v, h)]
            if any(grads):  # every forward+backward contender holds the weight's gradient
                axes[1][col].axhline(max(grads) / MIB, color="gray", linestyle=":", label="gradients dW + dH")
        axes[0][0].legend(fontsize=8)
        axes[1][0].legend(fontsize=8)
        fig.suptitle(WORKLOAD_TITLES[workload])
        fig.tight_layout()
        path = out_dir / f"{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json) of this suite")
    parser.add_argument("--out", required=True, help="output folder for report.md and the PNGs")
    args = parser.parse_args(argv)
    data = load(args.json)
    cases = rows_by_case(data)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot(cases, out_dir)
    summary = summary_table(cases) + floor_table(cases)
    text = ["# dopd-kernels benchmark report", ""] + machine_lines(data) + [
        "",
        "Figures: median of the timed rounds; `fwd`/`bwd` are the two halves of the same rounds; peak extra "
        "memory is the peak above the resident inputs during one call (it includes the gradients of the "
        "student's hidden states and weight; \"beyond gradients\" subtracts their (V + N)·H elements, leaving "
        "what the loss itself holds); × floor is the time divided by the matmul floor, the time the unavoidable "
        "matmul FLOPs (DESIGN.md section 4) take at the matmul rate measured in the same process (2.00× "
        "means twice the time of the matmuls alone; the ratio takes out the machine's matmul speed); the first call (untimed "
        "warm-up) includes compilation and autotuning; value Δ is max |output − naive output| / max |naive "
        "output| on the same inputs, checking that every contender computes the same thing. Contenders that "
        "did not run are listed with the reason.",
        "",
        "## Summary", "",
    ] + summary + ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + ["", "## Every case", ""] + detail_tables(cases)
    (out_dir / "report.md").write_text("\n".join(text) + "\n")
    print("\n".join(summary))
    print(f"report: {out_dir / 'report.md'}; plots: {', '.join(str(p) for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
