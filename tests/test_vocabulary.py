"""Vocabulary rule of the fused-linear entry points (issue 11 point 3): heads may carry padding rows.

The streams share the student's real vocabulary V (its `LMHead.vocab_size`, else its rows); rows of
any head past V are padding, excluded from every softmax and never read (every head is cut, as a view,
to the fewest rows any stream has; the rest of the padding is excluded as `valid_vocab` columns, so a
padded student's weight reaches the loss whole); a head that declares another vocabulary, or has fewer
than V rows, is refused with both sizes named.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, leaf, linear_streams, random_tokens, with_padding_rows
from dopd_kernels import (DOPDConfig, LMHead, TorchBackend, available_backends, fused_linear_dopd_loss,
                          fused_linear_opd_loss, token_logprobs)

V, PAD, H = 23, 5, 6


@pytest.mark.parametrize("backend", ["reference", "torch", TorchBackend(row_chunk=3, vocab_chunk=7)],
                         ids=["reference", "torch", "torch-3x7"])
@pytest.mark.parametrize("declare", [False, True], ids=["raw-teacher", "lmhead-vocab_size"])
def test_teacher_with_padded_rows_equals_unpadded(declare, backend):
    t = linear_streams(13, H, V)
    y = random_tokens(13, V)
    wt, bt = with_padding_rows(t["teacher_weight"], PAD), with_padding_rows(t["teacher_bias"], PAD)
    teacher = LMHead(wt, bt, vocab_size=V) if declare else wt
    kw = {} if declare else dict(teacher_bias=bt)
    cfg = DOPDConfig(top_k=5, topk_renorm=False)
    w1, w2 = leaf(t["student_weight"]), leaf(t["student_weight"])
    a = fused_linear_dopd_loss(t["student_hidden"], w1, t["teacher_hidden"], teacher, t["priv_student_hidden"], y,
                               student_bias=t["student_bias"], config=cfg, backend=backend, **kw)
    b = fused_linear_dopd_loss(t["student_hidden"], w2, t["teacher_hidden"], t["teacher_weight"],
                               t["priv_student_hidden"], y, student_bias=t["student_bias"],
                               teacher_bias=t["teacher_bias"], config=cfg, backend=backend)
    assert torch.equal(a.regime, b.regime)
    assert_close(a.per_token_loss, b.per_token_loss, rtol=1e-6, what="per-token loss")
    a.loss.backward()
    b.loss.backward()
    assert_close(w1.grad, w2.grad, rtol=1e-6, what="dW")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_student_padding_rows_take_no_mass_and_no_gradient(backend):
    t = linear_streams(11, H, V)
    y = random_tokens(11, V)
    w_pad = leaf(with_padding_rows(t["student_weight"], PAD))
    b_pad = leaf(with_padding_rows(t["student_bias"], PAD))
    student = LMHead(w_pad, b_pad, scale=0.8, softcap=4.0, vocab_size=V)
    # The teacher and the default privileged student: padded differently (teacher 2 rows, priv inherits).
    teacher = LMHead(with_padding_rows(t["teacher_weight"], 2), with_padding_rows(t["teacher_bias"], 2), vocab_size=V)
    out = fused_linear_dopd_loss(t["student_hidden"], student, t["teacher_hidden"], teacher, t["priv_student_hidden"], y,
                                 config=DOPDConfig(top_k=4), backend=backend)
    w, b = leaf(t["student_weight"]), leaf(t["student_bias"])
    ref = fused_linear_dopd_loss(t["student_hidden"], LMHead(w, b, scale=0.8, softcap=4.0), t["teacher_hidden"],
                                 LMHead(t["teacher_weight"], t["teacher_bias"]), t["priv_student_hidden"], y,
                                 config=DOPDConfig(top_k=4), backend=backend)
    assert torch.equal(out.regime, ref.regime)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=1e-6, what="per-token loss")
    out.loss.backward()
    ref.loss.backward()
    assert w_pad.grad.shape == w_pad.shape and b_pad.grad.shape == b_pad.shape
    assert torch.count_nonzero(w_pad.grad[V:]) == 0 and torch.count_nonzero(b_pad.grad[V:]) == 0
    assert_close(w_pad.grad[:V], w.grad, rtol=1e-6, what="dW")
    assert_close(b_pad.grad[:V], b.grad, rtol=1e-6, what="db")
    lp = token_logprobs(t["student_hidden"], y, student, backend=backend)
    assert_close(lp, token_logprobs(t["student_hidden"], y, LMHead(t["student_weight"], t["student_bias"], 0.8, 4.0),
                                    backend=backend), rtol=1e-6, what="token_logprobs")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_non_finite_padding_rows_are_neither_checked_nor_read(backend):
    # A checkpoint's padding rows may hold anything: check_finite reads only the rows a softmax reads, and
    # no backend lets a padding row into the value or a gradient (0 · NaN in dH = G·W would be NaN).
    # tests/test_backend_conformance.py checks the same on every backend, without check_finite.
    if backend not in ("reference", *available_backends()):
        pytest.skip(f"the {backend} backend is not available here")
    t = linear_streams(9, H, V)
    y = random_tokens(9, V)
    hp, h = leaf(t["student_hidden"]), leaf(t["student_hidden"])
    w = with_padding_rows(t["student_weight"], PAD, float("nan"))
    b = with_padding_rows(t["student_bias"], PAD, float("inf"))
    teacher = LMHead(with_padding_rows(t["teacher_weight"], PAD + 1, float("nan")), vocab_size=V)
    out = fused_linear_opd_loss(hp, LMHead(w, b, vocab_size=V), t["teacher_hidden"], teacher, y,
                                divergence="js", check_finite=True, backend=backend)
    ref = fused_linear_opd_loss(h, t["student_weight"], t["teacher_hidden"], t["teacher_weight"], y,
                                student_bias=t["student_bias"], divergence="js", backend=backend)
    assert_close(out.per_token_loss, ref.per_token_loss, rtol=1e-6, what="per-token loss")
    out.loss.backward()
    ref.loss.backward()
    assert_close(hp.grad, h.grad, rtol=1e-6, what="dH")
    w[V - 1, 0] = float("nan")  # the last real row is read
    with pytest.raises(ValueError, match=f"student_weight contains NaN or infinite values \\(row {V - 1}\\)"):
        fused_linear_opd_loss(hp, LMHead(w, b, vocab_size=V), t["teacher_hidden"], teacher, y,
                              divergence="js", check_finite=True, backend=backend)


def test_padding_rows_are_sliced_as_views_not_copied():
    seen = []

    class Spy(TorchBackend):
        def stats_pass(self, sources, *args):
            seen.extend(sources)
            return super().stats_pass(sources, *args)

        def full_pass(self, student, target, *args, **kw):  # full-vocabulary OPD: no stats pass, one sweep
            seen.extend((student, target))
            return super().full_pass(student, target, *args, **kw)

    t = linear_streams(7, H, V)
    wt = with_padding_rows(t["teacher_weight"], PAD)
    fused_linear_opd_loss(t["student_hidden"], t["student_weight"], t["teacher_hidden"], LMHead(wt, vocab_size=V),
                          random_tokens(7, V), backend=Spy())
    teacher = seen[1]
    assert teacher.weight.shape[0] == V and teacher.weight.data_ptr() == wt.data_ptr()
    # A padded student keeps its rows (a slice would copy its gradient): the teacher is cut to the
    # student's rows, and the padding is excluded as valid_vocab columns.
    seen.clear()
    ws = leaf(with_padding_rows(t["student_weight"], 2))
    fused_linear_opd_loss(t["student_hidden"], LMHead(ws, vocab_size=V), t["teacher_hidden"], LMHead(wt, vocab_size=V),
                          random_tokens(7, V), backend=Spy())
    student, teacher = seen
    assert student.weight is ws and student.valid_vocab == V
    assert teacher.weight.shape[0] == V + 2 and teacher.weight.data_ptr() == wt.data_ptr()


def test_different_tokenizers_are_refused_with_both_sizes():
    t = linear_streams(7, H, V)
    y = random_tokens(7, V - 3)
    s, th = t["student_hidden"], t["teacher_hidden"]
    with pytest.raises(ValueError, match=f"teacher_weight has a vocabulary of {V - 2} tokens but student_weight has {V}"):
        fused_linear_opd_loss(s, t["student_weight"], th, LMHead(t["teacher_weight"], vocab_size=V - 2), y)
    with pytest.raises(ValueError, match=f"teacher_weight has {V - 1} rows, fewer than the {V} tokens"):
        fused_linear_opd_loss(s, t["student_weight"], th, t["teacher_weight"][:-1], y)
    with pytest.raises(ValueError, match=f"teacher_weight has {V} rows, fewer than the {V + 2} tokens"):
        fused_linear_opd_loss(s, LMHead(with_padding_rows(t["student_weight"], 4), vocab_size=V + 2), th, t["teacher_weight"], y)
    with pytest.raises(ValueError, match=f"priv_student_weight has a vocabulary of {V} tokens but student_weight has {V - 3}"):
        fused_linear_dopd_loss(s, LMHead(t["student_weight"], vocab_size=V - 3), th, t["teacher_weight"],
                               t["priv_student_hidden"], y, priv_student_weight=LMHead(t["student_weight"], vocab_size=V))
    with pytest.raises(ValueError, match=r"LMHead.vocab_size must be in \[1, 23\]"):
        fused_linear_opd_loss(s, LMHead(t["student_weight"], vocab_size=V + 1), th, t["teacher_weight"], y)
    # A token of the padding rows is not a token of the vocabulary.
    with pytest.raises(ValueError, match=f"tokens must lie in \\[0, {V - 3}\\)"):
        fused_linear_opd_loss(s, LMHead(t["student_weight"], vocab_size=V - 3), th, t["teacher_weight"],
                              torch.full((7,), V - 2))


def test_undeclared_student_padding_gets_a_hint():
    t = linear_streams(7, H, V)
    y = random_tokens(7, V)
    with pytest.raises(ValueError, match=r"but student_weight has 28: .* \(if student_weight has padding rows, declare"):
        fused_linear_opd_loss(t["student_hidden"], with_padding_rows(t["student_weight"], PAD), t["teacher_hidden"],
                              LMHead(t["teacher_weight"], vocab_size=V), y)
