"""Per-row loss terms that live on a few columns: sampled-token and top-K supports.

Every divergence here is a function D(P, Q) of *bucket* distributions: the student's mass P_b and
the target's mass Q_b over a partition of the vocabulary into buckets b (one bucket per top-K token
plus an optional tail bucket; or {sampled token, rest}). By the chain rule through the softmax,

    ∂D/∂z_v = (1/τ) · p_v · e_{b(v)},   e_b = ∂D/∂P_b − Σ_b' P_b' ∂D/∂P_b',

so the gradient of a row is `p_v · dense` on every column (dense = e of the rest bucket) plus a
correction on the few explicit columns. This module turns bucket log-probs into the value, the per-row `dense`
coefficient and the per-column `sparse` coefficients; backends apply them (the dense part needs
one pass over the vocabulary, the sparse part a scatter). For a renormalized top-K support there
is no rest bucket and no dense part: the gradient touches the K logits only.

The dense coefficient can be astronomically large: forward KL's e_rest = 1 − Q_rest/P_rest is
−e^1000 for a student whose tail mass is e^-1000 and a teacher whose tail holds most of its mass,
while the tail columns' gradient p_v·e_rest ≈ −Q_rest·p_v/P_rest is O(1). Neither factor of that
product fits float64 (p_v ≈ e^-1000 underflows, e_rest overflows), so the product is never formed:
`RowTerm.dense_log` keeps log|e_rest| and passes form the dense part as
`sign · exp(z_v − (lse − log|dense|))` (`RowTerm.dense_normalizer`), a log-probability against a
shifted normalizer, as accurate as any other log-probability of the compute dtype.

All arithmetic is float64 on [rows, K] tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .divergences import divergence, log_mixture

# |dense| above which passes form the dense part in log space (`RowTerm.dense_normalizer`).
DENSE_FOLD = 2.0 ** 64


@dataclass
class RowTerm:
    """Value and gradient coefficients of a row term (gradient up to the factor weight/τ).

    value:  [n] divergence of each row.
    dense:  [n] coefficient of p_v on every column (the explicit ones included), or None.
    cols:   [n, k] explicit columns.
    sparse: [n, k] gradient added on those columns on top of `p_v · dense` (or the whole gradient
            when `dense` is None); None when `explicit` is given.
    explicit: [n, k] or None: the whole gradient P_v·e_v on those columns, written over `p_v · dense`.
            Terms with a tail bucket use it: with a tail far smaller for one stream than the other,
            `dense` is huge and `p_v · dense + sparse` would cancel catastrophically on a column with
            p_v ≈ 1.

    dense_log: [n] or None: log|dense| (float64), finite wherever the exact coefficient is finite and
            nonzero, also where `dense` itself overflowed float64 to ±inf; None: log|dense| of `dense`
            (a term whose coefficient cannot overflow).

    The three shapes: renormalized top-K (`sparse` only), tail-bucket terms (`dense` + `explicit`),
    sampled reverse KL (`dense` + `sparse`).
    """

    value: torch.Tensor
    dense: Optional[torch.Tensor]
    cols: torch.Tensor
    sparse: Optional[torch.Tensor]
    explicit: Optional[torch.Tensor] = None
    dense_log: Optional[torch.Tensor] = None

    def dense_normalizer(self, lse_s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The dense part as `p_v · dense = unit · exp(z_v − lse)` for the student's log-sum-exp `lse_s`
        [n] (float64): `(lse, unit)` [n] float64, with lse = lse_s − log|dense| and unit = sign(dense) on
        the rows whose |dense| exceeds `DENSE_FOLD`, (lse_s, dense) on the others.

        A pass that forms exp(z_v − lse) the way it forms a log-probability (`passes.split_lse`) keeps
        the compute dtype's relative precision on every column however large dense is: the product of
        an underflowed p_v and a huge dense (0, or 0·inf = NaN, where the exact value is O(1)) is never
        formed. Below `DENSE_FOLD` the product p_v·dense is formed as it is: exact where p_v rounds
        to 1 (sampled reverse KL's p_y·(−d) + d then cancels to 0 exactly), and where p_v underflows
        the compute dtype (< 2^-149) it is below 2^-85. Rows whose dense is NaN or whose `lse_s` is not
        finite (no distribution: the row's value is NaN) are left as they are. Requires `dense`."""
        log_mag = self.dense.abs().log() if self.dense_log is None else self.dense_log
        fold = (self.dense.abs() > DENSE_FOLD) & torch.isfinite(log_mag) & torch.isfinite(lse_s)
        return torch.where(fold, lse_s - log_mag, lse_s), torch.where(fold, self.dense.sign(), self.dense)


def bucket_coefficients(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, js_beta: float) -> torch.Tensor:
    """e_b of the formula above for each bucket [n, B]; 0 on buckets holding no student mass."""
    has_mass = log_p != float("-inf")  # NaN propagates (see divergences.py)
    lp = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    lq = torch.where(has_mass, log_q, torch.zeros_like(log_q))
    if kind == "forward_kl":
        # ∂D/∂P_b = −Q_b/P_b and Σ_b P_b·(−Q_b/P_b) = −1.
        e = 1.0 - torch.exp(lq - lp)
    else:
        if kind == "reverse_kl":
            r = lp - lq  # ∂D/∂P_b up to a constant that cancels in e_b
        else:  # js: ∂D/∂P_b = β (log P_b − log M_b)
            r = js_beta * (lp - log_mixture(lp, lq, js_beta))
        e = r - (lp.exp() * r).sum(-1, keepdim=True)
    return torch.where(has_mass, e, torch.zeros_like(e))


def _log_abs_one_minus_exp(d: torch.Tensor) -> torch.Tensor:
    """log|1 − e^d| without overflow: d + log(1 − e^-d) for d > 0 (e^d may be past float64's range),
    log(1 − e^d) for d ≤ 0; −inf at d = 0, NaN stays NaN."""
    return torch.where(d > 0, d + torch.log(-torch.expm1(-d)), torch.log(-torch.expm1(d)))


def bucket_term(log_p: torch.Tensor, log_q: torch.Tensor, cols: torch.Tensor, kind: str, js_beta: float, has_rest: bool) -> RowTerm:
    """Term over buckets `cols` [n, k] (+ a rest bucket as the last entry of log_p/log_q when `has_rest`)."""
    value = divergence(log_p, log_q, kind, js_beta)
    e = bucket_coefficients(log_p, log_q, kind, js_beta)
    p = log_p.exp()
    if kind == "forward_kl":
        # P_b·e_b = P_b − Q_b: the product form is 0·(−inf) = NaN when P_b underflows (log P_b finite).
        pe = torch.where(log_p != float("-inf"), p - log_q.exp(), torch.zeros_like(p))
    else:
        pe = p * e
    if not has_rest:
        return RowTerm(value, None, cols, pe)
    k = cols.shape[1]
    dense_log = None  # reverse KL and JS: e_rest is a difference of log-probs, finite wherever log P_rest is
    if kind == "forward_kl":
        # log|e_rest| = log|1 − Q_rest/P_rest|, finite where e_rest itself overflowed (Q_rest/P_rest > e^709)
        rest_p, rest_q = log_p[:, k], log_q[:, k]
        dense_log = torch.where(rest_p != float("-inf"), _log_abs_one_minus_exp(rest_q - rest_p),
                                torch.full_like(rest_p, float("-inf")))
    return RowTerm(value, e[:, k], cols, None, pe[:, :k], dense_log)


def tail_term(log_p_cols: torch.Tensor, log_q_cols: torch.Tensor, rest_p: torch.Tensor, rest_q: torch.Tensor,
              cols: torch.Tensor, kind: str, js_beta: float) -> RowTerm:
    """Term over the explicit columns `cols` [n, k] (full-vocabulary log-probs) plus a rest bucket.

    `rest_p`/`rest_q` [n]: log-mass of the rest, summed directly by the caller (accurate however small
    the tail; log(1 − Σp) would cancel to 0 or below it for a tail under the rounding of the
    log-sum-exp). The rest is renormalized together with the explicit columns so the buckets sum
    to 1; the explicit columns get their whole gradient P_v·e_v written (`explicit`).
    """
    raw_p = torch.cat([log_p_cols, rest_p[:, None].to(log_p_cols.dtype)], dim=-1)
    raw_q = torch.cat([log_q_cols, rest_q[:, None].to(log_q_cols.dtype)], dim=-1)
    lp = raw_p - torch.logsumexp(raw_p, dim=-1, keepdim=True)
    lq = raw_q - torch.logsumexp(raw_q, dim=-1, keepdim=True)
    return bucket_term(lp, lq, cols, kind, js_beta, has_rest=True)


def sampled_term(log_p_y: torch.Tensor, log_q_y: torch.Tensor, tokens: torch.Tensor, kind: str, js_beta: float,
                 rest_p: Optional[torch.Tensor] = None, rest_q: Optional[torch.Tensor] = None) -> RowTerm:
    """Sampled-token term. Reverse KL is the log-ratio estimator of vanilla OPD,
    `loss = sg(log p(y) − log q(y)) · log p(y)`, whose gradient d · (δ_vy − p_v)/τ (d the log ratio)
    is the policy-gradient estimate of reverse KL. Forward KL and JS use the two buckets {y, not y};
    `rest_p`/`rest_q` [n] are the log-masses of "not y", summed directly (not needed for reverse KL).
    """
    cols = tokens[:, None]
    if kind == "reverse_kl":
        d = log_p_y - log_q_y
        return RowTerm(d * log_p_y, -d, cols, d[:, None])
    return tail_term(log_p_y[:, None], log_q_y[:, None], rest_p, rest_q, cols, kind, js_beta)


def topk_term(student_cols: torch.Tensor, target_cols: torch.Tensor, lse_student: torch.Tensor,
              lse_target: torch.Tensor, cols: torch.Tensor, kind: str, js_beta: float, renorm: bool,
              rest_student: Optional[torch.Tensor] = None, rest_target: Optional[torch.Tensor] = None) -> RowTerm:
    """Top-K term from the scaled logits of both streams at the support `cols` [n, K].

    renorm=True: both distributions renormalized over the K tokens (gradient on K logits only).
    renorm=False: K full-vocabulary probabilities plus a tail bucket with the remaining mass
    (`rest_student`/`rest_target` [n]: its log-mass summed directly; needed when renorm=False).
    """
    if renorm:
        lp = torch.log_softmax(student_cols, dim=-1)
        lq = torch.log_softmax(target_cols, dim=-1)
        return bucket_term(lp, lq, cols, kind, js_beta, has_rest=False)
    return tail_term(student_cols - lse_student[:, None], target_cols - lse_target[:, None], rest_student, rest_target,
                     cols, kind, js_beta)
