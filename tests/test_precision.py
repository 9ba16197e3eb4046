"""fp32 precision at large logits (issue 15 points 5 and 7) on the torch backend; the checks live in
`hardening_checks` so every fp32 backend runs the same ones."""

from __future__ import annotations

import pytest
import torch

from dopd_kernels import TorchBackend
from dopd_kernels.passes import split_lse
from hardening_checks import PRECISION_CASES, check_dopd_large_logits, check_large_logits

BACKENDS = ["torch", TorchBackend(row_chunk=7, vocab_chunk=300)]
IDS = ["torch", "torch-7x300"]


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("gran", ["full", "topk", "sampled"])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js"])
@pytest.mark.parametrize("case", PRECISION_CASES)
def test_large_logits_fp32(case, kind, gran, backend):
    check_large_logits(backend, case, kind, gran)


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_dopd_large_logits_fp32(backend):
    check_dopd_large_logits(backend)


def test_split_lse_is_exact():
    lse = torch.tensor([1e4 + 0.123456789012, -3.5, float("-inf"), 0.0], dtype=torch.float64)
    hi, lo = split_lse(lse, torch.float32)
    assert hi.dtype == lo.dtype == torch.float32
    finite = torch.isfinite(lse)
    assert torch.equal(hi.double()[finite] + lo.double()[finite], lse[finite]) or \
        float((hi.double()[finite] + lo.double()[finite] - lse[finite]).abs().max()) < 1e-10
    assert hi[2] == float("-inf")
