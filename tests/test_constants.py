"""The divergence and regime codes have one definition (`dopd_kernels.codes`), the skip rule's constants
another (`dopd_kernels.skipping`); the C++/CUDA extension (`csrc/row_math.h`) and the Triton kernels
(`kernels/divergence.py`) must agree with them."""

from __future__ import annotations

import os
import re

import pytest
import torch

from dopd_kernels import Regime
from dopd_kernels.codes import DIVERGENCES, Divergence
from dopd_kernels.config import DIVERGENCES as CONFIG_DIVERGENCES
from dopd_kernels.skipping import SKIP_COLUMNS, TOLERANCE, VALUE_SHARE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_names_follow_the_enum():
    assert DIVERGENCES == CONFIG_DIVERGENCES == ("reverse_kl", "forward_kl", "js")
    assert [Divergence[name.upper()] for name in DIVERGENCES] == list(Divergence)


def test_compiled_extension_codes_match():
    from dopd_kernels._build import load_extension
    from dopd_kernels.backends.compiled import KIND_CODES

    try:
        ext = load_extension("cpu")
    except RuntimeError as e:
        if os.environ.get("DOPD_KERNELS_NO_BUILD", "0") not in ("", "0"):
            pytest.skip(f"compiled extension disabled: {e}")
        raise
    assert dict(ext.KINDS) == {d.name: d.value for d in Divergence}
    assert dict(ext.REGIMES) == {r.name: r.value for r in Regime}
    assert KIND_CODES == {d.key: d.value for d in Divergence}
    # The skip rule's constants (dopd_kernels.skipping is their one definition; row_math.h mirrors them).
    assert ext.SKIP_COLUMNS == SKIP_COLUMNS
    assert {getattr(torch, name): delta for name, delta in ext.SKIP_TOLERANCE.items()} == TOLERANCE
    assert ext.SKIP_VALUE_SHARE == VALUE_SHARE


def test_triton_kernel_codes_match():
    pytest.importorskip("triton", reason="triton not installed")
    from dopd_kernels.kernels import divergence

    assert {name: getattr(divergence, name).value for name in ("REVERSE_KL", "FORWARD_KL", "JS")} \
        == {d.name: d.value for d in Divergence}
    assert divergence.DENSE.value not in set(Divergence)  # the dense row-term kind is no divergence code
    assert divergence.KINDS == {d.key: d.value for d in Divergence}
    # Inside the kernels KIND is compared with those constants only, never with a bare number.
    with open(os.path.join(ROOT, "dopd_kernels", "kernels", "divergence.py")) as f:
        source = f.read()
    assert re.findall(r"KIND\s*[=!<>]=?\s*\d", source) == []
    assert "KIND == REVERSE_KL" in source and "KIND == DENSE" in source
