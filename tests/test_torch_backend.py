"""The chunked `torch` backend against the float64 `reference` backend: values, per-token outputs,
regimes and gradients; fp32 and bf16; 2-D and 3-D inputs; odd sizes and small tiles.

fp32 inputs: the reference runs on float64 copies of the very same values and the backend must agree
to ~1e-5 relative. bf16 inputs (judged like Cut Cross-Entropy): truth is the float64 computation on the
bf16 values; the backend's error must not exceed that of a naive materialized bf16 computation by
more than a small margin (and, since the library promises fp32 statistics, stay near fp32 accuracy).
"""

from __future__ import annotations

import pytest
import torch

import naive_reference as nv
from conftest import (IGNORE, assert_close, correlated_logits, distinct_logits, leaf, linear_streams,
                      random_tokens)
from dopd_kernels import (DOPDConfig, TorchBackend, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss,
                          opd_loss)

TORCH_BACKENDS = [TorchBackend(), TorchBackend(row_chunk=3, vocab_chunk=7)]
TB_IDS = ["default-tiles", "tiles-3x7"]
DIVS = ["reverse_kl", "forward_kl", "js"]
GRANS = [("full", True, "student"), ("sampled", True, "student"), ("topk", True, "student"),
         ("topk", False, "student"), ("topk", True, "target"), ("topk", False, "target")]
GRAN_IDS = ["full", "sampled", "topk-renorm", "topk-tail", "topk-renorm-target", "topk-tail-target"]
RTOL = 1e-5


LOSS_FLOOR_FP32 = 1e-10


def compare_opd(zs, zt, y, backend, rtol=RTOL, **kw):
    """Run opd_loss on the backend (inputs as given) and on the reference (float64 copies)."""
    s = leaf(zs)
    out = opd_loss(s, zt, y, backend=backend, **kw)
    s64 = leaf(zs, torch.float64)
    ref = opd_loss(s64, zt.double(), y, backend="reference", **kw)
    assert out.loss.dtype == torch.float32 and out.per_token_loss.dtype == torch.float32
    assert not out.per_token_loss.requires_grad
    # Absolute floor: a divergence between two nearly equal two-bucket distributions (values ~1e-7)
    # amplifies the fp32 rounding of the tail mass (~1e-7 relative) into errors of ~1e-12, which no
    # fp32 computation from these logits can resolve; 1e-10 is far below any loss a trainer sees.
    atol = max(rtol * float(ref.per_token_loss.abs().max()), LOSS_FLOOR_FP32)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=rtol, atol=atol, what="per-token loss")
    assert_close(out.loss, ref.loss, rtol=rtol, atol=max(rtol * float(ref.loss.abs().max()), LOSS_FLOOR_FP32), what="loss")
    w = torch.rand(y.shape) + 0.5 if kw.get("reduction") == "none" else None
    (out.loss * w).sum().backward() if w is not None else out.loss.backward()
    (ref.loss * w.double()).sum().backward() if w is not None else ref.loss.backward()
    assert s.grad.dtype == zs.dtype and s.grad.shape == zs.shape
    assert_close(s.grad, s64.grad, rtol=rtol, what="student grad")
    return out, ref


@pytest.mark.parametrize("shape,backend", [((29,), TORCH_BACKENDS[0]), ((29,), TORCH_BACKENDS[1]),
                                           ((3, 10), TORCH_BACKENDS[1])], ids=["2d-default-tiles", "2d-tiles-3x7", "3d-tiles-3x7"])
@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_opd_logits_fp32(kind, gran, renorm, source, shape, backend):
    zs, zt = correlated_logits(shape, 37, n_streams=2, noise=1.2)
    y = random_tokens(shape, 37)
    compare_opd(zs, zt, y, backend, divergence=kind, granularity=gran, top_k=9, topk_renorm=renorm, topk_from=source,
                js_beta=0.4, temperature=0.8)


def compare_dopd(zs, zt, zp, y, cfg, backend, rtol=RTOL, upstream=None, thresholds=None):
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=backend, thresholds=thresholds)
    s64 = leaf(zs, torch.float64)
    ref = dopd_loss(s64, zt.double(), zp.double(), y, config=cfg, backend="reference", thresholds=thresholds)
    assert torch.equal(out.regime, ref.regime), "regimes differ"
    assert out.regime.dtype == torch.int8 and out.regime.shape == y.shape
    for name in ("adv_gap", "q_teacher", "q_priv_student"):
        got = getattr(out, name)
        assert got.dtype == torch.float64 and got.shape == y.shape and not got.requires_grad
        assert_close(got, getattr(ref, name), rtol=rtol, what=name)
    for a, b in zip(out.thresholds, ref.thresholds):
        assert_close(a, b, rtol=rtol, what="thresholds")
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=rtol, what="per-token loss")
    assert_close(out.loss, ref.loss, rtol=rtol, what="loss")
    if upstream is None:
        out.loss.backward()
        ref.loss.backward()
    else:
        (out.loss * upstream).sum().backward()
        (ref.loss * upstream.double()).sum().backward()
    assert_close(s.grad, s64.grad, rtol=rtol, what="student grad")
    return out, ref


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
@pytest.mark.parametrize("shape", [(48,), (4, 13)], ids=["2d", "3d"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("source", ["student", "target"])
def test_dopd_logits_fp32(source, renorm, temperature, shape, backend):
    zs, zt, zp = correlated_logits(shape, 37, noise=(0.8, 1.5))
    y = random_tokens(shape, 37)
    cfg = DOPDConfig(top_k=8, topk_from=source, topk_renorm=renorm, temperature=temperature, trim=0.1,
                     reduction="seq_mean" if len(shape) == 2 else "mean")
    out, _ = compare_dopd(zs, zt, zp, y, cfg, backend)
    assert len(set(out.regime[y != IGNORE].tolist())) >= 3  # the inputs do exercise several regimes


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
def test_dopd_reduction_none_with_per_token_weights(backend):
    zs, zt, zp = correlated_logits((3, 11), 23)
    y = random_tokens((3, 11), 23)
    compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=5, reduction="none"), backend, upstream=torch.randn(3, 11))


# -- fused-linear mode ---------------------------------------------------------------------------


def compare_fused_linear_opd(t, y, backend, rtol=RTOL, **kw):
    """fused_linear_opd_loss on the backend (streams `t` as given, student and teacher biases) and on
    the reference (float64 copies): per-token loss, dH, dW and db."""
    names = ("student_hidden", "student_weight", "student_bias")
    tr, tr64 = [leaf(t[k]) for k in names], [leaf(t[k], torch.float64) for k in names]
    out = fused_linear_opd_loss(tr[0], tr[1], t["teacher_hidden"], t["teacher_weight"], y, student_bias=tr[2],
                                teacher_bias=t["teacher_bias"], backend=backend, **kw)
    ref = fused_linear_opd_loss(tr64[0], tr64[1], t["teacher_hidden"].double(), t["teacher_weight"].double(), y,
                                student_bias=tr64[2], teacher_bias=t["teacher_bias"].double(), backend="reference",
                                **kw)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=rtol, what="per-token loss")
    out.loss.backward()
    ref.loss.backward()
    for name, a, e in zip(("dH", "dW", "db"), tr, tr64):
        assert_close(a.grad, e.grad, rtol=rtol, what=name)


def fused_dopd_pair(t, y, cfg, backend, priv_weight=False, rtol=RTOL, shape_check=True):
    frozen = {k: v for k, v in t.items() if not k.startswith("student")}
    if priv_weight:
        frozen["priv_student_weight"] = t["student_weight"] + 0.1 * torch.randn_like(t["student_weight"])
    trainable = {k: leaf(v) for k, v in t.items() if k.startswith("student")}
    trainable64 = {k: leaf(v, torch.float64) for k, v in t.items() if k.startswith("student")}

    def call(tr, fr, be):
        kwargs = {k: v for k, v in {**tr, **fr}.items()
                  if k not in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                               "priv_student_hidden")}
        return fused_linear_dopd_loss(tr["student_hidden"], tr["student_weight"], fr["teacher_hidden"],
                                      fr["teacher_weight"], fr["priv_student_hidden"], y, config=cfg, backend=be,
                                      **kwargs)

    out = call(trainable, frozen, backend)
    ref = call(trainable64, {k: v.double() for k, v in frozen.items()}, "reference")
    assert torch.equal(out.regime, ref.regime), "regimes differ"
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=rtol, what="per-token loss")
    assert_close(out.loss, ref.loss, rtol=rtol, what="loss")
    out.loss.backward()
    ref.loss.backward()
    for k in trainable:
        assert trainable[k].grad is not None, f"no gradient for {k}"
        assert trainable[k].grad.dtype == trainable[k].dtype
        assert_close(trainable[k].grad, trainable64[k].grad, rtol=rtol, what=f"d{k}")
    return out, ref


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("priv_weight", [False, True], ids=["priv-weight-default", "priv-weight-own"])
@pytest.mark.parametrize("renorm", [True, False])
def test_fused_linear_dopd_fp32(renorm, priv_weight, bias, backend):
    t = linear_streams((5, 9), 16, 41, bias=bias)
    y = random_tokens((5, 9), 41)
    cfg = DOPDConfig(top_k=6, topk_renorm=renorm, temperature=1.2)
    fused_dopd_pair(t, y, cfg, backend, priv_weight=priv_weight)


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
def test_fused_linear_dopd_teacher_hidden_size_differs(backend):
    t = linear_streams(33, 12, 29, teacher_hidden=20)
    y = random_tokens(33, 29)
    fused_dopd_pair(t, y, DOPDConfig(top_k=5), backend)


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_fused_linear_opd_fp32(kind, gran, renorm, source, backend):
    compare_fused_linear_opd(linear_streams(21, 8, 31), random_tokens(21, 31), backend, divergence=kind,
                             granularity=gran, top_k=5, topk_renorm=renorm, topk_from=source, temperature=0.9)


def test_fused_linear_frozen_streams_get_no_gradient():
    t = linear_streams(10, 6, 17)
    frozen = {k: leaf(v) for k, v in t.items() if not k.startswith("student")}
    h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
    out = fused_linear_dopd_loss(h, w, frozen["teacher_hidden"], frozen["teacher_weight"], frozen["priv_student_hidden"],
                                 random_tokens(10, 17), teacher_bias=frozen["teacher_bias"], backend="torch")
    out.loss.backward()
    assert h.grad is not None and w.grad is not None
    assert all(v.grad is None for v in frozen.values())


def test_fused_linear_default_priv_weight_is_student_weight_detached():
    t = linear_streams(15, 6, 19)
    y = random_tokens(15, 19)
    w1, w2 = leaf(t["student_weight"]), leaf(t["student_weight"])
    args = (t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y)
    a = fused_linear_dopd_loss(t["student_hidden"], w1, *args, student_bias=t["student_bias"], backend="torch")
    b = fused_linear_dopd_loss(t["student_hidden"], w2, *args, student_bias=t["student_bias"],
                               priv_student_weight=t["student_weight"].clone(),
                               priv_student_bias=t["student_bias"].clone(), backend="torch")
    assert torch.equal(a.regime, b.regime)
    assert_close(a.loss, b.loss, rtol=1e-6, what="loss")
    a.loss.backward()
    b.loss.backward()
    assert_close(w1.grad, w2.grad, rtol=1e-6, what="dW")


# -- odd sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_BACKENDS + [TorchBackend(row_chunk=1, vocab_chunk=1)],
                         ids=TB_IDS + ["tiles-1x1"])
@pytest.mark.parametrize("n,v,k", [(1, 37, 8), (2, 1, 4), (7, 5, 5), (7, 5, 64), (9, 13, 12), (16, 61, 61)],
                         ids=["N=1", "V=1", "K=V", "K>V", "K=V-1", "V=61,K=V"])
@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_odd_sizes(n, v, k, renorm, backend):
    zs, zt, zp = correlated_logits(n, v, noise=(0.8, 1.5))
    y = random_tokens(n, v, mask_frac=0.1)
    compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=k, topk_renorm=renorm), backend)


@pytest.mark.parametrize("backend", TORCH_BACKENDS[1:], ids=TB_IDS[1:])
@pytest.mark.parametrize("n,v,k", [(1, 37, 8), (3, 1, 4), (7, 5, 5), (7, 5, 64)], ids=["N=1", "V=1", "K=V", "K>V"])
@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_opd_odd_sizes(kind, gran, renorm, source, n, v, k, backend):
    zs, zt = correlated_logits(n, v, n_streams=2, noise=1.0)
    y = random_tokens(n, v, mask_frac=0.1)
    compare_opd(zs, zt, y, backend, divergence=kind, granularity=gran, top_k=k, topk_renorm=renorm, topk_from=source)


def test_fused_linear_odd_sizes_k_exceeds_vocab():
    t = linear_streams(1, 3, 7)
    y = torch.randint(0, 7, (1,))
    fused_dopd_pair(t, y, DOPDConfig(top_k=50, topk_renorm=False), TorchBackend(row_chunk=2, vocab_chunk=3))


# -- bf16 ----------------------------------------------------------------------------------------


def _err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
@pytest.mark.parametrize("shape", [(40,), (4, 10)], ids=["2d", "3d"])
@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_bf16_vs_naive_bf16(renorm, shape, backend):
    v = 53
    zs, zt, zp = distinct_logits(shape, v, noise=(0.8, 1.5))
    y = random_tokens(shape, v)
    cfg = DOPDConfig(top_k=8, topk_renorm=renorm, trim=0.1)
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=backend)
    out.loss.backward()
    assert s.grad.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert out.adv_gap.dtype == torch.float64
    # Truth: float64 on the bf16 values.
    flat = (lambda z: z.reshape(-1, v))
    s64 = leaf(zs, torch.float64)
    per64, regime64, *_ = nv.dopd(flat(s64), flat(zt), flat(zp), y.reshape(-1), k=8, renorm=renorm, trim=0.1)
    loss64 = nv.reduce(per64, y.reshape(-1), "mean")
    loss64.backward()
    # The library routes on fp32 statistics of the exact bf16 values: the regimes must be the truth's.
    assert out.regime.reshape(-1).tolist() == regime64
    # Naive bf16: the same math materialized and computed in bf16 (its own log-softmax, bf16 autograd),
    # routed with the true regimes so that its error is the arithmetic's only.
    s16 = leaf(zs)
    per16, *_ = nv.dopd(flat(s16), flat(zt), flat(zp), y.reshape(-1), k=8, renorm=renorm, trim=0.1, dtype=torch.bfloat16,
                        thresholds=tuple(float(x) for x in out.thresholds))
    loss16 = nv.reduce(per16, y.reshape(-1), "mean")
    loss16.backward()
    err, naive_err = _err(out.loss, loss64), _err(loss16, loss64)
    assert err <= naive_err + 1e-6, f"loss error {err:.2e} exceeds naive bf16 error {naive_err:.2e}"
    assert_close(out.per_token_loss.reshape(-1), per64, rtol=1e-4, what="per-token loss (fp32 statistics)")
    gerr, naive_gerr = _err(s.grad, s64.grad), _err(s16.grad, s64.grad)
    gscale = float(s64.grad.abs().max())
    assert gerr <= naive_gerr + 1e-3 * gscale, f"grad error {gerr:.2e} exceeds naive bf16 error {naive_gerr:.2e}"
    # The gradient is stored in bf16: its error is the bf16 rounding of the exact gradient.
    assert_close(s.grad, s64.grad, rtol=2 ** -7, atol=1e-4 * gscale, what="grad (bf16 storage)")


@pytest.mark.parametrize("gran,renorm", [("full", True), ("sampled", True), ("topk", True), ("topk", False)],
                         ids=["full", "sampled", "topk-renorm", "topk-tail"])
@pytest.mark.parametrize("kind", DIVS)
def test_opd_bf16_vs_naive_bf16(kind, gran, renorm):
    v = 47
    zs, zt = distinct_logits(36, v, n_streams=2, noise=1.2)
    y = random_tokens(36, v)
    kw = dict(k=6, renorm=renorm)
    s = leaf(zs)
    out = opd_loss(s, zt, y, divergence=kind, granularity=gran, top_k=6, topk_renorm=renorm,
                   backend=TorchBackend(row_chunk=5, vocab_chunk=16))
    out.loss.backward()
    s64, s16 = leaf(zs, torch.float64), leaf(zs)
    loss64 = nv.reduce(nv.opd(s64, zt, y, kind, gran, **kw), y, "mean")
    loss16 = nv.reduce(nv.opd(s16, zt, y, kind, gran, dtype=torch.bfloat16, **kw), y, "mean")
    loss64.backward()
    loss16.backward()
    err, naive_err = _err(out.loss, loss64), _err(loss16, loss64)
    assert err <= naive_err + 1e-6, f"loss error {err:.2e} exceeds naive bf16 error {naive_err:.2e}"
    assert_close(out.loss, loss64, rtol=1e-4, what="loss (fp32 statistics)")
    gscale = float(s64.grad.abs().max())
    gerr, naive_gerr = _err(s.grad, s64.grad), _err(s16.grad, s64.grad)
    assert gerr <= naive_gerr + 1e-3 * gscale, f"grad error {gerr:.2e} exceeds naive bf16 error {naive_gerr:.2e}"


def check_fused_linear_dopd_bf16(backend, renorm: bool, v: int, hdim: int, k: int, device: str = "cpu",
                                 grad_rtol: float = 2 ** -7, grad_atol: float = 2e-3) -> None:
    """bf16 fused-linear DOPD judged like Cut Cross-Entropy: the error of loss and dH/dW/db against
    float64 truth (logits of the bf16 parameters) may not exceed a naive bf16 computation's by
    more than a small margin. Shared by every backend's tests."""
    t = linear_streams(30, hdim, v, dtype=torch.bfloat16)
    y = random_tokens(30, v)
    names = ("student_hidden", "student_weight", "student_bias")
    train = {n: leaf(t[n].to(device)) for n in names}
    out = fused_linear_dopd_loss(train["student_hidden"], train["student_weight"], t["teacher_hidden"].to(device),
                                 t["teacher_weight"].to(device), t["priv_student_hidden"].to(device), y.to(device),
                                 student_bias=train["student_bias"], teacher_bias=t["teacher_bias"].to(device),
                                 config=DOPDConfig(top_k=k, topk_renorm=renorm), backend=backend)
    out.loss.backward()
    # Truth: float64 logits of the bf16 parameters.
    t64 = {n: leaf(t[n], torch.float64) for n in names}
    zs = nv.linear_logits(t64["student_hidden"], t64["student_weight"], t64["student_bias"])
    zt = nv.linear_logits(t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"])
    zp = nv.linear_logits(t["priv_student_hidden"], t["student_weight"], t["student_bias"])
    per64, regime64, *_ = nv.dopd(zs, zt, zp, y, k=k, renorm=renorm)
    loss64 = nv.reduce(per64, y, "mean")
    loss64.backward()
    # Naive bf16: logits materialized in bf16 (matmul output rounded), then bf16 math.
    t16 = {n: leaf(t[n]) for n in names}
    zs16 = t16["student_hidden"] @ t16["student_weight"].T + t16["student_bias"]
    zt16 = t["teacher_hidden"] @ t["teacher_weight"].T + t["teacher_bias"]
    zp16 = t["priv_student_hidden"] @ t["student_weight"].T + t["student_bias"]
    per16, *_ = nv.dopd(zs16, zt16, zp16, y, k=k, renorm=renorm, dtype=torch.bfloat16,
                        thresholds=tuple(float(x) for x in out.thresholds))
    loss16 = nv.reduce(per16, y, "mean")
    loss16.backward()
    # fp32 matmuls of bf16 values are near-exact: the routing is the truth's.
    assert out.regime.cpu().tolist() == regime64
    assert _err(out.loss.cpu(), loss64) <= _err(loss16, loss64) + 1e-6
    assert_close(out.loss.cpu(), loss64, rtol=1e-4, what="loss")
    for n in names:
        g, g64, g16 = train[n].grad.cpu(), t64[n].grad, t16[n].grad
        assert g.dtype == torch.bfloat16
        scale = float(g64.abs().max())
        assert _err(g, g64) <= _err(g16, g64) + 1e-3 * scale, n
        assert_close(g, g64, rtol=grad_rtol, atol=grad_atol * scale, what=f"d{n}")


@pytest.mark.parametrize("renorm", [True, False])
def test_fused_linear_dopd_bf16(renorm):
    check_fused_linear_dopd_bf16(TorchBackend(row_chunk=7, vocab_chunk=10), renorm, v=45, hdim=16, k=6)


# -- tail buckets (regressions) ------------------------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
@pytest.mark.parametrize("kind", ["forward_kl", "js"])
def test_sampled_two_bucket_with_confident_student(kind, backend):
    # The student is nearly sure of its sampled token (p(y) = 1 − O(e^-25)): the "not y" bucket is far
    # below fp32 rounding of 1 − p(y); it must still be summed correctly (it was 0 → forward KL = inf).
    n, v = 6, 37
    zs, zt = correlated_logits(n, v, n_streams=2, noise=1.0)
    y = torch.randint(0, v, (n,))
    zs[torch.arange(n), y] += 25.0
    out, _ = compare_opd(zs, zt, y, backend, divergence=kind, granularity="sampled")
    assert torch.isfinite(out.per_token_loss).all()


@pytest.mark.parametrize("backend", TORCH_BACKENDS, ids=TB_IDS)
@pytest.mark.parametrize("source", ["student", "target"])
@pytest.mark.parametrize("kind", DIVS)
def test_topk_tail_with_peaked_target(kind, source, backend):
    # The teacher's mass sits on a few tokens (tail ~e^-30): the tail bucket must be summed, not 1 − Σp.
    n, v = 10, 41
    zs, zt = correlated_logits(n, v, n_streams=2, noise=1.0)
    zt[:, :3] += 30.0
    out, _ = compare_opd(zs, zt, torch.randint(0, v, (n,)), backend, divergence=kind, granularity="topk", top_k=6,
                         topk_renorm=False, topk_from=source)
    assert torch.isfinite(out.per_token_loss).all()


@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_extreme_logits_match_reference(renorm):
    # ±1e4 logits (÷ τ = 3): no NaN/inf, and agreement to the ~1e-4 that fp32 logits of that size allow.
    n, v = 16, 64
    zs, zt, zp = (torch.empty(n, v).uniform_(-1e4, 1e4) for _ in range(3))
    zt[:, :8] = zs[:, :8]
    y = random_tokens(n, v)
    cfg = DOPDConfig(top_k=8, topk_renorm=renorm, temperature=3.0)
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=TorchBackend(row_chunk=5, vocab_chunk=9))
    out.loss.backward()
    assert torch.isfinite(out.per_token_loss).all() and torch.isfinite(s.grad).all()
    s64 = leaf(zs, torch.float64)
    ref = dopd_loss(s64, zt.double(), zp.double(), y, config=cfg, backend="reference")
    ref.loss.backward()
    assert torch.equal(out.regime, ref.regime)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=1e-4, what="per-token loss")
    # The gradient here is a cancellation of log-ratios of size ~1e3 (p is nearly one-hot): judge it on
    # that scale, fp32 eps × |log-ratio| / N, not relative to the near-zero result.
    scale = float(ref.per_token_loss.abs().max()) / n
    assert_close(s.grad, s64.grad, rtol=1e-3, atol=1e-5 * max(scale, 1.0), what="grad")
