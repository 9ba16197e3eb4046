"""The CUDA kernels (csrc/kernels_cuda.cu) compile for Hopper (sm_90) without a GPU, in every
configuration the `cuda` backend launches.

The `.cu` file is torch-free (DESIGN.md section 5), so nvcc compiles it on a CPU machine. ptxas `-v`
reports each kernel instantiation: every one must be free of register spills, and every dtype pair of
student and teacher logits that the API admits (issue 17 point 3: a bf16 student with an fp32 teacher,
...) must have its full-vocabulary value and gradient kernels, for each divergence.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float", "__nv_bfloat16", "__half")
KINDS = (0, 1, 2)  # reverse KL, forward KL, JS (dopd::Kind)

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++filt") is None,
                                reason="nvcc (and c++filt) are needed to compile the CUDA kernels")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """{demangled kernel name: (registers, spill store bytes, spill load bytes)} from ptxas -v."""
    obj = tmp_path_factory.mktemp("nvcc") / "kernels_cuda.o"
    proc = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-O3", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"),
                           "-c", os.path.join(ROOT, "csrc", "kernels_cuda.cu"), "-o", str(obj)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found, current = {}, None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True).stdout.strip()
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            found.setdefault(current, [0, int(m.group(1)), int(m.group(2))])
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            found.setdefault(current, [0, 0, 0])[0] = int(m.group(1))
    assert found, "ptxas reported no kernels:\n" + proc.stderr[-2000:]
    return found


def _instantiations(kernels, name: str):
    """Template argument lists (as strings) of the instantiations of kernel `name`."""
    return {re.search(rf"{name}<([^>]*)>", k).group(1).replace(" ", "") for k in kernels if f"{name}<" in k}


def test_no_kernel_spills(kernels):
    spilling = {k: v for k, v in kernels.items() if v[1] or v[2]}
    assert not spilling, f"kernels spill registers: {spilling}"


def test_every_dtype_pair_has_full_vocabulary_kernels(kernels):
    """Student and teacher logits of different dtypes (bf16 + fp32, ...) in the value and gradient
    passes; before the fix the launchers refused them (cudaErrorInvalidValue) and none existed."""
    values, grads = _instantiations(kernels, "add_value_kernel"), _instantiations(kernels, "grad_kernel")
    for kind, ts, tt in itertools.product(KINDS, DTYPES, DTYPES):
        assert f"{kind},{ts},{tt}" in values, f"add_value_kernel<{kind}, {ts}, {tt}> missing"
        assert f"{kind},true,{ts},{tt}" in grads, f"grad_kernel<{kind}, true, {ts}, {tt}> missing"
    for ts in DTYPES:  # few-column terms read the student only
        assert f"0,false,{ts},{ts}" in grads
