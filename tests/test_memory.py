"""Structural memory tests of the `torch` backend (DESIGN.md section 3 memory rules).

A `TorchDispatchMode` records every tensor an aten op allocates (outputs that share no storage with
the op's inputs: views and in-place results are not allocations) during forward + backward. With
`TorchBackend(row_chunk=R, vocab_chunk=C)`, N > R and V > C:

- fused-linear mode: no allocation with ≥ N·V elements, and none above the tile budget R·(C + K)
  (a tile [R, C] plus the running top-K [R, K] it is merged with) except the input-/gradient-sized
  tensors the design allows: dH [N, H], dW [V, H], db [V], per-token [N] / [N, K] vectors.
- logits mode: no fp32/fp64 allocation with ≥ N·V elements; the only [N, V] allocation is the
  gradient of the student logits, in their dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import correlated_logits, interpreted_triton, leaf, linear_streams, random_tokens, with_padding_rows
from dopd_kernels import DOPDConfig, LMHead, TorchBackend, dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss

N, V, H, HT, R, C, K = 24, 131, 6, 5, 8, 32, 4


class AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.allocs = []  # (op name, shape, dtype, storage ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocs.append((str(func), tuple(t.shape), t.dtype, t.untyped_storage().data_ptr()))
        return out


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_fused(allocs, hidden_sizes):
    allowed = {(N, h) for h in hidden_sizes} | {(V, h) for h in hidden_sizes} | {(V,), (N,), (N, K), (N, 1)}
    budget = R * (C + K)
    for op, shape, dtype, _ in allocs:
        assert numel(shape) < N * V, f"{op} allocated {shape} ({dtype}): an [N, V]-sized tensor"
        assert numel(shape) <= budget or shape in allowed, (
            f"{op} allocated {shape} ({dtype}) = {numel(shape)} elements > tile budget R·(C+K) = {budget}")
    assert any(a[1] == (V, H) for a in allocs), "the recorder did not see the backward (no dW allocation)"
    assert any(len(a[1]) == 2 and a[1][0] <= R and 1 < a[1][1] <= C for a in allocs), "no [≤R, ≤C] tile seen"


@pytest.mark.parametrize("topk_from", ["student", "target"])
@pytest.mark.parametrize("renorm", [True, False])
def test_fused_linear_dopd_stays_within_tiles(renorm, topk_from):
    t = linear_streams(N, H, V, teacher_hidden=HT)
    y = random_tokens(N, V)
    h, w, b = leaf(t["student_hidden"]), leaf(t["student_weight"]), leaf(t["student_bias"])
    rec = AllocationRecorder()
    with rec:
        out = fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                     student_bias=b, teacher_bias=t["teacher_bias"],
                                     config=DOPDConfig(top_k=K, topk_renorm=renorm, topk_from=topk_from, trim=0.0),
                                     backend=TorchBackend(row_chunk=R, vocab_chunk=C))
        out.loss.backward()
    assert (out.regime == 2).any(), "no HT token: the full-vocabulary JS pass was not exercised"
    check_fused(rec.allocs, (H, HT))


@pytest.mark.parametrize("kind,gran", [("reverse_kl", "full"), ("forward_kl", "full"), ("js", "full"),
                                       ("forward_kl", "sampled"), ("reverse_kl", "sampled")])
def test_fused_linear_opd_stays_within_tiles(kind, gran):
    t = linear_streams(N, H, V)
    y = random_tokens(N, V)
    h, w, b = leaf(t["student_hidden"]), leaf(t["student_weight"]), leaf(t["student_bias"])
    rec = AllocationRecorder()
    with rec:
        out = fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, student_bias=b,
                                    teacher_bias=t["teacher_bias"], divergence=kind, granularity=gran,
                                    backend=TorchBackend(row_chunk=R, vocab_chunk=C))
        out.loss.backward()
    check_fused(rec.allocs, (H,))


def check_logits(allocs, grad_dtype):
    big = [a for a in allocs if numel(a[1]) >= N * V]
    for op, shape, dtype, _ in big:
        assert dtype == grad_dtype, f"{op} allocated {shape} in {dtype}: a copy of an [N, V] tensor in another dtype"
    assert len({a[3] for a in big}) <= 1, f"more than one [N, V] allocation: {[(a[0], a[1], a[2]) for a in big]}"
    assert big, "no [N, V] allocation seen: the gradient was not recorded"
    fp32_big = [a for a in allocs if a[2] in (torch.float32, torch.float64) and numel(a[1]) > R * (C + K)
                and a[1] not in ((N,), (N, K), (N, 1))]
    assert not fp32_big, f"fp32 allocations beyond the tile budget: {fp32_big[:5]}"


@pytest.mark.parametrize("renorm", [True, False])
def test_logits_mode_dopd_no_fp32_copy(renorm):
    zs, zt, zp = correlated_logits(N, V, dtype=torch.bfloat16)
    y = random_tokens(N, V)
    s = leaf(zs)
    rec = AllocationRecorder()
    with rec:
        out = dopd_loss(s, zt, zp, y, config=DOPDConfig(top_k=K, topk_renorm=renorm, trim=0.0),
                        backend=TorchBackend(row_chunk=R, vocab_chunk=C))
        out.loss.backward()
    assert s.grad.dtype == torch.bfloat16
    check_logits(rec.allocs, torch.bfloat16)


@pytest.mark.parametrize("kind,gran", [("js", "full"), ("forward_kl", "sampled"), ("reverse_kl", "topk")])
def test_logits_mode_opd_no_fp32_copy(kind, gran):
    zs, zt = correlated_logits((4, 10), V, n_streams=2, dtype=torch.bfloat16)
    y = random_tokens((4, 10), V)
    s = leaf(zs)
    rec = AllocationRecorder()
    with rec:
        out = opd_loss(s, zt, y, divergence=kind, granularity=gran, top_k=K, topk_renorm=False,
                       backend=TorchBackend(row_chunk=R, vocab_chunk=C))
        out.loss.backward()
    check_logits(rec.allocs, torch.bfloat16)


def test_recorder_detects_a_materialized_logits_tensor():
    """The recorder is not blind: the float64 reference (which materializes [N, V]) fails the checks."""
    t = linear_streams(N, H, V)
    y = random_tokens(N, V)
    h, w = leaf(t["student_hidden"]), leaf(t["student_weight"])
    rec = AllocationRecorder()
    with rec:
        fused_linear_opd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], y, backend="reference").loss.backward()
    with pytest.raises(AssertionError, match="an \\[N, V\\]-sized tensor"):
        check_fused(rec.allocs, (H,))


class OpRecorder(TorchDispatchMode):
    """Every aten op with the shape of its first tensor argument and of its first output."""

    def __init__(self):
        super().__init__()
        self.ops = []  # (op name, first input shape, output shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first_in = next((tuple(t.shape) for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
        first_out = next((tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)), None)
        self.ops.append((str(func), first_in, first_out))
        return out


def _dw_work(ops, v: int, h: int, row_chunk: int):
    """Ops that build or accumulate a [V, H] weight gradient: a [V, H] output, an index_add_ into a
    [V, H] target (sparse top-K gradients), or a Gᵀ·H tile product [block > row_chunk, H]."""
    return [op for op in ops if op[2] == (v, h) or ("index_add" in op[0] and op[1] == (v, h))
            or ("aten.mm" in op[0] and op[2] is not None and len(op[2]) == 2 and op[2][1] == h and op[2][0] > row_chunk)]


@pytest.mark.parametrize("bias_trainable", [False, True])
@pytest.mark.parametrize("renorm", [True, False])
def test_frozen_student_head_computes_no_dw(renorm, bias_trainable):
    # Issue 11 point 4 (LoRA / requires_grad=False lm_head): no dW buffer, no dW contraction, in backward.
    # V % C = 12 > R, so a [block, H] matmul output is a Gᵀ·H tile, never a dH row chunk.
    v = 140
    cfg = DOPDConfig(top_k=K, topk_renorm=renorm, trim=0.0)
    backend = TorchBackend(row_chunk=R, vocab_chunk=C)

    def loss(t, y, h, w, b):
        return fused_linear_dopd_loss(h, w, t["teacher_hidden"], t["teacher_weight"], t["priv_student_hidden"], y,
                                      student_bias=b, teacher_bias=t["teacher_bias"], config=cfg, backend=backend)

    # Fresh draws until the routing gives both dense (HT) and sparse (top-K) rows: a draw of N rows has no
    # HT row now and then.
    for _ in range(20):
        t, y = linear_streams(N, H, v, teacher_hidden=HT), random_tokens(N, v)
        with torch.no_grad():
            regime = loss(t, y, t["student_hidden"], t["student_weight"], t["student_bias"]).regime
        if (regime == 2).any() and (regime != 2).any():
            break
    else:
        pytest.fail("20 draws without both HT and top-K rows")
    work = {}
    for frozen in (True, False):
        h = leaf(t["student_hidden"])
        w = t["student_weight"].clone() if frozen else leaf(t["student_weight"])
        b = leaf(t["student_bias"]) if bias_trainable else t["student_bias"].clone()
        out = loss(t, y, h, w, b)
        assert torch.equal(out.regime, regime)
        rec = OpRecorder()
        with rec:
            out.loss.backward()
        assert h.grad is not None and (b.grad is not None) == bias_trainable
        work[frozen] = _dw_work(rec.ops, v, H, R)
    assert work[False], "the recorder did not see the dW work of a trainable head"
    assert not work[True], f"a frozen head still computed dW: {work[True][:4]}"


def test_frozen_head_gets_no_dw_buffer_in_any_pass():
    # The engine allocates the gradient buffers: every pass backend (torch, cpp, triton) gets dw=None to skip.
    sinks = []

    class Spy(TorchBackend):
        def full_grad_pass(self, *args, **kw):
            sinks.append(args[-1])
            return super().full_grad_pass(*args, **kw)

        def term_grad_pass(self, *args):
            sinks.append(args[-1])
            return super().term_grad_pass(*args)

        def full_pass(self, *args, **kw):  # value and gradient in one sweep (eager): grads is its last argument
            if args[-1] is not None:
                sinks.append(args[-1])
            return super().full_pass(*args, **kw)

    t = linear_streams(N, H, V)
    h = leaf(t["student_hidden"])
    out = fused_linear_opd_loss(h, t["student_weight"], t["teacher_hidden"], t["teacher_weight"], random_tokens(N, V),
                                student_bias=t["student_bias"], backend=Spy())
    out.loss.backward()
    assert sinks and all(s.dw is None and s.db is None and s.dh is not None for s in sinks)


def _backend_under_test(name: str, monkeypatch):
    """A backend name (the custom-op path) or, for "...-object", a backend object (its autograd Function);
    without CUDA the Triton one is interpreted, with TRITON_INTERPRET set during this test only."""
    from dopd_kernels import available_backends

    if name == "torch-object":
        return TorchBackend(row_chunk=R, vocab_chunk=C)
    if name == "triton-object":
        return interpreted_triton(monkeypatch, block_n=16, block_v=32, block_h=16)
    if name not in available_backends():
        pytest.skip(f"the {name} backend is not available here")
    return name


@pytest.mark.parametrize("backend", ["torch", "cpp", "torch-object", "triton-object"])
@pytest.mark.parametrize("workload", ["dopd", "js", "reverse_kl"])
@pytest.mark.parametrize("padding", [0, 3], ids=["unpadded", "padded-student"])
def test_scalar_loss_backward_hands_over_its_gradient_buffers(padding, workload, backend, monkeypatch):
    # A scalar loss forms dH, dW and db in its forward; `loss.backward()` must make those buffers the
    # leaves' `.grad` as they are. Any op between the loss and the weight (even a slice of every row)
    # makes autograd allocate a second [V, H] in the backward and copy: twice dW's memory at the peak.
    # "padded-student": the student's head declares `padding` rows past its vocabulary (as
    # `lm_head(model, tokenizer)` does for a checkpoint whose embedding was padded) and the teacher's has
    # more still; the padding is excluded as valid_vocab columns, not sliced off, so the same holds.
    backend = _backend_under_test(backend, monkeypatch)
    t = linear_streams(N, H, V)
    y = random_tokens(N, V)
    rows = V + padding
    h = leaf(t["student_hidden"])
    w, b = leaf(with_padding_rows(t["student_weight"], padding)), leaf(with_padding_rows(t["student_bias"], padding))
    student = LMHead(w, b, vocab_size=V)
    teacher = LMHead(with_padding_rows(t["teacher_weight"], 2 * padding),
                     with_padding_rows(t["teacher_bias"], 2 * padding), vocab_size=V)
    forward, backward = AllocationRecorder(), AllocationRecorder()
    with forward:
        if workload == "dopd":
            out = fused_linear_dopd_loss(h, student, t["teacher_hidden"], teacher, t["priv_student_hidden"], y,
                                         config=DOPDConfig(top_k=K, trim=0.0), backend=backend)
        else:
            out = fused_linear_opd_loss(h, student, t["teacher_hidden"], teacher, y, divergence=workload,
                                        backend=backend)
    with backward:
        out.loss.backward()
    formed = {a[3] for a in forward.allocs}
    for name, leaf_grad in (("hidden", h.grad), ("weight", w.grad), ("bias", b.grad)):
        assert leaf_grad.untyped_storage().data_ptr() in formed, f"{name}.grad is not the buffer the loss formed"
    copies = [a for a in backward.allocs if a[1] in ((rows, H), (rows,), (N, H))]
    assert not copies, f"the backward allocated gradient-sized tensors: {copies}"
    assert torch.count_nonzero(w.grad[V:]) == 0 and torch.count_nonzero(b.grad[V:]) == 0
