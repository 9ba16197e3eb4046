"""Non-finite values (issue 15 points 3, 4 and 7): one documented behaviour on every backend.

check_finite=True: a NaN/+inf logit or a row with no finite logit over the valid vocabulary is a
ValueError naming the stream and the row, raised before any kernel runs. check_finite=False: a
non-finite value never changes another token's routing and shows as NaN in the loss. `route()`
validates its inputs. Double backward is a clear error on the fused backends (the float64 reference
differentiates twice correctly). The checks live in `hardening_checks` for every backend to run.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, correlated_logits, leaf, random_tokens
from dopd_kernels import DOPDConfig, TorchBackend, dopd_loss, route, token_logprobs
from hardening_checks import (CORRUPTIONS, check_double_backward_raises, check_nonfinite_fused_linear,
                              check_nonfinite_opd, check_nonfinite_routing)
from test_validation import TRAP

BACKENDS = ["reference", "torch", TorchBackend(row_chunk=3, vocab_chunk=7)]
IDS = ["reference", "torch", "torch-3x7"]


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("stream", [0, 1, 2], ids=["student", "teacher", "priv_student"])
def test_nonfinite_row_never_reroutes_and_shows_as_nan(stream, how, backend):
    check_nonfinite_routing(backend, stream, how)


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("stream", [0, 1], ids=["student", "teacher"])
@pytest.mark.parametrize("gran", ["full", "topk", "sampled"])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js"])
def test_nonfinite_opd_shows_as_nan(kind, gran, stream, how, backend):
    check_nonfinite_opd(backend, kind, gran, stream, how)


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_nonfinite_fused_linear(backend):
    check_nonfinite_fused_linear(backend)


@pytest.mark.parametrize("stream", [0, 1, 2])
def test_check_finite_refuses_an_all_minus_inf_row(stream):
    zs, zt, zp = correlated_logits((3, 5), 13)
    streams = [zs, zt, zp.clone()]
    streams[stream] = streams[stream].clone()
    streams[stream][1, 2, 4] = float("-inf")  # one -inf logit is allowed (an impossible token) ...
    streams[stream][2, 3, :11] = float("-inf")  # ... a row with none finite in the valid vocabulary is not
    name = ("student_logits", "teacher_logits", "priv_student_logits")[stream]
    y = random_tokens((3, 5), 11)
    with pytest.raises(ValueError, match=rf"{name} has a row whose logits are all -inf .*\(row 13 of"):
        dopd_loss(*streams, y, config=DOPDConfig(valid_vocab=11), check_finite=True, backend=TRAP)
    streams[stream][2, 3, :11] = 0.0
    # Once refused rows are repaired the call runs and agrees with the float64 reference. The loss may
    # legitimately be +inf: a divergence whose second argument gives the one -inf token zero mass.
    out = dopd_loss(*streams, y, config=DOPDConfig(valid_vocab=11, reduction="none"), check_finite=True,
                    backend="torch")
    ref = dopd_loss(*(z.double() for z in streams), y, config=DOPDConfig(valid_vocab=11, reduction="none"),
                    backend="reference")
    assert not torch.isnan(out.per_token_loss).any()
    torch.testing.assert_close(out.per_token_loss.double(), ref.per_token_loss, rtol=1e-5, atol=1e-6)


def test_check_finite_names_the_row_of_a_nan():
    zs, zt, zp = correlated_logits(9, 13)
    zt = zt.clone()
    zt[6, 4] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits contains NaN or \+inf values \(row 6 of"):
        dopd_loss(zs, zt, zp, random_tokens(9, 13), check_finite=True, backend=TRAP)


def test_minus_inf_at_the_sampled_token_is_routed_but_not_averaged():
    # ℓ_T = -inf (the teacher rules y out): A = +inf, excluded from the thresholds, routed by the table
    # (HS: q_T = 0 < q_P); ℓ_T = ℓ_P = -inf: A = 0 (both agree), q = 0: LL. Losses stay finite: row 1's
    # y is kept out of the student's top-K (inside it, KL(s‖P) is legitimately +inf: P gives y no mass).
    zs, zt, zp = (z.clone() for z in correlated_logits(30, 17))
    y = torch.randint(0, 17, (30,))
    zt[0, y[0]] = float("-inf")
    zt[1, y[1]] = zp[1, y[1]] = float("-inf")
    zs[1, y[1]] = zs[1].min() - 1.0
    out = dopd_loss(zs, zt, zp, y, config=DOPDConfig(top_k=4, reduction="none"), backend="torch")
    assert out.regime[0] == 3 and out.regime[1] == 1
    assert out.adv_gap[1] == 0 and torch.isinf(out.adv_gap[0])
    assert torch.isfinite(out.per_token_loss).all() and all(torch.isfinite(t) for t in out.thresholds)
    ref = dopd_loss(zs.double(), zt.double(), zp.double(), y, config=DOPDConfig(top_k=4, reduction="none"),
                    backend="reference")
    assert torch.equal(out.regime, ref.regime)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=1e-5, what="per-token loss")


def test_route_validates_and_excludes_non_finite():
    lt, lp = -torch.rand(20, dtype=torch.float64) * 3, -torch.rand(20, dtype=torch.float64) * 3
    valid = torch.ones(20, dtype=torch.bool)
    for bad in (float("nan"), float("inf")):
        x = lt.clone()
        x[4] = bad
        with pytest.raises(ValueError, match=r"teacher_logprob holds NaN or \+inf at valid position \(4,\)"):
            route(x, lp, valid)
        valid_4 = valid.clone()
        valid_4[4] = False
        route(x, lp, valid_4)  # a masked position may hold anything
    with pytest.raises(TypeError, match="config must be a DOPDConfig"):
        route(lt, lp, valid, config={"trim": 0.1})
    with pytest.raises(TypeError, match="thresholds must be"):
        route(lt, lp, valid, thresholds="123")
    x = lt.clone()
    x[3] = float("-inf")
    masked = valid.clone()
    masked[3] = False
    regime, th = route(x, lp, valid)
    regime_m, th_m = route(lt, lp, masked)
    assert all(float(a) == float(b) for a, b in zip(th, th_m)), "a -inf log-prob moved the thresholds"
    assert torch.equal(regime[masked], regime_m[masked]) and regime[3] == 3


@pytest.mark.parametrize("backend", ["torch", TorchBackend(row_chunk=2, vocab_chunk=5)], ids=["torch", "torch-2x5"])
def test_double_backward_raises(backend):
    check_double_backward_raises(backend)


def test_reference_double_backward_is_exact():
    # The float64 reference is plain autograd: its Hessian-vector product matches finite differences.
    zs, zt, zp = (z.double() for z in correlated_logits(6, 11))
    y = random_tokens(6, 11)
    cfg = DOPDConfig(top_k=4)

    def grad(z):
        s = leaf(z)
        (g,) = torch.autograd.grad(dopd_loss(s, zt, zp, y, config=cfg, backend="reference").loss, s, create_graph=True)
        return s, g

    v = torch.randn_like(zs)
    s, g = grad(zs)
    (hvp,) = torch.autograd.grad((g * v).sum(), s)
    eps = 1e-6
    fd = (grad(zs + eps * v)[1] - grad(zs - eps * v)[1]) / (2 * eps)
    torch.testing.assert_close(hvp, fd.detach(), rtol=1e-5, atol=1e-8)


def test_token_logprobs_nan_row_gives_nan():
    zs, = correlated_logits(5, 13, n_streams=1)
    zs = zs.clone()
    zs[2, 0] = float("nan")
    y = torch.randint(0, 13, (5,))
    for backend in ("reference", "torch"):
        lp = token_logprobs(zs, y, backend=backend)
        assert torch.isnan(lp[2]) and torch.isfinite(lp[torch.arange(5) != 2]).all()
