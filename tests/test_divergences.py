"""Hand-checkable divergence cases: the expected figure of every test is computed here by a
closed-form formula (two-point distributions, explicit sums), not copied from the library."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import IGNORE, assert_close, correlated_logits, leaf, random_tokens
from dopd_kernels import DOPDConfig, TorchBackend, dopd_loss, opd_loss

BACKENDS = ["reference", "torch", TorchBackend(row_chunk=3, vocab_chunk=5)]
BACKEND_IDS = ["reference", "torch", "torch-tiled"]
DIVS = ["reverse_kl", "forward_kl", "js"]
GRANS = [("full", True), ("sampled", True), ("topk", True), ("topk", False)]
GRAN_IDS = ["full", "sampled", "topk-renorm", "topk-tail"]


def tol(backend):
    return 1e-12 if backend == "reference" else 2e-6


def kl2(p: float, q: float) -> float:
    """KL between the two-point distributions (p, 1−p) and (q, 1−q)."""
    return sum(a * math.log(a / b) for a, b in ((p, q), (1 - p, 1 - q)) if a > 0)


def js2(p: float, q: float, beta: float) -> float:
    m = beta * p + (1 - beta) * q
    return beta * kl2(p, m) + (1 - beta) * kl2(q, m)


def div2(kind, p, q, beta=0.5):
    return {"reverse_kl": kl2(p, q), "forward_kl": kl2(q, p), "js": js2(p, q, beta)}[kind]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("gran,renorm", GRANS, ids=GRAN_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_identical_distributions_give_zero(kind, gran, renorm, backend):
    (z,) = correlated_logits(13, 29, n_streams=1)
    y = random_tokens(13, 29)
    out = opd_loss(z, z.clone(), y, divergence=kind, granularity=gran, top_k=6, topk_renorm=renorm,
                   reduction="none", backend=backend)
    assert out.per_token_loss.abs().max() <= tol(backend)
    assert float(out.loss.abs().max()) <= tol(backend)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_dopd_identical_streams_give_zero_and_route_all_to_HT(backend):
    # A = 0 for every token, so Ā = 0 and every token is "high" (A ≥ Ā); q_T == q_P → HT; JS(s, s) = 0.
    (z,) = correlated_logits(17, 23, n_streams=1)
    y = random_tokens(17, 23)
    out = dopd_loss(z, z.clone(), z.clone(), y, backend=backend)
    valid = y != IGNORE
    assert (out.regime[valid] == 2).all() and (out.regime[~valid] == -1).all()
    assert float(out.loss.abs()) <= tol(backend)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_js_bounded(beta, backend):
    # Generalized JS ≤ H(β) = −β log β − (1−β) log(1−β) (log 2 at β = 0.5), reached by disjoint supports.
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    zs, zt = correlated_logits(20, 31, n_streams=2, noise=6.0, scale=5.0)
    y = random_tokens(20, 31, mask_frac=0.0)
    out = opd_loss(zs, zt, y, divergence="js", js_beta=beta, reduction="none", backend=backend)
    assert (out.per_token_loss <= bound + 1e-6).all()
    assert (out.per_token_loss >= -1e-7).all()
    # Nearly disjoint: student peaked on column 0, target on column 1 → JS → H(β).
    zs = torch.full((2, 4), -60.0)
    zt = zs.clone()
    zs[:, 0] = 60.0
    zt[:, 1] = 60.0
    out = opd_loss(zs, zt, torch.tensor([0, 1]), divergence="js", js_beta=beta, reduction="none", backend=backend)
    assert_close(out.per_token_loss, torch.full((2,), bound), rtol=1e-5, what="disjoint JS")


# The sampled reverse-KL estimator sg(log p − log q)·log p can be negative by design: excluded.
KL_CASES = [(k, g, r) for k in ("reverse_kl", "forward_kl") for g, r in GRANS if not (k == "reverse_kl" and g == "sampled")]


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind,gran,renorm", KL_CASES)
def test_kl_nonnegative(kind, gran, renorm, backend):
    zs, zt = correlated_logits(24, 19, n_streams=2, noise=2.0)
    y = random_tokens(24, 19)
    out = opd_loss(zs, zt, y, divergence=kind, granularity=gran, top_k=5, topk_renorm=renorm, reduction="none",
                   backend=backend)
    assert (out.per_token_loss >= -1e-7).all()
    assert (out.per_token_loss[y != IGNORE] > 0).any()


def test_sampled_reverse_kl_estimator_can_be_negative():
    # The estimator is d·log p(y): with log p(y) < 0 and log p(y) > log q(y) it is negative.
    zs = torch.tensor([[2.0, 0.0, 0.0]])
    zt = torch.tensor([[0.0, 0.0, 0.0]])
    out = opd_loss(zs, zt, torch.tensor([0]), granularity="sampled", reduction="none", backend="torch")
    lp = 2.0 - math.log(math.exp(2) + 2)
    lq = -math.log(3)
    assert_close(out.per_token_loss, torch.tensor([(lp - lq) * lp]), rtol=1e-6, what="sampled RKL")
    assert float(out.loss) < 0


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_two_point_full_closed_form(kind, backend):
    # V = 2: p = σ((a0 − a1)/τ), q = σ((b0 − b1)/τ).
    tau = float(torch.empty(()).uniform_(0.5, 2.0))
    beta = float(torch.empty(()).uniform_(0.1, 0.9))
    zs, zt = 3 * torch.randn(8, 2), 3 * torch.randn(8, 2)
    expected = [div2(kind, sigmoid((float(a[0]) - float(a[1])) / tau), sigmoid((float(b[0]) - float(b[1])) / tau), beta)
                for a, b in zip(zs, zt)]
    out = opd_loss(zs, zt, torch.randint(0, 2, (8,)), divergence=kind, js_beta=beta, temperature=tau,
                   reduction="none", backend=backend)
    assert_close(out.per_token_loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, what=kind)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", ["forward_kl", "js"])
def test_sampled_two_bucket_closed_form(kind, backend):
    # Sampled forward KL / JS are the two-point divergences of (p(y), 1 − p(y)) and (q(y), 1 − q(y)).
    zs, zt = correlated_logits(9, 11, n_streams=2, noise=1.5)
    y = torch.randint(0, 11, (9,))
    ps, pt = zs.double().softmax(-1), zt.double().softmax(-1)
    expected = [div2(kind, float(ps[i, y[i]]), float(pt[i, y[i]]), 0.5) for i in range(9)]
    out = opd_loss(zs, zt, y, divergence=kind, granularity="sampled", reduction="none", backend=backend)
    assert_close(out.per_token_loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, what=kind)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("kind", DIVS)
def test_topk_explicit_sum(kind, renorm, backend):
    # K = 2 of V = 6: the support is the student's two largest logits, written out by hand.
    zs, zt = correlated_logits(5, 6, n_streams=2, noise=1.0)
    out = opd_loss(zs, zt, torch.zeros(5, dtype=torch.long), divergence=kind, granularity="topk", top_k=2,
                   topk_renorm=renorm, reduction="none", backend=backend)
    expected = []
    for a, b in zip(zs.double(), zt.double()):
        p, q = a.softmax(0).tolist(), b.softmax(0).tolist()
        i, j = sorted(range(6), key=lambda c: -p[c])[:2]
        if renorm:
            pb = [p[i] / (p[i] + p[j]), p[j] / (p[i] + p[j])]
            qb = [q[i] / (q[i] + q[j]), q[j] / (q[i] + q[j])]
        else:
            pb = [p[i], p[j], sum(p) - p[i] - p[j]]
            qb = [q[i], q[j], sum(q) - q[i] - q[j]]
        if kind == "reverse_kl":
            expected.append(sum(x * math.log(x / w) for x, w in zip(pb, qb)))
        elif kind == "forward_kl":
            expected.append(sum(w * math.log(w / x) for x, w in zip(pb, qb)))
        else:
            mb = [(x + w) / 2 for x, w in zip(pb, qb)]
            expected.append(0.5 * sum(x * math.log(x / m) for x, m in zip(pb, mb))
                            + 0.5 * sum(w * math.log(w / m) for w, m in zip(qb, mb)))
    assert_close(out.per_token_loss, torch.tensor(expected, dtype=torch.float64), rtol=2e-5, what=kind)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", DIVS)
def test_full_gradient_closed_form(kind, backend):
    """DESIGN.md section 2 gradients with respect to the student logits, written out per row."""
    tau = float(torch.empty(()).uniform_(0.5, 2.0))
    beta = float(torch.empty(()).uniform_(0.2, 0.8))
    zs, zt = correlated_logits(7, 10, n_streams=2, noise=1.0)
    s = leaf(zs)
    opd_loss(s, zt, torch.zeros(7, dtype=torch.long), divergence=kind, js_beta=beta, temperature=tau,
             reduction="sum", backend=backend).loss.backward()
    p, q = (zs.double() / tau).softmax(-1), (zt.double() / tau).softmax(-1)
    lp, lq = p.log(), q.log()
    if kind == "reverse_kl":
        rkl = (p * (lp - lq)).sum(-1, keepdim=True)
        expected = p * (lp - lq - rkl) / tau
    elif kind == "forward_kl":
        expected = (p - q) / tau
    else:
        lm = (beta * p + (1 - beta) * q).log()
        klm = (p * (lp - lm)).sum(-1, keepdim=True)
        expected = beta / tau * p * (lp - lm - klm)
    assert_close(s.grad, expected, rtol=1e-5, what=f"d{kind}/dz")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_sampled_reverse_kl_gradient_is_policy_gradient(backend):
    # d/dz_v [sg(d)·log p(y)] = d·(δ_vy − p_v)/τ with d = log p(y) − log q(y).
    tau = 1.5
    zs, zt = correlated_logits(6, 9, n_streams=2)
    y = torch.randint(0, 9, (6,))
    s = leaf(zs)
    opd_loss(s, zt, y, granularity="sampled", temperature=tau, reduction="sum", backend=backend).loss.backward()
    lp, lq = (zs.double() / tau).log_softmax(-1), (zt.double() / tau).log_softmax(-1)
    d = (lp - lq).gather(1, y[:, None])
    expected = d * (torch.nn.functional.one_hot(y, 9).double() - lp.exp()) / tau
    assert_close(s.grad, expected, rtol=1e-5, what="sampled RKL grad")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_dopd_single_regime_weights(backend):
    # With thresholds (Ā huge, q̄ = 0) every token is LH: loss = β_l · top-K reverse KL(s‖T), by hand.
    zs, zt, zp = correlated_logits(6, 8)
    y = torch.randint(0, 8, (6,))
    cfg = DOPDConfig(top_k=3, beta_light=0.7)
    out = dopd_loss(zs, zt, zp, y, config=cfg.replace(reduction="none"), thresholds=(1e9, 0.0, 0.0), backend=backend)
    assert (out.regime == 0).all()
    expected = []
    for a, b in zip(zs.double(), zt.double()):
        cols = a.topk(3).indices
        pa, pb = a[cols].softmax(0), b[cols].softmax(0)
        expected.append(0.7 * float((pa * (pa.log() - pb.log())).sum()))
    assert_close(out.per_token_loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, what="LH")
