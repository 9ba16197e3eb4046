"""Reductions mean / seq_mean / sum / none and `normalizer=`, checked against reductions of the
float64 reference's per-token loss written out here (and against the naive implementation)."""

from __future__ import annotations

import pytest
import torch

import naive_reference as nv
from conftest import IGNORE, assert_close, correlated_logits, leaf, linear_streams, random_tokens
from dopd_kernels import DOPDConfig, TorchBackend, dopd_loss, fused_linear_opd_loss, opd_loss

BACKENDS = ["reference", TorchBackend(row_chunk=4, vocab_chunk=8)]
BACKEND_IDS = ["reference", "torch-tiled"]


def by_hand(per_token: torch.Tensor, y: torch.Tensor, reduction: str, normalizer=None) -> torch.Tensor:
    valid = y != IGNORE
    if normalizer is not None:
        return per_token.sum() / normalizer
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / valid.sum()
    if reduction == "seq_mean":
        rows = [per_token[b][valid[b]].sum() / valid[b].sum() for b in range(y.shape[0]) if valid[b].any()]
        return sum(rows) / len(rows)
    return per_token


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "seq_mean", "sum", "none"])
def test_dopd_reductions(reduction, backend):
    b, t, v = 5, 9, 31
    zs, zt, zp = correlated_logits((b, t), v)
    y = random_tokens((b, t), v, mask_frac=0.3)
    y[2] = IGNORE  # one sequence with no valid token: excluded from the seq_mean average
    y[0, 0] = 1
    cfg = DOPDConfig(top_k=5, reduction=reduction)
    s, s64 = leaf(zs), leaf(zs, torch.float64)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=backend)
    ref_none = dopd_loss(s64, zt.double(), zp.double(), y, config=cfg.replace(reduction="none"), backend="reference")
    expected = by_hand(ref_none.loss, y, reduction)
    assert out.loss.shape == expected.shape
    assert_close(out.loss, expected, rtol=1e-5, what=reduction)
    assert_close(out.per_token_loss, ref_none.per_token_loss, rtol=1e-5, what="per token")
    # Gradients of the reduced loss: against autograd through the by-hand reduction of the reference.
    w = torch.randn(b, t) if reduction == "none" else torch.ones(())
    (out.loss * w).sum().backward()
    (expected * w.double()).sum().backward()
    assert_close(s.grad, s64.grad, rtol=1e-5, what="grad")
    assert (s.grad[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_normalizer(reduction, as_tensor, backend):
    n, v = 30, 23
    zs, zt, zp = correlated_logits(n, v)
    y = random_tokens(n, v)
    norm = float(torch.randint(50, 200, ()))
    s, s64 = leaf(zs), leaf(zs, torch.float64)
    out = dopd_loss(s, zt, zp, y, config=DOPDConfig(reduction=reduction), backend=backend,
                    normalizer=torch.tensor(norm) if as_tensor else norm)
    ref = dopd_loss(s64, zt.double(), zp.double(), y, config=DOPDConfig(reduction="sum"), backend="reference")
    assert_close(out.loss, ref.loss / norm, rtol=1e-5, what="normalized")
    out.loss.backward()
    (ref.loss / norm).backward()
    assert_close(s.grad, s64.grad, rtol=1e-5, what="grad")
    o = opd_loss(zs, zt, y, divergence="js", reduction=reduction, normalizer=norm, backend=backend)
    r = opd_loss(zs.double(), zt.double(), y, divergence="js", reduction="sum", backend="reference")
    assert_close(o.loss, r.loss / norm, rtol=1e-5, what="opd normalized")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "seq_mean", "sum", "none"])
@pytest.mark.parametrize("gran", ["full", "sampled", "topk"])
def test_opd_reductions_match_naive(gran, reduction, backend):
    b, t, v = 4, 7, 19
    zs, zt = correlated_logits((b, t), v, n_streams=2)
    y = random_tokens((b, t), v, mask_frac=0.3)
    s = leaf(zs)
    out = opd_loss(s, zt, y, divergence="forward_kl", granularity=gran, top_k=4, reduction=reduction, backend=backend)
    s64 = leaf(zs, torch.float64)
    per = nv.opd(s64.reshape(-1, v), zt.reshape(-1, v), y.reshape(-1), "forward_kl", gran, k=4).reshape(b, t)
    exp = nv.reduce(per, y, reduction)
    assert_close(out.loss, exp, rtol=1e-5, what=reduction)
    w = torch.rand(b, t) + 0.1 if reduction == "none" else torch.ones(())
    (out.loss * w).sum().backward()
    (exp * w.double()).sum().backward()
    assert_close(s.grad, s64.grad, rtol=1e-5, what="grad")


def test_fused_linear_reduction_none_with_weights():
    t = linear_streams((3, 6), 8, 27)
    y = random_tokens((3, 6), 27)
    weights = torch.randn(3, 6)
    grads = []
    for dtype, be in ((torch.float32, TorchBackend(row_chunk=4, vocab_chunk=10)), (torch.float64, "reference")):
        h, w, bias = (leaf(t[k], dtype) for k in ("student_hidden", "student_weight", "student_bias"))
        out = fused_linear_opd_loss(h, w, t["teacher_hidden"].to(dtype), t["teacher_weight"].to(dtype), y,
                                    student_bias=bias, divergence="js", granularity="topk", top_k=5, topk_renorm=False,
                                    reduction="none", backend=be)
        assert out.loss.shape == (3, 6)
        (out.loss * weights.to(dtype)).sum().backward()
        grads.append((h.grad, w.grad, bias.grad))
    for name, a, e in zip(("dH", "dW", "db"), *grads):
        assert_close(a, e, rtol=1e-5, what=name)
