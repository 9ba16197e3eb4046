"""Issue 15 checks every backend runs: fp32 precision at large logits, the non-finite policy, and
double backward. Each function takes a backend (name or object) and a device; the cpp and triton test
modules parametrize the same functions over their backends:

    from hardening_checks import PRECISION_CASES, check_large_logits, check_nonfinite_routing, ...

Precision (issue 15 points 5/7): log-probabilities are formed against a float64 log-sum-exp
(`Stats.lse`, `passes.split_lse`), so fp32 results stay at fp32's relative precision however large the
logits are. Tolerances are the peers' (Liger's JSD kernel: ~1.6e-6 of the gradient's scale at
N(0, 40²); ~1e-7 relative on the loss at a 1e4 offset), with a small margin.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import IGNORE, assert_close, correlated_logits, leaf, linear_streams, random_tokens
from dopd_kernels import DOPDConfig, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss

LOG2 = math.log(2.0)


def _large_logits(case: str, n: int, v: int):
    """(student, target) fp32 logits of a precision case; the target is correlated with the student."""
    if case == "normal-40":  # ~N(0, 40²)
        s = 40 * torch.randn(n, v, dtype=torch.float64)
        t = 0.6 * s + 0.8 * 40 * torch.randn(n, v, dtype=torch.float64)
    elif case == "offset-1e4":  # spread ±4 around 1e4: the lse is ~1e4, log p is O(1)
        # Distinct values 2^-8 apart (fp32's grid at 1e4 is 2^-10): a top-K set never hinges on a tie.
        s = torch.stack([torch.randperm(v, dtype=torch.float64) for _ in range(n)]) * 2.0 ** -8 + (1e4 - v * 2.0 ** -9)
        t = s + 1.5 * torch.randn(n, v, dtype=torch.float64)
    else:  # "spread-1e4": uniform over ±1e4, offset by 1e4 (near one-hot rows, JS near its bound)
        s = torch.empty(n, v, dtype=torch.float64).uniform_(-1e4, 1e4) + 1e4
        t = torch.empty(n, v, dtype=torch.float64).uniform_(-1e4, 1e4) + 1e4
    return s.float(), t.float()


PRECISION_CASES = ("normal-40", "offset-1e4", "spread-1e4")
# Loss: relative error against float64 on the same fp32 values (plus an absolute floor for losses that
# are ~0, e.g. two-bucket terms of a token with no mass). Gradient: max error over the gradient's scale.
LOSS_RTOL, LOSS_ATOL, GRAD_TOL = 1e-6, 1e-9, 4e-6


def check_large_logits(backend, case: str, kind: str, gran: str, device: str = "cpu", n: int = 32, v: int = 2048):
    """opd_loss on fp32 logits of a precision case vs the float64 reference on the same values:
    loss within LOSS_RTOL, gradient within GRAD_TOL of its scale (scale at least 1/N: a saturated JS
    row has a ~0 gradient), JS per token never above log 2."""
    zs, zt = _large_logits(case, n, v)
    y = torch.randint(0, v, (n,))
    kw = dict(divergence=kind, granularity=gran, top_k=8, topk_renorm=False)
    s, s64 = leaf(zs.to(device)), leaf(zs, torch.float64)
    out = opd_loss(s, zt.to(device), y.to(device), backend=backend, **kw)
    ref = opd_loss(s64, zt.double(), y, backend="reference", **kw)
    out.loss.backward()
    ref.loss.backward()
    # The loss is a mean of per-token values that may cancel (the sampled reverse-KL estimator is
    # signed): its error is judged on the scale of the mean of |per-token loss|.
    err = abs(float(out.loss.detach()) - float(ref.loss.detach()))
    scale = float(ref.per_token_loss.abs().mean())
    assert err <= LOSS_RTOL * scale + LOSS_ATOL, (
        f"{case} {kind} {gran}: loss {float(out.loss.detach()):.9g} vs {float(ref.loss.detach()):.9g} (error "
        f"{err / max(scale, 1e-30):.2e} of the mean |per-token loss|)")
    gscale = max(float(s64.grad.abs().max()), 1.0 / n)
    gerr = float((s.grad.cpu().double() - s64.grad).abs().max())
    # At N(0, 40²) log-ratios are ~100 and the reverse-KL residual log p − log q − c cancels to O(1): it holds
    # GRAD_TOL only because every backend forms it as D_v − K from exact logit differences (row_math.h
    # full_grad_term); naive fp32 PyTorch, which rounds log q and c at ~1e-5, measured up to 4.3e-6 there.
    assert gerr <= GRAD_TOL * gscale, f"{case} {kind} {gran}: gradient error {gerr / gscale:.2e} of its scale"
    if kind == "js":
        assert float(out.per_token_loss.max()) <= LOG2, f"JS exceeds log 2: {float(out.per_token_loss.max())!r}"
        assert float(out.loss.detach()) <= LOG2 * (1 + 2 ** -23)


def check_dopd_large_logits(backend, device: str = "cpu", n: int = 48, v: int = 1024):
    """DOPD on the spread-1e4 case: routing equals the reference's, loss within LOSS_RTOL, no JS above log 2."""
    zs, zt = _large_logits("spread-1e4", n, v)
    zp = (zs.double() + torch.empty(n, v, dtype=torch.float64).uniform_(-3e3, 3e3)).float()
    y = random_tokens(n, v)
    cfg = DOPDConfig(top_k=8, trim=0.1)
    s = leaf(zs.to(device))
    out = dopd_loss(s, zt.to(device), zp.to(device), y.to(device), config=cfg, backend=backend)
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=cfg, backend="reference")
    assert torch.equal(out.regime.cpu(), ref.regime)
    err = abs(float(out.loss.detach()) - float(ref.loss))
    assert err <= LOSS_RTOL * abs(float(ref.loss)) + LOSS_ATOL, f"relative loss error {err / abs(float(ref.loss)):.2e}"
    ht = out.regime.cpu() == 2
    assert float(out.per_token_loss.cpu()[ht].amax()) <= LOG2 if bool(ht.any()) else True


# -- forward KL's tail bucket when the student's tail mass is far below the teacher's -------------------

# Gaps (nats) between a row's explicit columns and the rest of its student logits, cycled over the rows:
# none (an ordinary row); 60 (the tail coefficient 1 − Q_rest/P_rest ≈ −e^60 is past 2^64, p_v of a tail
# column ~e^-64); 95 (the coefficient overflows fp32 while p_v ~e^-99 is an fp32 subnormal: p_v·dense = inf
# in fp32); 1000 (Q_rest/P_rest ≈ e^1000 overflows float64, p_v underflows it, while the tail's gradient
# −Q_rest·p_v/P_rest is O(1)).
TAIL_GAPS = (0.0, 60.0, 95.0, 1000.0)
FLOAT64_GRAD_TOL = 1e-10


def _tail_streams(n: int, v: int, k: int):
    """(student, teacher) float64 logits [n, v] around 1e4 and the explicit columns [n, k]: the student's
    k head columns stand `TAIL_GAPS[i % 3]` nats above its other columns; the teacher is flat (~N(1e4, 3²)),
    so its tail holds ~(v − k)/v of its mass."""
    head = torch.stack([torch.randperm(v)[:k] for _ in range(n)])
    gap = torch.tensor([TAIL_GAPS[i % len(TAIL_GAPS)] for i in range(n)], dtype=torch.float64)
    s = 1e4 + 3 * torch.randn(n, v, dtype=torch.float64) - gap[:, None]
    s.scatter_(1, head, 1e4 + 3 * torch.randn(n, k, dtype=torch.float64))
    t = 1e4 + 3 * torch.randn(n, v, dtype=torch.float64)
    return s, t, head


def check_forward_kl_tail(backend, gran: str, dtype: torch.dtype, mode: str = "logits", device: str = "cpu",
                          n: int = 12, v: int = 64, k: int = 4):
    """Forward KL with a tail bucket (top-K with topk_renorm=False; sampled: the buckets {y, not y} with y
    the student's argmax) where the student's tail mass is e^-60 and e^-1000 of the teacher's, against the
    float64 reference on the same `dtype` values: gradient within GRAD_TOL (fp32) or FLOAT64_GRAD_TOL of
    its scale, loss within LOSS_RTOL. The product p_v · (1 − Q_rest/P_rest) of an underflowed p_v and an
    overflowed coefficient came out 0 (torch) or inf (cpp) on the tail columns, whose exact gradient is
    −Q_rest·p_v/P_rest = O(1). `mode="linear"`: the same logits from fused-linear streams (hidden = the
    logits, weight = the identity, so h·Wᵀ is exact and the hidden gradient is the logits gradient)."""
    k = 1 if gran == "sampled" else k
    zs, zt, head = _tail_streams(n, v, k)
    zs, zt = zs.to(dtype).double(), zt.to(dtype).double()  # the values the backend sees
    y = head[:, 0]  # sampled: the student's argmax
    kw = dict(divergence="forward_kl", granularity=gran, top_k=k, topk_renorm=False)
    s, s64 = leaf(zs.to(dtype).to(device)), leaf(zs)
    if mode == "linear":
        eye = torch.eye(v, dtype=dtype, device=device)
        out = fused_linear_opd_loss(s, eye, zt.to(dtype).to(device), eye, y.to(device), backend=backend, **kw)
    else:
        out = opd_loss(s, zt.to(dtype).to(device), y.to(device), backend=backend, **kw)
    ref = opd_loss(s64, zt, y, backend="reference", **kw)
    out.loss.backward()
    ref.loss.backward()
    # The case is there: on the rows with the widest gap, Q_rest/P_rest is past float64's range and the
    # reference's gradient on their tail columns is a sizeable part of the whole gradient.
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    tail = torch.ones_like(lp, dtype=torch.bool).scatter(1, head, False)
    rest = [torch.logsumexp(x.masked_fill(~tail, float("-inf")), -1) for x in (lp, lq)]
    wide = rest[1] - rest[0] > math.log(torch.finfo(torch.float64).max)
    gscale = max(float(s64.grad.abs().max()), 1.0 / n)
    assert bool(wide.any()) and float(s64.grad[wide][tail[wide]].abs().max()) > 0.1 * gscale
    err = abs(float(out.loss.detach()) - float(ref.loss.detach()))
    assert err <= LOSS_RTOL * float(ref.per_token_loss.abs().mean()) + LOSS_ATOL, f"{gran} {mode}: loss error {err:.2e}"
    tol = GRAD_TOL if dtype != torch.float64 else FLOAT64_GRAD_TOL
    g = s.grad.cpu().double()
    gerr = (g - s64.grad).abs()
    worst = int(gerr.max(1).values.argmax())
    assert float(gerr.max()) <= tol * gscale, (
        f"{gran} {mode} {str(dtype)[6:]}: gradient error {float(gerr.max()) / gscale:.2e} of its scale (tolerance {tol:g}); "
        f"worst row gap {TAIL_GAPS[worst % len(TAIL_GAPS)]:g}, its tail gradient sums to "
        f"{float(g[worst][tail[worst]].sum()):.6g} vs {float(s64.grad[worst][tail[worst]].sum()):.6g}")


# -- non-finite values ---------------------------------------------------------------------------

CORRUPTIONS = ("nan", "posinf", "all-neginf")


def _corrupt(z: torch.Tensor, row: int, how: str, col: int) -> torch.Tensor:
    z = z.clone()
    if how == "nan":
        z[row, col] = float("nan")
    elif how == "posinf":
        z[row, col] = float("inf")
    else:
        z[row] = float("-inf")
    return z


def check_nonfinite_routing(backend, stream: int, how: str, device: str = "cpu", n: int = 40, v: int = 37):
    """check_finite=False: one corrupted row of `stream` (0 student, 1 teacher, 2 priv-student) leaves
    the thresholds, regimes and losses of every other token exactly as if that token were masked (a
    student row: as if it were clean, the student does not route), and shows as a NaN loss on that
    token (teacher/priv: routed to HS) and in the total."""
    zs, zt, zp = correlated_logits(n, v, noise=(0.8, 1.2))
    y = random_tokens(n, v, mask_frac=0.1)
    bad = int((y != IGNORE).nonzero()[0])
    streams = [zs, zt, zp]
    streams[stream] = _corrupt(streams[stream], bad, how, (int(y[bad]) + 3) % v)
    cfg = DOPDConfig(top_k=5, trim=0.1, reduction="none")
    dev = [z.to(device) for z in streams]
    out = dopd_loss(*dev, y.to(device), config=cfg, backend=backend)
    y_cmp = y if stream == 0 else y.masked_fill(torch.arange(n) == bad, IGNORE)
    masked = dopd_loss(zs.to(device), zt.to(device), zp.to(device), y_cmp.to(device), config=cfg, backend=backend)
    for a, b in zip(out.thresholds, masked.thresholds):
        assert math.isfinite(float(a)) and float(a) == float(b), "a non-finite token moved the thresholds"
    others = torch.arange(n) != bad
    assert torch.equal(out.regime.cpu()[others], masked.regime.cpu()[others]), "other tokens were re-routed"
    assert_close(out.per_token_loss.cpu()[others], masked.per_token_loss.cpu()[others], rtol=1e-6, what="other tokens")
    assert math.isnan(float(out.per_token_loss[bad])), "the corrupted token's loss hides behind a finite value"
    if stream:
        assert int(out.regime[bad]) == 3, "a token with NaN routing statistics goes to HS"
    total = dopd_loss(*dev, y.to(device), config=cfg.replace(reduction="mean"), backend=backend)
    assert math.isnan(float(total.loss))


def check_nonfinite_opd(backend, kind: str, gran: str, stream: int, how: str, device: str = "cpu", n: int = 12,
                        v: int = 29):
    """check_finite=False, OPD: a corrupted student/teacher row gives a NaN loss on that token (never a
    finite value, whatever the granularity), the other tokens' losses unchanged."""
    zs, zt = correlated_logits(n, v, n_streams=2)
    y = torch.randint(0, v, (n,))
    bad = n // 2
    streams = [zs, zt]
    streams[stream] = _corrupt(streams[stream], bad, how, (int(y[bad]) + 2) % v)
    kw = dict(divergence=kind, granularity=gran, top_k=4, reduction="none", backend=backend)
    out = opd_loss(streams[0].to(device), streams[1].to(device), y.to(device), **kw)
    clean = opd_loss(zs.to(device), zt.to(device), y.to(device), **kw)
    assert math.isnan(float(out.per_token_loss[bad])), f"{kind}/{gran}: a non-finite row gave a finite loss"
    others = torch.arange(n) != bad
    assert_close(out.per_token_loss.cpu()[others], clean.per_token_loss.cpu()[others], rtol=1e-6, what="other tokens")


def check_nonfinite_fused_linear(backend, device: str = "cpu", n: int = 20, hdim: int = 6, v: int = 23):
    """A NaN teacher hidden row (fused-linear mode): NaN loss on that token, other tokens routed as if
    it were masked."""
    t = linear_streams(n, hdim, v)
    y = random_tokens(n, v, mask_frac=0.1)
    bad = int((y != IGNORE).nonzero()[0])
    th = t["teacher_hidden"].clone()
    th[bad, 1] = float("nan")
    cfg = DOPDConfig(top_k=4, trim=0.1, reduction="none")

    def call(teacher_hidden, tokens):
        return fused_linear_dopd_loss(t["student_hidden"].to(device), t["student_weight"].to(device), teacher_hidden.to(device),
                                      t["teacher_weight"].to(device), t["priv_student_hidden"].to(device), tokens.to(device),
                                      config=cfg, backend=backend)

    out, masked = call(th, y), call(t["teacher_hidden"], y.masked_fill(torch.arange(n) == bad, IGNORE))
    others = torch.arange(n) != bad
    assert torch.equal(out.regime.cpu()[others], masked.regime.cpu()[others])
    assert math.isnan(float(out.per_token_loss[bad])) and int(out.regime[bad]) == 3


def check_double_backward_raises(backend, device: str = "cpu"):
    """Second derivatives are not implemented by the fused passes: asking for them is a clear error."""
    zs, zt, zp = correlated_logits(10, 17)
    s = leaf(zs.to(device))
    out = dopd_loss(s, zt.to(device), zp.to(device), random_tokens(10, 17).to(device), backend=backend)
    with pytest.raises(RuntimeError, match="cannot differentiate twice"):
        torch.autograd.grad(out.loss, s, create_graph=True)
    (g,) = torch.autograd.grad(out.loss, s)  # first order is unaffected
    assert torch.isfinite(g).all()


def precision_report(backend, n: int = 64, v: int = 4096, seed: int = 0) -> list:
    """Rows (case, kind, granularity, loss, loss error / mean |per-token|, gradient error / its scale,
    max JS per token) of fp32 `backend` against float64, for the README's precision table."""
    torch.manual_seed(seed)
    rows = []
    for case in PRECISION_CASES:
        zs, zt = _large_logits(case, n, v)
        y = torch.randint(0, v, (n,))
        for kind in ("reverse_kl", "forward_kl", "js"):
            for gran in ("full", "topk", "sampled"):
                kw = dict(divergence=kind, granularity=gran, top_k=8, topk_renorm=False)
                s, s64 = leaf(zs), leaf(zs, torch.float64)
                out = opd_loss(s, zt, y, backend=backend, **kw)
                ref = opd_loss(s64, zt.double(), y, backend="reference", **kw)
                out.loss.backward()
                ref.loss.backward()
                lerr = abs(float(out.loss.detach()) - float(ref.loss.detach())) / float(ref.per_token_loss.abs().mean())
                gerr = float((s.grad.double() - s64.grad).abs().max()) / max(float(s64.grad.abs().max()), 1.0 / n)
                js_max = float(out.per_token_loss.max()) if kind == "js" else float("nan")
                rows.append((case, kind, gran, float(ref.loss.detach()), lerr, gerr, js_max))
    return rows


if __name__ == "__main__":  # python tests/hardening_checks.py [backend]
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "torch"
    print(f"| case | divergence | granularity | float64 loss | loss error | gradient error | max JS − log 2 |  ({name}, N=64, V=4096)")
    print("|---|---|---|---|---|---|---|")
    for case, kind, gran, loss, lerr, gerr, js_max in precision_report(name):
        js = f"{js_max - LOG2:+.1e}" if kind == "js" else ""
        print(f"| {case} | {kind} | {gran} | {loss:.3g} | {lerr:.1e} | {gerr:.1e} | {js} |")
