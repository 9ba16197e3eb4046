"""Every Triton kernel variant the backend launches compiles for Hopper (sm_90a), without a GPU.

`triton_sm90.py` records the launches of the target workloads with the tile configuration the
backend picks on CUDA, then compiles each with Triton's compiler and ptxas for sm_90a. The
interpreter tests check what the kernels compute; this one checks that they lower to a cubin that
fits the SM: shared memory within the 227 KiB a block may use, and no register spills (ptxas `-v`)
in any variant, bf16 or fp32, since a spilling tile configuration would quietly turn the fused
passes into local-memory traffic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")
pytest.importorskip("triton.backends.nvidia.compiler", reason="this triton has no NVIDIA backend")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_sm90.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    if not out.exists():
        pytest.fail(f"triton_sm90.py produced no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def _name(res):
    return f"{res['kernel']} {res['dtypes']} {res['constexprs']} {res['options']}"


def test_every_variant_of_the_target_workloads_was_recorded(results):
    kernels = {r["kernel"] for r in results}
    assert kernels == {"stats_kernel", "tail_lse_kernel", "gather_kernel", "sparse_grad_kernel",
                       "full_value_kernel", "grad_kernel"}
    linear_grads = {(r["constexprs"]["KIND"], r["constexprs"]["EXPLICIT"]) for r in results
                    if r["kernel"] == "grad_kernel" and r["constexprs"]["LINEAR"]}
    assert linear_grads >= {(0, False), (1, False), (2, False), (3, False), (3, True)}


def test_every_variant_compiles_for_sm90(results):
    failed = [f"{_name(r)}: {r['error']}" for r in results if "error" in r]
    assert not failed, "\n".join(failed)


def test_shared_memory_fits_a_hopper_block(results):
    from triton_sm90 import SHARED_LIMITS
    over = [f"{_name(r)}: {r['shared']} B" for r in results if "error" not in r and r["shared"] > SHARED_LIMITS[90]]
    assert not over, "\n".join(over)


def test_no_variant_spills_registers(results):
    compiled = [r for r in results if "error" not in r]
    assert any("*bf16" in r["dtypes"] for r in compiled) and any("*bf16" not in r["dtypes"] for r in compiled)
    spilling = [f"{_name(r)}: {r['registers']} registers, {r['spill_stores']} B spill stores"
                for r in compiled if r["spill_stores"]]
    assert not spilling, "\n".join(spilling)
