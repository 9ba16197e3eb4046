"""The float64 reference: DESIGN.md sections 1–2 written as plainly as possible.

Every stream's full `[N, V]` logits are materialized in float64 and gradients come from autograd.
It is the ground truth of the test suite and never fast. It shares no gradient code with the
other backends (they use hand-derived gradients); values go through `divergences.divergence`.
"""

from __future__ import annotations

import torch

from .config import DOPDConfig, OPDConfig
from .divergences import clamp_js, divergence
from .routing import assign_regimes, batch_thresholds, routing_statistics
from .sources import LinearSource, LogitsSource
from .topk import select_top_k

NEG_INF = float("-inf")


def materialize(source) -> torch.Tensor:
    """float64 logits [N, V_valid] of a source's valid columns [0, valid_vocab) (before the temperature),
    differentiable with respect to its tensors; in fused-linear mode `softcap(scale·(h·Wᵀ + b))`, so
    autograd chains through the tanh. Padding columns are never formed: a padding row of a weight, whatever
    it holds (NaN included), reaches neither the value nor any gradient, as on every other backend."""
    v = source.effective_vocab
    if isinstance(source, LogitsSource):
        z = source.logits[:, :v].to(torch.float64)
    elif isinstance(source, LinearSource):
        z = source.hidden.to(torch.float64) @ source.weight[:v].to(torch.float64).T
        if source.bias is not None:
            z = z + source.bias[:v].to(torch.float64)
        z = source.transform(z)
    else:
        raise TypeError(f"unknown source {type(source).__name__}")
    return z


def log_probs(source) -> torch.Tensor:
    """log softmax(z / τ) [N, V_valid] in float64 over the valid columns [0, valid_vocab) only: padding
    columns are not part of any support set, so a top-K never selects one (even against a -inf logit)."""
    return torch.log_softmax(materialize(source) / source.temperature, dim=-1)


def _complement_logsumexp(lp: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """log of the mass outside `cols`, summed directly over the remaining columns."""
    outside = torch.ones_like(lp, dtype=torch.bool).scatter(1, cols, False)
    return torch.logsumexp(lp.masked_fill(~outside, NEG_INF), dim=-1, keepdim=True)


def term(lp_s: torch.Tensor, lp_t: torch.Tensor, tokens: torch.Tensor, kind: str, granularity: str,
         top_k: int, js_beta: float, topk_from: str, topk_renorm: bool) -> torch.Tensor:
    """Per-row divergence [n] of student log-probs `lp_s` from target `lp_t` (both [n, V]); JS values
    held to their bound (`clamp_js`, as every backend does)."""
    value = _term(lp_s, lp_t, tokens, kind, granularity, top_k, js_beta, topk_from, topk_renorm)
    return clamp_js(value, js_beta) if kind == "js" else value


def _term(lp_s, lp_t, tokens, kind, granularity, top_k, js_beta, topk_from, topk_renorm):
    if granularity == "full":
        return divergence(lp_s, lp_t, kind, js_beta)
    if granularity == "sampled":
        y = tokens[:, None]
        ls_y, lt_y = lp_s.gather(1, y), lp_t.gather(1, y)
        if kind == "reverse_kl":
            return ((ls_y - lt_y).detach() * ls_y)[:, 0]
        bp = torch.cat([ls_y, _complement_logsumexp(lp_s, y)], dim=1)
        bq = torch.cat([lt_y, _complement_logsumexp(lp_t, y)], dim=1)
        return divergence(bp, bq, kind, js_beta)
    # top-K: the K most probable tokens of the chosen stream (a selection, not differentiated).
    source = lp_s if topk_from == "student" else lp_t
    cols = select_top_k(source.detach(), top_k)
    ls_k, lt_k = lp_s.gather(1, cols), lp_t.gather(1, cols)
    if topk_renorm:
        return divergence(torch.log_softmax(ls_k, -1), torch.log_softmax(lt_k, -1), kind, js_beta)
    bp = torch.cat([ls_k, _complement_logsumexp(lp_s, cols)], dim=1)
    bq = torch.cat([lt_k, _complement_logsumexp(lp_t, cols)], dim=1)
    return divergence(bp, bq, kind, js_beta)


def effective_top_k(top_k: int, source) -> int:
    return min(top_k, source.effective_vocab)


def opd_per_token(student, teacher, tokens: torch.Tensor, valid: torch.Tensor, cfg: OPDConfig) -> torch.Tensor:
    """Per-token OPD loss [N] (float64, 0 where not valid)."""
    rows = valid.nonzero()[:, 0]
    lp_s, lp_t = log_probs(student)[rows], log_probs(teacher)[rows]
    values = term(lp_s, lp_t, tokens[rows], cfg.divergence, cfg.granularity, effective_top_k(cfg.top_k, student),
                  cfg.js_beta, cfg.topk_from, cfg.topk_renorm)
    return torch.zeros(valid.shape[0], dtype=torch.float64, device=valid.device).index_put((rows,), values)


def dopd_per_token(student, teacher, priv, tokens: torch.Tensor, valid: torch.Tensor, cfg: DOPDConfig, thresholds=None,
                   routing_group=None):
    """Per-token DOPD loss [N] (float64, weighted, 0 where not valid) and the routing:
    `(loss, regime, adv_gap, q_teacher, q_priv_student, thresholds)`."""
    rows = valid.nonzero()[:, 0]
    y = tokens[rows]
    lp_s, lp_t, lp_p = (log_probs(src)[rows] for src in (student, teacher, priv))

    def full(v: torch.Tensor) -> torch.Tensor:  # scatter per-valid-row values into [N], 0 elsewhere
        return torch.zeros(valid.shape[0], dtype=torch.float64, device=valid.device).index_put((rows,), v)

    adv, q_t, q_p = (full(x) for x in routing_statistics(lp_t.gather(1, y[:, None])[:, 0], lp_p.gather(1, y[:, None])[:, 0]))
    if thresholds is None:
        thresholds = batch_thresholds(adv, q_t, q_p, valid, cfg.trim, routing_group)
    regime = assign_regimes(adv, q_t, q_p, valid, thresholds)
    r = regime[rows].long()

    k = effective_top_k(cfg.top_k, student)
    topk = dict(kind="reverse_kl", granularity="topk", top_k=k, js_beta=cfg.js_beta,
                topk_from=cfg.topk_from, topk_renorm=cfg.topk_renorm)
    rkl_teacher = term(lp_s, lp_t, y, **topk)
    rkl_priv = term(lp_s, lp_p, y, **topk)
    js_teacher = term(lp_s, lp_t, y, "js", "full", k, cfg.js_beta, cfg.topk_from, cfg.topk_renorm)
    # Columns in Regime order: LH, LL, HT, HS.
    per_regime = torch.stack([cfg.beta_light * rkl_teacher, cfg.beta_weak * rkl_priv,
                              cfg.beta_strong * js_teacher, cfg.beta_light * rkl_priv], dim=1)
    values = per_regime.gather(1, r[:, None])[:, 0]
    return full(values), regime, adv, q_t, q_p, thresholds


def token_logprobs(source, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log π(y) [N] in float64 (0 where not valid)."""
    lp = log_probs(source)
    safe = torch.where(valid, tokens, torch.zeros_like(tokens))
    return torch.where(valid, lp.gather(1, safe[:, None])[:, 0], torch.zeros((), dtype=lp.dtype))
