"""The float64 `reference` backend: autograd gradients checked numerically (`gradcheck`) and values,
routing and gradients checked against the independent naive implementation in `naive_reference.py`."""

from __future__ import annotations

import pytest
import torch

import naive_reference as nv
from conftest import IGNORE, assert_close, correlated_logits, leaf, linear_streams, random_tokens
from dopd_kernels import DOPDConfig, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss

DIVS = ["reverse_kl", "forward_kl", "js"]
GRANS = [("full", True, "student"), ("sampled", True, "student"), ("topk", True, "student"),
         ("topk", False, "student"), ("topk", True, "target"), ("topk", False, "target")]
GRAN_IDS = ["full", "sampled", "topk-renorm", "topk-tail", "topk-renorm-target", "topk-tail-target"]


@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_gradcheck_opd_reference(kind, gran, renorm, source):
    zs, zt = correlated_logits(5, 9, n_streams=2, noise=1.0, dtype=torch.float64)
    y = random_tokens(5, 9)
    kw = dict(divergence=kind, granularity=gran, top_k=4, topk_renorm=renorm, topk_from=source, temperature=1.3,
              js_beta=0.4, backend="reference")
    if kind == "reverse_kl" and gran == "sampled":
        # The estimator sg(d)·log p(y) is not the gradient of its value: check it as the gradient of
        # d0·log p(y) with d0 held at its value at the evaluation point.
        d0 = (nv.logprobs(zs, 1.3) - nv.logprobs(zt, 1.3)).gather(1, y.clamp(min=0)[:, None])[:, 0]
        d0 = torch.where(y != IGNORE, d0, torch.zeros_like(d0))

        def surrogate(z):
            return (d0 * nv.logprobs(z, 1.3).gather(1, y.clamp(min=0)[:, None])[:, 0]).sum()

        s = leaf(zs)
        opd_loss(s, zt, y, reduction="sum", **kw).loss.backward()
        s2 = leaf(zs)
        surrogate(s2).backward()
        assert_close(s.grad, s2.grad, rtol=1e-10, what="sampled RKL estimator gradient")
        assert torch.autograd.gradcheck(surrogate, (leaf(zs),))
        return
    assert torch.autograd.gradcheck(lambda z: opd_loss(z, zt, y, reduction="sum", **kw).loss, (leaf(zs),))


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("source", ["student", "target"])
def test_gradcheck_dopd_reference(source, renorm):
    zs, zt, zp = correlated_logits(10, 8, noise=(0.8, 1.5), dtype=torch.float64)
    y = random_tokens(10, 8)
    cfg = DOPDConfig(top_k=4, topk_from=source, topk_renorm=renorm, trim=0.1, temperature=0.8)
    out = dopd_loss(zs, zt, zp, y, config=cfg, backend="reference")
    assert len(set(out.regime[y != IGNORE].tolist())) >= 2  # several regimes exercised
    assert torch.autograd.gradcheck(lambda z: dopd_loss(z, zt, zp, y, config=cfg, backend="reference").loss,
                                    (leaf(zs),))


def test_gradcheck_fused_linear_reference():
    t = linear_streams(7, 5, 11, dtype=torch.float64)
    y = random_tokens(7, 11)
    cfg = DOPDConfig(top_k=3)

    # The privileged student's weight defaults to the student's (detached, so a finite difference in
    # W would also move the frozen stream): pass a fixed copy so f is the function autograd sees.
    w_p, b_p = t["student_weight"].clone(), t["student_bias"].clone()

    def f(h, w, b):
        return fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                      student_bias=b, teacher_bias=t["teacher_bias"], priv_student_weight=w_p,
                                      priv_student_bias=b_p, config=cfg, backend="reference").loss

    assert torch.autograd.gradcheck(f, (leaf(t["student_hidden"]), leaf(t["student_weight"]), leaf(t["student_bias"])))

    def g(h, w, b):
        return fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, student_bias=b,
                                     divergence="js", backend="reference").loss

    assert torch.autograd.gradcheck(g, (leaf(t["student_hidden"]), leaf(t["student_weight"]), leaf(t["student_bias"])))


# -- the reference against the independent naive implementation ------------------------------


@pytest.mark.parametrize("shape", [(23,), (3, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_reference_opd_matches_naive(kind, gran, renorm, source, shape):
    v = 17
    zs, zt = correlated_logits(shape, v, n_streams=2, noise=1.2, dtype=torch.float64)
    y = random_tokens(shape, v)
    kw = dict(k=5, beta=0.35, temperature=0.9, topk_from=source, renorm=renorm, valid_vocab=15)
    y = y.masked_fill(y >= 15, IGNORE)
    y.view(-1)[0] = 3
    s = leaf(zs)
    out = opd_loss(s, zt, y, divergence=kind, granularity=gran, top_k=5, js_beta=0.35, temperature=0.9,
                   topk_from=source, topk_renorm=renorm, valid_vocab=15, backend="reference")
    out.loss.backward()
    s2 = leaf(zs)
    per = nv.opd(s2.reshape(-1, v), zt.reshape(-1, v), y.reshape(-1), kind, gran, **kw).reshape(shape)
    exp = nv.reduce(per, y, "mean")
    exp.backward()
    assert_close(out.per_token_loss, per, rtol=1e-10, what="per token")
    assert_close(out.loss, exp, rtol=1e-10, what="loss")
    assert_close(s.grad, s2.grad, rtol=1e-9, what="grad")


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("source", ["student", "target"])
@pytest.mark.parametrize("reduction", ["mean", "seq_mean", "sum", "none"])
def test_reference_dopd_matches_naive(reduction, source, renorm):
    b, t, v = 4, 11, 29
    zs, zt, zp = correlated_logits((b, t), v, noise=(0.8, 1.4), dtype=torch.float64)
    y = random_tokens((b, t), v)
    cfg = DOPDConfig(top_k=6, trim=0.1, beta_light=0.55, beta_weak=0.25, beta_strong=1.2, js_beta=0.45,
                     temperature=1.1, topk_from=source, topk_renorm=renorm, reduction=reduction)
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend="reference")
    per, regime, a, qt, qp, th = nv.dopd(leaf(zs).reshape(-1, v), zt.reshape(-1, v), zp.reshape(-1, v), y.reshape(-1),
                                         k=6, trim=0.1, beta_light=0.55, beta_weak=0.25, beta_strong=1.2, js_beta=0.45,
                                         temperature=1.1, topk_from=source, renorm=renorm)
    assert out.regime.reshape(-1).tolist() == regime
    assert_close(out.per_token_loss.reshape(-1), per, rtol=1e-10, what="per token")
    for got, e in zip(out.thresholds, th):
        assert_close(got, torch.tensor(e, dtype=torch.float64), rtol=1e-12, what="thresholds")
    s2 = leaf(zs)
    per2 = nv.dopd(s2.reshape(-1, v), zt.reshape(-1, v), zp.reshape(-1, v), y.reshape(-1), k=6, trim=0.1,
                   beta_light=0.55, beta_weak=0.25, beta_strong=1.2, js_beta=0.45, temperature=1.1, topk_from=source,
                   renorm=renorm)[0].reshape(b, t)
    exp = nv.reduce(per2, y, reduction)
    assert_close(out.loss, exp, rtol=1e-10, what="loss")
    weights = torch.rand(b, t, dtype=torch.float64) if reduction == "none" else None
    (out.loss * weights).sum().backward() if weights is not None else out.loss.backward()
    (exp * weights).sum().backward() if weights is not None else exp.backward()
    assert_close(s.grad, s2.grad, rtol=1e-9, what="grad")
