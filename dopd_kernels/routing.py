"""DOPD routing: per-token advantage gap and confidences, trimmed batch thresholds, four regimes.

All routing arithmetic runs in float64 on `[N]` statistics, whatever the input dtype: it is O(N),
and a regime should not flip because a statistic was rounded. Nothing here carries a gradient.

Non-finite statistics (identical on every backend, since all of them route here):
- ℓ_T = ℓ_P = -inf (both streams rule the sampled token out): A = 0, q_T = q_P = 0 — finite.
- exactly one of ℓ_T, ℓ_P is -inf: A = +inf; the token routes by the table (high gap) but is left out
  of the thresholds' trimmed means.
- ℓ_T or ℓ_P is NaN (a NaN/+inf logit, or a row with no finite logit): the token is routed to HS,
  left out of the trimmed means, and its loss is NaN (`nan_tokens`), so the damage shows in the loss.
A non-finite statistic therefore never moves the thresholds, and never re-routes another token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .config import DOPDConfig, Regime, Thresholds


def trimmed_mean(values: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean of `values` [n] after dropping its floor(trim · n) largest entries (0 when n == 0)."""
    values = values.to(torch.float64)
    n = values.numel()
    if n == 0:
        return values.new_zeros(())
    # floor(trim · n) of the fraction the caller meant: the binary product can land just below an
    # integer (0.29 · 100 == 28.999999999999996), which would keep one value too many.
    keep = n - math.floor(trim * n * (1.0 + 1e-12))
    return torch.sort(values).values[:keep].mean()


def routing_statistics(teacher_logprob: torch.Tensor, priv_student_logprob: torch.Tensor):
    """(A, q_T, q_P) in float64: A = |ℓ_T − ℓ_P|, q = exp ℓ."""
    lt = teacher_logprob.detach().to(torch.float64)
    lp = priv_student_logprob.detach().to(torch.float64)
    gap = torch.where(lt == lp, torch.zeros_like(lt), (lt - lp).abs())  # both -inf: they agree, A = 0 (not NaN)
    return gap, lt.exp(), lp.exp()


def finite_statistics(adv_gap, q_teacher, q_priv_student) -> torch.Tensor:
    """Tokens whose three statistics are finite (the others never enter the thresholds)."""
    return torch.isfinite(adv_gap) & torch.isfinite(q_teacher) & torch.isfinite(q_priv_student)


def nan_tokens(adv_gap, q_teacher, q_priv_student) -> torch.Tensor:
    """Tokens with a NaN statistic: their DOPD loss is NaN on every backend."""
    return torch.isnan(adv_gap) | torch.isnan(q_teacher) | torch.isnan(q_priv_student)


def batch_thresholds(adv_gap, q_teacher, q_priv_student, valid: torch.Tensor, trim: float, group=None) -> Thresholds:
    """Trimmed means of the three statistics over the valid tokens whose statistics are all finite;
    with a `torch.distributed` `group`, over those tokens of every rank of the group (a collective call)."""
    keep = valid & finite_statistics(adv_gap, q_teacher, q_priv_student)
    stats = tuple(x[keep] for x in (adv_gap, q_teacher, q_priv_student))
    if group is not None:
        from .parallel import gather_routing_statistics

        stats = gather_routing_statistics(stats, group)
    return Thresholds(*(trimmed_mean(x, trim).cpu() for x in stats))


def assign_regimes(adv_gap, q_teacher, q_priv_student, valid: torch.Tensor, thresholds: Thresholds) -> torch.Tensor:
    """Regime code per token (int8), DESIGN.md section 1:

    LH: A < Ā and q_P + q_T ≥ q̄_P + q̄_T     LL: A < Ā and q_P + q_T < q̄_P + q̄_T
    HT: A ≥ Ā and q_T ≥ q_P                   HS: A ≥ Ā and q_T < q_P

    A token with a NaN statistic goes to HS (the value NaN comparisons give, made explicit).
    """
    a_bar, qt_bar, qp_bar = (t.to(adv_gap.device, torch.float64) for t in thresholds)
    low = adv_gap < a_bar
    confident = (q_priv_student + q_teacher) >= (qp_bar + qt_bar)
    teacher_wins = q_teacher >= q_priv_student
    regime = torch.where(
        low,
        torch.where(confident, int(Regime.LH), int(Regime.LL)),
        torch.where(teacher_wins, int(Regime.HT), int(Regime.HS)),
    ).to(torch.int8)
    regime = regime.masked_fill(nan_tokens(adv_gap, q_teacher, q_priv_student), int(Regime.HS))
    return regime.masked_fill(~valid, int(Regime.IGNORED))


def route(
    teacher_logprob: torch.Tensor,
    priv_student_logprob: torch.Tensor,
    valid_mask: torch.Tensor,
    config: Optional[DOPDConfig] = None,
    thresholds: Optional[Thresholds] = None,
    routing_group=None,
) -> Tuple[torch.Tensor, Thresholds]:
    """Route tokens to DOPD regimes from their sampled-token log-probs.

    Args:
        teacher_logprob: `[*]` log π_T(y) of each token (for example from `token_logprobs`).
        priv_student_logprob: `[*]` log π_P(y), same shape.
        valid_mask: `[*]` bool, True where the token counts.
        config: `DOPDConfig` (its `trim` is used); defaults to the paper's settings.
        thresholds: optional precomputed `Thresholds` (e.g. over a global batch) used instead of
            this batch's trimmed means.
        routing_group: optional `torch.distributed` group; thresholds are then the trimmed means
            over the valid tokens of all its ranks (every rank must call).

    Returns:
        `(regime, thresholds)`: `[*]` int8 `Regime` codes (-1 where not valid) and the thresholds used.
    """
    from .validation import check_config, coerce_thresholds

    config = check_config(config, DOPDConfig)
    for name, t in (("teacher_logprob", teacher_logprob), ("priv_student_logprob", priv_student_logprob)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if priv_student_logprob.shape != teacher_logprob.shape:
        raise ValueError(
            f"priv_student_logprob must have shape {list(teacher_logprob.shape)} like teacher_logprob, got {list(priv_student_logprob.shape)}"
        )
    if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool or valid_mask.shape != teacher_logprob.shape:
        raise TypeError(f"valid_mask must be a bool tensor of shape {list(teacher_logprob.shape)}")
    for name, t in (("priv_student_logprob", priv_student_logprob), ("valid_mask", valid_mask)):
        if t.device != teacher_logprob.device:
            raise ValueError(f"{name} is on {t.device} but teacher_logprob is on {teacher_logprob.device}")
    for name, t in (("teacher_logprob", teacher_logprob), ("priv_student_logprob", priv_student_logprob)):
        bad = valid_mask & (torch.isnan(t) | (t == float("inf")))
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name} holds NaN or +inf at valid position {where}: a log-probability is in [-inf, 0]")
    a, qt, qp = routing_statistics(teacher_logprob, priv_student_logprob)
    thresholds = coerce_thresholds(thresholds) or batch_thresholds(a, qt, qp, valid_mask, config.trim, routing_group)
    return assign_regimes(a, qt, qp, valid_mask, thresholds), thresholds


@dataclass
class Routing:
    """Per-token routing outputs [N] (float64 statistics, 0 where not valid) and thresholds."""

    regime: torch.Tensor
    adv_gap: torch.Tensor
    q_teacher: torch.Tensor
    q_priv_student: torch.Tensor
    thresholds: Thresholds


def empty_routing(valid: torch.Tensor, thresholds: Optional[Thresholds]) -> Routing:
    """Routing of a call before its statistics are known: every token ignored, statistics 0."""
    zeros = torch.zeros(valid.shape[0], dtype=torch.float64, device=valid.device)
    regime = torch.full(valid.shape, int(Regime.IGNORED), dtype=torch.int8, device=valid.device)
    if thresholds is None:
        thresholds = Thresholds(*(torch.zeros((), dtype=torch.float64) for _ in range(3)))
    return Routing(regime, zeros, zeros.clone(), zeros.clone(), thresholds)


def nan_routed(routing: Routing) -> torch.Tensor:
    """Tokens [N] whose routing statistics are NaN: their loss is NaN, since a NaN teacher row must
    show in the loss even where the token's term only reads the other streams."""
    return nan_tokens(routing.adv_gap, routing.q_teacher, routing.q_priv_student)


def poison_nan_routed(per_token: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The per-token loss with NaN at the `nan_routed` tokens."""
    return torch.where(nan_routed(routing), torch.full_like(per_token, float("nan")), per_token)
