"""The compiled `cpp` backend (csrc/, C++/OpenMP) against the float64 `reference` backend, and the
`cuda` backend's availability contract.

Same judgement as tests/test_torch_backend.py (whose comparison helpers are reused): fp32 to ~1e-5
relative; bf16 judged like Cut Cross-Entropy, error vs the float64 truth not above a naive
materialized bf16 computation's by more than a small margin. Every case runs with the default tiles
and with tiny tiles (3 rows × 7 columns) so that block boundaries, partial blocks and multi-chunk
rows are exercised. The extension is built (or loaded from its cache) once per session.
"""

from __future__ import annotations

import os

import pytest
import torch

import naive_reference as nv
from conftest import IGNORE, assert_close, correlated_logits, distinct_logits, leaf, linear_streams, random_tokens
from dopd_kernels import DOPDConfig, LMHead, Regime, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss
from hardening_checks import (CORRUPTIONS, PRECISION_CASES, check_double_backward_raises, check_dopd_large_logits,
                              check_large_logits, check_nonfinite_fused_linear, check_nonfinite_opd,
                              check_nonfinite_routing)
from head_transform_checks import HEAD_CASES, check_bf16_heads, check_dopd_heads, check_opd_heads
from dopd_kernels.backends import available_backends, resolve_backend
from test_torch_backend import (DIVS, GRAN_IDS, GRANS, RTOL, _err, check_fused_linear_dopd_bf16, compare_dopd,
                               compare_fused_linear_opd, compare_opd, fused_dopd_pair)

TILES = [(2048, 1024), (3, 7)]
TILE_IDS = ["default-tiles", "tiles-3x7"]


def _cpp(row_chunk=2048, vocab_chunk=1024):
    from dopd_kernels.backends.compiled import CppBackend

    try:
        return CppBackend(row_chunk, vocab_chunk)
    except RuntimeError as e:
        if os.environ.get("DOPD_KERNELS_NO_BUILD", "0") not in ("", "0"):
            pytest.skip(f"compiled extension disabled: {e}")
        raise


@pytest.fixture(scope="module", params=TILES, ids=TILE_IDS)
def cpp(request):
    return _cpp(*request.param)


# -- the tail-bucket pass ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode,dtype", [("logits", torch.float32), ("logits", torch.bfloat16),
                                        ("linear", torch.float32), ("linear", torch.bfloat16)])
def test_rest_logsumexp_matches_float64(mode, dtype, cpp):
    """log Σ exp over the valid columns outside each row's explicit ones, summed directly, against a
    float64 computation on the same (rounded) inputs: padded columns past `valid_vocab`, masked rows
    skipped, and -1 entries (another shard's columns) ignored."""
    from dopd_kernels.sources import LinearSource, LogitsSource

    n, v, h, vv, k = 9, 41, 12, 37, 5
    rows = torch.tensor([0, 2, 3, 5, 6, 8])
    cols = torch.stack([torch.randperm(vv)[:k] for _ in rows])
    cols[1, 2] = -1
    cols[4, :] = -1
    if mode == "logits":
        x = (2 * torch.randn(n, v)).to(dtype)
        src, z = LogitsSource(x, 0.8, vv), x.double() / 0.8
    else:
        hid, w, b = (torch.randn(n, h).to(dtype), (torch.randn(v, h) / 2).to(dtype), torch.randn(v).to(dtype))
        src, z = LinearSource(hid, w, b, 0.8, vv), (hid.double() @ w.double().T + b.double()) / 0.8
    want = z[rows, :vv].clone()
    for i in range(rows.shape[0]):
        mine = cols[i][cols[i] >= 0]
        want[i, mine] = float("-inf")
    want = torch.logsumexp(want, dim=1)
    got = cpp.rest_logsumexp(src, rows, cols)
    assert got.dtype == torch.float64  # (max, log-sum) added in float64, as the stats pass does
    assert_close(got.double(), want, rtol=1e-5, atol=1e-5, what=f"rest log-sum-exp ({mode}, {dtype})")


# -- selection -------------------------------------------------------------------------------------


def test_cpp_is_available_and_auto_on_cpu(cpp):
    assert "cpp" in available_backends()
    assert resolve_backend("auto", torch.device("cpu")).name == "cpp"
    assert not cpp.supports(torch.device("cuda"))


def test_cuda_backend_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: see test_cuda_matches_reference")
    assert "cuda" not in available_backends()
    with pytest.raises(RuntimeError, match="CUDA"):
        dopd_loss(*correlated_logits(4, 9), torch.zeros(4, dtype=torch.long), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_reference():
    zs, zt, zp = (z.cuda() for z in correlated_logits(48, 300, noise=(0.8, 1.5)))
    y = random_tokens(48, 300).cuda()
    cfg = DOPDConfig(top_k=16, topk_renorm=False, temperature=0.9)
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend="cuda")
    out.loss.backward()
    s64 = leaf(zs.cpu(), torch.float64)
    ref = dopd_loss(s64, zt.cpu().double(), zp.cpu().double(), y.cpu(), config=cfg, backend="reference")
    ref.loss.backward()
    assert torch.equal(out.regime.cpu(), ref.regime)
    assert_close(out.per_token_loss.cpu(), ref.per_token_loss, rtol=1e-4, what="per-token loss")
    assert_close(s.grad.cpu(), s64.grad, rtol=1e-4, what="grad")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("kind", DIVS)
def test_cuda_mixed_dtypes_heads_and_precision(kind):
    """The CUDA paths only compile-checked on CPU machines (issues 11, 15.5, 17.3, 17.5): a bf16 student
    with an fp32 teacher in the full-vocabulary passes, head transforms in the fused-linear epilogue, and
    fp32 precision at logits ~N(0, 40²)."""
    zs, zt = correlated_logits(32, 300, n_streams=2, noise=1.2)
    y = random_tokens(32, 300)
    s = leaf(zs.to("cuda", torch.bfloat16))
    out = opd_loss(s, zt.cuda(), y.cuda(), divergence=kind, granularity="full", backend="cuda")
    out.loss.backward()
    s64 = leaf(zs.bfloat16(), torch.float64)
    ref = opd_loss(s64, zt.double(), y, divergence=kind, granularity="full", backend="reference")
    ref.loss.backward()
    assert_close(out.per_token_loss.cpu(), ref.per_token_loss, rtol=1e-4, what="per-token loss (fp32 statistics)")
    assert_close(s.grad.cpu(), s64.grad, rtol=2 ** -7, atol=2e-3 * float(s64.grad.abs().max()), what="grad (bf16)")
    for gran in ("full", "topk", "sampled"):
        check_opd_heads("cuda", kind, gran, device="cuda", rtol=1e-4)
        check_large_logits("cuda", "normal-40", kind, gran, device="cuda")
    check_bf16_heads("cuda", kind, "full", device="cuda")


# -- logits mode -----------------------------------------------------------------------------------


def opd_rtol(kind, gran):
    """Forward KL / JS over the sampled buckets {y, rest} can be ~1e-7 per token: a value that small is
    dominated by the fp32 rounding of the stored log-sum-exp and sampled logit (any fp32 backend)."""
    return 5e-5 if gran == "sampled" and kind != "reverse_kl" else RTOL


@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_opd_logits_fp32(kind, gran, renorm, source, cpp):
    zs, zt = correlated_logits((3, 10), 37, n_streams=2, noise=1.2)
    y = random_tokens((3, 10), 37)
    compare_opd(zs, zt, y, cpp, rtol=opd_rtol(kind, gran), divergence=kind, granularity=gran, top_k=9,
                topk_renorm=renorm, topk_from=source, js_beta=0.4, temperature=0.8)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("source", ["student", "target"])
def test_dopd_logits_fp32(source, renorm, temperature, cpp):
    zs, zt, zp = correlated_logits((4, 13), 37, noise=(0.8, 1.5))
    y = random_tokens((4, 13), 37)
    cfg = DOPDConfig(top_k=8, topk_from=source, topk_renorm=renorm, temperature=temperature, trim=0.1,
                     reduction="seq_mean")
    # The tail bucket's mass 1 − Σ_K p is an fp32 cancellation when the top-K holds nearly all of it
    # (target top-K at τ = 0.7 over 37 columns): relative error ~1e-4 for any fp32 implementation.
    out, _ = compare_dopd(zs, zt, zp, y, cfg, cpp, rtol=RTOL if renorm else 1e-4)
    assert len(set(out.regime[y != IGNORE].tolist())) >= 3


def test_dopd_reduction_none_with_per_token_weights(cpp):
    zs, zt, zp = correlated_logits((3, 11), 23)
    y = random_tokens((3, 11), 23)
    compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=5, reduction="none"), cpp, upstream=torch.randn(3, 11))


@pytest.mark.parametrize("n,v,k", [(1, 37, 8), (2, 1, 4), (7, 5, 5), (7, 5, 64), (16, 61, 61), (5, 1025, 16)],
                         ids=["N=1", "V=1", "K=V", "K>V", "V=61,K=V", "V=block+1"])
@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_odd_sizes(n, v, k, renorm, cpp):
    zs, zt, zp = correlated_logits(n, v, noise=(0.8, 1.5))
    y = random_tokens(n, v, mask_frac=0.1)
    compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=k, topk_renorm=renorm), cpp)


@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_valid_vocab_padding(renorm, cpp):
    v, vv = 40, 33
    zs, zt, zp = correlated_logits(24, v, noise=(0.8, 1.5))
    zs[:, vv:] = 50.0  # padding must be ignored whatever it holds
    y = random_tokens(24, vv)
    out, _ = compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=6, topk_renorm=renorm, valid_vocab=vv, temperature=1.3), cpp)


@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_neg_inf_logits_and_k_above_finite_count(renorm, cpp):
    """-inf logits inside the vocabulary (masked tokens): a top-K larger than a row's finite count still
    yields K columns; the -inf ones carry no mass in any stream, so which of them is picked is moot."""
    zs, zt, zp = correlated_logits(10, 19, noise=(0.8, 1.5))
    masked = torch.rand(10, 19) < 0.5
    masked[:, 0] = False
    for z in (zs, zt, zp):
        z[masked] = float("-inf")
    y = torch.zeros(10, dtype=torch.long)
    cfg, th = DOPDConfig(top_k=15, topk_renorm=renorm), (1e9, -1.0, -1.0)
    if renorm:
        compare_dopd(zs, zt, zp, y, cfg, cpp, thresholds=th)
        return
    # With a tail bucket the reference's autograd gives NaN here (log-sum-exp over an all -inf
    # remainder): compare values, and require a finite gradient.
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=cpp, thresholds=th)
    out.loss.backward()
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=cfg, backend="reference", thresholds=th)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=RTOL, what="per-token loss")
    assert torch.isfinite(s.grad).all()


def _regime_inputs(n=30, v=41):
    zs, zt, zp = correlated_logits(n, v, noise=(0.8, 1.5))
    y = random_tokens(n, v, mask_frac=0.1)
    return zs, zt, zp, y


@pytest.mark.parametrize("regime", ["LH", "LL", "HT", "HS"])
def test_dopd_each_regime_alone(regime, cpp):
    zs, zt, zp, y = _regime_inputs()
    valid = y != IGNORE
    rows = valid.nonzero()[:, 0]
    if regime in ("LH", "LL"):  # every gap below Ā; summed confidence above (LH) or below (LL) the bar
        thresholds = (1e9, -1.0, -1.0) if regime == "LH" else (1e9, 1.0, 1.0)
    else:  # every gap at or above Ā = 0; the sampled token favours the teacher (HT) or the priv student (HS)
        thresholds = (0.0, 0.0, 0.0)
        zp = zt.clone()
        zp[rows, y[rows]] += -2.0 if regime == "HT" else 2.0
    out, _ = compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=7, topk_renorm=False), cpp, thresholds=thresholds)
    assert set(out.regime[valid].tolist()) == {int(Regime[regime])}


def test_dopd_every_regime_present(cpp):
    zs, zt, zp = correlated_logits(64, 53, noise=(0.8, 1.5))
    y = random_tokens(64, 53)
    out, _ = compare_dopd(zs, zt, zp, y, DOPDConfig(top_k=8, trim=0.1), cpp)
    assert set(out.regime[y != IGNORE].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("kind", DIVS)
def test_extreme_logits_no_nan(kind, cpp):
    n, v = 12, 29
    zs, zt, zp = correlated_logits(n, v, noise=(0.8, 1.5))
    offsets = torch.arange(v) * 0.5  # distinct spikes: a top-K set must not hinge on a tie
    for z in (zs, zt, zp):  # ±1e4 spikes: near one-hot rows and probabilities that underflow to 0
        hi, lo = torch.rand(n, v) < 0.15, torch.rand(n, v) < 0.15
        z[hi] = (1e4 - offsets).expand(n, v)[hi]
        z[lo & ~hi] = -1e4
    y = random_tokens(n, v, mask_frac=0.1)
    for renorm in (True, False):
        cfg = DOPDConfig(top_k=5, topk_renorm=renorm)
        s = leaf(zs)
        out = dopd_loss(s, zt, zp, y, config=cfg, backend=cpp)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(out.per_token_loss).all() and torch.isfinite(s.grad).all()
        s64 = leaf(zs, torch.float64)
        ref = dopd_loss(s64, zt.double(), zp.double(), y, config=cfg, backend="reference")
        ref.loss.backward()
        # Logits of magnitude 1e4 carry an fp32 rounding of ~1e-3 in every log-prob: compare loosely,
        # on the rows routed alike (a regime may flip on such rounding).
        same = out.regime == ref.regime
        assert_close(out.per_token_loss[same], ref.per_token_loss[same], rtol=1e-2, what="per-token loss")
        if bool(same.all()):  # the gradient's error: no worse than the fp32 torch backend's
            st = leaf(zs)
            dopd_loss(st, zt, zp, y, config=cfg, backend="torch").loss.backward()
            scale = float(s64.grad.abs().max())
            assert _err(s.grad, s64.grad) <= 2 * _err(st.grad, s64.grad) + 1e-3 * scale
    s = leaf(zs)
    o = opd_loss(s, zt, y, divergence=kind, granularity="full", backend=cpp)
    o.loss.backward()
    assert torch.isfinite(o.loss) and torch.isfinite(s.grad).all()


# -- fused-linear mode -----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("priv_weight", [False, True], ids=["priv-weight-default", "priv-weight-own"])
@pytest.mark.parametrize("renorm", [True, False])
def test_fused_linear_dopd_fp32(renorm, priv_weight, bias, cpp):
    t = linear_streams((5, 9), 13, 41, bias=bias)  # H not a multiple of 16
    y = random_tokens((5, 9), 41)
    fused_dopd_pair(t, y, DOPDConfig(top_k=6, topk_renorm=renorm, temperature=1.2), cpp, priv_weight=priv_weight)


def test_fused_linear_dopd_teacher_hidden_size_differs(cpp):
    t = linear_streams(33, 12, 29, teacher_hidden=20)
    fused_dopd_pair(t, random_tokens(33, 29), DOPDConfig(top_k=5), cpp)


@pytest.mark.parametrize("n,v,h,k", [(1, 37, 7, 8), (6, 1025, 17, 16), (7, 5, 3, 64)], ids=["N=1", "V=block+1", "K>V"])
def test_fused_linear_dopd_odd_sizes(n, v, h, k, cpp):
    t = linear_streams(n, h, v)
    fused_dopd_pair(t, random_tokens(n, v, mask_frac=0.1), DOPDConfig(top_k=k, topk_renorm=False), cpp)


def test_fused_linear_dopd_valid_vocab_and_ignore(cpp):
    t = linear_streams((3, 8), 10, 30)
    y = random_tokens((3, 8), 26, mask_frac=0.4)
    fused_dopd_pair(t, y, DOPDConfig(top_k=5, valid_vocab=26, topk_renorm=False, temperature=0.8), cpp)


@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_fused_linear_opd_fp32(kind, gran, renorm, source, cpp):
    compare_fused_linear_opd(linear_streams(21, 9, 31), random_tokens(21, 31), cpp, rtol=opd_rtol(kind, gran),
                             divergence=kind, granularity=gran, top_k=5, topk_renorm=renorm, topk_from=source,
                             temperature=0.9)


# -- bf16 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_bf16_vs_naive_bf16(renorm, cpp):
    v = 53
    zs, zt, zp = distinct_logits(40, v, noise=(0.8, 1.5))
    y = random_tokens(40, v)
    cfg = DOPDConfig(top_k=8, topk_renorm=renorm, trim=0.1)
    s = leaf(zs)
    out = dopd_loss(s, zt, zp, y, config=cfg, backend=cpp)
    out.loss.backward()
    assert s.grad.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    s64 = leaf(zs, torch.float64)
    per64, regime64, *_ = nv.dopd(s64, zt, zp, y, k=8, renorm=renorm, trim=0.1)
    loss64 = nv.reduce(per64, y, "mean")
    loss64.backward()
    assert out.regime.tolist() == regime64
    s16 = leaf(zs)
    per16, *_ = nv.dopd(s16, zt, zp, y, k=8, renorm=renorm, trim=0.1, dtype=torch.bfloat16,
                        thresholds=tuple(float(x) for x in out.thresholds))
    loss16 = nv.reduce(per16, y, "mean")
    loss16.backward()
    assert _err(out.loss, loss64) <= _err(loss16, loss64) + 1e-6
    assert_close(out.per_token_loss, per64, rtol=1e-4, what="per-token loss (fp32 statistics)")
    gscale = float(s64.grad.abs().max())
    assert _err(s.grad, s64.grad) <= _err(s16.grad, s64.grad) + 1e-3 * gscale
    assert_close(s.grad, s64.grad, rtol=2 ** -7, atol=1e-4 * gscale, what="grad (bf16 storage)")


@pytest.mark.parametrize("renorm", [True, False])
def test_fused_linear_dopd_bf16(renorm, cpp):
    check_fused_linear_dopd_bf16(cpp, renorm, v=45, hdim=13, k=6)


# -- the header's regime selection against the library's routing ----------------------------------


def test_header_regimes_match_routing(cpp):
    from dopd_kernels._build import load_extension
    from dopd_kernels.routing import assign_regimes, batch_thresholds

    n = 500
    adv, qt, qp = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    qt[:50] = qp[:50]  # ties of q_T and q_P
    valid = torch.rand(n) < 0.9
    th = batch_thresholds(adv, qt, qp, valid, 0.05)
    adv[50:60] = th.adv_gap  # ties with Ā
    got = load_extension("cpu").assign_regimes(adv, qt, qp, valid, *(float(x) for x in th))
    assert torch.equal(got, assign_regimes(adv, qt, qp, valid, th))


# -- output-head transforms (issue 11) ---------------------------------------------------------------
# The shared checks of head_transform_checks.py: LMHead scale / soft-cap per stream, applied in the
# kernels' tile epilogue (stats, value, tail, gather) and chained through their jacobian in the
# gradient passes (dense tiles and the sparse top-K contraction), against the float64 reference.


@pytest.mark.parametrize("gran,renorm,source", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_opd_heads_fp32(kind, gran, renorm, source, cpp):
    check_opd_heads(cpp, kind, gran, renorm, source)


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
@pytest.mark.parametrize("renorm", [True, False])
def test_dopd_heads_fp32(renorm, case, cpp):
    check_dopd_heads(cpp, renorm, case)


@pytest.mark.parametrize("kind,gran", [("js", "full"), ("reverse_kl", "topk"), ("forward_kl", "sampled")])
def test_opd_heads_bf16(kind, gran, cpp):
    check_bf16_heads(cpp, kind, gran)


@pytest.mark.parametrize("gran,renorm", [("full", True), ("topk", True), ("topk", False)],
                         ids=["full", "topk-renorm", "topk-tail"])
def test_frozen_student_head(gran, renorm, cpp):
    """A frozen lm_head (LoRA / requires_grad=False): dH exact, no weight or bias gradient."""
    t = linear_streams(23, 10, 31)
    y = random_tokens(23, 31)
    kw = dict(divergence="js", granularity=gran, top_k=5, topk_renorm=renorm, temperature=0.9)
    grads = []
    for be, dt in ((cpp, torch.float32), ("reference", torch.float64)):
        h = leaf(t["student_hidden"], dt)
        w, b = t["student_weight"].to(dt), t["student_bias"].to(dt)  # frozen
        out = fused_linear_opd_loss(h, LMHead(w, b, 1.4, 3.0), t["teacher_hidden"].to(dt),
                                    LMHead(t["teacher_weight"].to(dt), t["teacher_bias"].to(dt), 0.8, None), y,
                                    backend=be, **kw)
        out.loss.backward()
        assert w.grad is None and b.grad is None
        grads.append(h.grad)
    assert_close(grads[0], grads[1], rtol=RTOL, what="dH with a frozen head")


# -- issue 15: fp32 precision at large logits, non-finite values, double backward --------------------
# The shared checks of hardening_checks.py. In the kernels: the stats pass returns (max, log-sum), added
# in float64; log-probabilities are (z − hi) − lo with the float64 log-sum-exp split in two fp32
# numbers; per-row divergence sums run in float64.


@pytest.mark.parametrize("gran", ["full", "topk", "sampled"])
@pytest.mark.parametrize("kind", DIVS)
@pytest.mark.parametrize("case", PRECISION_CASES)
def test_large_logits_fp32(case, kind, gran, cpp):
    check_large_logits(cpp, case, kind, gran)


def test_dopd_large_logits_fp32(cpp):
    check_dopd_large_logits(cpp)


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("stream", [0, 1, 2], ids=["student", "teacher", "priv"])
def test_nonfinite_routing(stream, how, cpp):
    check_nonfinite_routing(cpp, stream, how)


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("stream", [0, 1], ids=["student", "teacher"])
@pytest.mark.parametrize("gran", ["full", "topk", "sampled"])
@pytest.mark.parametrize("kind", DIVS)
def test_nonfinite_opd(kind, gran, stream, how, cpp):
    check_nonfinite_opd(cpp, kind, gran, stream, how)


def test_nonfinite_fused_linear(cpp):
    check_nonfinite_fused_linear(cpp)


def test_double_backward_raises(cpp):
    check_double_backward_raises(cpp)


# -- strides and layouts (issue 15 point 2) -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gran,renorm", [("full", True), ("topk", True), ("topk", False), ("sampled", True)],
                         ids=["full", "topk-renorm", "topk-tail", "sampled"])
def test_transposed_logits(gran, renorm, dtype, cpp):
    """`x.T`-style logits (column stride ≠ 1) forward and backward; the gradient has the input's layout."""
    n, v = 17, 43
    zs, zt = (z.T.contiguous().T for z in distinct_logits(n, v, n_streams=2, noise=1.2, dtype=dtype))  # no top-K ties
    assert zs.stride(1) != 1
    y = random_tokens(n, v)
    s = zs.detach().requires_grad_(True)
    out = opd_loss(s, zt, y, divergence="js", granularity=gran, top_k=6, topk_renorm=renorm, backend=cpp)
    out.loss.backward()
    s64 = leaf(zs, torch.float64)
    ref = opd_loss(s64, zt.double(), y, divergence="js", granularity=gran, top_k=6, topk_renorm=renorm,
                   backend="reference")
    ref.loss.backward()
    rtol = RTOL if dtype == torch.float32 else 2 ** -7
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=RTOL if dtype == torch.float32 else 1e-4, what="loss")
    assert_close(s.grad, s64.grad, rtol=rtol, what="grad")


@pytest.mark.parametrize("gran,renorm", [("full", True), ("topk", True), ("topk", False)],
                         ids=["full", "topk-renorm", "topk-tail"])
def test_fused_linear_strided_weight_and_hidden(gran, renorm, cpp):
    """A weight passed as `W.T` of an [H, V] tensor, non-contiguous hidden states and bias, with head
    transforms: every pass reads them through their strides."""
    t = linear_streams(21, 9, 37)
    y = random_tokens(21, 37)
    strided = {k: (x.T.contiguous().T if x.dim() == 2 else torch.stack([x, x], 1)[:, 0]) for k, x in t.items()}
    assert not any(x.is_contiguous() for x in strided.values())
    kw = dict(divergence="reverse_kl", granularity=gran, top_k=5, topk_renorm=renorm, temperature=0.9)
    results = []
    for be, src, dt in ((cpp, strided, torch.float32), ("reference", t, torch.float64)):
        h, w, b = (src[k].detach().to(dt).requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
        out = fused_linear_opd_loss(h, LMHead(w, b, 1.3, 4.0), src["teacher_hidden"].to(dt),
                                    LMHead(src["teacher_weight"].to(dt), src["teacher_bias"].to(dt)), y, backend=be, **kw)
        out.loss.backward()
        results.append((out.per_token_loss, h.grad, w.grad, b.grad))
    for name, a, e in zip(("loss", "dH", "dW", "db"), *results):
        assert_close(a, e, rtol=RTOL, what=name)
