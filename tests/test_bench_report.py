"""The benchmark suite's own code: its naive baselines compute what the library computes, and
report.py turns a JSON written by the suite's smoke mode into the table and the plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE_JSON = ROOT / "benchmarks" / "results" / "smoke" / "bench.json"
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root
    sys.path.insert(0, str(ROOT))


@pytest.mark.parametrize("workload", ["dopd", "js", "kl", "logprob"])
def test_naive_baselines_match_reference_backend(workload):
    from benchmarks import contenders
    from benchmarks.inputs import Case, make_inputs

    case = Case(workload, 48, 700, 32)
    x = make_inputs(case)
    got = []
    for fn in (contenders.build("naive", x, case), contenders._library(workload, "reference", x)):
        x.zero_grad()
        if workload == "logprob":
            got.append((fn().detach().double(),))
            continue
        loss = fn()
        loss.backward()
        got.append((loss.detach().double(), x.hs.grad.double(), x.ws.grad.double()))
    (naive_value, *naive_grads), (ref_value, *ref_grads) = got
    torch.testing.assert_close(naive_value, ref_value, rtol=1e-4, atol=1e-6)
    for g, r in zip(naive_grads, ref_grads):  # fp32 vs fp64 may swap a near-tied K-th token: compare as wholes
        assert (g - r).norm() <= 1e-3 * r.norm()


def test_inputs_are_peaked_and_populate_every_regime():
    from benchmarks.harness import regime_mix
    from benchmarks.inputs import Case, make_inputs

    x = make_inputs(Case("dopd", 256, 4000, 256))
    assert 0.3 < x.stats["entropy_p50"] < 3.0 and x.stats["entropy_p90"] < 7.0  # log V = 8.3
    assert all(f > 0.02 for f in regime_mix(x).values())


def case_rows(report: str) -> dict:
    """(case heading, contender) -> the cells of that contender's row in the report's per-case tables."""
    rows, heading = {}, None
    for line in report.splitlines():
        if line.startswith("### "):
            heading = line[4:]
        elif heading and line.startswith("| ") and " | ok | " in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[heading, cells[0]] = cells
    return rows


def test_report_from_smoke_json(tmp_path):
    data = json.loads(SMOKE_JSON.read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(SMOKE_JSON), "--out", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    report = (tmp_path / "report.md").read_text()
    workloads = {b["extra_info"]["workload"] for b in data["benchmarks"]}
    assert workloads == {"dopd", "js", "kl", "logprob"}
    for w in workloads:
        assert (tmp_path / f"{w}.png").stat().st_size > 1000
        assert f"**{w}**" in proc.stdout
    rows = case_rows(report)
    for b in data["benchmarks"]:  # every contender that ran has a row, with its time ÷ matmul floor
        e, median = b["extra_info"], b["stats"]["median"]
        assert e["times_floor"] == pytest.approx(median / e["floor_s"]) and e["times_floor"] > 0
        row = rows[f"{e['workload']}: V={e['v']}, H={e['h']}, N={e['n']}, {e['dtype']}", e["contender"]]
        assert row[9] == f"{e['times_floor']:.2f}×"
    for w in workloads:  # the floor summary: one table per workload, printed as well
        assert f"**{w}** — time ÷ matmul floor" in proc.stdout
    ran = {(b["extra_info"]["workload"], b["extra_info"]["contender"]) for b in data["benchmarks"]}
    for peer in ("trl_chunked_divergence", "liger_chunked_jsd"):  # the CPU peers run (and were checked) in smoke mode
        assert {("js", peer), ("kl", peer)} <= ran
    for r in data["dopd_bench"]["not_run"]:  # and every one that did not, with its reason
        assert f"| {r['contender']} | {r['status']} |" in report
    assert "Machine:" in report and "SMOKE MODE" in report and "| × floor |" in report


def test_report_reads_floor_fraction_of_older_results():
    from benchmarks import report

    assert report.times_floor({"floor_fraction": 0.25}) == 4.0  # JSON written before `times_floor` existed
    assert report.times_floor({"times_floor": 2.5, "floor_fraction": 0.1}) == 2.5
    assert report.times_floor({"floor_fraction": None}) is None
