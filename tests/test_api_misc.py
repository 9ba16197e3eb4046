"""The rest of the public surface: nn.Module faces, no_grad, token_logprobs, valid_vocab and -inf
padding, extreme logits, inputs left unmodified, backend selection, output conveniences."""

from __future__ import annotations

import pytest
import torch

import naive_reference as nv
from conftest import IGNORE, assert_close, correlated_logits, distinct_logits, leaf, linear_streams, random_tokens
from dopd_kernels import (DOPDConfig, DOPDLoss, FusedLinearDOPDLoss, FusedLinearOPDLoss, OPDConfig, OPDLoss, Regime,
                          TorchBackend, available_backends, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss,
                          opd_loss, token_logprobs)

BACKENDS = ["reference", "torch", TorchBackend(row_chunk=3, vocab_chunk=7)]
BACKEND_IDS = ["reference", "torch", "torch-3x7"]


def test_modules_match_functions():
    zs, zt, zp = correlated_logits((3, 7), 29)
    y = random_tokens((3, 7), 29)
    cfg = DOPDConfig(top_k=5, reduction="seq_mean")
    a, b = leaf(zs), leaf(zs)
    m = DOPDLoss(cfg, backend="torch")
    assert isinstance(m, torch.nn.Module)
    out_m, out_f = m(a, zt, zp, y), dopd_loss(b, zt, zp, y, config=cfg, backend="torch")
    assert torch.equal(out_m.regime, out_f.regime)
    assert_close(out_m.loss, out_f.loss, rtol=0, atol=0, what="DOPDLoss")
    out_m.loss.backward()
    out_f.loss.backward()
    assert torch.equal(a.grad, b.grad)
    # OPDLoss from keywords and from an OPDConfig; both options at once is an error.
    for mod in (OPDLoss(divergence="js", granularity="topk", top_k=4, backend="torch"),
                OPDLoss(OPDConfig(divergence="js", granularity="topk", top_k=4), backend="torch")):
        got = mod(zs, zt, y)
        exp = opd_loss(zs, zt, y, divergence="js", granularity="topk", top_k=4, backend="torch")
        assert_close(got.loss, exp.loss, rtol=0, atol=0, what="OPDLoss")
    with pytest.raises(ValueError, match="either an OPDConfig or keyword options"):
        OPDLoss(OPDConfig(), divergence="js")
    t = linear_streams((3, 7), 6, 29)
    f = FusedLinearDOPDLoss(cfg, backend="torch")(t["student_hidden"], t["student_weight"], t["teacher_hidden"],
                                                   t["teacher_weight"], t["priv_student_hidden"], y,
                                                   student_bias=t["student_bias"])
    g = fused_linear_dopd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"],
                               t["priv_student_hidden"], y, student_bias=t["student_bias"], config=cfg, backend="torch")
    assert_close(f.loss, g.loss, rtol=0, atol=0, what="FusedLinearDOPDLoss")
    o = FusedLinearOPDLoss(divergence="forward_kl", backend="torch")(t["student_hidden"], t["student_weight"],
                                                                     t["teacher_hidden"], t["teacher_weight"], y)
    p = fused_linear_opd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"], y,
                              divergence="forward_kl", backend="torch")
    assert_close(o.loss, p.loss, rtol=0, atol=0, what="FusedLinearOPDLoss")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_no_grad(backend):
    zs, zt, zp = correlated_logits(20, 31)
    y = random_tokens(20, 31)
    s = leaf(zs)
    with torch.no_grad():
        out = dopd_loss(s, zt, zp, y, config=DOPDConfig(top_k=5, topk_renorm=False), backend=backend)
        o2 = opd_loss(s, zt, y, granularity="sampled", divergence="forward_kl", backend=backend)
    assert not out.loss.requires_grad and not o2.loss.requires_grad
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=DOPDConfig(top_k=5, topk_renorm=False),
                    backend="reference")
    assert_close(out.loss, ref.loss, rtol=1e-5, what="no_grad value")
    assert torch.equal(out.regime, ref.regime)


def test_no_grad_does_no_gradient_work(monkeypatch):
    calls = []
    for name in ("full_grad_pass", "term_grad_pass"):
        real = getattr(TorchBackend, name)
        monkeypatch.setattr(TorchBackend, name, lambda self, *a, _real=real, **k: calls.append(1) or _real(self, *a, **k))
    zs, zt, zp = correlated_logits(12, 17)
    y = random_tokens(12, 17)
    s = leaf(zs)
    with torch.no_grad():
        dopd_loss(s, zt, zp, y, backend="torch")
    assert not calls
    dopd_loss(s, zt, zp, y, backend="torch").loss.backward()
    assert calls


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_token_logprobs_logits_and_linear(temperature, backend):
    zs, = correlated_logits((3, 8), 41, n_streams=1)
    y = random_tokens((3, 8), 41)
    got = token_logprobs(zs, y, temperature=temperature, backend=backend)
    lp = nv.logprobs(zs.reshape(-1, 41), temperature)
    flat = y.reshape(-1)
    exp = torch.where(flat != IGNORE, lp[torch.arange(flat.shape[0]), flat.clamp(min=0)], torch.zeros(()))
    assert got.shape == y.shape and got.dtype == torch.float32 and not got.requires_grad
    assert_close(got.reshape(-1), exp, rtol=1e-6, what="token_logprobs(logits)")
    t = linear_streams(24, 8, 41)
    y1 = random_tokens(24, 41)
    y1 = y1.masked_fill(y1 >= 37, IGNORE)
    got = token_logprobs(t["student_hidden"], y1, t["student_weight"], t["student_bias"], temperature=temperature,
                         valid_vocab=37, backend=backend)
    lp = nv.logprobs(nv.linear_logits(t["student_hidden"], t["student_weight"], t["student_bias"]), temperature, 37)
    exp = torch.where(y1 != IGNORE, lp[torch.arange(24), y1.clamp(min=0)], torch.zeros(()))
    assert_close(got, exp, rtol=1e-6, what="token_logprobs(hidden, weight)")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("mode", ["valid_vocab", "minus_inf"])
def test_padding_columns_are_ignored(mode, backend):
    """Padding columns (≥ valid_vocab, or -inf logits) change nothing and get a zero gradient."""
    n, v, pad = 24, 29, 6
    zs, zt, zp = correlated_logits(n, v)
    y = random_tokens(n, v - pad)
    cfg = DOPDConfig(top_k=5, topk_renorm=False)
    a = leaf(zs)
    if mode == "valid_vocab":
        # Wild values in the padding columns must not leak into anything.
        zs_p, zt_p, zp_p = zs.clone(), zt.clone(), zp.clone()
        for z in (zs_p, zt_p, zp_p):
            z[:, v - pad:] = 50 * torch.randn(n, pad)
        a = leaf(zs_p)
        out = dopd_loss(a, zt_p, zp_p, y, config=cfg.replace(valid_vocab=v - pad), backend=backend)
    else:
        zs_p, zt_p, zp_p = zs.clone(), zt.clone(), zp.clone()
        for z in (zs_p, zt_p, zp_p):
            z[:, v - pad:] = float("-inf")
        a = leaf(zs_p)
        out = dopd_loss(a, zt_p, zp_p, y, config=cfg, backend=backend)
    b = leaf(zs[:, :v - pad])
    ref = dopd_loss(b, zt[:, :v - pad], zp[:, :v - pad], y, config=cfg, backend=backend)
    assert torch.equal(out.regime, ref.regime)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=1e-6, what="per token")
    out.loss.backward()
    ref.loss.backward()
    assert torch.isfinite(a.grad).all()
    assert (a.grad[:, v - pad:] == 0).all()
    assert_close(a.grad[:, :v - pad], b.grad, rtol=1e-6, what="grad")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_fused_linear_valid_vocab_gives_zero_grad_on_padding_rows(backend):
    t = linear_streams(16, 6, 23)
    y = random_tokens(16, 19)
    w, b = leaf(t["student_weight"]), leaf(t["student_bias"])
    out = fused_linear_opd_loss(t["student_hidden"], w, t["teacher_hidden"], t["teacher_weight"], y, student_bias=b,
                                divergence="js", valid_vocab=19, backend=backend)
    out.loss.backward()
    assert (w.grad[19:] == 0).all() and (b.grad[19:] == 0).all()
    assert (w.grad[:19] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind,gran,renorm", [("reverse_kl", "full", True), ("forward_kl", "full", True),
                                              ("js", "full", True), ("forward_kl", "sampled", True),
                                              ("reverse_kl", "sampled", True), ("reverse_kl", "topk", False),
                                              ("js", "topk", True)])
def test_extreme_logits_no_nan(kind, gran, renorm, backend):
    n, v = 12, 40
    zs, zt = (torch.empty(n, v).uniform_(-1e4, 1e4) for _ in range(2))
    y = random_tokens(n, v)
    s = leaf(zs)
    out = opd_loss(s, zt, y, divergence=kind, granularity=gran, top_k=6, topk_renorm=renorm, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.per_token_loss).all() and torch.isfinite(out.loss)
    assert torch.isfinite(s.grad).all()
    # Values agree with float64 to what fp32 logits of size 1e4 allow. Their log-sum-exp has an ulp of
    # ~1e-3, so a log-probability of ~-1e4 is off by ~1e-3 absolute: sampled reverse KL, d·log p(y)
    # with d a difference of two such log-probs, is then off by up to ~10. Judged like Cut
    # Cross-Entropy: within 2e-3 relative / 1e-2 absolute, or no worse than twice the error of a naive
    # fp32 log_softmax computation on the same inputs.
    ref = opd_loss(zs.double(), zt.double(), y, divergence=kind, granularity=gran, top_k=6, topk_renorm=renorm,
                   reduction="none", backend="reference").per_token_loss
    naive = nv.opd(zs, zt, y, kind, gran, k=6, renorm=renorm, dtype=torch.float32).double()
    err = (out.per_token_loss.double() - ref).abs()
    naive_err = (naive - ref).abs().max().item()
    within = err <= 1e-2 + 2e-3 * ref.abs()
    assert bool(within.all()) or err.max().item() <= 2 * naive_err, \
        f"per-token loss: max error {err.max().item():.3g}, naive fp32 {naive_err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_inputs_not_modified(backend):
    zs, zt, zp = correlated_logits((2, 9), 33)
    y = random_tokens((2, 9), 33)
    t = linear_streams((2, 9), 6, 33)
    before = [x.clone() for x in (zs, zt, zp, y)]
    lin_before = {k: v.clone() for k, v in t.items()}
    s = leaf(zs)
    dopd_loss(s, zt, zp, y, config=DOPDConfig(top_k=4, topk_renorm=False, temperature=0.7, valid_vocab=31)
              if bool((y < 31).all()) else DOPDConfig(top_k=4, temperature=0.7), backend=backend).loss.backward()
    opd_loss(s, zt, y, granularity="sampled", divergence="js", temperature=1.3, backend=backend).loss.backward()
    h = leaf(t["student_hidden"])
    fused_linear_dopd_loss(h, t["student_weight"], t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                           student_bias=t["student_bias"], teacher_bias=t["teacher_bias"],
                           config=DOPDConfig(temperature=2.0), backend=backend).loss.backward()
    for a, b in zip((s, zt, zp, y), before):
        assert torch.equal(a.detach(), b)
    for k, v in t.items():
        assert torch.equal(v, lin_before[k]), k
    assert torch.equal(h.detach(), lin_before["student_hidden"])


def test_backend_selection():
    names = available_backends()
    assert "reference" in names and "torch" in names
    zs, zt, zp = correlated_logits(10, 15)
    y = random_tokens(10, 15)
    auto = dopd_loss(zs, zt, zp, y, backend="auto")
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, backend="reference")
    assert_close(auto.loss, ref.loss, rtol=1e-5, what="auto backend")
    assert "row_chunk=3" in repr(TorchBackend(row_chunk=3, vocab_chunk=7))


def test_regime_fractions_and_output_types():
    zs, zt, zp = correlated_logits(40, 21)
    y = random_tokens(40, 21)
    out = dopd_loss(zs, zt, zp, y, backend="torch")
    fr = out.regime_fractions()
    valid = y != IGNORE
    for r in (Regime.LH, Regime.LL, Regime.HT, Regime.HS):
        assert fr[r.name] == pytest.approx(float((out.regime[valid] == r).sum()) / float(valid.sum()))
    assert sum(fr.values()) == pytest.approx(1.0)
    assert out.loss.dtype == torch.float32 and out.regime.dtype == torch.int8
    for th in out.thresholds:
        assert th.dtype == torch.float64 and th.dim() == 0
    o64 = dopd_loss(zs.double(), zt.double(), zp.double(), y, backend="torch")
    assert o64.loss.dtype == torch.float64


@pytest.mark.parametrize("dtypes", [(torch.float16,) * 3, (torch.bfloat16, torch.float32, torch.float32),
                                    (torch.float32, torch.bfloat16, torch.float16), (torch.float64,) * 3],
                         ids=["fp16", "bf16-student", "mixed-frozen", "fp64"])
def test_dtypes_and_mixed_streams(dtypes):
    # Distinct student values on a bf16/fp16-exact grid: a top-K set never hinges on a rounding tie.
    zs, zt, zp = distinct_logits(20, 31, dtype=torch.float32)
    zs, zt, zp = (z.to(d) for z, d in zip((zs, zt, zp), dtypes))
    y = random_tokens(20, 31)
    s, s64 = leaf(zs), leaf(zs, torch.float64)
    out = dopd_loss(s, zt, zp, y, config=DOPDConfig(top_k=6), backend=TorchBackend(row_chunk=6, vocab_chunk=8))
    ref = dopd_loss(s64, zt.double(), zp.double(), y, config=DOPDConfig(top_k=6), backend="reference")
    assert out.loss.dtype == (torch.float64 if dtypes[0] == torch.float64 else torch.float32)
    assert torch.equal(out.regime, ref.regime)
    assert_close(out.loss, ref.loss, rtol=1e-5, what="loss")
    out.loss.backward()
    ref.loss.backward()
    assert s.grad.dtype == dtypes[0]
    # The gradient is stored in the student's dtype: its rounding is the bound.
    rtol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}.get(dtypes[0], 1e-5)
    assert_close(s.grad, s64.grad, rtol=rtol, atol=rtol * float(s64.grad.abs().max()), what="grad")


def test_token_dtypes_custom_ignore_index_and_non_contiguous_inputs():
    zs, zt, zp = correlated_logits((4, 5), 23)
    y = random_tokens((4, 5), 23, ignore_index=-1)
    cfg = DOPDConfig(top_k=5, ignore_index=-1)
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=cfg, backend="reference")
    assert (ref.regime[y == -1] == -1).all()
    for tokens in (y, y.int()):
        out = dopd_loss(zs, zt, zp, tokens, config=cfg, backend="torch")
        assert_close(out.loss, ref.loss, rtol=1e-5, what=f"tokens {tokens.dtype}")
    # Transposed (non-contiguous) [T, B, V] views give the transposed result.
    tr = [z.transpose(0, 1) for z in (zs, zt, zp)]
    out = dopd_loss(*tr, y.T, config=cfg.replace(reduction="none"), backend="torch")
    ref_none = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=cfg.replace(reduction="none"),
                         backend="reference")
    assert_close(out.loss, ref_none.loss.T, rtol=1e-5, what="non-contiguous")


@pytest.mark.parametrize("backend", [b for b in ("reference", "torch", "cpp") if b in available_backends()])
def test_torch_compile_step_breaks_once_around_the_loss(backend):
    """A compiled step with work before and after the loss: a backend that runs as a custom op (`ops.py`)
    traces into one graph; "reference" is one deliberate graph break, so Dynamo builds exactly two graphs
    (without it, the validation, routing and passes cut this step into 13 to 30 graphs), and the
    compiled step matches eager, gradients through the loss included."""
    from torch._dynamo.testing import CompileCounter

    t = linear_streams(20, 24, 90)
    y = random_tokens(20, 90)
    x, a, w = t["student_hidden"], leaf(torch.randn(24, 24, dtype=torch.float64).float()), leaf(t["student_weight"])

    def step(a, w):
        h = torch.tanh(x @ a)
        out = fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                     config=DOPDConfig(top_k=8), backend=backend)
        return 2.0 * out.loss + (h ** 2).mean()

    eager = step(a, w)
    eager.backward()
    ga, gw = a.grad.clone(), w.grad.clone()
    a.grad = w.grad = None
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter)(a, w)
    compiled.backward()
    assert counter.frame_count == (2 if backend == "reference" else 1)
    assert_close(compiled, eager, rtol=1e-6, what="loss")
    assert_close(a.grad, ga, rtol=1e-6, what="d(step)/da through the loss")
    assert_close(w.grad, gw, rtol=1e-6, what="dW")


@pytest.mark.parametrize("mode", ["logits", "fused-linear"])
def test_in_place_change_between_forward_and_backward(mode):
    """reduction="none" defers the gradient to the backward, whose state goes through save_for_backward:
    a tensor it reads (the student's or a frozen stream's) changed in place after the forward makes
    backward fail, as for any autograd op, instead of silently mixing old statistics with new weights.
    A scalar reduction forms its gradient in the forward: the backward then returns the gradient at the
    forward's inputs, whatever happened to them since."""
    y = random_tokens(12, 40)
    for reduction in ("none", "mean"):
        cfg = DOPDConfig(top_k=4, reduction=reduction)
        for changed in ("student", "teacher"):
            if mode == "logits":
                zs, zt, zp = correlated_logits(12, 40)
                s = leaf(zs)
                call = lambda: dopd_loss(s, zt, zp, y, config=cfg, backend="torch")  # noqa: E731
                target, grad_of = (s if changed == "student" else zt), s
            else:
                t = linear_streams(12, 8, 40)
                w = leaf(t["student_weight"])
                call = lambda: fused_linear_dopd_loss(t["student_hidden"], w, t["teacher_hidden"],  # noqa: E731
                                                      t["teacher_weight"], t["priv_student_hidden"], y, config=cfg,
                                                      backend="torch")
                target, grad_of = (w if changed == "student" else t["teacher_weight"]), w
            expected = torch.autograd.grad(call().loss.sum(), grad_of)[0]
            out = call()
            with torch.no_grad():
                target.mul_(1.5)
            if reduction == "none":
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    out.loss.sum().backward()
            else:
                out.loss.backward()
                assert_close(grad_of.grad, expected, rtol=1e-6, what="eager gradient at the forward's inputs")


@pytest.mark.parametrize("reduction", ["mean", "seq_mean", "sum", "none"])
def test_gradient_is_eager_for_scalar_reductions_and_deferred_otherwise(reduction, monkeypatch):
    """Scalar reductions know d loss / d per-token loss before the loss exists: the gradient passes run in
    the forward and the backward only scales their result. reduction="none" runs them in the backward,
    exact for an arbitrary upstream gradient (here per-token weights). Both match the float64 reference."""
    calls = []
    for name in ("full_grad_pass", "term_grad_pass"):
        real = getattr(TorchBackend, name)
        monkeypatch.setattr(TorchBackend, name, lambda self, *a, _real=real, **k: calls.append(1) or _real(self, *a, **k))
    zs, zt, zp = correlated_logits((3, 6), 50)
    y = random_tokens((3, 6), 50)
    cfg = DOPDConfig(top_k=5, trim=0.1, reduction=reduction)
    weights = torch.rand(3, 6, dtype=torch.float64) + 0.5
    grads = {}
    for backend, dtype in (("torch", torch.float32), ("reference", torch.float64)):
        s = leaf(zs, dtype)
        out = dopd_loss(s, zt.to(dtype), zp.to(dtype), y, config=cfg, backend=backend)
        if backend == "torch":
            assert bool(calls) == (reduction != "none"), "gradient passes ran at the wrong time"
        loss = (out.loss * weights.to(dtype)).sum() if reduction == "none" else 3.0 * out.loss
        loss.backward()
        if backend == "torch":
            assert calls, "no gradient pass ran"
        grads[backend] = s.grad
    scale = float(grads["reference"].abs().max())
    assert_close(grads["torch"], grads["reference"], rtol=1e-5, atol=1e-6 * scale, what="gradient")
