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
    for b in data["benchmarks"]:  # every contender that ran has a row
        assert f"| {b['extra_info']['contender']} | ok |" in report
    for r in data["dopd_bench"]["not_run"]:  # and every one that did not, with its reason
        assert f"| {r['contender']} | {r['status']} |" in report
    assert "Machine:" in report and "SMOKE MODE" in report
