"""The top-K tie rule (`dopd_kernels.topk.select_top_k`): the K largest values, equal values taken
lower column first, the rule of the compiled kernels' (value, −column) keys. Checked against a plain
sort by (−value, column), and through the `reference` backend against the naive float64 losses, on
logits where ties at the K-th place are the common case. Every other backend is held to the same
columns by test_backend_conformance.py (`test_topk_ties_*`) and test_distributed.py (across shards)."""

from __future__ import annotations

import pytest
import torch

import naive_reference as nv
from conftest import ambiguous_topk_rows, assert_close, random_tokens, tied_logits
from dopd_kernels import DOPDConfig, dopd_loss, opd_loss
from dopd_kernels.topk import select_top_k


def by_sort(values: torch.Tensor, k: int) -> torch.Tensor:
    """The rule written as a sort: by value descending, then by position (column) ascending."""
    out = []
    for row in values.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        out.append(sorted(order[:k]))
    return torch.tensor(out, dtype=torch.long).reshape(values.shape[0], k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [0, 1, 5, 16])
def test_select_top_k_is_the_sort_rule(k, dtype):
    z = tied_logits(40, 16, levels=3, dtype=dtype)
    z[::7, 3:9] = float("-inf")  # ties at −inf too
    if k:
        assert bool(ambiguous_topk_rows(z, k).any()) or k == 16
    got = select_top_k(z, k)
    assert got.shape == (40, k) and got.dtype == torch.long
    assert torch.equal(got, by_sort(z, k))


def test_select_top_k_without_ties_is_torch_topk():
    z = torch.randn(30, 50, dtype=torch.float64)
    assert torch.equal(select_top_k(z, 7), torch.topk(z, 7, dim=1).indices.sort(1).values)


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("source", ["student", "target"])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js"])
def test_reference_opd_ties_follow_the_rule(kind, source, renorm):
    n, v, k = 24, 29, 7
    zs, zt = tied_logits(n, v, dtype=torch.float64), tied_logits(n, v, dtype=torch.float64)
    assert float(ambiguous_topk_rows(zs if source == "student" else zt, k).float().mean()) > 0.3
    y = random_tokens(n, v)
    out = opd_loss(zs, zt, y, divergence=kind, granularity="topk", top_k=k, topk_from=source, topk_renorm=renorm,
                   backend="reference")
    want = nv.opd(zs, zt, y, kind, "topk", k=k, topk_from=source, renorm=renorm)
    assert_close(out.per_token_loss, want, rtol=1e-12, what="per-token loss")


@pytest.mark.parametrize("source", ["student", "target"])
def test_reference_dopd_ties_follow_the_rule(source):
    n, v, k = 48, 29, 7
    zs, zt, zp = (tied_logits(n, v, dtype=torch.float64) for _ in range(3))
    y = random_tokens(n, v)
    cfg = DOPDConfig(top_k=k, topk_from=source, trim=0.1)
    out = dopd_loss(zs, zt, zp, y, config=cfg, backend="reference")
    want, regime, *_ = nv.dopd(zs, zt, zp, y, k=k, trim=0.1, topk_from=source,
                               thresholds=tuple(float(t) for t in out.thresholds))
    assert out.regime.tolist() == regime
    assert sum(r in (nv.LH, nv.LL, nv.HS) for r in regime) > n // 3  # the top-K regimes are common
    assert_close(out.per_token_loss, want, rtol=1e-12, what="per-token loss")
