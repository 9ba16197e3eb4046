"""The `triton` backend against the float64 `reference` (and a naive bf16 computation, and Liger).

Without CUDA the kernels run on CPU tensors in the Triton interpreter: this module sets
`TRITON_INTERPRET=1` before the kernels are first imported (they read it when decorated) and keeps
it set during its own tests only, so other modules' `backend="auto"` is unaffected. With CUDA the
same cases run compiled on the GPU and the interpreter variants skip. Shapes stay at a few hundred
columns so the interpreter finishes the module in a few minutes.

fp32 inputs must agree with the reference to ~1e-5 relative; bf16 inputs are judged like Cut
Cross-Entropy: the error against float64 truth on the bf16 values may not exceed a naive bf16
materialized computation's by more than a small margin.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

import dopd_kernels.kernels.divergence  # noqa: E402,F401  (decorated now: interpreted without CUDA)
from dopd_kernels.kernels.stats import topk_offsets  # noqa: E402


@triton.jit
def _topk_offsets_probe(out_ptr, slot, n_rows, top_k, base, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr):
    """The stats kernel's top-K output offsets for rows base .. base + BLOCK_N (test_topk_output_offsets_are_int64)."""
    offs = base + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K_PAD)
    tl.store(out_ptr + tl.arange(0, BLOCK_N)[:, None] * K_PAD + ks[None, :], topk_offsets(slot, n_rows, top_k, offs, ks))


if not CUDA:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import naive_reference as nv  # noqa: E402
from head_transform_checks import check_bf16_heads, check_dopd_heads, check_opd_heads  # noqa: E402
from test_torch_backend import check_fused_linear_dopd_bf16, compare_fused_linear_opd  # noqa: E402
from test_memory import AllocationRecorder  # noqa: E402
from conftest import IGNORE, assert_close, correlated_logits, distinct_logits, leaf, linear_streams, random_tokens  # noqa: E402
from dopd_kernels import (DOPDConfig, LMHead, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss,  # noqa: E402
                          opd_loss, token_logprobs)
from dopd_kernels.backends import available_backends, resolve_backend  # noqa: E402
from dopd_kernels.backends import triton_backend  # noqa: E402
from dopd_kernels.backends.triton_backend import MAX_TOPK, TritonBackend  # noqa: E402
from dopd_kernels.passes import Grads  # noqa: E402
from dopd_kernels.sources import LinearSource, LogitsSource  # noqa: E402

# The interpreter evaluates discarded branches of tl.where on -inf columns (numpy warns; GPUs do not).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="kernels are compiled for CUDA in this process; "
                                                 "the interpreter variants run on machines without CUDA")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA not available")),
]
TB = TritonBackend()
SMALL_TILES = TritonBackend(block_n=16, block_v=32, block_h=16, vocab_splits=3)  # many tiles, several splits
RTOL = 1e-5
DIVS = ["reverse_kl", "forward_kl", "js"]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def to(device, *ts):
    return [t.to(device) for t in ts]


def _err(a, b):
    return float((a.double() - b.double()).abs().max())


# -- DOPD, logits mode -----------------------------------------------------------------------------


def compare_dopd(zs, zt, zp, y, cfg, backend=TB, rtol=RTOL, upstream=None, thresholds=None):
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=backend, thresholds=thresholds)
    s64 = leaf(zs, torch.float64)
    ref = dopd_loss(s64, zt.double(), zp.double(), y, config=cfg, backend="reference", thresholds=thresholds)
    assert torch.equal(out.regime, ref.regime), "regimes differ"
    for name in ("adv_gap", "q_teacher", "q_priv_student"):
        assert_close(getattr(out, name), getattr(ref, name), rtol=rtol, what=name)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=rtol, what="per-token loss")
    assert_close(out.loss, ref.loss, rtol=rtol, what="loss")
    up = torch.ones(()) if upstream is None else upstream
    (out.loss * up.to(out.loss.device)).sum().backward()
    (ref.loss * up.double().to(ref.loss.device)).sum().backward()
    assert s.grad.dtype == zs.dtype and s.grad.shape == zs.shape
    assert torch.isfinite(s.grad).all()
    assert_close(s.grad, s64.grad, rtol=rtol, what="student grad")
    return out, ref


DOPD_CASES = {
    # name: (lead shape, V, config kwargs, backend)
    "3d-seq-mean": ((3, 9), 150, dict(top_k=16, reduction="seq_mean"), TB),
    "tail-temperature": ((26,), 150, dict(top_k=16, topk_renorm=False, temperature=0.7), TB),
    "topk-from-target": ((26,), 150, dict(top_k=12, topk_from="target", temperature=1.3), TB),
    "topk-from-target-tail": ((26,), 100, dict(top_k=12, topk_from="target", topk_renorm=False), TB),
    "valid-vocab": ((26,), 150, dict(top_k=16, valid_vocab=117), TB),
    "K>=V": ((20,), 40, dict(top_k=64, topk_renorm=False), TB),
    "V=block+1": ((20,), 33, dict(top_k=8, topk_renorm=False), SMALL_TILES),
    "small-tiles": ((37,), 150, dict(top_k=8, js_beta=0.3), SMALL_TILES),
    "N=1": ((1,), 70, dict(top_k=8), TB),
    "V=1": ((6,), 1, dict(top_k=4, topk_renorm=False), TB),
    "K=V=5": ((12,), 5, dict(top_k=5), TB),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(DOPD_CASES))
def test_dopd_logits_fp32(case, device):
    shape, v, kw, backend = DOPD_CASES[case]
    zs, zt, zp = to(device, *correlated_logits(shape, v, noise=(0.8, 1.5)))
    y = random_tokens(shape, kw.get("valid_vocab") or v, mask_frac=0.0 if shape == (1,) else 0.2).to(device)
    cfg = DOPDConfig(trim=0.1, **kw)
    out, _ = compare_dopd(zs, zt, zp, y, cfg, backend)
    if shape[-1] > 20 and v > 20:
        assert len(set(out.regime[y != IGNORE].tolist())) >= 3  # several regimes exercised


def _each_regime_inputs(regime, device):
    """Inputs and thresholds that put every valid token in `regime`."""
    zs, zt, zp = correlated_logits(24, 90, noise=(0.8, 1.5))
    y = random_tokens(24, 90)
    if regime in ("LH", "LL"):  # A < Ā = 1e9; q_T + q_P against 0 (LH) or 3 (LL)
        thresholds = (1e9, 0.0, 0.0) if regime == "LH" else (1e9, 1.5, 1.5)
    else:  # A ≥ Ā = 0; the teacher (HT) or the privileged student (HS) more confident at y
        zp = zt.clone()
        rows = torch.arange(24)
        zp[rows, y.clamp(min=0)] += -1.0 if regime == "HT" else 1.0
        thresholds = (0.0, 0.0, 0.0)
    return to(device, zs, zt, zp, y), thresholds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regime", ["LH", "LL", "HT", "HS"])
def test_dopd_each_regime_alone(regime, device):
    (zs, zt, zp, y), thresholds = _each_regime_inputs(regime, device)
    out, _ = compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=8, topk_renorm=regime != "LL"), thresholds=thresholds)
    code = ["LH", "LL", "HT", "HS"].index(regime)
    assert set(out.regime[y != IGNORE].tolist()) == {code}


@pytest.mark.parametrize("device", DEVICES)
def test_dopd_every_regime_present_reduction_none_weights(device):
    zs, zt, zp = to(device, *correlated_logits(40, 120, noise=(0.8, 1.5)))
    y = random_tokens(40, 120, mask_frac=0.1).to(device)
    # Thresholds halfway between the two middle values of each statistic (no token sits on a
    # threshold, where fp32 and float64 statistics could route differently): all four regimes occur.
    probe = dopd_loss(zs.double(), zt.double(), zp.double(), y, backend="reference")
    valid = y != IGNORE
    half = int(valid.sum()) // 2

    def middle(x):
        x = x[valid].sort().values
        return float(x[half - 1] + x[half]) / 2

    med = tuple(middle(getattr(probe, k)) for k in ("adv_gap", "q_teacher", "q_priv_student"))
    out, _ = compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=10, reduction="none"), thresholds=med,
                          upstream=torch.randn(40))
    assert set(out.regime[valid].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("device", DEVICES)
def test_dopd_extreme_logits_no_nan(device):
    n, v = 24, 128
    zs, zt, zp = (torch.empty(n, v).uniform_(-1e4, 1e4) for _ in range(3))
    zt[:, :8] = zs[:, :8]  # some shared mass so the divergences are not all saturated
    y = random_tokens(n, v).to(device)
    zs, zt, zp = to(device, zs, zt, zp)
    for cfg in (DOPDConfig(top_k=8), DOPDConfig(top_k=8, topk_renorm=False, temperature=3.0)):
        grads = {}
        for backend in (TB, "torch", "reference"):
            dt = torch.float64 if backend == "reference" else None
            s = leaf(zs, dt)
            out = dopd_loss(s, zt.to(s.dtype), zp.to(s.dtype), y, config=cfg, backend=backend)
            out.loss.backward()
            grads[backend if isinstance(backend, str) else "triton"] = (out, s.grad)
        (out, g), (ref, g64), (_, g_torch) = grads["triton"], grads["reference"], grads["torch"]
        assert torch.isfinite(out.per_token_loss).all() and torch.isfinite(g).all()
        assert torch.equal(out.regime, ref.regime)
        # fp32 logits of magnitude 1e4/τ carry ~1e-4 absolute rounding in log p, so p (and a KL of
        # size ~1e3) agrees with float64 to ~1e-4 relative, and near-one-hot rows leave gradients
        # that cancel to ~0 with fp32 residue: against float64 the bar is agreement at that level;
        # against the torch backend (the same fp32 statistics) it is tight.
        assert_close(out.per_token_loss, ref.per_token_loss, rtol=2e-3, what="per-token loss")
        scale = float(g64.abs().max())
        assert_close(g, g64, rtol=2e-3, atol=1e-5 + 2e-2 * scale, what="grad vs float64")
        assert_close(g, g_torch, rtol=1e-4, atol=1e-7 + 1e-4 * scale, what="grad vs torch backend")


@pytest.mark.parametrize("device", DEVICES)
def test_dopd_no_grad_does_no_gradient_work(device, monkeypatch):
    zs, zt, zp = to(device, *correlated_logits(20, 60))
    y = random_tokens(20, 60).to(device)
    s = leaf(zs)

    def fail(*a, **k):
        raise AssertionError("gradient pass ran under no_grad")

    monkeypatch.setattr(TritonBackend, "full_grad_pass", fail)
    monkeypatch.setattr(TritonBackend, "term_grad_pass", fail)
    with torch.no_grad():
        out = dopd_loss(s, zt, zp, y, config=DOPDConfig(top_k=8), backend=TB)
    assert not out.loss.requires_grad
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=DOPDConfig(top_k=8), backend="reference")
    assert_close(out.loss, ref.loss, rtol=RTOL, what="loss")


@pytest.mark.parametrize("device", DEVICES)
def test_dopd_non_contiguous_logits(device):
    zs, zt, zp = to(device, *correlated_logits(18, 160))
    y = random_tokens(18, 80).to(device)
    # Every other column of a wider tensor: strided logits are read in place.
    compare_dopd(zs[:, ::2], zt[:, ::2], zp[:, ::2], y, DOPDConfig(top_k=8, trim=0.1))


# -- OPD, logits mode ------------------------------------------------------------------------------

GRANS = [("full", True, "student"), ("sampled", True, "student"), ("topk", True, "student"),
         ("topk", False, "student"), ("topk", False, "target")]
GRAN_IDS = ["full", "sampled", "topk-renorm", "topk-tail", "topk-tail-target"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_opd_logits_fp32(kind, gran, renorm, source, device):
    zs, zt = to(device, *correlated_logits(22, 97, n_streams=2, noise=1.2))
    y = random_tokens(22, 97).to(device)
    kw = dict(divergence=kind, granularity=gran, top_k=9, topk_renorm=renorm, topk_from=source, js_beta=0.4,
              temperature=0.8, reduction="none" if gran == "full" else "mean")
    s, s64 = leaf(zs), leaf(zs, torch.float64)
    out = opd_loss(s, zt, y, backend=TB, **kw)
    ref = opd_loss(s64, zt.double(), y, backend="reference", **kw)
    # Two-bucket sampled forward KL / JS: the engine forms log P(not y) as (tail log-sum-exp − lse),
    # two fp32 numbers of size ~|lse|, so a term of two near-cancelling buckets carries ~ulp(lse).
    atol = 2e-6 if gran == "sampled" and kind != "reverse_kl" else None
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=RTOL, atol=atol, what="per-token loss")
    w = torch.rand(22, device=device) + 0.5 if kw["reduction"] == "none" else torch.ones((), device=device)
    (out.loss * w).sum().backward()
    (ref.loss * w.double()).sum().backward()
    assert_close(s.grad, s64.grad, rtol=RTOL, what="student grad")


# -- fused-linear mode -----------------------------------------------------------------------------


def fused_dopd_pair(t, y, cfg, backend=TB, priv_weight=False, rtol=RTOL):
    frozen = {k: v for k, v in t.items() if not k.startswith("student")}
    if priv_weight:
        frozen["priv_student_weight"] = t["student_weight"] + 0.1 * torch.randn_like(t["student_weight"])
    train = {k: leaf(v) for k, v in t.items() if k.startswith("student")}
    train64 = {k: leaf(v, torch.float64) for k, v in t.items() if k.startswith("student")}

    def call(tr, fr, be):
        rest = {k: v for k, v in {**tr, **fr}.items() if k not in
                ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "priv_student_hidden")}
        return fused_linear_dopd_loss(tr["student_hidden"], tr["student_weight"], fr["teacher_hidden"],
                                      fr["teacher_weight"], fr["priv_student_hidden"], y, config=cfg, backend=be,
                                      **rest)

    out = call(train, frozen, backend)
    ref = call(train64, {k: v.double() for k, v in frozen.items()}, "reference")
    assert torch.equal(out.regime, ref.regime), "regimes differ"
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=rtol, what="per-token loss")
    assert_close(out.loss, ref.loss, rtol=rtol, what="loss")
    out.loss.backward()
    ref.loss.backward()
    for k in train:
        assert train[k].grad is not None and train[k].grad.dtype == train[k].dtype, k
        assert_close(train[k].grad, train64[k].grad, rtol=rtol, what=f"d{k}")
    return out


FUSED_CASES = {
    # name: (lead, H, V, H_teacher, bias, priv weight, config kwargs, backend)
    "bias-H40": ((24,), 40, 97, None, True, False, dict(top_k=12, temperature=1.3), TB),
    "no-bias-3d-tail": ((3, 8), 24, 97, None, False, False, dict(top_k=12, topk_renorm=False), TB),
    "teacher-H-differs-own-priv-weight": ((24,), 24, 97, 36, True, True, dict(top_k=8), TB),
    "small-tiles-valid-vocab": ((30,), 20, 100, None, True, False, dict(top_k=8, valid_vocab=90, trim=0.1),
                                SMALL_TILES),
    "V=block+1-K>V": ((12,), 17, 33, None, True, False, dict(top_k=40, topk_renorm=False), SMALL_TILES),
    "N=1": ((1,), 24, 50, None, True, False, dict(top_k=8), TB),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_linear_dopd_fp32(case, device):
    lead, h, v, ht, bias, priv_weight, kw, backend = FUSED_CASES[case]
    t = {k: x.to(device) for k, x in linear_streams(lead, h, v, bias=bias, teacher_hidden=ht).items()}
    y = random_tokens(lead, kw.get("valid_vocab") or v, mask_frac=0.0 if lead == (1,) else 0.2).to(device)
    fused_dopd_pair(t, y, DOPDConfig(**kw), backend, priv_weight=priv_weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,gran,renorm", [("js", "full", True), ("reverse_kl", "full", True),
                                              ("forward_kl", "full", True), ("js", "sampled", True),
                                              ("reverse_kl", "sampled", True), ("forward_kl", "topk", False)])
def test_fused_linear_opd_fp32(kind, gran, renorm, device):
    t = {k: x.to(device) for k, x in linear_streams(20, 24, 70).items()}
    compare_fused_linear_opd(t, random_tokens(20, 70).to(device), SMALL_TILES, divergence=kind, granularity=gran,
                             top_k=7, topk_renorm=renorm, temperature=0.9)


# -- bf16 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_bf16_vs_naive_bf16(renorm, device):
    v = 150
    zs, zt, zp = distinct_logits(40, v, noise=(0.8, 1.5))
    y = random_tokens(40, v)
    cfg = DOPDConfig(top_k=16, topk_renorm=renorm, trim=0.1)
    s = leaf(zs.to(device))
    out = dopd_loss(s, zt.to(device), zp.to(device), y.to(device), config=cfg, backend=TB)
    out.loss.backward()
    assert s.grad.dtype == torch.bfloat16
    s64 = leaf(zs, torch.float64)
    per64, regime64, *_ = nv.dopd(s64, zt, zp, y, k=16, renorm=renorm, trim=0.1)
    loss64 = nv.reduce(per64, y, "mean")
    loss64.backward()
    assert out.regime.cpu().tolist() == regime64
    s16 = leaf(zs)
    per16, *_ = nv.dopd(s16, zt, zp, y, k=16, renorm=renorm, trim=0.1, dtype=torch.bfloat16,
                        thresholds=tuple(float(x) for x in out.thresholds))
    loss16 = nv.reduce(per16, y, "mean")
    loss16.backward()
    assert _err(out.loss.cpu(), loss64) <= _err(loss16, loss64) + 1e-6
    assert_close(out.per_token_loss.cpu(), per64, rtol=1e-4, what="per-token loss (fp32 statistics)")
    gscale = float(s64.grad.abs().max())
    assert _err(s.grad.cpu(), s64.grad) <= _err(s16.grad, s64.grad) + 1e-3 * gscale
    assert_close(s.grad.cpu(), s64.grad, rtol=2 ** -7, atol=1e-4 * gscale, what="grad (bf16 storage)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renorm", [True, False])
def test_fused_linear_dopd_bf16_vs_naive_bf16(renorm, device):
    # dH / dW contract bf16-rounded gradient tiles on tensor cores (as Liger and Cut Cross-Entropy
    # do), so they are judged against the naive bf16 error, not against bf16 rounding of the truth.
    check_fused_linear_dopd_bf16(SMALL_TILES, renorm, v=90, hdim=24, k=8, device=device, grad_rtol=2 ** -6,
                                 grad_atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", DIVS)
def test_opd_full_bf16_vs_naive_bf16(kind, device):
    zs, zt = distinct_logits(30, 120, n_streams=2, noise=1.2)
    y = random_tokens(30, 120)
    s = leaf(zs.to(device))
    out = opd_loss(s, zt.to(device), y.to(device), divergence=kind, granularity="full", backend=TB)
    out.loss.backward()
    s64, s16 = leaf(zs, torch.float64), leaf(zs)
    loss64 = nv.reduce(nv.opd(s64, zt, y, kind, "full"), y, "mean")
    loss16 = nv.reduce(nv.opd(s16, zt, y, kind, "full", dtype=torch.bfloat16), y, "mean")
    loss64.backward()
    loss16.backward()
    assert _err(out.loss.cpu(), loss64) <= _err(loss16, loss64) + 1e-6
    gscale = float(s64.grad.abs().max())
    assert _err(s.grad.cpu(), s64.grad) <= _err(s16.grad, s64.grad) + 1e-3 * gscale


@pytest.mark.parametrize("device", DEVICES)
def test_dopd_fp16_logits(device):
    zs, zt, zp = to(device, *distinct_logits(30, 100, noise=(0.8, 1.5), dtype=torch.float16))  # no top-K ties
    y = random_tokens(30, 100).to(device)
    cfg = DOPDConfig(top_k=10, topk_renorm=False)
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=TB)
    out.loss.backward()
    s64 = leaf(zs, torch.float64)
    ref = dopd_loss(s64, zt.double(), zp.double(), y, config=cfg, backend="reference")
    ref.loss.backward()
    assert s.grad.dtype == torch.float16 and torch.equal(out.regime, ref.regime)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=1e-5, what="per-token loss")
    # fp16 storage: half an ulp relative, and fp16's subnormal spacing 2^-24 below 6e-5.
    assert_close(s.grad, s64.grad, rtol=2 ** -10, atol=2 ** -24, what="grad (fp16 storage)")


# -- token_logprobs, stats pass, float64, registry ---------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs(dtype, device):
    t = linear_streams((3, 7), 20, 75, dtype=dtype)
    y = random_tokens((3, 7), 60).to(device)
    h, w, b = (t[k].to(device) for k in ("student_hidden", "student_weight", "student_bias"))
    got = token_logprobs(h, y, w, b, temperature=1.5, valid_vocab=60, backend=TB)
    ref = token_logprobs(h.double(), y, w.double(), b.double(), temperature=1.5, valid_vocab=60, backend="reference")
    assert got.dtype == torch.float32
    assert_close(got, ref, rtol=1e-5, what="fused-linear log-probs")
    z = (h.float() @ w.float().T).to(dtype)
    got = token_logprobs(z, y, temperature=0.5, backend=TB)
    ref = token_logprobs(z.double(), y, temperature=0.5, backend="reference")
    assert_close(got, ref, rtol=1e-5, what="logits log-probs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,v,backend", [(200, 300, TB), (5, 200, SMALL_TILES), (128, 128, TB)],
                         ids=["K=200(K_PAD=256)", "K=5-many-tiles", "K=V=128"])
def test_stats_pass_topk_and_lse(k, v, backend, device):
    """Running top-K of up to 256 columns (sorted descending) for several streams at once, against torch."""
    # Streams 0 and 2 keep a top-K: each holds distinct values, so the top-K set is unique.
    zs, zt, zp = (distinct_logits(20, v)[0].float().to(device) for _ in range(3))
    rows = torch.tensor([0, 3, 4, 7, 8, 9, 12, 13, 19], device=device)
    tokens = torch.randint(0, v, (rows.shape[0],), device=device)
    sources = [LogitsSource(z, temperature=0.9) for z in (zs, zt, zp)]
    stats = backend.stats_pass(sources, rows, tokens, (0, 2), k)
    for j, z in enumerate((zs, zt, zp)):
        zr = z[rows].double() / 0.9
        assert_close(stats.lse[j], torch.logsumexp(zr, 1), rtol=1e-6, what=f"lse {j}")
        assert_close(stats.logit_y[j], zr.gather(1, tokens[:, None])[:, 0], rtol=1e-6, what=f"logit_y {j}")
    assert set(stats.topk) == {0, 2}
    for j in (0, 2):
        assert torch.equal(stats.topk[j], torch.topk(sources[j].logits[rows], k, dim=1).indices), f"top-K {j}"


@pytest.mark.parametrize("device", DEVICES)
def test_stats_pass_topk_fused_linear(device):
    t = {k: x.to(device) for k, x in linear_streams(17, 20, 150).items()}
    src = LinearSource(t["student_hidden"], t["student_weight"], t["student_bias"])
    rows = torch.arange(17, device=device)
    stats = SMALL_TILES.stats_pass([src], rows, torch.zeros(17, dtype=torch.long, device=device), (0,), 24)
    z = t["student_hidden"].double() @ t["student_weight"].double().T + t["student_bias"].double()
    assert torch.equal(stats.topk[0].sort(1).values, torch.topk(z, 24, dim=1).indices.sort(1).values)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_inputs_use_the_torch_path(device):
    zs, zt, zp = to(device, *correlated_logits(12, 40, dtype=torch.float64))
    y = random_tokens(12, 40).to(device)
    compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=5), rtol=1e-10)


def test_registry_auto_and_unavailable(monkeypatch):
    device = torch.device("cuda" if CUDA else "cpu")
    assert isinstance(resolve_backend("auto", device), TritonBackend)
    assert isinstance(resolve_backend("triton", device), TritonBackend)
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not isinstance(resolve_backend("auto", device), TritonBackend)
        assert "triton" not in available_backends()  # it could not run anywhere here
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            resolve_backend("triton", device)
    # Without the triton package the factory says why.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "dopd_kernels.backends.triton_backend")
    with pytest.raises(RuntimeError, match="triton"):
        resolve_backend("triton", device)


def test_torch_compile_step_runs_with_a_graph_break():
    """A compiled training step around the fused loss with the Triton kernels: the public function is
    a deliberate graph break (`torch.compiler.disable`), so the step compiles and matches eager,
    gradients included."""
    t = linear_streams(20, 24, 90)
    y = random_tokens(20, 90)

    def step(h, w):
        out = fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                     config=DOPDConfig(top_k=8), backend=TB)
        return 2.0 * out.loss

    h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
    eager = step(h, w)
    eager.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    compiled = torch.compile(step, backend="eager")(h, w)
    compiled.backward()
    assert_close(compiled, eager, rtol=1e-6, what="loss")
    assert_close(h.grad, gh, rtol=1e-6, what="dH")
    assert_close(w.grad, gw, rtol=1e-6, what="dW")


# -- memory rule and a peer implementation ----------------------------------------------------------


def test_fused_linear_allocates_no_vocabulary_rows():
    """Allocation trace: every tensor created during a fused-linear forward + backward (DOPD with all
    regimes, and full-vocabulary JS OPD) is checked; none has a vocabulary axis per token."""

    n, hdim, v = 40, 24, 257  # V appears in no other dimension
    t = linear_streams(n, hdim, v, teacher_hidden=20)
    y = random_tokens(n, v)


    h, w, b = leaf(t["student_hidden"]), leaf(t["student_weight"]), leaf(t["student_bias"])
    with AllocationRecorder() as trace:
        out = fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                     student_bias=b, teacher_bias=t["teacher_bias"],
                                     config=DOPDConfig(top_k=8, topk_renorm=False), backend=TB)
        out.loss.backward()
        opd = fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, divergence="js", backend=TB)
        opd.loss.backward()
    assert len(set(out.regime[y != IGNORE].tolist())) >= 3
    shapes = [(f, s) for f, s, _, _ in trace.allocs]
    assert any("zeros" in f and s == (n, hdim) for f, s in shapes), "the trace misses the backward"
    allowed = {(v, hdim), (v,)}  # dW / db accumulators
    bad = [(f, s) for f, s in shapes if v in s and s not in allowed]
    assert not bad, f"tensors with a vocabulary axis per token: {bad[:5]}"
    assert max(torch.Size(s).numel() for _, s in shapes) < n * v


def test_js_matches_liger_fused_linear_jsd():
    """Full-vocabulary JS OPD against Liger-Kernel's LigerFusedLinearJSD on identical inputs. Liger's
    `jsd_beta` weights the teacher: JS_β(student, teacher) here is Liger's with jsd_beta = 1 − β."""
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed "
                                "(optional test dependency: pip install liger-kernel==0.8.5 --no-deps)")
    n, hdim, v = 16, 24, 120
    t = linear_streams(n, hdim, v, bias=False, teacher_hidden=28)
    device = "cuda" if CUDA else "cpu"
    t = {k: x.to(device) for k, x in t.items()}
    for beta, temperature in ((0.5, 1.0), (0.3, 2.0)):
        h1, w1 = leaf(t["student_hidden"]), leaf(t["student_weight"])
        peer = liger.LigerFusedLinearJSD(jsd_beta=1.0 - beta, temperature=temperature)
        ref = peer(h1, w1, t["teacher_hidden"], t["teacher_weight"], None)
        ref.backward()
        h2, w2 = leaf(t["student_hidden"]), leaf(t["student_weight"])
        out = fused_linear_opd_loss(h2, w2, t["teacher_hidden"], t["teacher_weight"],
                                    torch.zeros(n, dtype=torch.long, device=device), divergence="js",
                                    granularity="full", js_beta=beta, temperature=temperature, backend=TB)
        out.loss.backward()
        assert_close(out.loss, ref, rtol=1e-5, what="loss vs Liger")
        assert_close(h2.grad, h1.grad, rtol=1e-4, what="dH vs Liger")
        assert_close(w2.grad, w1.grad, rtol=1e-4, what="dW vs Liger")



# -- output-head transforms (issue 11): scale and soft-cap in the tile epilogue --------------------
# The shared checks of `head_transform_checks` (float64 reference on the same values; bf16 against a
# naive bf16 computation). SMALL_TILES: several vocabulary tiles and splits, so the jacobian meets
# the dH scratch, the atomics and the tail kernel across tile borders.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,gran,renorm,source", [
    ("js", "full", True, "student"), ("reverse_kl", "full", True, "student"), ("forward_kl", "full", True, "student"),
    ("reverse_kl", "sampled", True, "student"), ("forward_kl", "sampled", True, "student"),
    ("reverse_kl", "topk", True, "student"), ("js", "topk", False, "student"), ("forward_kl", "topk", True, "target")])
def test_opd_head_transforms_fp32(kind, gran, renorm, source, device):
    check_opd_heads(SMALL_TILES, kind, gran, renorm, source, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["scale", "softcap", "scale+softcap", "teacher-only"])
def test_opd_head_transform_cases(case, device):
    check_opd_heads(TB, "js", "full", case=case, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,renorm", [("scale", True), ("softcap", False), ("scale+softcap", True),
                                         ("student-only", False)])
def test_dopd_head_transforms_fp32(case, renorm, device):
    check_dopd_heads(SMALL_TILES if renorm else TB, renorm, case, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,gran", [("js", "full"), ("reverse_kl", "topk"), ("forward_kl", "sampled")])
def test_head_transforms_bf16(kind, gran, device):
    check_bf16_heads(SMALL_TILES, kind, gran, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_student_head_computes_no_dw(device):
    """A frozen lm_head (LoRA, or requires_grad=False): dH only, and no [V, H] accumulator is allocated."""

    n, hdim, v = 18, 12, 67
    t = {k: x.to(device) for k, x in linear_streams(n, hdim, v).items()}
    y = random_tokens(n, v, mask_frac=0.1).to(device)
    head = dict(scale=1.3, softcap=3.0)


    grads = {}
    for be, dt in ((TB, None), ("reference", torch.float64)):
        h = leaf(t["student_hidden"], dt)
        w, b = t["student_weight"].to(dt or torch.float32), t["student_bias"].to(dt or torch.float32)
        with AllocationRecorder() as trace:
            out = fused_linear_dopd_loss(h, LMHead(w, b, **head), t["teacher_hidden"].to(h.dtype),
                                         t["teacher_weight"].to(h.dtype), t["priv_student_hidden"].to(h.dtype), y,
                                         config=DOPDConfig(top_k=6, topk_renorm=False, trim=0.1), backend=be)
            out.loss.backward()
        grads[str(be)] = (out.loss, h.grad, [shape for _, shape, _, _ in trace.allocs])
    (loss, dh, shapes), (loss64, dh64, _) = grads[str(TB)], grads["reference"]
    assert_close(loss, loss64, rtol=RTOL, what="loss")
    assert_close(dh, dh64, rtol=RTOL, what="dH")
    assert any(s == (n, hdim) for s in shapes), "the trace misses the backward"
    assert (v, hdim) not in shapes, "a [V, H] tensor was allocated for a frozen head"


# -- fp32 precision at large logits (issue 15 point 5) ---------------------------------------------
# log p = (z − hi) − lo from the float64 log-sum-exp's split: the loss keeps fp32 relative precision
# whatever the logits' magnitude. Gradients: Liger's JSD kernel stays within 1.6e-6 of the gradient's
# scale of float64 at logits ~N(0, 40²); on top of that, a full-vocabulary gradient element is allowed
# the fp32 rounding of its own bracket (p_v·(r_v − c), r_v = lp − lq ≈ c ≈ 40 for reverse KL cancel
# where p_v ≈ 1, on every fp32 backend): 4·eps32·p_v·(|r_v| + |c|) per unit of upstream gradient.
# Before the split lse (fp32 log p = z − lse) reverse KL, forward KL and JS all exceeded this.


def _large_logit_case(case: str, n: int = 16, v: int = 200):
    g = torch.Generator().manual_seed(7)
    if case == "N(0,40^2)":
        zs = 40 * torch.randn(n, v, generator=g)
        zt = zs + 20 * torch.randn(n, v, generator=g)
    else:  # spread over ±1e4, offset by 1e4; a few columns shared so the divergences are not all saturated
        zs = (torch.rand(n, v, generator=g) * 2 - 1) * 1e4 + 1e4
        zt = zs + 5e3 * torch.randn(n, v, generator=g)
        zt[:, :20] = zs[:, :20] + torch.randn(n, 20, generator=g)
    return zs, zt, torch.randint(0, v, (n,), generator=g)


def _bracket_rounding(zs: torch.Tensor, zt: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """4·eps32 times the magnitude of the terms of each full-vocabulary gradient element (float64)."""
    lp, lq = torch.log_softmax(zs.double(), 1), torch.log_softmax(zt.double(), 1)
    p, q = lp.exp(), lq.exp()
    if kind == "forward_kl":  # p − q
        return 4 * 2 ** -24 * (p + q)
    r = lp - lq if kind == "reverse_kl" else beta * (lp - torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta)))
    c = (p * r).sum(1, keepdim=True)
    return 4 * 2 ** -24 * p * (r.abs() + c.abs())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["N(0,40^2)", "1e4+-1e4"])
@pytest.mark.parametrize("gran,renorm", [("full", True), ("topk", True), ("topk", False)],
                         ids=["full", "topk-renorm", "topk-tail"])
@pytest.mark.parametrize("kind", DIVS)
def test_large_logits_fp32_precision(kind, gran, renorm, case, device):
    zs, zt, y = to(device, *_large_logit_case(case))
    kw = dict(divergence=kind, granularity=gran, top_k=8, topk_renorm=renorm)
    s, s64 = leaf(zs), leaf(zs, torch.float64)
    out = opd_loss(s, zt, y, backend=TB, **kw)
    ref = opd_loss(s64, zt.double(), y, backend="reference", **kw)
    assert_close(out.loss, ref.loss, rtol=1e-6, atol=0.0, what="loss")
    if kind == "js":  # JS ≤ log 2 (up to the rounding of log 2 to fp32)
        assert float(out.per_token_loss.max()) <= float(torch.tensor(math.log(2), dtype=torch.float32))
    out.loss.backward()
    ref.loss.backward()
    assert torch.isfinite(s.grad).all()
    if case == "N(0,40^2)":
        atol = 1.6e-6 * float(s64.grad.abs().max())
        if gran == "full":  # mean over the tokens: upstream 1/n
            atol = atol + _bracket_rounding(zs, zt, kind) / zs.shape[0]
        err = (s.grad.double() - s64.grad).abs()
        assert bool((err <= atol).all()), f"grad: worst excess {float((err - atol).max()):.3e}"
    # At ±1e4 the bracket terms are ~1e4, and every fp32 backend's gradient carries their rounding
    # (the torch backend's alike); only the loss is held to fp32 precision there.


# -- tile rules, device guard, guards and offsets (issues 16 and 17) -------------------------------


DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
               (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("hdt,wdt", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_tile_rules_for_every_top_k(hdt, wdt, monkeypatch):
    """The CUDA defaults for every K the kernels take: tl.dot operands ≥ 16 in every dimension
    (Triton 3.6 refuses K < 16, fp32 included), K_PAD ≤ BLOCK_V, logits tiles ≥ 128 columns."""
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    v, hdim = 151936, 4096
    linear = [LinearSource(torch.empty(4, hdim, dtype=hdt), torch.empty(v, hdim, dtype=wdt))]
    logits = [LogitsSource(torch.empty(4, v, dtype=hdt))]
    assert TB._topk_width(linear) == (MAX_TOPK // 2 if torch.float32 in (hdt, wdt) else MAX_TOPK)
    for k in [0] + [1 << i for i in range(9)]:  # K_PAD 0 (no top-K), 1 .. MAX_TOPK
        if k <= TB._topk_width(linear):
            for role in ("stats", "tail", "value", "grad", "grad_dw"):
                cfg = TB._config(linear, 65536, k, role=role)
                assert min(cfg.block_n, cfg.block_v, cfg.block_h) >= 16, (k, role, cfg)
                assert cfg.block_v >= k
        for n_topk in (1, 2):
            if k * n_topk <= TB._topk_width(logits):
                cfg = TB._config(logits, 65536, k, n_topk=n_topk)
                assert cfg.block_v >= max(k, 128), (k, cfg)


@pytest.mark.parametrize("device", DEVICES)
def test_two_running_top_ks_beyond_one_launch(device, monkeypatch):
    """DOPD with topk_from="target" keeps two running top-Ks; with fp32 fused-linear tiles two of
    K_PAD = 128 exceed one launch's budget, so the second stream gets a stats launch of its own."""
    t = {k: x.to(device) for k, x in linear_streams(12, 16, 150).items()}
    y = random_tokens(12, 150).to(device)
    assert 2 * 128 > TB._topk_width([LinearSource(t["student_hidden"], t["student_weight"])])
    launched = _record_launches(monkeypatch)
    fused_dopd_pair(t, y, DOPDConfig(top_k=100, topk_from="target", topk_renorm=False, trim=0.1))
    assert [name for name, _ in launched].count("stats_kernel") == 2


def test_top_k_above_the_kernel_maximum_runs_on_torch(monkeypatch):
    """top_k > MAX_TOPK (the API accepts any K ≥ 1): the call runs on the torch backend, correctly."""
    zs, zt, zp = correlated_logits(6, MAX_TOPK + 60)
    y = random_tokens(6, MAX_TOPK + 60)
    calls = []
    monkeypatch.setattr(TritonBackend, "stats_pass", lambda *a, **k: calls.append(1))
    compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=MAX_TOPK + 1, trim=0.0))
    s = leaf(zs)
    out = opd_loss(s, zt, y, divergence="reverse_kl", granularity="topk", top_k=MAX_TOPK + 20, backend=TB)
    ref = opd_loss(zs.double(), zt.double(), y, divergence="reverse_kl", granularity="topk", top_k=MAX_TOPK + 20,
                   backend="reference")
    assert_close(out.loss, ref.loss, rtol=RTOL, what="loss")
    assert not calls, "a Triton stats pass ran with a top-K above MAX_TOPK"


def test_every_launch_runs_under_a_guard_of_its_inputs_device(monkeypatch):
    """Triton launches on the current device: each kernel launch must be inside a device guard of
    its inputs' device. Mocked: the guard records the device it makes current, the launches check it."""
    import contextlib

    current = []
    launched = []

    @contextlib.contextmanager
    def guard(device):
        current.append(device)
        yield
        current.pop()

    real_run = TritonBackend._run

    def run(kernel, grid, device, *args, **kw):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        with guard(device):
            assert current and all(t.device == current[-1] for t in tensors)
            launched.append(kernel)
            orig_guard = triton_backend.device_guard
            monkeypatch.setattr(triton_backend, "device_guard", lambda d: contextlib.nullcontext())
            try:
                real_run(kernel, grid, device, *args, **kw)
            finally:
                monkeypatch.setattr(triton_backend, "device_guard", orig_guard)

    monkeypatch.setattr(TritonBackend, "_run", staticmethod(run))
    t = linear_streams(10, 16, 40)
    y = random_tokens(10, 40)
    h = leaf(t["student_hidden"])
    out = fused_linear_dopd_loss(h, t["student_weight"], t["teacher_hidden"], t["teacher_weight"],
                                 t["priv_student_hidden"], y, config=DOPDConfig(top_k=4, topk_renorm=False), backend=TB)
    out.loss.backward()
    assert len({k.fn.__name__ if hasattr(k, "fn") else str(k) for k in launched}) >= 4


def test_device_guard_makes_a_cuda_device_current(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with triton_backend.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with triton_backend.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("device", DEVICES)
def test_dense_gradient_with_an_overflowing_coefficient_has_no_nan(device):
    """KIND 3 (p · dense): a dense coefficient beyond fp32 range meets p = 0 at padding columns and
    underflowed columns; the tile must give 0 there, not 0·inf = NaN."""
    n, v, vv = 6, 40, 33
    z = torch.randn(n, v, device=device)
    z[:, 5] = -200.0  # p underflows to 0 in a valid column too
    src = LogitsSource(z, valid_vocab=vv)
    rows = torch.arange(n, device=device)
    lse = torch.logsumexp(z[:, :vv].double(), 1)
    sink = Grads(logits=torch.zeros_like(z))
    coef = torch.full((n,), 1e39, dtype=torch.float64, device=device)  # inf in fp32
    TB._grad_tiles(src, src, rows, lse, lse, coef, torch.ones(n, dtype=torch.float64, device=device),
                   TB._div.DENSE, 0.5, sink)
    g = sink.logits
    assert not torch.isnan(g).any()
    assert (g[:, vv:] == 0).all() and (g[:, 5] == 0).all()
    assert torch.isinf(g[:, :5]).all()  # p > 0: p · inf


def test_topk_output_offsets_are_int64():
    """The second top-K stream's offsets (slot · n · K + row · K + j) at 9M rows and K = 256 pass
    2^31; computed by the stats kernel's own helper in an interpreted probe kernel."""
    n_rows, top_k, base = 9_000_000, 256, 8_999_990
    out = torch.empty(16, 4, dtype=torch.int64, device="cuda" if CUDA else "cpu")
    _topk_offsets_probe[(1,)](out, 1, n_rows, top_k, base, BLOCK_N=16, K_PAD=4)
    want = torch.tensor([[(n_rows + base + i) * top_k + j for j in range(4)] for i in range(16)])
    assert torch.equal(out.cpu(), want)


# -- determinism (issue 17 point 4) ----------------------------------------------------------------


def _record_launches(monkeypatch):
    launched = []
    real_run = TritonBackend._run

    def run(kernel, grid, device, *args, **kw):
        launched.append((getattr(kernel, "fn", kernel).__name__, {k: v for k, v in kw.items() if k.startswith("NEED")}))
        real_run(kernel, grid, device, *args, **kw)

    monkeypatch.setattr(TritonBackend, "_run", staticmethod(run))
    return launched


def _fused_dopd_grads(backend, t, y, cfg):
    h, w, b = (leaf(t[k]) for k in ("student_hidden", "student_weight", "student_bias"))
    out = fused_linear_dopd_loss(h, LMHead(w, b, 1.2, 4.0), t["teacher_hidden"], t["teacher_weight"],
                                 t["priv_student_hidden"], y, config=cfg, backend=backend)
    out.loss.backward()
    return out, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("via", ["constructor", "torch-flag"])
def test_deterministic_mode_avoids_atomics_and_repeats_bitwise(via, monkeypatch):
    """Deterministic dW / db: the vocabulary-major `grad_dw_kernel` (full and tail-bucket rows) and
    the column-sorted `sparse_dw_kernel` (renormalized top-K rows) run, no kernel with float atomics
    gets dW / db, two runs agree bitwise, and both agree with float64. (The interpreter runs atomics
    in order, so bitwise repeatability alone could not tell the modes apart: hence the launch check.)"""
    t = linear_streams(20, 16, 60)
    y = random_tokens(20, 60, mask_frac=0.1)
    if via == "constructor":
        backend = TritonBackend(block_n=16, block_v=32, block_h=16, vocab_splits=3, deterministic=True)
    else:
        backend = SMALL_TILES
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    launched = _record_launches(monkeypatch)
    t64 = {k: v.double() for k, v in t.items()}
    for renorm in (False, True):
        cfg = DOPDConfig(top_k=6, topk_renorm=renorm, trim=0.1)
        out1, g1 = _fused_dopd_grads(backend, t, y, cfg)
        out2, g2 = _fused_dopd_grads(backend, t, y, cfg)
        assert len(set(out1.regime[y != IGNORE].tolist())) >= 3
        for a, b in zip(g1, g2):
            assert torch.equal(a, b)
        ref, g64 = _fused_dopd_grads("reference", t64, y, cfg)
        assert_close(out1.loss, ref.loss, rtol=RTOL, what="loss")
        for a, e, name in zip(g1, g64, ("dH", "dW", "db")):
            assert_close(a, e, rtol=RTOL, what=name)
    names = {name for name, _ in launched}
    assert {"grad_dw_kernel", "sparse_dw_kernel"} <= names, names
    for name, needs in launched:  # no kernel with float atomics ran with dW / db
        if name in ("grad_kernel", "sparse_grad_kernel"):
            assert not needs["NEED_DW"] and not needs["NEED_DB"], (name, needs)
