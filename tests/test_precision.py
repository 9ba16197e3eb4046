"""fp32 precision at large logits (issue 15 points 5 and 7) on the torch backend, and the forward-KL tail
bucket whose coefficient overflows float64 on the torch and cpp backends; the checks live in
`hardening_checks` so every backend runs the same ones."""

from __future__ import annotations

import math

import pytest
import torch

from dopd_kernels import TorchBackend
from dopd_kernels.passes import split_lse
from dopd_kernels.row_terms import DENSE_FOLD, RowTerm
from hardening_checks import PRECISION_CASES, check_dopd_large_logits, check_forward_kl_tail, check_large_logits

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


def _cpp(*tiles: int):
    from dopd_kernels.backends.compiled import CppBackend

    return CppBackend(*tiles)


TAIL_BACKENDS = [pytest.param(lambda: "cpp", id="cpp"), pytest.param(lambda: _cpp(3, 7), id="cpp-3x7"),
                 pytest.param(lambda: "torch", id="torch"),
                 pytest.param(lambda: TorchBackend(row_chunk=5, vocab_chunk=24), id="torch-5x24")]


@pytest.mark.parametrize("make_backend", TAIL_BACKENDS)
@pytest.mark.parametrize("mode", ["logits", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("gran", ["topk", "sampled"])
def test_forward_kl_tail_far_below_teacher(gran, dtype, mode, make_backend):
    check_forward_kl_tail(make_backend(), gran, dtype, mode)


def test_dense_normalizer_folds_only_huge_coefficients():
    """p_v·dense = unit·exp(z_v − lse): a coefficient past DENSE_FOLD (or one that overflowed to ±inf, with
    its log-magnitude kept) moves into lse; ordinary, zero and NaN coefficients and rows without a finite
    log-sum-exp stay as they are."""
    dense = torch.tensor([0.5, -3.0, 0.0, -2.0 ** 70, float("-inf"), float("nan"), -2.0 ** 70], dtype=torch.float64)
    log_mag = torch.tensor([0.5, 3.0, 0.0, 70.0, 1000.0, float("nan"), 70.0], dtype=torch.float64).log()
    log_mag[3] = log_mag[6] = 70 * math.log(2.0)
    log_mag[4] = 1000.0
    lse = 1e4 + torch.randn(7, dtype=torch.float64)
    lse[6] = float("nan")
    term = RowTerm(torch.zeros(7, dtype=torch.float64), dense, torch.zeros(7, 1, dtype=torch.long), None, None, log_mag)
    lse_out, unit = term.dense_normalizer(lse)
    folded = torch.tensor([False, False, False, True, True, False, False])
    assert DENSE_FOLD < 2.0 ** 70
    assert torch.equal(unit[~folded].nan_to_num(7.0), dense[~folded].nan_to_num(7.0))
    assert torch.equal(lse_out[~folded].nan_to_num(7.0), lse[~folded].nan_to_num(7.0))
    assert torch.equal(unit[folded], torch.tensor([-1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(lse_out[folded], lse[folded] - log_mag[folded], rtol=0, atol=1e-12)
