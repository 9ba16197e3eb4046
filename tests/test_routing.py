"""Routing: advantage gap, trimmed thresholds and the four regimes (DESIGN.md section 1).

Constructed cases use log-probabilities whose exponentials are exact powers of two (or dyadic
log-probabilities whose differences are exact), so each tie at a threshold is an exact tie and the
expected regime follows from the table in the design by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

import naive_reference as nv
from conftest import IGNORE, assert_close, correlated_logits, leaf, random_tokens
from dopd_kernels import DOPDConfig, Regime, Thresholds, TorchBackend, dopd_loss, route, token_logprobs

LH, LL, HT, HS = int(Regime.LH), int(Regime.LL), int(Regime.HT), int(Regime.HS)
BACKENDS = ["reference", "torch", TorchBackend(row_chunk=4, vocab_chunk=6)]
BACKEND_IDS = ["reference", "torch", "torch-tiled"]


def log2pow(k: int) -> float:
    """A float64 ℓ with exp(ℓ) == 2**-k exactly (searched among the neighbours of −k·ln 2)."""
    target = 2.0 ** -k
    x = torch.tensor(-k * math.log(2.0), dtype=torch.float64)
    for _ in range(64):
        e = float(torch.exp(x))
        if e == target:
            return float(x)
        x = torch.nextafter(x, torch.tensor(math.inf if e < target else -math.inf, dtype=torch.float64))
    raise AssertionError(f"no float64 ℓ with exp(ℓ) == 2^-{k}")


def test_regime_table_with_exact_tie_on_confidence_sum():
    # (q_T, q_P) = (2^-a, 2^-b) per token; trim = 0. Σq_T = Σq_P = 2, so q̄_T = q̄_P = 1/4 and
    # q̄_T + q̄_P = 1/2 exactly. A = 0 on the diagonal tokens and A = ln 8 on the two off-diagonal
    # ones, so Ā = 2·ln 8 / 8 > 0: diagonal tokens are low, off-diagonal ones high.
    pairs = [(1, 1), (1, 1), (2, 2), (4, 4), (4, 4), (4, 4), (1, 4), (4, 1)]
    lt = torch.tensor([log2pow(a) for a, _ in pairs], dtype=torch.float64)
    lp = torch.tensor([log2pow(b) for _, b in pairs], dtype=torch.float64)
    regime, th = route(lt, lp, torch.ones(8, dtype=torch.bool), DOPDConfig(trim=0.0))
    # (1/2,1/2): sum 1 ≥ 1/2 → LH; (1/4,1/4): sum 1/2 == 1/2 → LH (a tie goes to ≥);
    # (1/16,1/16): sum 1/8 < 1/2 → LL; (1/2,1/16): high, q_T > q_P → HT; (1/16,1/2): high → HS.
    assert regime.tolist() == [LH, LH, LH, LL, LL, LL, HT, HS]
    assert regime.dtype == torch.int8
    assert float(th.q_teacher) == 0.25 and float(th.q_priv_student) == 0.25
    a_off = abs(log2pow(1) - log2pow(4))
    assert_close(th.adv_gap, torch.tensor(2 * a_off / 8, dtype=torch.float64), rtol=1e-15, what="Ā")


def test_tie_on_advantage_gap_goes_high():
    # ℓ values with exact differences: A = [0, 1, 2] → Ā = 1 exactly; the token with A == Ā is high.
    lt = torch.tensor([-1.0, -1.0, -3.0], dtype=torch.float64)
    lp = torch.tensor([-1.0, -2.0, -1.0], dtype=torch.float64)
    regime, th = route(lt, lp, torch.ones(3, dtype=torch.bool), DOPDConfig(trim=0.0))
    assert float(th.adv_gap) == 1.0
    # token 0: A = 0 < 1, q_T + q_P = 2/e vs mean sum (e^-1 + e^-1 + e^-3 + e^-1 + e^-2 + e^-1)/3.
    mean_sum = (3 * math.exp(-1) + math.exp(-3) + math.exp(-2) + math.exp(-1)) / 3
    expected0 = LH if 2 * math.exp(-1) >= mean_sum else LL
    assert regime.tolist() == [expected0, HT, HS]


def test_tie_on_q_teacher_equal_q_priv_goes_HT():
    # All ℓ_T == ℓ_P: A = 0 for every token, Ā = 0, every token is high, q_T == q_P → HT.
    lt = torch.randn(10, dtype=torch.float64).abs().neg()
    regime, th = route(lt, lt.clone(), torch.ones(10, dtype=torch.bool))
    assert float(th.adv_gap) == 0.0
    assert (regime == HT).all()


def test_thresholds_override_ties():
    lt = -torch.rand(12, dtype=torch.float64) * 3
    lp = -torch.rand(12, dtype=torch.float64) * 3
    a, qt, qp = (lt - lp).abs(), lt.exp(), lp.exp()
    # Ā equal to token 0's A (→ high), and for token 1 the confidence thresholds equal its own q's (→ LH if low).
    i, j = 0, 1
    if a[j] >= a[i]:
        lt[[i, j]], lp[[i, j]] = lt[[j, i]], lp[[j, i]]
        a, qt, qp = (lt - lp).abs(), lt.exp(), lp.exp()
    assume_distinct = a[j] < a[i]
    assert assume_distinct
    th = Thresholds(a[i].clone(), qt[j].clone(), qp[j].clone())
    regime, used = route(lt, lp, torch.ones(12, dtype=torch.bool), thresholds=th)
    assert int(regime[i]) == (HT if qt[i] >= qp[i] else HS)
    assert int(regime[j]) == LH
    assert regime.tolist() == nv.regimes_of(lt, lp, th)
    assert all(float(u) == float(t) for u, t in zip(used, th))
    # The same thresholds given as a tuple or a [3] tensor.
    for alt in (tuple(float(t) for t in th), torch.stack(list(th))):
        assert torch.equal(route(lt, lp, torch.ones(12, dtype=torch.bool), thresholds=alt)[0], regime)


@pytest.mark.parametrize("n,trim", [(5, 0.05), (19, 0.05), (20, 0.05), (47, 0.05), (64, 0.05), (10, 0.25),
                                    (7, 0.5), (100, 0.29), (100, 0.07), (30, 0.1)])
def test_trimmed_thresholds_by_hand(n, trim):
    # N below 1/trim drops nothing; above it drops floor(trim·N) largest values of each statistic.
    lt = -torch.rand(n, dtype=torch.float64) * 4
    lp = -torch.rand(n, dtype=torch.float64) * 4
    valid = torch.ones(n, dtype=torch.bool)
    _, th = route(lt, lp, valid, DOPDConfig(trim=trim))
    drop = {(5, 0.05): 0, (19, 0.05): 0, (20, 0.05): 1, (47, 0.05): 2, (64, 0.05): 3, (10, 0.25): 2,
            (7, 0.5): 3, (100, 0.29): 29, (100, 0.07): 7, (30, 0.1): 3}[(n, trim)]
    for got, stat in zip(th, ((lt - lp).abs(), lt.exp(), lp.exp())):
        kept = sorted(stat.tolist())[: n - drop]
        assert_close(got, torch.tensor(sum(kept) / len(kept), dtype=torch.float64), rtol=1e-13, what=f"trim n={n}")


def test_route_masks_invalid_tokens():
    n = 30
    lt, lp = -torch.rand(n, dtype=torch.float64) * 3, -torch.rand(n, dtype=torch.float64) * 3
    valid = torch.rand(n) < 0.6
    valid[0] = True
    lt_bad = lt.masked_fill(~valid, -50.0)  # extreme statistics at masked positions must not matter
    regime, th = route(lt_bad, lp, valid)
    regime_sub, th_sub = route(lt[valid], lp[valid], torch.ones(int(valid.sum()), dtype=torch.bool))
    assert (regime[~valid] == -1).all()
    assert torch.equal(regime[valid], regime_sub)
    for a, b in zip(th, th_sub):
        assert float(a) == float(b)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_ignore_index_excluded_from_thresholds_and_loss(backend):
    n, v = 40, 33
    zs, zt, zp = correlated_logits(n, v)
    y = random_tokens(n, v, mask_frac=0.3)
    valid = y != IGNORE
    # Masked rows get wild logits: if they leaked into thresholds or loss, the result would change.
    zt_bad, zp_bad = zt.clone(), zp.clone()
    zt_bad[~valid] = 30 * torch.randn(int((~valid).sum()), v)
    zp_bad[~valid] = -30 * torch.randn(int((~valid).sum()), v)
    s_full, s_sub = leaf(zs), leaf(zs[valid])
    out = dopd_loss(s_full, zt_bad, zp_bad, y, backend=backend)
    sub = dopd_loss(s_sub, zt[valid], zp[valid], y[valid], backend=backend)
    for a, b in zip(out.thresholds, sub.thresholds):
        assert_close(a, b, rtol=1e-6, what="thresholds")
    assert torch.equal(out.regime[valid], sub.regime)
    assert (out.regime[~valid] == -1).all()
    assert (out.per_token_loss[~valid] == 0).all() and (out.adv_gap[~valid] == 0).all()
    assert (out.q_teacher[~valid] == 0).all() and (out.q_priv_student[~valid] == 0).all()
    assert_close(out.loss, sub.loss, rtol=1e-6, what="loss")
    out.loss.backward()
    sub.loss.backward()
    assert (s_full.grad[~valid] == 0).all()
    assert_close(s_full.grad[valid], s_sub.grad, rtol=1e-5, what="grad")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("trim", [0.0, 0.05, 0.2])
def test_dopd_routing_matches_naive(trim, backend):
    n, v = 48, 41
    zs, zt, zp = correlated_logits(n, v, noise=(0.8, 1.6))
    y = random_tokens(n, v)
    out = dopd_loss(zs, zt, zp, y, config=DOPDConfig(trim=trim, top_k=7), backend=backend)
    _, regime, a, qt, qp, th = nv.dopd(zs, zt, zp, y, trim=trim, k=7)
    assert out.regime.tolist() == regime
    assert out.regime.dtype == torch.int8
    for got, exp in ((out.adv_gap, a), (out.q_teacher, qt), (out.q_priv_student, qp)):
        assert got.dtype == torch.float64 and not got.requires_grad
        assert_close(got, exp, rtol=1e-5, what="routing statistic")
    for got, exp in zip(out.thresholds, th):
        assert_close(got, torch.tensor(exp, dtype=torch.float64), rtol=1e-5, what="threshold")
    assert set(out.regime[y != IGNORE].tolist()) <= {LH, LL, HT, HS}


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_route_on_token_logprobs_matches_dopd(backend):
    """The two-pass path (token_logprobs of each frozen stream, then route) routes like dopd_loss."""
    v = 27
    zs, zt, zp = correlated_logits((4, 9), v)
    y = random_tokens((4, 9), v)
    cfg = DOPDConfig(trim=0.1, temperature=1.3)
    lt = token_logprobs(zt, y, temperature=1.3, backend=backend)
    lp = token_logprobs(zp, y, temperature=1.3, backend=backend)
    regime, th = route(lt, lp, y != IGNORE, cfg)
    out = dopd_loss(zs, zt, zp, y, config=cfg, backend=backend)
    assert torch.equal(regime, out.regime)
    for a, b in zip(th, out.thresholds):
        assert_close(a, b, rtol=1e-6, what="threshold")
    # And the thresholds from route() fed back into dopd_loss reproduce the same routing.
    again = dopd_loss(zs, zt, zp, y, config=cfg, thresholds=th, backend=backend)
    assert torch.equal(again.regime, out.regime)
    assert_close(again.loss, out.loss, rtol=1e-6, what="loss with thresholds=")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_thresholds_override_changes_routing_as_specified(backend):
    n, v = 32, 19
    zs, zt, zp = correlated_logits(n, v)
    y = random_tokens(n, v)
    # Ā = +huge: every valid token is low; q̄ = 0 → every valid token LH.  Ā = 0: every token high.
    lo = dopd_loss(zs, zt, zp, y, thresholds=(1e6, 0.0, 0.0), backend=backend)
    hi = dopd_loss(zs, zt, zp, y, thresholds=torch.tensor([0.0, 0.5, 0.5]), backend=backend)
    valid = y != IGNORE
    assert (lo.regime[valid] == LH).all()
    qt, qp = hi.q_teacher[valid], hi.q_priv_student[valid]
    assert torch.equal(hi.regime[valid].long(), torch.where(qt >= qp, HT, HS))
    assert float(lo.thresholds.adv_gap) == 1e6 and float(hi.thresholds.q_teacher) == 0.5
