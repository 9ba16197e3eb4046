"""Checks of the output-head transforms (`LMHead` scale / soft-cap / vocab_size) that every backend runs.

Each function takes a backend (name or object) and an optional device, builds fresh random streams,
and compares the backend against the float64 `reference` backend on float64 copies of the very same
values (fp32: ~1e-5 relative on the per-token loss, the loss and dH/dW/db), or, for bf16, judges it
like Cut Cross-Entropy (no worse than a naive materialized bf16 computation plus a small margin).
The cpp and triton test modules parametrize the same functions over their backends:

    from head_transform_checks import HEAD_CASES, check_opd_heads, check_dopd_heads, check_bf16_heads
"""

from __future__ import annotations

import torch

import naive_reference as nv
from conftest import assert_close, leaf, linear_streams, random_tokens
from dopd_kernels import DOPDConfig, LMHead, fused_linear_dopd_loss, fused_linear_opd_loss

# (scale, softcap) of the student, teacher and privileged student. Logits of `linear_streams` are
# ~N(0, 2²): a cap of 2.5-4 bends them well into tanh's curved part, scales move them by ±60%.
HEAD_CASES = {
    "scale": ((1.6, None), (0.6, None), (1.3, None)),
    "softcap": ((1.0, 3.0), (1.0, 2.5), (1.0, 4.0)),
    "scale+softcap": ((1.6, 3.0), (0.6, 2.5), (1.3, 4.0)),
    "student-only": ((0.7, 2.5), (1.0, None), (1.0, None)),
    "teacher-only": ((1.0, None), (1.8, 3.0), (1.0, None)),
}
STUDENT_NAMES = ("student_hidden", "student_weight", "student_bias")


def _heads(t: dict, case: str) -> dict:
    """LMHeads of the teacher and priv-student (the latter with its own weight: student + noise), and
    the student's (scale, softcap)."""
    (ss, cs), (st, ct), (sp, cp) = HEAD_CASES[case]
    return dict(teacher=LMHead(t["teacher_weight"], t["teacher_bias"], st, ct),
                priv_student=LMHead(t["priv_student_weight"], None, sp, cp), student=(ss, cs))


def _streams(n, hdim: int, v: int, dtype=torch.float32) -> dict:
    t = linear_streams(n, hdim, v, dtype=dtype)
    t["priv_student_weight"] = (t["student_weight"].double() + 0.1 * torch.randn(v, hdim, dtype=torch.float64)).to(dtype)
    return t


def _run(fn, t: dict, y: torch.Tensor, case: str, backend, device: str, dtype=None, **kw):
    """Call `fn` (fused_linear_opd_loss / fused_linear_dopd_loss) with LMHeads; returns (output, student leaves)."""
    dev = (lambda x: x.to(device) if dtype is None else x.to(device, dtype))
    train = {n: leaf(dev(t[n])) for n in STUDENT_NAMES}
    heads = _heads({k: dev(v) for k, v in t.items()}, case)
    scale, softcap = heads["student"]
    student = LMHead(train["student_weight"], train["student_bias"], scale, softcap)
    if fn is fused_linear_opd_loss:
        out = fn(train["student_hidden"], student, dev(t["teacher_hidden"]), heads["teacher"], y.to(device),
                 backend=backend, **kw)
    else:
        out = fn(train["student_hidden"], student, dev(t["teacher_hidden"]), heads["teacher"],
                 dev(t["priv_student_hidden"]), y.to(device), priv_student_weight=heads["priv_student"], backend=backend,
                 **kw)
    return out, train


def _compare_grads(out, ref, train, train64, rtol: float) -> None:
    out.loss.backward()
    ref.loss.backward()
    for n in STUDENT_NAMES:
        assert train[n].grad is not None and train[n].grad.dtype == train[n].dtype, n
        assert_close(train[n].grad.cpu(), train64[n].grad, rtol=rtol, what=f"d{n}")


def check_opd_heads(backend, kind: str, gran: str, renorm: bool = True, topk_from: str = "student",
                    case: str = "scale+softcap", device: str = "cpu", rtol: float = 1e-5, n: int = 19, hdim: int = 8,
                    v: int = 37, temperature: float = 0.9) -> None:
    """fused_linear_opd_loss with per-stream heads on `backend` vs the float64 reference (fp32 inputs)."""
    t, y = _streams(n, hdim, v), random_tokens(n, v)
    kw = dict(divergence=kind, granularity=gran, top_k=5, topk_renorm=renorm, topk_from=topk_from,
              temperature=temperature)
    out, train = _run(fused_linear_opd_loss, t, y, case, backend, device, **kw)
    ref, train64 = _run(fused_linear_opd_loss, t, y, case, "reference", "cpu", dtype=torch.float64, **kw)
    assert_close(out.per_token_loss.cpu(), ref.per_token_loss, rtol=rtol, what="per-token loss")
    _compare_grads(out, ref, train, train64, rtol)


def check_dopd_heads(backend, renorm: bool = True, case: str = "scale+softcap", device: str = "cpu",
                     rtol: float = 1e-5, shape=(4, 9), hdim: int = 12, v: int = 41) -> None:
    """fused_linear_dopd_loss with per-stream heads on `backend` vs the float64 reference (fp32 inputs):
    regimes, per-token loss, loss and dH/dW/db."""
    t, y = _streams(shape, hdim, v), random_tokens(shape, v)
    kw = dict(config=DOPDConfig(top_k=6, topk_renorm=renorm, temperature=1.2, trim=0.1))
    out, train = _run(fused_linear_dopd_loss, t, y, case, backend, device, **kw)
    ref, train64 = _run(fused_linear_dopd_loss, t, y, case, "reference", "cpu", dtype=torch.float64, **kw)
    assert torch.equal(out.regime.cpu(), ref.regime), "regimes differ"
    assert_close(out.per_token_loss.cpu(), ref.per_token_loss, rtol=rtol, what="per-token loss")
    assert_close(out.loss.cpu(), ref.loss, rtol=rtol, what="loss")
    _compare_grads(out, ref, train, train64, rtol)


def _naive_head(z: torch.Tensor, scale: float, softcap) -> torch.Tensor:
    """The transform as a model's forward writes it, in z's own dtype."""
    z = z * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double()).abs().max())


def bf16_grad_tolerance(backend) -> tuple:
    """(rtol, atol as a share of the float64 gradient's largest entry) of bf16 gradients against float64. The
    Triton kernels contract bf16-rounded gradient tiles into dH / dW on tensor cores (as Liger and Cut
    Cross-Entropy do): every term carries its gradient entry's bf16 rounding (2^-9 relative), so an entry
    summing terms of both signs errs by up to ~2^-9 of their absolute sum, which can pass 2e-3 of the largest
    entry (seeds 35 and 37 of 40 did in `test_opd_heads_bf16[triton-interp-js-full]`); they stay bounded by
    the naive bf16 error, which every check also asserts. The other backends contract in fp32."""
    return (2 ** -6, 1e-2) if "Triton" in type(backend).__name__ else (2 ** -7, 2e-3)


def check_bf16_heads(backend, kind: str = "js", gran: str = "full", case: str = "scale+softcap", device: str = "cpu",
                     n: int = 30, hdim: int = 16, v: int = 45) -> None:
    """bf16 fused-linear OPD with heads, judged like Cut Cross-Entropy: truth is float64 on the bf16
    parameters; the backend's loss and dH/dW/db errors may not exceed those of a naive bf16 computation
    (logits materialized and transformed in bf16) by more than a small margin."""
    t, y = _streams(n, hdim, v, dtype=torch.bfloat16), random_tokens(n, v)
    kw = dict(divergence=kind, granularity=gran, top_k=6)
    out, train = _run(fused_linear_opd_loss, t, y, case, backend, device, **kw)
    out.loss.backward()
    (ss, cs), (st, ct), _ = HEAD_CASES[case]
    truth = {}
    for dt in (torch.float64, torch.bfloat16):
        p = {k: leaf(t[k], dt) for k in STUDENT_NAMES}
        zs = _naive_head(p["student_hidden"] @ p["student_weight"].T + p["student_bias"], ss, cs)
        zt = _naive_head(t["teacher_hidden"].to(dt) @ t["teacher_weight"].to(dt).T + t["teacher_bias"].to(dt), st, ct)
        loss = nv.reduce(nv.opd(zs, zt, y, kind, gran, k=6, dtype=dt), y, "mean")
        loss.backward()
        truth[dt] = (loss, p)
    (loss64, p64), (loss16, p16) = truth[torch.float64], truth[torch.bfloat16]
    assert _err(out.loss, loss64) <= _err(loss16, loss64) + 1e-6, "loss worse than naive bf16"
    assert_close(out.loss.cpu(), loss64, rtol=1e-4, what="loss (fp32 statistics)")
    for k in STUDENT_NAMES:
        g, g64, g16 = train[k].grad, p64[k].grad, p16[k].grad
        assert g.dtype == torch.bfloat16
        scale = float(g64.abs().max())
        assert _err(g, g64) <= _err(g16, g64) + 1e-3 * scale, f"d{k} worse than naive bf16"
        rtol, atol = bf16_grad_tolerance(backend)
        assert_close(g.cpu(), g64, rtol=rtol, atol=atol * scale, what=f"d{k}")
