"""The Triton kernels compile for Hopper (sm_90a) and Ampere (sm_80), without a GPU: CI's share of the check.

`triton_sm90.py` records kernel launches through the public API with the tile configuration the
backend picks on CUDA, then compiles them with the installed Triton's compiler and ptxas. CI records
`ci_cases()` (every kernel and every axis: logits and fused-linear, one and two running top-Ks, K =
1 to past MAX_TOPK, bf16 / fp32 / mixed dtypes, the deterministic mode, biases and head transforms)
and compiles one launch per tile class (`representatives()`), which fits CI's time budget on two
cores. Every configuration the API admits, every distinct launch, under several Triton versions:
`python tests/triton_matrix.py` (minutes per version; run it before changing a kernel or a tile rule). The interpreter tests check what
the kernels compute; this one checks that they lower to a cubin that fits the SM: shared memory
within what a block may use, and on sm_90a no register spills (ptxas `-v`) in any variant, since a
spilling tile configuration would quietly turn the fused passes into local-memory traffic. Other
Triton versions: `tests/triton_matrix.py` replays the same recording under each.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")
pytest.importorskip("triton.backends.nvidia.compiler", reason="this triton has no NVIDIA backend")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_sm90 as sm90  # noqa: E402


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("sm90") / "specs.json"
    return str(path), sm90.record_subprocess(str(path), cases="ci")


@pytest.fixture(scope="module")
def compiled(recording, tmp_path_factory):
    """capability -> the compiled variants (each capability compiled once, on first use)."""
    cache = {}

    def get(cap: int):
        if cap not in cache:
            out = tmp_path_factory.mktemp("sm90") / f"results-{cap}.json"
            cache[cap] = sm90.compile_subprocess(recording[0], str(out), cap, representatives_only=True)
        return cache[cap]
    return get


CAPS = pytest.mark.parametrize("cap", [90, 80], ids=["sm_90a", "sm_80"])


def _names(results, cap, spills):
    return "\n".join(f"{sm90.variant_name(r)}: {'; '.join(sm90.problems(r, cap, spills))} (from: {r['case']})"
                     for r in results if sm90.problems(r, cap, spills))


def test_every_api_call_runs(recording):
    """Every configuration is one the API accepts: none may raise (the triton backend hands a
    top-K above its MAX_TOPK to the torch backend rather than refusing it)."""
    raised = [f"{c['label']}: {c['error']}" for c in recording[1]["cases"] if c["error"]]
    assert not raised, "\n".join(raised)


def test_the_recording_covers_every_kernel_and_axis(recording):
    """Each kernel of the kernel modules is launched, and each axis a kernel specializes on takes
    its values: one and two running top-Ks, K_PAD from 1 to the largest the kernels keep, the tail
    bucket's explicit columns, every divergence KIND, biases, head transforms, mixed dtypes, and
    the deterministic mode's kernels (they are among the defined ones)."""
    specs = recording[1]["specs"]
    defined = {(m, a) for m in sm90.KERNEL_MODULES
               for a in vars(importlib.import_module(f"dopd_kernels.kernels.{m}")) if a.endswith("_kernel")}
    assert {(s["module"], s["kernel"]) for s in specs} == defined

    def values(kernel, arg):
        return {s["args"][arg][1] for s in specs if s["kernel"] == kernel and arg in s["args"]}

    from dopd_kernels.backends.triton_backend import MAX_TOPK
    from dopd_kernels.codes import Divergence
    assert {bin(m).count("1") for m in values("stats_kernel", "TOPK_MASK")} == {0, 1, 2}
    k_pads = values("gather_kernel", "K_PAD")
    assert min(k_pads) == 1 and max(k_pads) == MAX_TOPK
    assert values("grad_kernel", "EXPLICIT") == {False, True}
    # Full-vocabulary reverse / forward KL rows take kl_online_kernel (statistics and value in one sweep);
    # full_value_kernel runs JS rows, and KL rows only when their log-sum-exps come from elsewhere (a
    # vocabulary shard's all-reduce), which no single-process recording makes: its KL variants carry fewer
    # live values than its JS one.
    assert len(values("grad_kernel", "KIND")) == 4 and len(values("kl_online_kernel", "KIND")) == 2
    assert values("full_value_kernel", "KIND") >= {Divergence.JS.value}
    assert values("stats_kernel", "LINEAR") == {False, True}
    assert max(values("stats_kernel", "BIAS_MASK")) > 0 and max(values("stats_kernel", "HEAD_MASK")) > 0
    dtype_sets = {tuple(sorted({d[1] for d in s["args"].values() if d[0] == "tensor" and d[1] in ("bf16", "fp16", "fp32")}))
                  for s in specs if s["kernel"] == "full_value_kernel"}
    assert any(len(d) > 1 for d in dtype_sets)


@CAPS
def test_every_variant_compiles(compiled, cap):
    failed = [r for r in compiled(cap) if "error" in r]
    assert not failed, _names(failed, cap, spills=False)


@CAPS
def test_shared_memory_fits_a_block(compiled, cap):
    over = [r for r in compiled(cap) if "error" not in r and r["shared"] > sm90.SHARED_LIMITS[cap]]
    assert not over, _names(over, cap, spills=False)


def test_no_variant_spills_registers_on_sm90(compiled):
    """Spills are judged on sm_90a, the capability the tile defaults are chosen for."""
    compiled_ok = [r for r in compiled(90) if "error" not in r]
    assert any("*bf16" in r["dtypes"] for r in compiled_ok) and any("*bf16" not in r["dtypes"] for r in compiled_ok)
    spilling = [r for r in compiled_ok if r["spill_stores"]]
    assert not spilling, _names(spilling, 90, spills=True)
