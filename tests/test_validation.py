"""Bad inputs: a clear TypeError/ValueError naming the argument, raised before any backend runs.

A backend object that fails the test if its first pass is reached proves "before any kernel runs". Mismatched devices cannot be constructed on a CPU-only machine and are not tested.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import correlated_logits, linear_streams, random_tokens
from dopd_kernels import (DOPDConfig, OPDConfig, TorchBackend, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss,
                          opd_loss, route, token_logprobs)


class TrapBackend(TorchBackend):
    """A backend whose passes must never run (every call starts with the stats pass, or with the
    one-sweep full pass for full-vocabulary OPD)."""

    def stats_pass(self, *a, **k):
        raise AssertionError("a pass ran before validation rejected the input")

    full_pass = stats_pass


TRAP = TrapBackend()
N, V = 8, 13


@pytest.fixture
def logits():
    zs, zt, zp = correlated_logits(N, V)
    return zs, zt, zp, random_tokens(N, V)


def _expect(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_good_inputs_pass_validation_and_reach_the_backend(logits):
    zs, zt, zp, y = logits
    with pytest.raises(AssertionError, match="a pass ran"):
        dopd_loss(zs, zt, zp, y, backend=TRAP)


@pytest.mark.parametrize("case", [
    "teacher-shape", "priv-vocab", "tokens-shape", "student-1d", "student-4d", "int-logits", "float-tokens",
    "bool-tokens", "token-too-big", "token-negative", "token-in-padding", "tokens-list", "logits-ndarray",
])
def test_dopd_bad_tensors(logits, case):
    zs, zt, zp, y = logits
    args = dict(student_logits=zs, teacher_logits=zt, priv_student_logits=zp, tokens=y)
    cfg = None
    exc, match = ValueError, None
    if case == "teacher-shape":
        args["teacher_logits"], match = zt[:-1], "teacher_logits must have the shape of student_logits"
    elif case == "priv-vocab":
        args["priv_student_logits"], match = zp[:, :-1], "priv_student_logits must have the shape"
    elif case == "tokens-shape":
        args["tokens"], match = y[:-1], r"tokens must have shape \[8\]"
    elif case == "student-1d":
        args["student_logits"], match = zs[0], r"student_logits must have shape \[N, V\] or \[B, T, V\]"
    elif case == "student-4d":
        args["student_logits"] = zs.reshape(2, 2, 2, V)
        match = r"student_logits must have shape \[N, V\] or \[B, T, V\]"
    elif case == "int-logits":
        args["teacher_logits"], exc, match = zt.long(), TypeError, "teacher_logits must have dtype"
    elif case == "float-tokens":
        args["tokens"], exc, match = y.float(), TypeError, "tokens must have an integer dtype"
    elif case == "bool-tokens":
        args["tokens"], exc, match = y > 0, TypeError, "tokens must have an integer dtype"
    elif case == "token-too-big":
        y = y.clone()
        y[0] = V
        args["tokens"], match = y, rf"tokens must lie in \[0, {V}\)"
    elif case == "token-negative":
        y = y.clone()
        y[1] = -3
        args["tokens"], match = y, rf"tokens must lie in \[0, {V}\).*found -3"
    elif case == "token-in-padding":
        y = y.clone()
        y[0] = V - 1
        cfg, match = DOPDConfig(valid_vocab=V - 2), rf"tokens must lie in \[0, {V - 2}\)"
        args["tokens"] = y
    elif case == "tokens-list":
        args["tokens"], exc, match = y.tolist(), TypeError, "tokens must be a torch.Tensor"
    elif case == "logits-ndarray":
        args["student_logits"], exc, match = zs.numpy(), TypeError, "student_logits must be a torch.Tensor"
    _expect(exc, match, dopd_loss, **args, config=cfg, backend=TRAP)


def test_valid_vocab_larger_than_vocabulary(logits):
    zs, zt, zp, y = logits
    _expect(ValueError, "valid_vocab=14 exceeds the vocabulary size 13", dopd_loss, zs, zt, zp, y,
            config=DOPDConfig(valid_vocab=V + 1), backend=TRAP)
    _expect(ValueError, "valid_vocab", opd_loss, zs, zt, y, valid_vocab=V + 1, backend=TRAP)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("stream", [0, 1, 2])
def test_non_finite_logits_with_check_finite(logits, bad, stream):
    zs, zt, zp, y = logits
    streams = [zs.clone(), zt.clone(), zp.clone()]
    streams[stream][3, 5] = bad
    name = ("student_logits", "teacher_logits", "priv_student_logits")[stream]
    _expect(ValueError, f"{name} contains NaN or \\+inf", dopd_loss, *streams, y, check_finite=True, backend=TRAP)


def test_check_finite_allows_minus_inf_padding(logits):
    zs, zt, zp, y = logits
    zs, zt, zp = (z.clone() for z in (zs, zt, zp))
    for z in (zs, zt, zp):
        z[:, -2:] = float("-inf")
    y = y.masked_fill(y >= V - 2, 0)
    out = dopd_loss(zs, zt, zp, y, check_finite=True, backend="torch")
    assert torch.isfinite(out.loss)


def test_fused_linear_non_finite_with_check_finite():
    t = linear_streams(N, 4, V)
    y = random_tokens(N, V)
    w = t["teacher_weight"].clone()
    w[2, 1] = float("nan")
    _expect(ValueError, "teacher_weight contains NaN", fused_linear_dopd_loss, t["student_hidden"], t["student_weight"],
            t["teacher_hidden"], w, t["priv_student_hidden"], y, check_finite=True, backend=TRAP)


def test_seq_mean_needs_2d_tokens(logits):
    zs, zt, zp, y = logits
    _expect(ValueError, r'reduction="seq_mean" needs tokens shaped \[B, T\]', dopd_loss, zs, zt, zp, y,
            config=DOPDConfig(reduction="seq_mean"), backend=TRAP)
    _expect(ValueError, "seq_mean", opd_loss, zs, zt, y, reduction="seq_mean", backend=TRAP)


@pytest.mark.parametrize("field,value,exc", [
    ("top_k", 0, ValueError), ("top_k", 2.5, TypeError), ("top_k", True, TypeError),
    ("beta_light", -0.1, ValueError), ("beta_weak", float("nan"), ValueError), ("beta_strong", "1", TypeError),
    ("js_beta", 0.0, ValueError), ("js_beta", 1.0, ValueError), ("trim", 1.0, ValueError), ("trim", -0.01, ValueError),
    ("temperature", 0.0, ValueError), ("temperature", -1.0, ValueError), ("temperature", float("inf"), ValueError),
    ("ignore_index", 1.5, TypeError), ("reduction", "avg", ValueError), ("topk_from", "teacher", ValueError),
    ("topk_renorm", 1, TypeError), ("valid_vocab", 0, ValueError),
])
def test_bad_dopd_config(field, value, exc):
    with pytest.raises(exc, match=field):
        DOPDConfig(**{field: value})
    with pytest.raises(exc, match=field):
        DOPDConfig().replace(**{field: value})


@pytest.mark.parametrize("field,value,exc", [
    ("divergence", "kl", ValueError), ("granularity", "topK", ValueError), ("top_k", -1, ValueError),
    ("js_beta", 1.5, ValueError), ("temperature", 0, ValueError), ("reduction", None, ValueError),
    ("valid_vocab", 2.0, TypeError),
])
def test_bad_opd_config(field, value, exc, logits):
    with pytest.raises(exc, match=field):
        OPDConfig(**{field: value})
    zs, zt, _, y = logits
    with pytest.raises(exc, match=field):
        opd_loss(zs, zt, y, **{field: value}, backend=TRAP)


@pytest.mark.parametrize("thresholds,exc,match", [
    ((1.0, 2.0), ValueError, "thresholds must have 3 entries"),
    (torch.zeros(4), ValueError, r"thresholds tensor must have shape \[3\]"),
    ((1.0, float("nan"), 0.5), ValueError, "thresholds must be finite"),
    (3.0, TypeError, "thresholds must be a Thresholds"),
])
def test_bad_thresholds(logits, thresholds, exc, match):
    zs, zt, zp, y = logits
    _expect(exc, match, dopd_loss, zs, zt, zp, y, thresholds=thresholds, backend=TRAP)


@pytest.mark.parametrize("normalizer,reduction,exc,match", [
    (0, "mean", ValueError, "normalizer must be positive"),
    (-3.0, "sum", ValueError, "normalizer must be positive"),
    (float("inf"), "mean", ValueError, "normalizer must be positive and finite"),
    ("8", "mean", TypeError, "normalizer must be a positive number"),
    (torch.ones(2), "mean", ValueError, "normalizer must be a scalar"),
    (4.0, "none", ValueError, "normalizer= is only accepted"),
])
def test_bad_normalizer(logits, normalizer, reduction, exc, match):
    zs, zt, zp, y = logits
    _expect(exc, match, dopd_loss, zs, zt, zp, y, config=DOPDConfig(reduction=reduction), normalizer=normalizer,
            backend=TRAP)
    _expect(exc, match, opd_loss, zs, zt, y, reduction=reduction, normalizer=normalizer, backend=TRAP)


@pytest.mark.parametrize("case", ["weight-hidden-mismatch", "teacher-vocab", "bias-shape", "teacher-rows", "hidden-1d",
                                  "priv-weight-width", "int-weight"])
def test_fused_linear_bad_shapes(case):
    t = linear_streams((2, 4), 6, V)
    y = random_tokens((2, 4), V)
    a = dict(student_hidden=t["student_hidden"], student_weight=t["student_weight"], teacher_hidden=t["teacher_hidden"],
             teacher_weight=t["teacher_weight"], priv_student_hidden=t["priv_student_hidden"], tokens=y)
    exc = ValueError
    if case == "weight-hidden-mismatch":
        a["student_weight"], match = t["student_weight"][:, :-1], r"student_weight must have shape \[V, 6\]"
    elif case == "teacher-vocab":
        a["teacher_weight"], match = t["teacher_weight"][:-1], "teacher_weight has 12 rows, fewer than the 13 tokens"
    elif case == "bias-shape":
        a["student_bias"], match = t["student_bias"][:-1], r"student_bias must have shape \[13\]"
    elif case == "teacher-rows":
        a["teacher_hidden"], match = t["teacher_hidden"][:1], "teacher_hidden must have leading shape"
    elif case == "hidden-1d":
        a["student_hidden"], match = t["student_hidden"][0, 0], r"student_hidden must have shape \[N, H\]"
    elif case == "priv-weight-width":
        a["priv_student_weight"], match = t["student_weight"][:, :3], "priv_student_weight must have shape"
    else:
        a["student_weight"], exc, match = t["student_weight"].int(), TypeError, "student_weight must have dtype"
    _expect(exc, match, fused_linear_dopd_loss, **a, backend=TRAP)


def test_fused_linear_opd_bad_tokens():
    t = linear_streams(N, 4, V)
    y = random_tokens(N, V)
    y[0] = V + 3
    _expect(ValueError, "tokens must lie in", fused_linear_opd_loss, t["student_hidden"], t["student_weight"],
            t["teacher_hidden"], t["teacher_weight"], y, backend=TRAP)


def test_token_logprobs_and_route_bad_inputs(logits):
    zs, _, _, y = logits
    _expect(ValueError, "tokens must have shape", token_logprobs, zs, y[:-1], backend=TRAP)
    _expect(ValueError, r"weight must have shape \[V, 5\]|student_weight must have shape", token_logprobs,
            torch.randn(N, 5), y, torch.randn(V, 4), backend=TRAP)
    lt = torch.randn(N, dtype=torch.float64)
    _expect(ValueError, "priv_student_logprob must have shape", route, lt, lt[:-1], torch.ones(N, dtype=torch.bool))
    _expect(TypeError, "valid_mask must be a bool tensor", route, lt, lt, torch.ones(N))
    _expect(TypeError, "teacher_logprob must be a floating-point", route, lt.long(), lt, torch.ones(N, dtype=torch.bool))


def test_bad_backend_argument(logits):
    zs, zt, zp, y = logits
    _expect(ValueError, "backend must be 'auto' or one of", dopd_loss, zs, zt, zp, y, backend="cuda-magic")
    _expect(TypeError, "backend must be a name or a backend object", dopd_loss, zs, zt, zp, y, backend=3)
    _expect(ValueError, "row_chunk and vocab_chunk must be >= 1", TorchBackend, row_chunk=0)


def test_mismatched_devices_not_testable_here():
    """Placeholder documenting the one check that needs two devices (e.g. cpu + cuda)."""
    if torch.cuda.is_available():
        zs, zt, zp = correlated_logits(4, 7)
        y = random_tokens(4, 7)
        with pytest.raises(ValueError, match="all inputs must share a device"):
            dopd_loss(zs.cuda(), zt, zp, y, backend=TRAP)
    else:
        pytest.skip("needs a second device (CUDA) to build inputs on different devices")


# -- empty and fully masked batches: defined results, not NaN ------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "seq_mean", "sum", "none"])
@pytest.mark.parametrize("empty", ["fully-masked", "zero-rows"])
def test_empty_or_fully_masked_batch(empty, reduction, backend):
    b, t = (3, 5) if empty == "fully-masked" else (0, 5)
    zs, zt, zp = correlated_logits((b, t), V)
    y = torch.full((b, t), -100, dtype=torch.long)
    s = zs.clone().requires_grad_(True)
    out = dopd_loss(s, zt, zp, y, config=DOPDConfig(reduction=reduction), backend=backend)
    assert not torch.isnan(out.loss).any()
    assert (out.loss == 0).all() and out.loss.shape == (() if reduction != "none" else (b, t))
    assert (out.regime == -1).all() and out.regime.shape == (b, t)
    assert (out.per_token_loss == 0).all()
    assert all(math.isfinite(float(x)) for x in out.thresholds)
    out.loss.sum().backward()
    assert s.grad is not None and (s.grad == 0).all()
    assert out.regime_fractions() == {"LH": 0.0, "LL": 0.0, "HT": 0.0, "HS": 0.0}
    # The same for vanilla OPD (and the fused-linear face).
    s2 = zs.clone().requires_grad_(True)
    o = opd_loss(s2, zt, y, granularity="topk", top_k=3, reduction=reduction, backend=backend)
    assert (o.loss == 0).all()
    o.loss.sum().backward()
    assert (s2.grad == 0).all()
    tl = linear_streams((b, t), 4, V)
    h = tl["student_hidden"].clone().requires_grad_(True)
    w = tl["student_weight"].clone().requires_grad_(True)
    f = fused_linear_dopd_loss(h, w, tl["teacher_hidden"], tl["teacher_weight"], tl["priv_student_hidden"], y,
                               config=DOPDConfig(reduction=reduction), backend=backend)
    assert (f.loss == 0).all()
    f.loss.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


# -- issue 15 points 2 and 7 -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_mixed_dtypes_within_a_stream_are_refused(which):
    t = linear_streams(N, 4, V)
    y = random_tokens(N, V)
    a = dict(student_bias=t["student_bias"])
    w = t["student_weight"]
    if which == "weight":
        w = w.double()
    else:
        a["student_bias"] = t["student_bias"].bfloat16()
    with pytest.raises(TypeError, match=f"student_{which} has dtype torch.(float64|bfloat16) but student_hidden has "
                                        "torch.float32; the hidden states, weight and bias of one stream must share"):
        fused_linear_dopd_loss(t["student_hidden"], w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"],
                               y, backend=TRAP, **a)


def test_mixed_dtypes_across_streams_are_accepted():
    t = linear_streams(N, 4, V)
    y = random_tokens(N, V)
    out = fused_linear_dopd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"].bfloat16(),
                                 t["teacher_weight"].bfloat16(), t["priv_student_hidden"].double(), y,
                                 priv_student_weight=t["student_weight"].double(), backend="torch")
    assert torch.isfinite(out.loss)


def test_logits_gradient_buffer_is_contiguous_whatever_the_input_layout():
    grads = []

    class Spy(TorchBackend):
        def full_grad_pass(self, *args, **kw):
            grads.append(args[-1].logits)
            return super().full_grad_pass(*args, **kw)

        def term_grad_pass(self, *args):
            grads.append(args[-1].logits)
            return super().term_grad_pass(*args)

        def full_pass(self, *args, **kw):
            if args[-1] is not None:
                grads.append(args[-1].logits)
            return super().full_pass(*args, **kw)

    zs, zt, zp = correlated_logits((5, 4), V)
    s = zs.clone().requires_grad_(True)
    y = random_tokens((5, 4), V)
    out = dopd_loss(s.transpose(0, 1), zt.transpose(0, 1), zp.transpose(0, 1), y.T, backend=Spy())
    out.loss.backward()
    assert grads and all(g.is_contiguous() for g in grads)
    s64 = zs.double().requires_grad_(True)
    dopd_loss(s64, zt.double(), zp.double(), y, backend="reference").loss.backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)


def test_weight_given_transposed_is_accepted():
    t = linear_streams(N, 4, V)
    y = random_tokens(N, V)
    w_t = t["student_weight"].T.contiguous().T  # rows are strided, not contiguous
    assert not w_t.is_contiguous()
    a = fused_linear_opd_loss(t["student_hidden"], w_t, t["teacher_hidden"], t["teacher_weight"], y, backend="torch")
    b = fused_linear_opd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"], y,
                              backend="torch")
    torch.testing.assert_close(a.loss, b.loss)


def test_empty_vocabulary_or_hidden_size():
    zs, zt, zp = (torch.zeros(N, 0) for _ in range(3))
    y = torch.full((N,), -100)
    _expect(ValueError, "student_logits must have a vocabulary V >= 1", dopd_loss, zs, zt, zp, y, backend=TRAP)
    _expect(ValueError, "student_logits must have a vocabulary V >= 1", opd_loss, zs, zt, y, backend=TRAP)
    t = linear_streams(N, 4, V)
    h0, w0 = torch.zeros(N, 0), torch.zeros(V, 0)
    _expect(ValueError, "need a hidden size H >= 1 and a vocabulary V >= 1, got H=0", fused_linear_opd_loss, h0, w0,
            t["teacher_hidden"], t["teacher_weight"], y, backend=TRAP)
    _expect(ValueError, "got H=4, V=0", fused_linear_opd_loss, t["student_hidden"], torch.zeros(0, 4),
            t["teacher_hidden"], t["teacher_weight"], y, backend=TRAP)


def test_ignore_index_outside_int64(logits):
    zs, zt, zp, y = logits
    _expect(ValueError, "ignore_index must fit in int64", DOPDConfig, ignore_index=2 ** 70)
    _expect(ValueError, "ignore_index must fit in int64", opd_loss, zs, zt, y, ignore_index=-(2 ** 63) - 1, backend=TRAP)


@pytest.mark.parametrize("thresholds", ["123", b"123", 1.5])
def test_thresholds_of_the_wrong_kind(logits, thresholds):
    zs, zt, zp, y = logits
    _expect(TypeError, "thresholds must be a Thresholds", dopd_loss, zs, zt, zp, y, thresholds=thresholds, backend=TRAP)


def test_wrong_config_type(logits):
    from dopd_kernels import FusedLinearOPDLoss, OPDLoss

    zs, zt, zp, y = logits
    _expect(TypeError, "config must be a DOPDConfig", dopd_loss, zs, zt, zp, y, config=OPDConfig(), backend=TRAP)
    _expect(TypeError, "config must be a DOPDConfig", dopd_loss, zs, zt, zp, y, config={"top_k": 4}, backend=TRAP)
    t = linear_streams(N, 4, V)
    _expect(TypeError, "config must be a DOPDConfig", fused_linear_dopd_loss, t["student_hidden"], t["student_weight"],
            t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y, config=OPDConfig(), backend=TRAP)
    _expect(TypeError, "config must be an OPDConfig", OPDLoss, DOPDConfig())
    _expect(TypeError, "config must be an OPDConfig", FusedLinearOPDLoss, {"divergence": "js"})


def test_normalizer_that_requires_grad(logits):
    zs, zt, zp, y = logits
    n = torch.tensor(5.0, requires_grad=True)
    _expect(ValueError, "normalizer must not require grad", dopd_loss, zs, zt, zp, y, normalizer=n, backend=TRAP)
    _expect(ValueError, "normalizer must not require grad", opd_loss, zs, zt, y, normalizer=n, backend=TRAP)
