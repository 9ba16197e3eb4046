"""Size selection, run settings and result bookkeeping of the benchmark suite.

Sizes follow the device found (see `GRIDS`): CPU sizes by default (the whole CPU run takes about
9.5 CPU-minutes: under 10 minutes on 2 idle cores), real sizes in bf16 on CUDA, tiny sizes in smoke mode (`--smoke` or
`DOPD_BENCH_SMOKE=1`: N=16, V=500, H=16, one round; every code path, in well under a minute).

Environment overrides (used by `gpu_check.sh`):
    DOPD_BENCH_SMOKE=1              smoke mode
    DOPD_BENCH_WORKLOADS=dopd,js    run only these workloads
    DOPD_BENCH_SIZES="V:H:N,N;..."  replace the size grid of every workload
    DOPD_BENCH_ROUNDS=5             timed rounds per contender
    DOPD_BENCH_BUDGET_S=300         once this many seconds have passed, remaining contenders are
                                    recorded as skipped for time (the JSON is still written)
    DOPD_BENCH_NOTE="..."           a note about the machine, stored with the results

Contenders that cannot run are recorded (reason and case) under the key `dopd_bench.not_run` of
the `--benchmark-json` file, next to the run settings, as well as skipped with that reason.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import pytest
import torch

from .inputs import WORKLOADS, Case

# workload -> [(V, H, [N, ...])]
GRIDS = {
    "cpu": {  # ~9.5 CPU-minutes (< 10 min on 2 idle cores), memory probes and torch.compile included
        "dopd": [(32000, 512, [64, 256]), (151936, 512, [16, 64])],
        "js": [(32000, 512, [32, 128])],
        "kl": [(32000, 512, [32, 128])],
        "logprob": [(151936, 512, [16, 64])],
    },
    "cuda": {
        "dopd": [(128256, 4096, [2048, 8192, 16384]), (151936, 4096, [2048, 8192, 16384]),
                 (262144, 2048, [2048, 8192, 16384])],
        "js": [(151936, 4096, [2048, 8192]), (262144, 2048, [2048, 8192])],
        "kl": [(151936, 4096, [2048, 8192]), (262144, 2048, [2048, 8192])],
        "logprob": [(151936, 4096, [2048, 8192]), (262144, 2048, [2048, 8192])],
    },
}
SMOKE_GRID = [(500, 16, [16])]
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
ROUNDS = {"cpu": 3, "cuda": 5}


@dataclass
class Settings:
    smoke: bool
    device: str
    dtype: str
    rounds: int
    budget_s: float
    note: str
    started: float = field(default_factory=time.time)
    load_start: Tuple[float, ...] = field(default_factory=os.getloadavg)
    not_run: List[dict] = field(default_factory=list)
    matmul_tflops: Dict[str, float] = field(default_factory=dict)
    workdir: str = ""

    def grid(self, workload: str):
        sizes = os.environ.get("DOPD_BENCH_SIZES", "").strip()
        if self.smoke:
            return SMOKE_GRID
        if sizes:
            return [(int(v), int(h), [int(n) for n in ns.split(",")])
                    for v, h, ns in (part.split(":") for part in sizes.split(";") if part.strip())]
        return GRIDS[self.device][workload]

    def cases(self, workloads) -> List[Case]:
        """Cases ordered by N, then vocabulary, then workload: inputs made for a size are reused, and
        if a time budget cuts the run short every vocabulary still has its smaller sizes."""
        chosen = [w for w in os.environ.get("DOPD_BENCH_WORKLOADS", ",".join(WORKLOADS)).split(",") if w]
        found = [Case(w, n, v, h, self.dtype, self.device)
                 for w in workloads if w in chosen for v, h, ns in self.grid(w) for n in ns]
        return sorted(found, key=lambda c: (c.n, c.v, c.h, workloads.index(c.workload)))

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        """True once the budget (less `reserve_s`, time a contender needs beyond its rounds) is spent."""
        return self.budget_s > 0 and time.time() - self.started > self.budget_s - reserve_s

    def record(self, case: Case, contender: str, status: str) -> None:
        self.not_run.append({**case.as_dict(), "contender": contender, "status": status})


SETTINGS: Settings = None  # set in pytest_configure


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true", default=False,
                     help="dopd benchmarks: tiny sizes, one round (also DOPD_BENCH_SMOKE=1)")


def pytest_configure(config):
    global SETTINGS
    smoke = config.getoption("--smoke") or os.environ.get("DOPD_BENCH_SMOKE") == "1"
    if smoke:
        os.environ["DOPD_BENCH_SMOKE"] = "1"  # seen by the contenders and the probe subprocesses
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke and device == "cpu":
        # Triton contenders (library backend, Liger) run on CPU tensors in the interpreter at smoke
        # sizes; this must be set before anything imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    SETTINGS = Settings(
        smoke=smoke,
        device=device,
        dtype="float32" if smoke else DTYPES[device],
        rounds=1 if smoke else int(os.environ.get("DOPD_BENCH_ROUNDS", ROUNDS[device])),
        budget_s=float(os.environ.get("DOPD_BENCH_BUDGET_S", "0")),
        note=os.environ.get("DOPD_BENCH_NOTE", ""),
        workdir=tempfile.mkdtemp(prefix="dopd-bench-"),
    )


def pytest_unconfigure(config):
    if SETTINGS is not None and SETTINGS.workdir:
        import shutil

        shutil.rmtree(SETTINGS.workdir, ignore_errors=True)


def pytest_generate_tests(metafunc):
    workloads = getattr(metafunc.module, "WORKLOADS", None)
    if workloads is None or "case_contender" not in metafunc.fixturenames:
        return
    from . import contenders

    pairs = [(c, name) for c in SETTINGS.cases(list(workloads)) for name in contenders.names(c.workload)]
    metafunc.parametrize("case_contender", pairs, ids=[f"{c.label}-{name}" for c, name in pairs])


@pytest.fixture(scope="session")
def settings() -> Settings:
    return SETTINGS


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {
        "torch": torch.__version__,
        "device": SETTINGS.device,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in SETTINGS.load_start],
        "note": SETTINGS.note,
    }
    if SETTINGS.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    machine_info["dopd"] = info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["dopd_bench"] = {
        "smoke": SETTINGS.smoke,
        "device": SETTINGS.device,
        "dtype": SETTINGS.dtype,
        "rounds": SETTINGS.rounds,
        "wall_s": round(time.time() - SETTINGS.started, 1),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "matmul_tflops": SETTINGS.matmul_tflops,
        "not_run": SETTINGS.not_run,
    }
