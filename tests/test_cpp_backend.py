"""What is specific to the compiled backends: the `cpp` extension's pass-level tail kernel, its selection
as `backend="auto"` on CPU, the header's regime selection against the library's routing, and the `cuda`
backend's availability contract and GPU-only paths. The DOPD/OPD matrix against the float64 `reference`
(values, regimes, gradients, dtypes, odd sizes, head transforms, large logits, non-finite values, strides)
runs for `cpp` (default and 3 × 7 tiles) and, on a GPU, `cuda` in tests/test_backend_conformance.py.
The extension is built (or loaded from its cache) once per session.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, correlated_logits, leaf, random_tokens
from dopd_kernels import DOPDConfig, dopd_loss, opd_loss
from dopd_kernels.backends import available_backends, resolve_backend
from hardening_checks import check_large_logits
from head_transform_checks import check_bf16_heads, check_opd_heads
from test_backend_conformance import DIVS, _cpp

TILES = [(2048, 1024), (3, 7)]
TILE_IDS = ["default-tiles", "tiles-3x7"]


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

@pytest.mark.parametrize("mode,dtype", [("logits", torch.float32), ("logits", torch.bfloat16),
                                        ("linear", torch.float32), ("linear", torch.bfloat16)])
def test_stats_pass_sums_the_sampled_tail_in_its_sweep(mode, dtype, cpp):
    """The sampled token's tail bucket (every valid column but y), which the stats pass sums beside the
    log-sum-exp and top-K, against float64 on the same (rounded) inputs: tokens in the first and last
    column, in a partial last block and past `valid_vocab` (nothing left out); a token holding nearly
    all the mass (the tail summed directly, not as lse + log(1 − p_y)); a row with a NaN logit off the
    token (NaN) and one whose only NaN is the token's (left out: finite). The log-sum-exp and top-K
    equal those of a stats pass without tails."""
    from dopd_kernels.sources import LinearSource, LogitsSource

    n, v, h, vv, k = 9, 41, 12, 37, 4
    rows = torch.tensor([0, 1, 2, 3, 5, 6, 8])
    tokens = torch.tensor([0, vv - 1, 35, 39, 7, 20, 11])
    if mode == "logits":
        x = 2 * torch.randn(n, v)
        x[5, 7] = 60.0  # row 5's token holds all but ~e-50 of the mass
        x[6, 3], x[8, 11] = float("nan"), float("nan")
        x = x.to(dtype)
        src, z = LogitsSource(x, 0.8, vv), x.double() / 0.8
    else:
        hid, w = torch.randn(n, h), torch.randn(v, h) / 2
        w[7] = hid[5] * (40.0 / hid[5].norm() ** 2)  # row 5's logit at its token is 40
        hid[6, 0] = float("nan")  # every logit of row 6 is NaN
        hid, w, b = hid.to(dtype), w.to(dtype), torch.randn(v).to(dtype)
        src, z = LinearSource(hid, w, b, 0.8, vv), (hid.double() @ w.double().T + b.double()) / 0.8
    want = z[rows, :vv].clone()
    inside = tokens < vv
    want[inside.nonzero()[:, 0], tokens[inside]] = float("-inf")
    want = torch.logsumexp(want, dim=1)
    stats = cpp.stats_pass([src], rows, tokens, (0,), k, rest_streams=(0,))
    plain = cpp.stats_pass([src], rows, tokens, (0,), k)
    assert plain.rest_lse == {} and torch.equal(stats.topk[0], plain.topk[0])
    torch.testing.assert_close(stats.lse[0], plain.lse[0], rtol=0, atol=0, equal_nan=True)
    got = stats.rest_lse[0]
    assert got.dtype == torch.float64
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    ok = ~want.isnan()
    assert_close(got[ok], want[ok], rtol=1e-5, atol=1e-5, what=f"stats-pass tail ({mode}, {dtype})")
    assert want[4] - z[5, 7] < -30  # the confident row's tail really is far below its token


# -- full_pass: one pass over a row that fits a tile, online statistics for a wider one ----------------


def check_repeats_on_two_threads(t: dict, y: torch.Tensor, backend, kind: str) -> None:
    """Full-vocabulary fused-linear OPD on streams `t` (biases when `t` has them) twice with two threads:
    bitwise the same per-token loss, dH and dW."""
    from dopd_kernels import fused_linear_opd_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(2):
            h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
            out = fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, divergence=kind,
                                        granularity="full", student_bias=t.get("student_bias"),
                                        teacher_bias=t.get("teacher_bias"), backend=backend)
            out.loss.backward()
            runs.append((out.per_token_loss, h.grad, w.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", DIVS)
def test_full_pass_repeats_bitwise_on_two_threads(kind, cpp):
    """Full-vocabulary OPD (the engine runs no stats pass, so `full_pass` computes the log-sum-exps too) gives
    bitwise the same loss and gradients call after call with two threads: every row's sums run in one thread
    in a fixed order, and the dH/dW contractions are the same GEMMs in the same order. V = 37 fits the
    default tile (one sweep) and spans six 7-column blocks (the online sweeps)."""
    from conftest import linear_streams

    check_repeats_on_two_threads(linear_streams(40, 12, 37), random_tokens(40, 37), cpp, kind)


@pytest.mark.parametrize("vocab_chunk", [512, 2048], ids=["tiles", "one-sweep"])
def test_skipping_repeats_bitwise_on_two_threads(vocab_chunk):
    """With negligible blocks skipped (peaked inputs), loss and gradients repeat bitwise on two threads: each
    row decides its blocks alone from its own float64 sums, and the kept rows of each block are gathered and
    contracted in row order. V = 2048 in four 512-column tiles (grad_pass) or one (full_pass)."""
    from test_tile_skipping import peaked_streams  # the skip report's inputs (its module sets up the import)

    backend = _cpp(8, vocab_chunk)
    check_repeats_on_two_threads(peaked_streams(24, 256, 2048), random_tokens(24, 2048), backend, "js")
    assert backend.skip_counter.fraction > 0.2  # 8 candidates over 8 blocks per row: many blocks hold one


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


def test_cuda_hands_a_top_k_past_its_sort_to_torch():
    """The CUDA stats kernel keeps at most the extension's MAX_TOPK (1024) entries per row and refused a
    larger K at launch ("invalid argument") while the API accepts any K ≥ 1: `select` hands such calls
    to the torch backend, as the triton backend does past its own limit (issue 17 point 1). The
    extension itself needs CUDA, so its `MAX_TOPK` is stood in for here; the next test runs it."""
    from types import SimpleNamespace

    from dopd_kernels.backends.compiled import CudaBackend
    from dopd_kernels.backends.torch_chunked import TorchBackend
    from dopd_kernels.sources import LogitsSource

    backend = object.__new__(CudaBackend)  # no extension load: the CPU torch has no CUDA
    backend._ops = SimpleNamespace(MAX_TOPK=1024)
    wide, narrow = [LogitsSource(torch.empty(2, 3000))], [LogitsSource(torch.empty(2, 1000))]
    assert backend.select(wide, 1024) is backend
    assert isinstance(backend.select(wide, 1025), TorchBackend)
    assert backend.select(wide, 4096) is backend.select(wide, 1025)  # one fallback, made once
    assert backend.select(narrow, 4096) is backend  # K past the vocabulary: clamped to it, 1000 fit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_top_k_past_its_sort_matches_reference():
    zs, zt, zp = correlated_logits(8, 1500)
    y = random_tokens(8, 1500)
    cfg = DOPDConfig(top_k=1100, trim=0.0)
    s = leaf(zs.cuda())
    out = dopd_loss(s, zt.cuda(), zp.cuda(), y.cuda(), config=cfg, backend="cuda")
    out.loss.backward()
    s64 = leaf(zs, torch.float64)
    ref = dopd_loss(s64, zt.double(), zp.double(), y, config=cfg, backend="reference")
    ref.loss.backward()
    assert_close(out.loss.cpu(), ref.loss, rtol=1e-5, what="loss")
    assert_close(s.grad.cpu(), s64.grad, rtol=1e-4, what="grad")


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


def test_wide_reverse_kl_value_pass_returns_its_constant():
    """full_pass without a gradient (the deferred path's value pass) on rows wider than a tile returns reverse
    KL's gradient constant, the KL itself, as with a gradient; forward KL's is 0."""
    backend = _cpp(4, 64)
    ext = backend._ops
    hs, ws, ht, wt = torch.randn(8, 16), torch.randn(300, 16), torch.randn(8, 16), torch.randn(300, 16)
    s, t = ext.Stream(hs, ws, None, 1.0, 300), ext.Stream(ht, wt, None, 1.0, 300)
    for kind, expect in ((0, "value"), (1, "zero")):
        _, value, c, *_ = ext.full_pass(s, t, torch.arange(8), None, None, kind, 0.5, None, backend._tiling, None, None,
                                       None, None, False)
        assert torch.equal(c, value if expect == "value" else torch.zeros_like(value)), (kind, c, value)
