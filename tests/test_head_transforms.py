"""Output-head transforms (issue 11): `LMHead` scale and soft-cap per stream on the fused-linear entry
points, against the float64 reference (the shared checks of `head_transform_checks`), against logits
mode on the model-style logits, gradcheck through the tanh, and the API rules (LMHead + bias, bad
transforms, the privileged student's default head)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, leaf, linear_streams, random_tokens
from dopd_kernels import (DOPDConfig, LMHead, TorchBackend, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss,
                          opd_loss, token_logprobs)
from head_transform_checks import HEAD_CASES, check_bf16_heads, check_dopd_heads, check_opd_heads

BACKENDS = ["torch", TorchBackend(row_chunk=3, vocab_chunk=7)]
BACKEND_IDS = ["torch", "torch-3x7"]
GRANS = [("full", True, "student"), ("sampled", True, "student"), ("topk", True, "student"),
         ("topk", False, "student"), ("topk", True, "target")]
GRAN_IDS = ["full", "sampled", "topk-renorm", "topk-tail", "topk-renorm-target"]


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js"])
def test_opd_heads_fp32(kind, gran, renorm, source, backend):
    check_opd_heads(backend, kind, gran, renorm, source)


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_opd_heads_each_case(case):
    check_opd_heads(TorchBackend(row_chunk=4, vocab_chunk=9), "js", "full", case=case)
    check_opd_heads("torch", "reverse_kl", "topk", case=case)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", sorted(HEAD_CASES))
@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_heads_fp32(renorm, case, backend):
    check_dopd_heads(backend, renorm, case)


@pytest.mark.parametrize("kind,gran", [("js", "full"), ("reverse_kl", "topk"), ("forward_kl", "sampled")])
def test_opd_heads_bf16(kind, gran):
    check_bf16_heads(TorchBackend(row_chunk=7, vocab_chunk=10), kind, gran)


def _model_logits(h, w, b, scale, softcap):
    z = (h @ w.T + b) * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fused_heads_equal_logits_mode_on_the_models_logits(backend):
    # Independent of LinearSource.transform: the logits a model's forward would produce, in logits mode.
    t = linear_streams(17, 8, 29, dtype=torch.float64)
    y = random_tokens(17, 29)
    (ss, cs), (st, ct), (sp, cp) = HEAD_CASES["scale+softcap"]
    h, w, b = (leaf(t[k]) for k in ("student_hidden", "student_weight", "student_bias"))
    out = fused_linear_dopd_loss(h, LMHead(w, b, ss, cs), t["teacher_hidden"],
                                 LMHead(t["teacher_weight"], t["teacher_bias"], st, ct), t["priv_student_hidden"], y,
                                 config=DOPDConfig(top_k=5), backend=backend)
    h2, w2, b2 = (leaf(t[k]) for k in ("student_hidden", "student_weight", "student_bias"))
    zs = _model_logits(h2, w2, b2, ss, cs)
    zt = _model_logits(t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"], st, ct)
    zp = _model_logits(t["priv_student_hidden"], t["student_weight"], t["student_bias"], ss, cs)  # default priv head
    ref = dopd_loss(zs, zt, zp, y, config=DOPDConfig(top_k=5), backend=backend)
    assert torch.equal(out.regime, ref.regime)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=1e-10, what="per-token loss")
    out.loss.backward()
    ref.loss.backward()
    for a, e, n in ((h, h2, "dH"), (w, w2, "dW"), (b, b2, "db")):
        assert_close(a.grad, e.grad, rtol=1e-10, what=n)
    lp = token_logprobs(t["teacher_hidden"], y, LMHead(t["teacher_weight"], t["teacher_bias"], st, ct), backend=backend)
    lp_logits = token_logprobs(zt, y, backend=backend)
    assert_close(lp, lp_logits, rtol=1e-12, what="token_logprobs with an LMHead")


@pytest.mark.parametrize("backend", ["reference", "torch", TorchBackend(row_chunk=2, vocab_chunk=5)],
                         ids=["reference", "torch", "torch-2x5"])
@pytest.mark.parametrize("kind,gran,renorm", [("js", "full", True), ("reverse_kl", "topk", True),
                                              ("forward_kl", "topk", False), ("js", "sampled", True)])
def test_gradcheck_through_tanh(kind, gran, renorm, backend):
    t = linear_streams(5, 3, 11, dtype=torch.float64)
    y = random_tokens(5, 11)
    teacher = LMHead(t["teacher_weight"], t["teacher_bias"], 0.8, 2.0)

    def loss(h, w, b):
        return fused_linear_opd_loss(h, LMHead(w, b, 1.4, 1.5), t["teacher_hidden"], teacher, y, divergence=kind,
                                     granularity=gran, top_k=4, topk_renorm=renorm, backend=backend).loss

    args = tuple(leaf(t[k]) for k in ("student_hidden", "student_weight", "student_bias"))
    assert torch.autograd.gradcheck(loss, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_default_priv_student_head_is_the_students_detached():
    t = linear_streams(15, 6, 19)
    y = random_tokens(15, 19)
    w1, w2 = leaf(t["student_weight"]), leaf(t["student_weight"])
    head = dict(scale=0.7, softcap=3.0)
    args = (t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y)
    a = fused_linear_dopd_loss(t["student_hidden"], LMHead(w1, t["student_bias"], **head), *args, backend="torch")
    b = fused_linear_dopd_loss(t["student_hidden"], LMHead(w2, t["student_bias"], **head), *args, backend="torch",
                               priv_student_weight=LMHead(t["student_weight"].clone(), t["student_bias"].clone(), **head))
    assert torch.equal(a.regime, b.regime)
    assert_close(a.per_token_loss, b.per_token_loss, rtol=1e-6, what="per-token loss")
    a.loss.backward()
    b.loss.backward()
    assert_close(w1.grad, w2.grad, rtol=1e-6, what="dW")


def test_lmhead_with_a_separate_bias_is_refused():
    t = linear_streams(6, 4, 11)
    y = random_tokens(6, 11)
    head = LMHead(t["teacher_weight"], t["teacher_bias"])
    with pytest.raises(ValueError, match="teacher_bias was given together with an LMHead"):
        fused_linear_opd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"], head, y,
                              teacher_bias=t["teacher_bias"])
    with pytest.raises(ValueError, match="student_bias was given together with an LMHead"):
        token_logprobs(t["student_hidden"], y, LMHead(t["student_weight"]), t["student_bias"])


@pytest.mark.parametrize("field,value,exc,match", [
    ("scale", 0.0, ValueError, "scale must be non-zero"),
    ("scale", float("nan"), ValueError, "scale must be finite"),
    ("scale", float("inf"), ValueError, "scale must be finite"),
    ("scale", "2", TypeError, "scale must be a real number"),
    ("softcap", 0.0, ValueError, "softcap must be > 0"),
    ("softcap", -30.0, ValueError, "softcap must be > 0"),
    ("softcap", float("inf"), ValueError, "softcap must be finite"),
    ("vocab_size", 0, ValueError, "vocab_size must be in"),
    ("vocab_size", 2.5, TypeError, "vocab_size must be an int"),
])
def test_bad_head_transforms(field, value, exc, match):
    t = linear_streams(6, 4, 11)
    y = random_tokens(6, 11)
    head = LMHead(t["teacher_weight"], **{field: value})
    with pytest.raises(exc, match=f"teacher_weight: LMHead.{match}"):
        fused_linear_dopd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"], head,
                               t["priv_student_hidden"], y)


def test_logits_mode_is_untouched_by_heads():
    # opd_loss on logits has no transform: same as the fused path with an identity LMHead.
    t = linear_streams(9, 5, 13, dtype=torch.float64)
    y = random_tokens(9, 13)
    fused = fused_linear_opd_loss(t["student_hidden"], LMHead(t["student_weight"]), t["teacher_hidden"],
                                  LMHead(t["teacher_weight"]), y, backend="torch")
    logits = opd_loss(t["student_hidden"] @ t["student_weight"].T, t["teacher_hidden"] @ t["teacher_weight"].T, y,
                      backend="torch")
    assert_close(fused.per_token_loss, logits.per_token_loss, rtol=1e-10, what="per-token loss")


@pytest.mark.parametrize("backend", ["reference", "torch", TorchBackend(row_chunk=3, vocab_chunk=4)],
                         ids=["reference", "torch", "torch-3x4"])
@pytest.mark.parametrize("renorm", [True, False])
def test_gradcheck_dopd_through_tanh(renorm, backend):
    t = linear_streams(8, 3, 9, dtype=torch.float64)
    y = random_tokens(8, 9)
    teacher = LMHead(t["teacher_weight"], t["teacher_bias"], 1.3, 2.5)
    priv = LMHead(t["student_weight"] + 0.2 * torch.randn_like(t["student_weight"]), None, 0.9, 3.0)
    cfg = DOPDConfig(top_k=3, topk_renorm=renorm, trim=0.2)

    def loss(h, w, b):
        return fused_linear_dopd_loss(h, LMHead(w, b, 1.2, 1.8), t["teacher_hidden"], teacher, t["priv_student_hidden"], y,
                                      priv_student_weight=priv, config=cfg, backend=backend).loss

    args = tuple(leaf(t[k]) for k in ("student_hidden", "student_weight", "student_bias"))
    assert torch.autograd.gradcheck(loss, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_modules_take_lmheads():
    from dopd_kernels import FusedLinearDOPDLoss, FusedLinearOPDLoss

    t = linear_streams(10, 5, 17)
    y = random_tokens(10, 17)
    s = LMHead(t["student_weight"], t["student_bias"], 0.8, 3.0)
    th = LMHead(t["teacher_weight"], t["teacher_bias"], 1.5, None)
    a = FusedLinearOPDLoss(divergence="js", backend="torch")(t["student_hidden"], s, t["teacher_hidden"], th, y)
    b = fused_linear_opd_loss(t["student_hidden"], s, t["teacher_hidden"], th, y, divergence="js", backend="torch")
    assert torch.equal(a.per_token_loss, b.per_token_loss)
    c = FusedLinearDOPDLoss(DOPDConfig(top_k=4), backend="torch")(t["student_hidden"], s, t["teacher_hidden"], th,
                                                                  t["priv_student_hidden"], y)
    d = fused_linear_dopd_loss(t["student_hidden"], s, t["teacher_hidden"], th, t["priv_student_hidden"], y,
                               config=DOPDConfig(top_k=4), backend="torch")
    assert torch.equal(c.per_token_loss, d.per_token_loss)
