"""The contenders of each workload, all starting from the same fused-linear inputs (`inputs.py`).

Workloads (what one call computes, from hidden states and `lm_head` weights):

- `dopd`:    the DOPD loss (paper defaults: K=128, β_l=0.6, β_w=0.3, trim=0.05), forward+backward.
- `js`:      full-vocabulary JS(s, t) with β=0.5, mean over tokens, forward+backward.
- `kl`:      full-vocabulary forward KL(t ‖ s), mean over tokens, forward+backward.
- `logprob`: log π_s(y) of the sampled tokens (the log-sum-exp / log-prob part), forward only.

Contenders:

- `naive`: what a user writes by hand: the `[N, V]` logits via matmul, upcast to fp32,
  `log_softmax`, routing, top-K and the divergences, all materialized. Independent of the
  library's code.
- `naive_compiled`: `torch.compile` of the same function.
- `lib_<name>`: this library through its public API with `backend=<name>`, for every name that
  `dopd_kernels.available_backends()` can offer (the float64 `reference` is ground truth, not a
  contender); names it does not offer are recorded as unavailable.
- `lib_<name>_frozen_head`, `naive_frozen_head` (`dopd` only): the same loss with the student's
  `lm_head` frozen (`requires_grad=False`, as under LoRA): no `dW` is computed or allocated, so these
  show the time and memory a frozen head saves against its trainable twin.
- peers, when installed: on `js` and `kl`, TRL's own distillation loss
  (`trl_chunked_divergence`: `DistillationTrainer`'s `_chunked_divergence_loss`, TRL >= 1.16, its
  Triton kernels on CUDA and its PyTorch tiles on CPU); Liger-Kernel's pure-PyTorch chunked loss
  (`liger_chunked_jsd`: `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`, soft loss only,
  `compiled=False`, so it runs on CPU); Liger's Triton ops (`LigerFusedLinearJSD`, its JSD and
  KL-divergence ops on materialized logits, `LigerFusedLinearKLDivLoss`); and Cut Cross-Entropy (its
  log-sum-exp / log-prob kernel) on `logprob`. The DOPD routing exists only here.

TRL and Liger weight their generalized JSD the other way round from this library: theirs is
`β' KL(t‖m) + (1−β') KL(s‖m)` with `m = β' t + (1−β') s`, this library's `js_beta` weights the student,
so `β' = 1 − js_beta`; `β' = 0` is forward KL(t‖s) (`peer_beta`). At the benchmarked β = 0.5 both
agree, so smoke mode also checks every peer's value at an asymmetric β (`harness.check_value`).

`availability(name, case)` returns None when a contender can run on a case, or the reason it
cannot; `build(name, inputs, case, js_beta)` returns a zero-argument callable computing the workload
(a scalar loss to back-propagate, or the log-probs for `logprob`).
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Callable, Dict, List, Optional

import torch

from .inputs import Case, Inputs

LIBRARY_BACKENDS = ("torch", "cpp", "triton", "cuda")  # always listed, so a missing one is recorded
K, BETA_LIGHT, BETA_WEAK, BETA_STRONG, JS_BETA, TRIM = 128, 0.6, 0.3, 1.0, 0.5, 0.05
FORWARD_ONLY = ("logprob",)


# -- naive PyTorch, as a user writes it ------------------------------------------------------------

def _trimmed_mean(x: torch.Tensor, trim: float) -> torch.Tensor:
    keep = x.shape[0] - math.floor(trim * x.shape[0])
    return torch.sort(x).values[:keep].mean()


def _js(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token JS_β of log-prob rows: β KL(p‖m) + (1−β) KL(q‖m), log m by logaddexp."""
    lm = torch.logaddexp(ls + math.log(beta), lt + math.log(1 - beta))
    return beta * (ls.exp() * (ls - lm)).sum(-1) + (1 - beta) * (lt.exp() * (lt - lm)).sum(-1)


def _topk_rkl(zs_k: torch.Tensor, zt_k: torch.Tensor) -> torch.Tensor:
    """Reverse KL over a top-K set, both distributions renormalized over the set."""
    ls, lt = torch.log_softmax(zs_k, -1), torch.log_softmax(zt_k, -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def naive_dopd(hs, ws, ht, wt, hp, tokens):
    zs = (hs @ ws.T).float()
    with torch.no_grad():  # frozen streams
        zt = (ht @ wt.T).float()
        zp = (hp @ ws.T).float()
        lt, lp = torch.log_softmax(zt, -1), torch.log_softmax(zp, -1)
        lt_y, lp_y = lt.gather(1, tokens[:, None])[:, 0], lp.gather(1, tokens[:, None])[:, 0]
        gap, q_t, q_p = (lt_y - lp_y).abs(), lt_y.exp(), lp_y.exp()
        low = gap < _trimmed_mean(gap, TRIM)
        confident = q_t + q_p >= _trimmed_mean(q_t, TRIM) + _trimmed_mean(q_p, TRIM)
        teacher_wins = q_t >= q_p
    ls = torch.log_softmax(zs, -1)
    idx = ls.topk(K, dim=-1).indices
    zs_k = zs.gather(1, idx)
    rkl_t = _topk_rkl(zs_k, zt.gather(1, idx))
    rkl_p = _topk_rkl(zs_k, zp.gather(1, idx))
    js = _js(ls, lt, JS_BETA)
    per_token = torch.where(low, torch.where(confident, BETA_LIGHT * rkl_t, BETA_WEAK * rkl_p),
                            torch.where(teacher_wins, BETA_STRONG * js, BETA_LIGHT * rkl_p))
    return per_token.mean()


def naive_js(hs, ws, ht, wt, tokens, beta=JS_BETA):
    ls = torch.log_softmax((hs @ ws.T).float(), -1)
    with torch.no_grad():
        lt = torch.log_softmax((ht @ wt.T).float(), -1)
    return _js(ls, lt, beta).mean()


def naive_kl(hs, ws, ht, wt, tokens):
    ls = torch.log_softmax((hs @ ws.T).float(), -1)
    with torch.no_grad():
        lt = torch.log_softmax((ht @ wt.T).float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def naive_logprob(hs, ws, tokens):
    return torch.log_softmax((hs @ ws.T).float(), -1).gather(1, tokens[:, None])[:, 0]


NAIVE = {"dopd": naive_dopd, "js": naive_js, "kl": naive_kl, "logprob": naive_logprob}


def _kwargs(workload: str, js_beta: float) -> dict:
    """The JS weight is the only workload parameter a contender takes (the `js` workload's)."""
    return {"beta": js_beta} if workload == "js" else {}


def _args(workload: str, x: Inputs) -> tuple:
    if workload == "dopd":
        return x.hs, x.ws, x.ht, x.wt, x.hp, x.tokens
    if workload in ("js", "kl"):
        return x.hs, x.ws, x.ht, x.wt, x.tokens
    return x.hs, x.ws, x.tokens


# -- this library -----------------------------------------------------------------------------------

FROZEN = "_frozen_head"  # suffix of the frozen-student-head variants of the `dopd` contenders


def _student_head(x: Inputs, frozen: bool) -> torch.Tensor:
    """The student's `lm_head` as the contender sees it: trainable, or a view that does not require grad."""
    return x.ws.detach() if frozen else x.ws


def _library(workload: str, backend: str, x: Inputs, frozen: bool = False, js_beta: float = JS_BETA) -> Callable:
    import dopd_kernels as dk

    if workload == "dopd":
        ws = _student_head(x, frozen)
        return lambda: dk.fused_linear_dopd_loss(x.hs, ws, x.ht, x.wt, x.hp, x.tokens, backend=backend).loss
    if workload in ("js", "kl"):
        div = "js" if workload == "js" else "forward_kl"
        return lambda: dk.fused_linear_opd_loss(x.hs, x.ws, x.ht, x.wt, x.tokens, divergence=div,
                                                granularity="full", js_beta=js_beta, backend=backend).loss
    return lambda: dk.token_logprobs(x.hs, x.tokens, weight=x.ws, backend=backend)


def smoke_mode() -> bool:
    """Smoke mode (`--smoke` sets this variable for the probe subprocesses too)."""
    return os.environ.get("DOPD_BENCH_SMOKE") == "1"


def _library_availability(backend: str, case: Case) -> Optional[str]:
    import dopd_kernels as dk
    from dopd_kernels.backends import resolve_backend

    offered = dk.available_backends()
    if backend not in offered:
        return f"unavailable: backend {backend!r} not offered by available_backends() = {offered}"
    try:
        resolve_backend(backend, torch.device(case.device))
    except (ValueError, RuntimeError) as err:
        return f"unavailable: {err}"
    if backend == "triton" and case.device == "cpu" and not smoke_mode():
        return "skipped: Triton needs CUDA (interpreter too slow)"
    return None


# -- peers ----------------------------------------------------------------------------------------

def peer_beta(workload: str, js_beta: float) -> float:
    """TRL's and Liger's β for this library's `js` workload at `js_beta`, or for forward KL (`kl`).

    Theirs weights the teacher: JS_β' = β' KL(t‖m) + (1−β') KL(s‖m), m = β' t + (1−β') s, where this
    library's JS_β = β KL(s‖m) + (1−β) KL(t‖m), m = β s + (1−β) t; so β' = 1 − β. At β' = 0 both
    peers compute KL(t‖s), this library's `forward_kl`."""
    return 1.0 - js_beta if workload == "js" else 0.0


def _liger(workload: str, which: str, x: Inputs, js_beta: float) -> Callable:
    from liger_kernel.transformers import LigerFusedLinearJSD, LigerFusedLinearKLDivLoss, LigerJSD, LigerKLDIVLoss

    beta = peer_beta(workload, js_beta)
    if which == "liger_chunked_jsd":  # the pure-PyTorch chunked loss: soft (distillation) term only, not compiled
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # It masks on `true_labels` (never equal to ignore_index here) and divides by their count: the
        # mean over the tokens. With weight_hard_loss=0 it skips the cross-entropy term entirely.
        chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False)
        return lambda: chunked(x.hs, x.ws, x.ht, x.wt, x.tokens)
    if which == "liger_fused_linear_jsd":
        loss = LigerFusedLinearJSD(jsd_beta=beta)
        return lambda: loss(x.hs, x.ws, x.ht, x.wt, None)

    def teacher_logprobs():
        with torch.no_grad():
            return torch.log_softmax((x.ht @ x.wt.T).float(), -1)

    if which == "liger_fused_linear_kl_div":  # takes the teacher's probabilities as data
        loss = LigerFusedLinearKLDivLoss()
        return lambda: loss(x.hs, x.ws, teacher_logprobs().exp())
    op = LigerJSD(beta=beta) if which == "liger_jsd" else LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda: op(torch.log_softmax((x.hs @ x.ws.T).float(), -1), teacher_logprobs())


def _trl(workload: str, x: Inputs, js_beta: float) -> Callable:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    # It takes [B, T, H] hidden states and a completion mask; no normalizer means the mean over the
    # valid tokens, as the naive baseline computes.
    beta = peer_beta(workload, js_beta)
    mask = torch.ones(1, x.hs.shape[0], dtype=torch.long, device=x.hs.device)
    return lambda: _chunked_divergence_loss(x.hs[None], x.ht[None], x.ws, x.wt, mask, beta)[0]


def _cce(x: Inputs) -> Callable:
    from cut_cross_entropy import linear_cross_entropy

    return lambda: -linear_cross_entropy(x.hs, x.ws, x.tokens, reduction="none", impl="cce")


PEERS: Dict[str, Dict[str, str]] = {  # workload -> contender -> module that must import
    "js": {"trl_chunked_divergence": "trl.trainer.distillation_trainer", "liger_chunked_jsd": "liger_kernel.chunked_loss",
           "liger_fused_linear_jsd": "liger_kernel", "liger_jsd": "liger_kernel"},
    "kl": {"trl_chunked_divergence": "trl.trainer.distillation_trainer", "liger_chunked_jsd": "liger_kernel.chunked_loss",
           "liger_fused_linear_jsd": "liger_kernel", "liger_kl_div": "liger_kernel",
           "liger_fused_linear_kl_div": "liger_kernel"},
    "logprob": {"cce": "cut_cross_entropy"},
}
CPU_PEERS = ("trl_chunked_divergence", "liger_chunked_jsd")  # peers with a PyTorch path: timed on CPU like the library


def _peer_availability(name: str, case: Case) -> Optional[str]:
    module = PEERS[case.workload][name]
    try:
        importlib.import_module(module)
    except Exception as err:  # any import failure means the peer cannot run here
        return f"unavailable: import {module} failed ({type(err).__name__}: {err})"
    if name in CPU_PEERS:
        return None
    if case.device != "cuda" and not smoke_mode():
        return "skipped: Triton peers need CUDA (interpreter too slow)"
    if case.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "skipped: Triton peers need CUDA or TRITON_INTERPRET=1"
    if name == "cce" and case.device != "cuda":
        return "skipped: CCE's kernel needs CUDA"
    return None


# -- registry -------------------------------------------------------------------------------------

def names(workload: str) -> List[str]:
    """Every contender of a workload, available here or not; torch.compile last (its compile time is
    the least predictable, so a time budget should cut it first)."""
    lib = [f"lib_{b}" for b in library_backends()]
    frozen = ["naive" + FROZEN] + [name + FROZEN for name in lib] if workload == "dopd" else []
    return ["naive"] + lib + frozen + list(PEERS.get(workload, {})) + ["naive_compiled"]


def library_backends() -> List[str]:
    """The known backends plus any other fast backend the library offers (not `reference`)."""
    import dopd_kernels as dk

    extra = [b for b in dk.available_backends() if b not in LIBRARY_BACKENDS and b != "reference"]
    return list(LIBRARY_BACKENDS) + extra


def kind(name: str) -> str:
    if name.startswith("naive"):
        return "baseline"
    return "library" if name.startswith("lib_") else "peer"


def availability(name: str, case: Case) -> Optional[str]:
    name = name.removesuffix(FROZEN)  # a frozen-head variant runs wherever its trainable twin does
    if name == "naive":
        return None
    if name == "naive_compiled":
        if case.device == "cpu" and case.dtype != "float32":
            return "skipped: torch.compile CPU codegen benchmarked in fp32 only"
        return None
    if name.startswith("lib_"):
        return _library_availability(name[4:], case)
    return _peer_availability(name, case)


_COMPILED: Dict[str, Callable] = {}


def build(name: str, x: Inputs, case: Case, js_beta: float = JS_BETA) -> Callable:
    """The contender `name` on inputs `x` as a zero-argument callable; `js_beta` is the JS weight of the
    `js` workload (ignored by the others)."""
    w = case.workload
    kw = _kwargs(w, js_beta)
    frozen = name.endswith(FROZEN)
    name = name.removesuffix(FROZEN)
    if name == "naive":
        fn, args = NAIVE[w], _args(w, x)
        if frozen:  # the student head is the second argument of every naive workload
            args = (args[0], _student_head(x, True), *args[2:])
        return lambda: fn(*args, **kw)
    if name == "naive_compiled":
        if w not in _COMPILED:  # one compiled function per workload; dynamic shapes avoid a recompile per size
            # smoke mode checks the path through dynamo and AOT autograd, not inductor's codegen time
            _COMPILED[w] = torch.compile(NAIVE[w], dynamic=True, backend="aot_eager" if smoke_mode() else "inductor")
        fn, args = _COMPILED[w], _args(w, x)
        return lambda: fn(*args, **kw)
    if name.startswith("lib_"):
        return _library(w, name[4:], x, frozen, js_beta)
    if name.startswith("liger"):
        return _liger(w, name, x, js_beta)
    if name == "trl_chunked_divergence":
        return _trl(w, x, js_beta)
    return _cce(x)
