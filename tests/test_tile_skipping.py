"""Skipping negligible gradient blocks (`dopd_kernels/skipping.py`, issue 14 point 2) on the `torch` and `cpp`
backends (the extension mirrors the rule where its gradient sweeps form their tiles, csrc/kernels_cpu.cpp).

The rule keeps every row's skipped gradient mass within δ of its L1 norm; here: that guarantee on
gradient tiles directly, the gradients of fused-linear OPD (reverse KL, forward KL, JS; eager and
deferred; one sweep and several tiles per row) and DOPD (HT rows' JS, tail-bucket top-K terms): with
skipping no further from the float64 reference than without it (plus skipping.py's bound and δ of the
gradient's scale; the peaked inputs' logits of ~50 put the dense fp32 error itself near 1e-5) and within the suite's fp32
tolerance on its usual inputs, fp32 and bf16; a substantial share of the contractions skipped on
peaked inputs (`benchmarks/skipping_report.peaked_streams`, LLM-like entropies over a floor ~25 nats
below the candidates) and none on flat ones; the skipped work really not done (FLOPs counted); logits
mode and `skip_negligible=False` skip nothing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from conftest import assert_close, leaf, linear_streams, random_tokens
from dopd_kernels import DOPDConfig, TorchBackend, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss
from dopd_kernels.skipping import (GATHER_ROWS, SKIP_COLUMNS, RowBudget, TileSkips, js_tile_bounds, plan_js_value_skips,
                                   plan_tile_skips, tolerance)
from dopd_kernels.config import Regime
from dopd_kernels.sources import LinearSource
from test_backend_conformance import Target, compare_fused_linear_opd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root
    sys.path.insert(0, str(ROOT))
from benchmarks.skipping_report import matmul_flops, peaked_streams  # noqa: E402  (the report's inputs and counter)

N, H, V = 48, 256, 4096  # 16 skippable blocks per row
DIVS = ["reverse_kl", "forward_kl", "js"]


def entropy(t: dict) -> torch.Tensor:
    lp = torch.log_softmax(t["student_hidden"].double() @ t["student_weight"].double().T + t["student_bias"].double(), -1)
    return -(lp.exp() * lp).sum(-1)


def test_generator_is_llm_like():
    ent = entropy(peaked_streams(N, H, V))
    assert 0.2 < float(ent.median()) < 3.0, f"median entropy {float(ent.median()):.2f} nats"


@pytest.mark.parametrize("rows", [1, 4])
def test_budget_bound_holds_per_row(rows):
    """RowBudget on gradient tiles of softmax differences (Σ_v g_v = 0) split into tiles: each row's
    skipped L1 mass ≤ δ(‖g‖₁ + |Σ_v g_v|); a row with a NaN keeps the block that holds it; a zero row skips
    every block (row by row); a group of `rows` rows decides each block together.

    The rule's lower bound Σ_seen|g| + |Σ_seen g| relies on Σ_v g_v = 0, which the fp32-rounded g keeps only up to
    its rounding: with |Σ_seen g| ≤ ‖g_unseen‖₁ + |Σ_v g_v| the guarantee is δ(‖g‖₁ + |Σ_v g_v|). The two differ
    only on rows whose g is itself rounding noise: rows of 50·N(0, 1) logits, nearly one-hot in both softmaxes,
    whose peak p_v − p'_v rounds to 0 in fp32 while the rest of the row keeps its 1e-18 (seed 2030770381:
    skipped 6.3e-24 against δ‖g‖₁ = 3.5e-24; the old assertion failed in 1 of 34 runs here)."""
    n, v, delta = 12, 3000, 2.0 ** -20
    # (at 30·N(0, 1), the 4-row groups found no block negligible for all their rows in 3 of 400 draws)
    z = 50 * torch.randn(n, v, dtype=torch.float64)
    # float32 values (the tiles RowBudget sees), held in float64 for the check's sums
    g = (torch.softmax(z, -1) - torch.softmax(z + 3 * torch.randn_like(z), -1)).float().double()
    g[1] = 0.0
    g[2, 5] = float("nan")
    budget, kept = RowBudget(n, v, delta, g.device, rows=rows), []
    for c0 in range(0, v, 1100):  # tiles that do not align with the blocks
        tile = g[:, c0:c0 + 1100].float()
        keep = budget.keep(tile)
        assert keep.shape == (n, -(-tile.shape[1] // SKIP_COLUMNS))
        assert bool((keep.reshape(n // rows, rows, -1) == keep[::rows, None, :]).all()), "a group decided apart"
        kept.append(keep.repeat_interleave(SKIP_COLUMNS, dim=1)[:, :tile.shape[1]])
    kept = torch.cat(kept, 1)
    skipped = torch.where(kept, torch.zeros_like(g), g.abs()).sum(1)
    ok = torch.isfinite(g).all(1)
    assert bool((skipped[ok] <= delta * (g[ok].abs().sum(1) + g[ok].sum(1).abs())).all())
    assert bool(kept[2, :SKIP_COLUMNS].all())
    assert bool((~kept[ok]).any()), "nothing skipped on rows of logits 50·N(0, 1)"
    if rows == 1:
        assert bool((~kept[1]).all())


STUDENT = ("student_hidden", "student_weight", "student_bias")


def torch_backend(row_chunk: int, vocab_chunk: int) -> Callable[[bool], TorchBackend]:
    """`check_skipping`'s factory for the torch backend at these tiles."""
    return lambda skip: TorchBackend(row_chunk, vocab_chunk, skip_negligible=skip)


def cpp_backend(row_chunk: int, vocab_chunk: int) -> Callable[[bool], object]:
    """`check_skipping`'s factory for the cpp backend at these tiles (one sweep when V <= vocab_chunk)."""
    from test_backend_conformance import _cpp  # skips when the extension build is disabled

    return lambda skip: _cpp(row_chunk, vocab_chunk, skip)


FAMILIES = {"torch": torch_backend, "cpp": cpp_backend}
family = pytest.mark.parametrize("family", list(FAMILIES))


def _grads(t: dict, y: torch.Tensor, backend, cfg: Optional[DOPDConfig] = None, upstream=None, thresholds=None, **kw):
    """The loss on streams `t` (DOPD with `cfg` and `thresholds`, else fused-linear OPD with `kw`) and the
    gradients of the student's hidden states, weight and bias; `upstream` [N] weights a reduction="none" loss."""
    tr = {k: leaf(t[k]) for k in STUDENT}
    common = dict(student_bias=tr["student_bias"], teacher_bias=t["teacher_bias"], backend=backend)
    if cfg is not None:
        out = fused_linear_dopd_loss(tr["student_hidden"], tr["student_weight"], t["teacher_hidden"], t["teacher_weight"],
                                     t["priv_student_hidden"], y, config=cfg, thresholds=thresholds, **common)
    else:
        out = fused_linear_opd_loss(tr["student_hidden"], tr["student_weight"], t["teacher_hidden"], t["teacher_weight"],
                                    y, **common, **kw)
    (out.loss if upstream is None else (out.loss * upstream.to(out.loss.dtype)).sum()).backward()
    return out, [tr[k].grad for k in STUDENT]


def separated_thresholds(t: dict, y: torch.Tensor, cfg: DOPDConfig) -> tuple:
    """DOPD thresholds for `check_skipping`: the float64 reference's batch thresholds, each moved to the middle
    between the two tokens' statistics that bracket it (Ā among the gaps A, q̄_T + q̄_P among the sums
    q_T + q_P), so no token sits within fp32 rounding of a threshold. With the batch's own trimmed means,
    about 1 draw in 150 of 192 peaked tokens routed a token differently in fp32 than in float64."""
    d = {k: x.double() for k, x in t.items()}
    with torch.no_grad():
        ref = fused_linear_dopd_loss(d["student_hidden"], d["student_weight"], d["teacher_hidden"], d["teacher_weight"],
                                     d["priv_student_hidden"], y, student_bias=d["student_bias"],
                                     teacher_bias=d["teacher_bias"], config=cfg, backend="reference")
    valid = y != cfg.ignore_index

    def between(values: torch.Tensor, at: torch.Tensor) -> float:
        v = values[valid].sort().values
        i = int(torch.searchsorted(v, at))
        lo, hi = (v[i - 1] if i > 0 else at - 1), (v[i] if i < v.numel() else at + 1)
        return float((lo + hi) / 2)

    th = ref.thresholds
    confident = between(ref.q_teacher + ref.q_priv_student, th.q_teacher + th.q_priv_student)
    return between(ref.adv_gap, th.adv_gap), confident / 2, confident / 2


def skip_bounds(t: dict, y: torch.Tensor, cfg: Optional[DOPDConfig] = None, upstream=None, thresholds=None,
                **kw) -> dict:
    """What skipping may change (skipping.py's bounds, no head transform), from the float64 reference's
    gradient g [N, V] with respect to the student's logits: dH at most δ·max_i ‖g_i‖₁·max_v,k |W_vk|, dW at
    most δ·max_k Σ_i ‖g_i‖₁·|h_ik| (its column sums bound every entry), db at most δ·Σ_i ‖g_i‖₁ (tiles
    skipped whole, TileSkips, leave their share of db out too)."""
    d = {k: x.double() for k, x in t.items()}
    logits = lambda h, w, b: h @ w.T + b
    zs = logits(d["student_hidden"], d["student_weight"], d["student_bias"]).requires_grad_(True)
    zt = logits(d["teacher_hidden"], d["teacher_weight"], d["teacher_bias"])
    if cfg is not None:
        zp = logits(d["priv_student_hidden"], d["student_weight"], d["student_bias"])
        loss = dopd_loss(zs, zt, zp, y, config=cfg, thresholds=thresholds, backend="reference").loss
    else:
        loss = opd_loss(zs, zt, y, backend="reference", **kw).loss
    (loss if upstream is None else (loss * upstream.double()).sum()).backward()
    mass, delta = zs.grad.abs().sum(1), tolerance(t["student_hidden"].dtype)
    return {"dH": delta * float(mass.max() * d["student_weight"].abs().max()),
            "dW": delta * float((mass[:, None] * d["student_hidden"].abs()).sum(0).max()),
            "db": delta * float(mass.sum())}


def check_skipping(t: dict, y: torch.Tensor, make: Callable[[bool], object], **kw) -> tuple:
    """Gradients from the backends `make(skip_negligible)` with skipping off and on against the float64
    reference (on float64 copies of the same values): with skipping, each of dH, dW, db is off the
    reference by at most the error without it plus the bound of `skip_bounds`, plus δ of its scale for the
    rounding of a different contraction order (kept rows are gathered, blocks contracted apart); and DOPD
    routes alike (with `separated_thresholds`). Returns the skipping backend's `SkipCounter` and its output."""
    dtype = t["student_hidden"].dtype
    if kw.get("cfg") is not None and kw.get("thresholds") is None:
        kw["thresholds"] = separated_thresholds(t, y, kw["cfg"])
    ref_out, ref = _grads({k: x.double() for k, x in t.items()}, y, "reference", **kw)
    bounds = skip_bounds(t, y, **kw)
    backends = [make(False), make(True)]
    (off_out, off), (on_out, on) = (_grads(t, y, b, **kw) for b in backends)
    # The values: untouched, except a JS row's value sweep leaves out tiles within δ of its value (js_value_skips),
    # and tiles formed for fewer rows round their logits differently (as off's own error: a second rounding).
    ref_v, on_v, off_v = (x.per_token_loss.double() for x in (ref_out, on_out, off_out))
    err_on, err_off = float((on_v - ref_v).abs().max()), float((off_v - ref_v).abs().max())
    assert err_on <= 2 * err_off + tolerance(dtype) * float(ref_v.abs().max()), (err_on, err_off)
    # Values of rows without a JS value sweep (not JS, not DOPD's HT rows) are bit-equal.
    plain = torch.full_like(on_v, kw.get("divergence") != "js", dtype=torch.bool)
    if kw.get("cfg") is not None:
        plain = on_out.regime != int(Regime.HT)
    assert torch.equal(on_out.per_token_loss[plain], off_out.per_token_loss[plain])
    if kw.get("cfg") is not None:
        assert torch.equal(on_out.regime, ref_out.regime)
    for name, a, b, r in zip(("dH", "dW", "db"), on, off, ref):
        scale = float(r.abs().max())
        err_on, err_off = (float((x.double() - r).abs().max()) for x in (a, b))
        assert err_on <= err_off + bounds[name] + tolerance(dtype) * scale, (
            f"{name}: error {err_on / scale:.2e} of its scale with skipping, {err_off / scale:.2e} without, "
            f"bound {bounds[name] / scale:.2e}")
        if dtype == torch.bfloat16:  # the suite's bf16 gradient tolerance (as test_head_transforms judges it)
            assert_close(a, r, rtol=2 ** -7, atol=2e-3 * scale, what=name)
    assert backends[0].skip_counter.entries == 0
    return backends[1].skip_counter, on_out


# vocab_chunk 1024: four tiles per row (separate value and gradient sweeps, deferred gradient);
# 8192: a row's vocabulary in one sweep (full_pass, eager gradient).
@family
@pytest.mark.parametrize("kind", DIVS)
@pytest.mark.parametrize("vocab_chunk,reduction", [(1024, "none"), (8192, "mean")], ids=["tiles-deferred", "one-sweep-eager"])
def test_full_opd_peaked(kind, vocab_chunk, reduction, family):
    upstream = torch.rand(N, dtype=torch.float64) + 0.5 if reduction == "none" else None
    skipped, _ = check_skipping(peaked_streams(N, H, V), random_tokens(N, V), FAMILIES[family](32, vocab_chunk),
                                 upstream=upstream, divergence=kind, granularity="full", js_beta=0.4, reduction=reduction)
    assert skipped.fraction > 0.4, f"skipped {skipped.fraction:.2f} of the contractions"


@family
def test_large_logits(family):
    """Floor ~250 nats below the candidates, logits of several hundred: the blocks without a candidate
    (~60% of them: 8 candidates over 16 blocks) and more are skipped."""
    skipped, _ = check_skipping(peaked_streams(N, H, V, gap=10.0), random_tokens(N, V), FAMILIES[family](32, 1024),
                                 divergence="js", granularity="full")
    assert skipped.fraction > 0.5, f"skipped {skipped.fraction:.2f} of the contractions"


@family
def test_flat_inputs_skip_nothing(family):
    """The suite's usual fused-linear inputs (softmax entropy near log V): nothing to skip, and the
    gradients within the suite's fp32 tolerance of the reference."""
    backend = FAMILIES[family](32, 1024)(True)
    compare_fused_linear_opd(Target(backend), linear_streams(N, 32, V), random_tokens(N, V), divergence="reverse_kl",
                             granularity="full")
    assert backend.skip_counter.entries > 0 and backend.skip_counter.fraction < 0.01


@family
@pytest.mark.parametrize("renorm", [False, True])
def test_dopd_peaked(renorm, family):
    """HT rows (full-vocabulary JS after routing) and, with a tail bucket, the top-K rows' dense part."""
    t = peaked_streams(N, H, V)
    skipped, out = check_skipping(t, random_tokens(N, V), FAMILIES[family](16, 2048),
                                   cfg=DOPDConfig(top_k=8, topk_renorm=renorm, trim=0.1))
    assert int((out.regime == 2).sum()) > 0, "no HT rows"
    assert skipped.fraction > 0.3, f"skipped {skipped.fraction:.2f} of the contractions"


@family
def test_bf16(family):
    """bf16 storage (δ = 2^-12): the suite's bf16 gradient tolerance, and no more than 4δ above the error
    of the same backend without skipping."""
    skipped, _ = check_skipping(peaked_streams(N, H, V, dtype=torch.bfloat16), random_tokens(N, V),
                                 FAMILIES[family](32, 2048), divergence="js", granularity="full")
    assert skipped.fraction > 0.4, f"skipped {skipped.fraction:.2f} of the contractions"


@pytest.mark.parametrize("kind", ["reverse_kl", "js"])
def test_skipped_contractions_are_not_computed(kind):
    """Counted FLOPs: each skipped gradient entry saves its dH and dW products (2·H FLOPs each), and each
    entry skipped whole (wide rows: `unformed`) its two recomputed projections as well. (With 4
    tiles of 1024 columns, no tile is negligible for 16 of a chunk's 32 rows here: the entries are skipped
    block by block, or whole inside a tile that others keep; `test_tiles_skipped_whole` has the unformed.)"""
    t, y = peaked_streams(N, H, V), random_tokens(N, V)
    flops = {}
    for skip in (False, True):
        backend = TorchBackend(row_chunk=32, vocab_chunk=1024, skip_negligible=skip)
        h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
        flops[skip] = (matmul_flops(backend, lambda: fused_linear_opd_loss(
            h, w, t["teacher_hidden"], t["teacher_weight"], y, divergence=kind, granularity="full",
            backend=backend).loss.backward())[1], backend.skip_counter)
    (dense, off), (fewer, on) = flops[False], flops[True]
    assert off.entries == 0 and on.skipped > 0
    assert dense - fewer == 4 * H * (on.skipped + on.unformed + on.value_unformed)


@family
def test_logits_mode_skips_nothing(family):
    backend = FAMILIES[family](16, 512)(True)
    t = peaked_streams(8, H, 1024)
    z = (t["student_hidden"] @ t["student_weight"].T).requires_grad_(True)
    opd_loss(z, t["teacher_hidden"] @ t["teacher_weight"].T, random_tokens(8, 1024), divergence="js",
             backend=backend).loss.backward()
    assert backend.skip_counter.entries == 0


@family
def test_skip_flag_is_checked(family):
    with pytest.raises(TypeError, match="skip_negligible"):
        FAMILIES[family](16, 512)("yes")


@pytest.mark.parametrize("vocab_chunk", [1024, 8192], ids=["tiles", "one-sweep"])
def test_cpp_skipped_contractions_are_not_computed(vocab_chunk):
    """The extension's FLOP counter: each skipped gradient entry saves exactly its dH and dW products (2·H
    FLOPs each), in the gradient sweep over tiles and in the one-sweep full_pass, and each entry skipped
    whole (wide rows: `unformed`) its two recomputed projections as well; the rest of the counted work
    (forward projections, value sweep) is the same."""
    t, y = peaked_streams(N, H, V), random_tokens(N, V, mask_frac=0.0)
    flops = {}
    for skip in (False, True):
        backend = cpp_backend(32, vocab_chunk)(skip)
        h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
        backend.reset_matmul_flops()
        fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, divergence="js", granularity="full",
                              backend=backend).loss.backward()
        flops[skip] = (backend.matmul_flops(), backend.skip_counter)
    (dense, off), (fewer, on) = flops[False], flops[True]
    assert off.entries == 0 and on.entries == N * V and on.fraction > 0.4
    assert dense - fewer == 4 * H * (on.skipped + on.unformed + on.value_unformed)


def test_cpp_float64_never_skips():
    backend = cpp_backend(32, 1024)(True)
    _grads({k: x.double() for k, x in peaked_streams(8, H, 2048).items()}, random_tokens(8, 2048), backend,
           divergence="js", granularity="full")
    assert backend.skip_counter.entries == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", DIVS)
@family
def test_tiles_skipped_whole(family, kind, dtype):
    """Wide full-vocabulary rows (16 tiles of 256 columns, two row chunks): the tiles that the online
    sweep's (KL) or the value sweep's (JS) statistics bound as negligible are neither recomputed nor
    contracted (csrc TileSkips, torch `_kl_sweep` / `_value_sweep`), within `check_skipping`'s bound; each such entry
    saves its two recomputed projections besides its dH and dW products (8·H FLOPs), each entry skipped
    after forming its tile (or projected only to pad a gathered tile) the contractions (4·H), counted."""
    t, y = peaked_streams(N, H, V, dtype=dtype), random_tokens(N, V, mask_frac=0.0)
    check_skipping(t, y, FAMILIES[family](32, 256), divergence=kind, granularity="full")
    flops = {}
    for skip in (False, True):
        backend = FAMILIES[family](32, 256)(skip)
        flops[skip] = (matmul_flops(backend, lambda: _grads(t, y, backend, divergence=kind, granularity="full"))[1],
                       backend.skip_counter)
    (dense, off), (fewer, on) = flops[False], flops[True]
    assert off.entries == 0 and on.entries == N * V
    # ~60% of the entries skip their tile whole; a gathered tile projects at least GATHER_ROWS = 16 of a
    # chunk's 32 or 16 rows, so ~30% go unformed here (a small share of a chunk of 1024 rows)
    assert on.unformed > 0.2 * on.entries, f"{on.unformed / on.entries:.2f} of the entries skipped whole"
    # JS's value sweep leaves out whole tiles too (two projections, 4·H FLOPs, per entry); KL has none
    assert (on.value_unformed > 0.2 * on.entries) if kind == "js" else on.value_unformed == 0
    assert dense - fewer == 4 * H * (on.skipped + on.unformed + on.value_unformed)


def test_js_value_skip_rule_float64():
    """The JS value-sweep rule on float64 tiles (the `torch` backend's sweep with δ = 2^-20 given, so rounding,
    ~1e-16, cannot hide a violation): each row's value within δ of its full sweep's, relative; its constant c
    within E_c; and the gradient plan's spent mass, forced tiles and E_c included, within δ‖u‖₁ of the float64
    gradient u = p(β(log p − log m) − c) with respect to the logits."""
    n, beta, delta, tiles = 64, 0.3, 2.0 ** -20, V // 256
    t = {k: x.double() for k, x in peaked_streams(n, H, V).items()}
    s = LinearSource(t["student_hidden"], t["student_weight"], t["student_bias"])
    q = LinearSource(t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"])
    backend, rows = TorchBackend(32, 256), torch.arange(n)
    zs = t["student_hidden"] @ t["student_weight"].T + t["student_bias"]
    zt = t["teacher_hidden"] @ t["teacher_weight"].T + t["teacher_bias"]
    lse_s, lse_t = zs.logsumexp(-1), zt.logsumexp(-1)
    lp, lq = zs - lse_s[:, None], zt - lse_t[:, None]
    shares = tuple(x.exp().view(n, tiles, 256).sum(-1) for x in (lp, lq))  # P_T, Q_T of the 256-column tiles
    full_v, full_c, _ = backend._value_sweep(s, q, rows, lse_s, lse_t, "js", beta, 0.0)
    value, c, plan = backend._value_sweep(s, q, rows, lse_s, lse_t, "js", beta, delta, shares)
    value_skips = plan_js_value_skips(*shares, beta, delta)
    assert float((~value_skips.keep).double().mean()) > 0.3, "too few tiles left out of the value sweep"
    assert bool(((value - full_v).abs() <= delta * full_v).all())
    ec = torch.where(value_skips.keep, 0.0, js_tile_bounds(*shares, beta)[0]).sum(1)
    assert bool(((c - full_c).abs() <= ec + 1e-15).all())
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    u = lp.exp() * (beta * (lp - lm) - full_c[:, None])
    assert bool((~plan.keep[~value_skips.keep]).all()), "a tile left out of the value sweep was kept for the gradient"
    assert bool((plan.spent <= delta * u.abs().sum(1)).all())
    assert plan.keep.shape == (n, tiles)


def test_plan_tile_skips_with_forced_tiles():
    """`plan_tile_skips(forced=...)`: forced tiles first, their mass spent from the start; a row whose forced mass
    exceeds δ·lower skips nothing and is marked failed, one that forces nothing is never failed."""
    bound = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3, dtype=torch.float64)
    forced = TileSkips(torch.tensor([[True, True, True, False], [False, True, True, True], [True] * 4]),
                       torch.tensor([2.0, 9.0, 0.0], dtype=torch.float64))
    lower = torch.tensor([5.0, 5.0, float("nan")], dtype=torch.float64)
    (keep, spent), failed = plan_tile_skips(bound, lower, 1.0, forced)
    assert keep.tolist() == [[False, False, True, False], [True] * 4, [True] * 4]
    assert spent.tolist() == [5.0, 0.0, 0.0] and failed.tolist() == [False, True, False]


@family
def test_js_rows_of_vanishing_gradient_take_a_correction_sweep(family):
    """Student and teacher each all but certain of a different token: JS near its maximum, the gradient ~1e-60
    (log p/m is log 1/β wherever p has mass), so the negligible tiles the value sweep left out weigh far more
    than δ of it. Every row then sweeps the tiles it left out (a correction sweep, net value_unformed ≤ 0) and
    plans as without value skips: values and gradients within `check_skipping`'s bounds."""
    n, s = 32, 150.0
    w = torch.randn(V, H, dtype=torch.float64)
    w /= w.norm(dim=1, keepdim=True)
    a = torch.randint(0, V, (n,))
    t = dict(student_hidden=s * w[a], student_weight=w, teacher_hidden=s * w[(a + V // 2) % V], teacher_weight=w,
             priv_student_hidden=s * w[a], student_bias=torch.zeros(V, dtype=torch.float64),
             teacher_bias=torch.zeros(V, dtype=torch.float64))
    t = {k: x.float() for k, x in t.items()}
    skipped, _ = check_skipping(t, random_tokens(n, V), FAMILIES[family](32, 256), divergence="js", granularity="full")
    assert skipped.value_unformed <= 0, skipped


@family
def test_dopd_ht_rows_skip_tiles_whole(family):
    """DOPD's HT rows get their log-sum-exps from the statistics pass: their value sweep bounds the tiles
    (16 of 256 columns here) and their gradient sweep skips the negligible ones whole, within the bound.
    192 tokens: more HT rows (~20%) than GATHER_ROWS, so a tile's keepers padded to it can be fewer."""
    n, cfg = 192, DOPDConfig(top_k=8, trim=0.1)
    t, y = peaked_streams(n, H, V), random_tokens(n, V)
    skipped, out = check_skipping(t, y, FAMILIES[family](32, 256), cfg=cfg)
    ht = int((out.regime == int(Regime.HT)).sum())
    assert ht > GATHER_ROWS, "too few HT rows"
    assert skipped.unformed > 0, f"nothing skipped whole: {skipped}"
    # the stats pass's tile shares leave most tiles out of the HT rows' value sweep too (js_value_skips)
    assert skipped.value_unformed > 0.15 * ht * V, f"value sweep: {skipped.value_unformed / (ht * V):.2f} left out"


@family
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", DIVS)
def test_deferred_gradient_skips_the_planned_tiles(kind, dtype, family):
    """reduction="none" with a backend object defers the gradient to the backward (`FusedLoss`): the forward's
    online or value sweep plans the whole tiles (`full_pass(plan_skips=True)`, carried in the autograd state)
    and the backward leaves them out unformed, as the eager gradient of a scalar reduction does. Upstream
    gradients of powers of two keep every decision of the rule, so the counts must equal eager "sum"'s;
    the gradients within `check_skipping`'s bound (bf16: δ = 2^-12, and the suite's bf16 tolerance)."""
    t, y = peaked_streams(N, H, V, dtype=dtype), random_tokens(N, V, mask_frac=0.0)
    upstream = 2.0 ** torch.randint(-1, 2, (N,)).double()
    deferred, _ = check_skipping(t, y, FAMILIES[family](32, 256), upstream=upstream, divergence=kind,
                                 granularity="full", reduction="none")
    eager = FAMILIES[family](32, 256)(True)
    _grads(t, y, eager, divergence=kind, granularity="full", reduction="sum")
    assert deferred.unformed > 0.2 * deferred.entries, f"{deferred.unformed / deferred.entries:.2f} skipped whole"
    assert (deferred.skipped, deferred.unformed) == (eager.skip_counter.skipped, eager.skip_counter.unformed)


@family
def test_deferred_dopd_ht_rows_skip_the_planned_tiles(family):
    """DOPD with reduction="none": the HT rows' value sweep (log-sum-exps given) plans their tiles for the
    deferred backward; the counts equal eager "sum"'s (upstream gradients of powers of two)."""
    n = 192
    t, y = peaked_streams(n, H, V), random_tokens(n, V)
    upstream = 2.0 ** torch.randint(-1, 2, (n,)).double()
    thresholds = separated_thresholds(t, y, DOPDConfig(top_k=8, trim=0.1))
    deferred, _ = check_skipping(t, y, FAMILIES[family](32, 256), cfg=DOPDConfig(top_k=8, trim=0.1, reduction="none"),
                                 upstream=upstream, thresholds=thresholds)
    eager = FAMILIES[family](32, 256)(True)
    _grads(t, y, eager, cfg=DOPDConfig(top_k=8, trim=0.1, reduction="sum"), thresholds=thresholds)
    assert deferred.unformed > 0 and deferred.value_unformed > 0, f"nothing skipped whole: {deferred}"
    eager_counts = (eager.skip_counter.skipped, eager.skip_counter.unformed, eager.skip_counter.value_unformed)
    assert (deferred.skipped, deferred.unformed, deferred.value_unformed) == eager_counts


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("family,skipping", [("torch", None), ("cpp", None), ("cpp", "cpp")],
                         ids=["torch", "cpp", "cpp-op"])
def test_non_finite_upstream_reaches_every_column(family, skipping, bad):
    """A row whose upstream gradient is NaN or inf has a NaN or inf gradient on every column: the tiles
    bounded as negligible for it must not hide that (they are formed), so the non-finite entries of dH,
    dW, db are those of the gradients without skipping. A backend object defers the gradient (tiles planned
    in the forward); the "cpp" op's backward forms it eagerly with the upstream gradient as row weights
    (its default tiles: 16 of 1024 columns here)."""
    v = 4 * V
    t, y = peaked_streams(N, H, v), random_tokens(N, v, mask_frac=0.0)
    upstream = torch.ones(N, dtype=torch.float64)
    upstream[3] = bad
    backends = {False: FAMILIES[family](32, 256)(False), True: skipping or FAMILIES[family](32, 256)(True)}
    grads = {skip: _grads(t, y, backend, upstream=upstream, divergence="js", granularity="full", reduction="none")[1]
             for skip, backend in backends.items()}
    for name, on, off in zip(("dH", "dW", "db"), grads[True], grads[False]):
        assert bool((~torch.isfinite(off)).any()), f"{name}: no non-finite entry without skipping"
        assert torch.equal(torch.isfinite(on), torch.isfinite(off)), f"{name}: non-finite entries differ"


@family
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("kind", ["reverse_kl", "js"])
def test_skip_decisions_do_not_depend_on_the_gradient_scale(kind, temperature, family):
    """The rule compares each row's skipped mass with δ of its own mass, so a row's scale (weight / τ:
    reduction, normalizer, temperature) must not change what is skipped: the whole-tile bounds (of the
    unscaled gradient) and the block rule's masses (scaled) must share one unit. Eager "sum" and "mean"
    over 64 tokens at τ = 1/2 and 2 scale the rows by powers of two, which keep every comparison exact,
    so the counts must agree exactly."""
    n = 64
    t, y = peaked_streams(n, H, V), random_tokens(n, V, mask_frac=0.0)
    counts = []
    for reduction in ("sum", "mean"):
        backend = FAMILIES[family](32, 256)(True)
        _grads(t, y, backend, divergence=kind, granularity="full", reduction=reduction, temperature=temperature)
        counts.append((backend.skip_counter.skipped, backend.skip_counter.unformed))
    assert counts[0][0] > 0, "nothing skipped"
    assert counts[0] == counts[1], f"(skipped, unformed) of sum and mean: {counts}"


def test_js_plans_agree_across_backends():
    """The same plan on both backends: `torch` and `cpp` at the same tiles decide the same whole tiles (value and
    gradient sweeps) and blocks on peaked JS rows. Their statistics round differently, so a decision within
    rounding of its budget may differ: 2% of the entries is allowed (15 draws here agreed exactly)."""
    t, y = peaked_streams(N, H, V), random_tokens(N, V, mask_frac=0.0)
    counts = []
    for make in (torch_backend(32, 256), cpp_backend(32, 256)):
        backend = make(True)
        _grads(t, y, backend, divergence="js", granularity="full")
        k = backend.skip_counter
        counts.append((k.entries, k.skipped, k.unformed, k.value_unformed))
    (entries, *a), (entries_cpp, *b) = counts
    assert entries == entries_cpp == N * V
    assert all(abs(x - z) <= 0.02 * entries for x, z in zip(a, b)), counts
    assert a[2] > 0.2 * entries, "the value sweeps left out too little to compare"
