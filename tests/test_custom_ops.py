"""The losses as `torch.library` custom ops (`dopd_kernels/ops.py`, issue 14 point 3).

`torch.library.opcheck` on every op (schema, autograd registration, fake tensors, AOT dispatch with
dynamic shapes: eager vs traced outputs and gradients); the public functions trace into one graph with
`fullgraph=True`; a compiled training step (model → fused-linear DOPD loss → gradient → SGD) matches the
eager step and the float64 reference, for a scalar reduction and for reduction="none" with a
non-uniform upstream gradient; data checks run inside the op, before any kernel.
"""

from __future__ import annotations

import pytest
import torch

from conftest import IGNORE, assert_close, correlated_logits, leaf, linear_streams, random_tokens
from dopd_kernels import (DOPDConfig, LMHead, TorchBackend, available_backends, dopd_loss,
                          fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss, token_logprobs)
from dopd_kernels.ops import DOPD, OPD, Streams, op_arguments

OPS = torch.ops.dopd_kernels
NEEDS_CPP = pytest.mark.skipif("cpp" not in available_backends(), reason="the cpp extension cannot be built here")
N, H, V = 7, 5, 13


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _streams(kind, mode: str, dtype, lead=N):
    """Fresh random streams of `kind` (the student's tensors require grad) and tokens."""
    y = random_tokens(lead, V)
    if mode == "logits":
        zs = correlated_logits(lead, V, n_streams=len(kind.streams), dtype=dtype)
        tensors = tuple((leaf(z) if i == 0 else z).reshape(-1, V) for i, z in enumerate(zs))
        return Streams(tuple((t,) for t in tensors), None, y)
    t = linear_streams(lead, H, V, dtype=dtype)
    h, w, b = leaf(t["student_hidden"]).reshape(-1, H), leaf(t["student_weight"]), leaf(t["student_bias"])
    student, teacher = (h, w, b), (t["teacher_hidden"].reshape(-1, H), t["teacher_weight"])
    # DOPD's privileged student shares the student's head (detached); head transforms on two streams.
    priv = (t["priv_student_hidden"].reshape(-1, H), w.detach(), b.detach())
    tensors, heads = (student, teacher, priv)[:len(kind.streams)], ((1.0, 4.0), (0.5, None), (1.0, 4.0))
    return Streams(tensors, heads[:len(kind.streams)], y)


CASES = [  # kind, mode, dtype, reduction, backend, extras
    (DOPD, "logits", torch.float32, "mean", "torch", {}),
    (DOPD, "logits", torch.float32, "none", "cpp", {}),
    (DOPD, "linear", torch.float64, "none", "torch", {"thresholds": True}),
    (DOPD, "linear", torch.float32, "sum", "cpp", {"normalizer": True}),
    (OPD, "logits", torch.float64, "seq_mean", "torch", {"divergence": "js"}),
    (OPD, "linear", torch.float32, "none", "cpp", {"granularity": "topk"}),
    (OPD, "logits", torch.float32, "mean", "cpp", {"granularity": "sampled", "divergence": "forward_kl"}),
]


def _params(cases, backend_at: int) -> list:
    """`cases` as pytest parameters, those on the cpp backend skipped where it cannot be built."""
    return [pytest.param(*c, marks=NEEDS_CPP) if c[backend_at] == "cpp" else c for c in cases]


def _config(kind, reduction, extras):
    options = {k: v for k, v in extras.items() if k in kind.fields}
    return kind.config(top_k=4, reduction=reduction, **options)


@pytest.mark.parametrize("kind,mode,dtype,reduction,backend,extras", _params(CASES, 4))
def test_opcheck_forward_ops(kind, mode, dtype, reduction, backend, extras):
    streams = _streams(kind, mode, dtype, lead=(2, 4) if reduction == "seq_mean" else N)
    thresholds = torch.tensor([0.5, 0.2, 0.2], dtype=torch.float64) if extras.get("thresholds") else None
    normalizer = torch.tensor(3.0) if extras.get("normalizer") else None
    args = op_arguments(kind, streams, _config(kind, reduction, extras), backend, True, thresholds, normalizer)
    assert any(args["needs_grad"])
    torch.library.opcheck(getattr(OPS, kind.name).default, (), args)


@pytest.mark.parametrize("kind,backend", _params([(DOPD, "torch"), (OPD, "cpp")], 1))
def test_opcheck_backward_ops(kind, backend):
    """The deferred gradient of reduction="none": the op the forward's autograd formula calls, given an
    arbitrary upstream gradient and (DOPD) the thresholds the forward used."""
    streams = _streams(kind, "linear", torch.float32)
    cfg = _config(kind, "none", {"granularity": "full", "divergence": "js"})
    args = op_arguments(kind, streams, cfg, backend, False)
    out = getattr(OPS, kind.name)(**args)
    for name in ("normalizer", "check_finite"):
        del args[name]
    if kind.routed:
        args["thresholds"] = out[-1]
    args["grad"] = torch.rand(streams.tokens.shape) + 0.5
    for name in kind.streams:  # the formula calls it with grad mode off: its inputs never carry a graph
        args[name] = [t.detach() for t in args[name]]
    torch.library.opcheck(getattr(OPS, f"{kind.name}_backward").default, (), args)


@pytest.mark.parametrize("mode,backend", _params([("logits", "torch"), ("linear", "cpp")], 1))
def test_opcheck_token_logprobs(mode, backend):
    streams = _streams(OPD, mode, torch.float32)
    heads = streams.heads[:1] if streams.heads else ()
    args = dict(stream=[t.detach() for t in streams.tensors[0]], scale=[s for s, _ in heads],
                softcap=[c or 0.0 for _, c in heads], tokens=streams.tokens.masked_fill(streams.tokens == V - 1, IGNORE),
                temperature=1.5, ignore_index=IGNORE, valid_vocab=V - 1, backend=backend)
    torch.library.opcheck(OPS.token_logprobs.default, (), args)


def test_public_functions_trace_into_one_graph():
    """fullgraph=True: validation and the op trace without a break, and the results match eager."""
    zs, zt, zp = correlated_logits((2, 5), V)
    y = random_tokens((2, 5), V)
    t = linear_streams((2, 5), H, V)
    head = LMHead(t["student_weight"], t["student_bias"], scale=0.5, softcap=3.0)
    calls = [
        lambda: dopd_loss(zs, zt, zp, y, config=DOPDConfig(top_k=4, reduction="seq_mean"), backend="torch").loss,
        lambda: opd_loss(zs, zt, y, divergence="js", granularity="topk", top_k=3, normalizer=4.0, backend="torch").loss,
        lambda: fused_linear_dopd_loss(t["student_hidden"], head, t["teacher_hidden"], t["teacher_weight"],
                                       t["priv_student_hidden"], y, thresholds=(0.5, 0.2, 0.2), backend="torch").loss,
        lambda: fused_linear_opd_loss(t["student_hidden"], head, t["teacher_hidden"], t["teacher_weight"], y,
                                      reduction="none", backend="torch").loss,
        lambda: token_logprobs(t["student_hidden"], y, head, backend="torch"),
    ]
    for call in calls:
        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True, backend="eager")()
        assert_close(compiled, call(), rtol=1e-6, what="compiled vs eager")


class TinyModel(torch.nn.Module):
    """Hidden states from inputs, and the student's `lm_head` (with a bias)."""

    def __init__(self, dtype):
        super().__init__()
        self.body = torch.nn.Linear(H, H, dtype=dtype)
        self.head = torch.nn.Linear(H, V, dtype=dtype)

    def forward(self, x):
        return torch.tanh(self.body(x))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_training_step_matches_eager_and_the_reference(reduction):
    """Two SGD steps, each: hidden states → fused-linear DOPD loss → gradient → update, compiled whole
    with fullgraph=True (aot_eager: forward and backward graphs through AOTAutograd). The gradient is
    taken with torch.autograd.grad: tracing Tensor.backward() into the graph needs
    trace_autograd_ops, under which the `.grad` bookkeeping of a plain-PyTorch loss already drifts from
    eager on the third step (torch 2.13)."""
    lead = (3, 4)
    t = linear_streams(lead, H, V, dtype=torch.float64)
    y = random_tokens(lead, V)
    x = torch.randn(*lead, H, dtype=torch.float64)
    upstream = torch.rand(lead, dtype=torch.float64) + 0.5  # reduction="none": a non-uniform upstream gradient
    cfg = DOPDConfig(top_k=4, trim=0.1, reduction=reduction)

    def step(model, backend):
        dt = model.head.weight.dtype
        out = fused_linear_dopd_loss(model(x.to(dt)), model.head.weight, t["teacher_hidden"].to(dt),
                                     t["teacher_weight"].to(dt), t["priv_student_hidden"].to(dt), y,
                                     student_bias=model.head.bias, config=cfg, backend=backend)
        loss = out.loss if reduction == "mean" else (out.loss * upstream.to(dt)).sum()
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
        return loss.detach(), grads

    def train(dtype, backend, compile_backend=None):
        torch.manual_seed(1234)
        model = TinyModel(torch.float64).to(dtype)
        fn = step if compile_backend is None else torch.compile(step, fullgraph=True, backend=compile_backend)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return [fn(model, backend) for _ in range(2)]

    eager = train(torch.float32, "torch")
    compiled = train(torch.float32, "torch", "aot_eager")
    reference = train(torch.float64, "reference")
    for i, (e, c, r) in enumerate(zip(eager, compiled, reference)):
        assert_close(c[0], e[0], rtol=1e-6, what=f"step {i}: compiled loss vs eager")
        assert_close(c[0], r[0], rtol=1e-5, what=f"step {i}: compiled loss vs float64")
        for name, gc, ge, gr in zip(("body.weight", "body.bias", "head.weight", "head.bias"), c[1], e[1], r[1]):
            assert_close(gc, ge, rtol=1e-6, what=f"step {i}: compiled d/d{name} vs eager")
            assert_close(gc, gr, rtol=1e-5, what=f"step {i}: compiled d/d{name} vs float64")


def test_data_checks_run_inside_the_op_before_any_kernel(monkeypatch):
    """Errors that need the data come from the op's implementation, before the first pass, with the same
    messages as on the autograd-Function path (tests/test_validation.py)."""
    def trap(self, *a, **k):
        raise AssertionError("a pass ran before validation rejected the input")

    monkeypatch.setattr(TorchBackend, "stats_pass", trap)
    monkeypatch.setattr(TorchBackend, "full_pass", trap)
    zs, zt, zp = correlated_logits(N, V)
    y = random_tokens(N, V)
    bad = y.clone()
    bad[0] = V
    nan = zt.clone()
    nan[2, 3] = float("nan")
    cases = [
        (ValueError, "tokens must lie in", lambda: dopd_loss(zs, zt, zp, bad, backend="torch")),
        (ValueError, "teacher_logits contains NaN", lambda: dopd_loss(zs, nan, zp, y, check_finite=True, backend="torch")),
        (ValueError, "thresholds must be finite", lambda: dopd_loss(zs, zt, zp, y, thresholds=torch.tensor(
            [0.1, float("inf"), 0.2]), backend="torch")),
        (ValueError, "normalizer must be positive", lambda: opd_loss(zs, zt, y, normalizer=torch.tensor(0.0),
                                                                     backend="torch")),
        (ValueError, "backend must be 'auto' or one of", lambda: opd_loss(zs, zt, y, backend="no-such-backend")),
        (ValueError, "tokens must lie in", lambda: token_logprobs(zs, bad, backend="torch")),
        (AssertionError, "a pass ran", lambda: dopd_loss(zs, zt, zp, y, backend="torch")),  # good input gets there
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    # A static check still raises in Python, before the op is called at all.
    y2 = random_tokens(N, V)
    with pytest.raises(ValueError, match="valid_vocab=14 exceeds"):
        dopd_loss(zs, zt, zp, y2, config=DOPDConfig(valid_vocab=V + 1), backend="torch")
