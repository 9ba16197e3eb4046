"""An independent, naive implementation of DESIGN.md sections 1-2 used to check the library.

It shares no code with `dopd_kernels` (no import from it): it materializes every `[N, V]` tensor,
computes in the dtype it is asked for (float64 for ground truth; bf16 to play the "naive user"
baseline that bf16 results are judged against) and gets gradients from autograd.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

NEG_INF = float("-inf")
LH, LL, HT, HS, IGNORED = 0, 1, 2, 3, -1


def logprobs(z: torch.Tensor, temperature: float = 1.0, valid_vocab=None, dtype=torch.float64) -> torch.Tensor:
    z = z.to(dtype) / temperature
    if valid_vocab is not None:
        z = torch.cat([z[:, :valid_vocab], torch.full_like(z[:, valid_vocab:], NEG_INF)], dim=1)
    return torch.log_softmax(z, dim=-1)


def kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Σ a (log a − log b) over the last dim; buckets where a has no mass contribute 0."""
    mass = la > NEG_INF
    la_s = torch.where(mass, la, torch.zeros_like(la))
    lb_s = torch.where(mass, lb, torch.zeros_like(lb))
    return torch.where(mass, la_s.exp() * (la_s - lb_s), torch.zeros_like(la)).sum(-1)


def div(lp: torch.Tensor, lq: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    if kind == "reverse_kl":
        return kl(lp, lq)
    if kind == "forward_kl":
        return kl(lq, lp)
    assert kind == "js"
    m = beta * lp.exp() + (1 - beta) * lq.exp()  # plain (non log-space) mixture
    lm = torch.log(torch.where(m > 0, m, torch.ones_like(m))).masked_fill(m == 0, NEG_INF)
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)


def _rest(lp: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """log of the mass outside `cols`, by summing the other columns."""
    keep = torch.ones(lp.shape, dtype=torch.bool, device=lp.device)
    keep[torch.arange(lp.shape[0])[:, None], cols] = False
    return torch.logsumexp(torch.where(keep, lp, torch.full_like(lp, NEG_INF)), dim=-1, keepdim=True)


def term(lp, lq, y, kind, granularity, k=128, beta=0.5, topk_from="student", renorm=True):
    """Per-row divergence of student log-probs lp [n, V] from target lq [n, V]."""
    if granularity == "full":
        return div(lp, lq, kind, beta)
    if granularity == "sampled":
        ly, qy = lp[torch.arange(lp.shape[0]), y][:, None], lq[torch.arange(lq.shape[0]), y][:, None]
        if kind == "reverse_kl":
            return ((ly - qy).detach() * ly)[:, 0]
        return div(torch.cat([ly, _rest(lp, y[:, None])], 1), torch.cat([qy, _rest(lq, y[:, None])], 1), kind, beta)
    src = lp if topk_from == "student" else lq
    k = min(k, lp.shape[1])
    cols = src.detach().argsort(dim=-1, descending=True, stable=True)[:, :k]  # ties: the lower column
    pk, qk = lp.gather(1, cols), lq.gather(1, cols)
    if renorm:
        return div(pk - torch.logsumexp(pk, -1, keepdim=True), qk - torch.logsumexp(qk, -1, keepdim=True), kind, beta)
    return div(torch.cat([pk, _rest(lp, cols)], 1), torch.cat([qk, _rest(lq, cols)], 1), kind, beta)


def trimmed_mean(values, trim: float) -> float:
    """Python floats: drop the floor(trim · n) largest values (trim read as the decimal it was
    written as), average the rest in exact arithmetic."""
    vals = sorted(float(v) for v in values)
    n = len(vals)
    if n == 0:
        return 0.0
    drop = math.floor(Fraction(repr(trim)) * n)
    kept = vals[: n - drop]
    return float(sum(Fraction(v) for v in kept) / len(kept))


def regimes_of(lt, lp, thresholds):
    """Regime codes of float64 tensors of sampled-token log-probs, per DESIGN.md section 1."""
    a_bar, qt_bar, qp_bar = (float(x) for x in thresholds)
    out = []
    for a_t, a_p in zip(lt.tolist(), lp.tolist()):
        a, qt, qp = abs(a_t - a_p), math.exp(a_t), math.exp(a_p)
        if a < a_bar:
            out.append(LH if qp + qt >= qp_bar + qt_bar else LL)
        else:
            out.append(HT if qt >= qp else HS)
    return out


def opd(zs, zt, tokens, kind, granularity, *, k=128, beta=0.5, temperature=1.0, topk_from="student", renorm=True,
        valid_vocab=None, ignore_index=-100, dtype=torch.float64):
    """Per-token OPD loss [N] (0 at ignored rows) from logits [N, V]."""
    valid = tokens != ignore_index
    rows = valid.nonzero()[:, 0]
    lp = logprobs(zs[rows], temperature, valid_vocab, dtype)
    lq = logprobs(zt[rows], temperature, valid_vocab, dtype)
    kk = min(k, valid_vocab or zs.shape[1])
    vals = term(lp, lq, tokens[rows], kind, granularity, kk, beta, topk_from, renorm)
    out = torch.zeros(tokens.shape[0], dtype=vals.dtype)
    return out.index_put((rows,), vals)


def dopd(zs, zt, zp, tokens, *, k=128, beta_light=0.6, beta_weak=0.3, beta_strong=1.0, js_beta=0.5, trim=0.05,
         temperature=1.0, topk_from="student", renorm=True, valid_vocab=None, ignore_index=-100, thresholds=None,
         dtype=torch.float64):
    """Per-token DOPD loss [N], regimes (list), (A, q_T, q_P) float64 [N] and thresholds (floats)."""
    valid = tokens != ignore_index
    rows = valid.nonzero()[:, 0]
    y = tokens[rows]
    lp_s = logprobs(zs[rows], temperature, valid_vocab, dtype)
    lp_t = logprobs(zt[rows], temperature, valid_vocab, dtype)
    lp_p = logprobs(zp[rows], temperature, valid_vocab, dtype)
    ar = torch.arange(rows.shape[0])
    # Routing statistics always in float64 (they are O(N)).
    lt_y, lp_y = lp_t[ar, y].detach().double(), lp_p[ar, y].detach().double()
    a, qt, qp = (lt_y - lp_y).abs(), lt_y.exp(), lp_y.exp()
    if thresholds is None:
        thresholds = tuple(trimmed_mean(x.tolist(), trim) for x in (a, qt, qp))
    reg = regimes_of(lt_y, lp_y, thresholds)
    kk = min(k, valid_vocab or zs.shape[1])
    vals = []
    for i, r in enumerate(reg):
        s, t, p, yy = lp_s[i:i + 1], lp_t[i:i + 1], lp_p[i:i + 1], y[i:i + 1]
        if r == LH:
            vals.append(beta_light * term(s, t, yy, "reverse_kl", "topk", kk, js_beta, topk_from, renorm))
        elif r == LL:
            vals.append(beta_weak * term(s, p, yy, "reverse_kl", "topk", kk, js_beta, topk_from, renorm))
        elif r == HT:
            vals.append(beta_strong * term(s, t, yy, "js", "full", kk, js_beta))
        else:
            vals.append(beta_light * term(s, p, yy, "reverse_kl", "topk", kk, js_beta, topk_from, renorm))
    n = tokens.shape[0]
    loss = torch.zeros(n, dtype=dtype)
    if vals:
        loss = loss.index_put((rows,), torch.cat(vals))
    regime = [IGNORED] * n
    for i, r in zip(rows.tolist(), reg):
        regime[i] = r

    def full(x):
        return torch.zeros(n, dtype=torch.float64).index_put((rows,), x)

    return loss, regime, full(a), full(qt), full(qp), thresholds


def reduce(per_token: torch.Tensor, tokens: torch.Tensor, reduction: str, ignore_index=-100, normalizer=None):
    """Reduce a per-token loss shaped like `tokens` ([N] or [B, T])."""
    valid = tokens != ignore_index
    if reduction == "none":
        return per_token
    if normalizer is not None:
        return per_token.sum() / normalizer
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        n = int(valid.sum())
        return per_token.sum() / n if n else per_token.sum() * 0
    assert reduction == "seq_mean"
    seqs = [per_token[b][valid[b]].mean() for b in range(tokens.shape[0]) if bool(valid[b].any())]
    return torch.stack(seqs).mean() if seqs else per_token.sum() * 0


def linear_logits(h, w, b=None):
    z = h.double() @ w.double().T
    return z if b is None else z + b.double()
