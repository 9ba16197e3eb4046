"""Which loss term each valid row gets (DESIGN.md sections 1 and 4, step 2): the DOPD plan routes rows
into regimes from the stats pass; the OPD plan gives every row the one configured term.

A plan maps the stats pass (`passes.Stats`, rows in compact valid order) to `Group`s of rows that
share a term: a target stream, a support (granularity), a divergence and a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .config import DOPDConfig, OPDConfig, Regime, Thresholds
from .passes import STUDENT, Stats
from .routing import assign_regimes, batch_thresholds, empty_routing, routing_statistics

TEACHER, PRIV_STUDENT = 1, 2

Plan = Callable[[Stats], List["Group"]]


@dataclass(frozen=True)
class Group:
    """Rows `pos` [g] (positions into the compact valid-row order) that share one loss term."""

    pos: torch.Tensor
    target: int
    granularity: str
    divergence: str
    weight: float


# DOPD's term per regime: (regime, target stream, granularity, divergence, the config's weight field).
DOPD_TERMS = (
    (Regime.LH, TEACHER, "topk", "reverse_kl", "beta_light"),
    (Regime.LL, PRIV_STUDENT, "topk", "reverse_kl", "beta_weak"),
    (Regime.HT, TEACHER, "full", "js", "beta_strong"),
    (Regime.HS, PRIV_STUDENT, "topk", "reverse_kl", "beta_light"),
)


def rest_streams(terms: Sequence[Tuple[int, str, str]]) -> tuple:
    """Streams whose tail bucket "every column but the sampled token" the stats pass sums
    (`Stats.rest_lse`): the student and the target of every sampled forward KL / JS term, given as
    (target, granularity, divergence). Sampled reverse KL reads only the sampled logits."""
    targets = [target for target, g, d in terms if g == "sampled" and d != "reverse_kl"]
    return tuple(sorted({STUDENT, *targets})) if targets else ()


def dopd_plan(cfg: DOPDConfig, rows: torch.Tensor, valid: torch.Tensor, thresholds: Optional[Thresholds],
              routing_group=None) -> tuple:
    """(plan, routing): the plan routes the rows `rows` [n] (valid row ids) into the four regimes and
    fills `routing` (per-token [N] statistics, regimes and the thresholds used) as it does. Routing
    is planned even for a rank without rows: thresholds over a group are a collective."""
    routing = empty_routing(valid, thresholds)

    def plan(stats: Stats) -> List[Group]:
        lt = stats.logit_y[TEACHER] - stats.lse[TEACHER]
        lp = stats.logit_y[PRIV_STUDENT] - stats.lse[PRIV_STUDENT]
        for name, x in zip(("adv_gap", "q_teacher", "q_priv_student"), routing_statistics(lt, lp)):
            getattr(routing, name)[rows] = x
        if thresholds is None:
            routing.thresholds = batch_thresholds(routing.adv_gap, routing.q_teacher, routing.q_priv_student, valid,
                                                  cfg.trim, routing_group)
        routing.regime = assign_regimes(routing.adv_gap, routing.q_teacher, routing.q_priv_student, valid,
                                        routing.thresholds)
        r = routing.regime[rows]

        def pos(code: Regime) -> torch.Tensor:
            return (r == int(code)).nonzero()[:, 0]

        return [Group(pos(code), target, gran, div, getattr(cfg, beta)) for code, target, gran, div, beta in DOPD_TERMS]

    return plan, routing


def dopd_topk_streams(cfg: DOPDConfig) -> tuple:
    """Streams whose top-K columns the stats pass keeps: the student's, or each target's."""
    return (STUDENT,) if cfg.topk_from == "student" else (TEACHER, PRIV_STUDENT)


def dopd_rest_streams(cfg: DOPDConfig) -> tuple:
    """Streams whose sampled-token tail bucket the DOPD stats pass sums: none while no regime's term is
    sampled forward KL / JS (`DOPD_TERMS`)."""
    return rest_streams([(target, gran, div) for _, target, gran, div, _ in DOPD_TERMS])


def dopd_share_streams(cfg: DOPDConfig) -> tuple:
    """Streams whose per-tile shares (`Stats.tile_shares`) the DOPD stats pass keeps for the value sweeps of
    its full-vocabulary JS rows (HT), which may then leave negligible tiles out: the student and each such
    term's target."""
    targets = {target for _, target, gran, div, _ in DOPD_TERMS if gran == "full" and div == "js"}
    return tuple(sorted({STUDENT, *targets})) if targets else ()


def opd_plan(cfg: OPDConfig, rows: torch.Tensor) -> Plan:
    """Every valid row (`rows` [n]) gets the configured term; the plan reads no statistics (a
    full-vocabulary OPD call may compute them in its one sweep, `passes.Passes.full_pass`)."""
    def plan(stats: Optional[Stats]) -> List[Group]:
        every = torch.arange(rows.shape[0], device=rows.device)
        return [Group(every, TEACHER, cfg.granularity, cfg.divergence, 1.0)]

    return plan


def opd_topk_streams(cfg: OPDConfig) -> tuple:
    if cfg.granularity != "topk":
        return ()
    return (STUDENT,) if cfg.topk_from == "student" else (TEACHER,)


def opd_rest_streams(cfg: OPDConfig) -> tuple:
    """Streams whose sampled-token tail bucket the OPD stats pass sums (sampled forward KL / JS)."""
    return rest_streams([(TEACHER, cfg.granularity, cfg.divergence)])
