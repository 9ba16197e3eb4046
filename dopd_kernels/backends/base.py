"""What every backend offers the public API, and the shared DOPD/OPD planning of pass backends.

A backend exposes `dopd`, `opd` and `token_logprobs` over sources (see `sources.py`) of the valid
and masked rows `[N]`. Pass backends (`torch`, `triton`, compiled) only implement the passes of
`engine.py`; `PassBackend` turns them into the three entry points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..config import DOPDConfig, OPDConfig, Regime, Thresholds
from ..engine import STUDENT, Group, LossEngine, Stats, TermSettings, run
from ..parallel import VocabShard
from ..routing import assign_regimes, batch_thresholds, nan_tokens, routing_statistics

TEACHER, PRIV_STUDENT = 1, 2


@dataclass
class Routing:
    """Per-token routing outputs [N] (float64 statistics, 0 where not valid) and thresholds."""

    regime: torch.Tensor
    adv_gap: torch.Tensor
    q_teacher: torch.Tensor
    q_priv_student: torch.Tensor
    thresholds: Thresholds


def empty_routing(valid: torch.Tensor, thresholds: Optional[Thresholds]) -> Routing:
    zeros = torch.zeros(valid.shape[0], dtype=torch.float64, device=valid.device)
    regime = torch.full(valid.shape, int(Regime.IGNORED), dtype=torch.int8, device=valid.device)
    if thresholds is None:
        thresholds = Thresholds(*(torch.zeros((), dtype=torch.float64) for _ in range(3)))
    return Routing(regime, zeros, zeros.clone(), zeros.clone(), thresholds)


def poison_nan_routed(per_token: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The per-token loss with NaN at tokens whose routing statistics are NaN (see `routing.py`): a
    NaN teacher row must show in the loss even where the token's term only reads the other streams."""
    bad = nan_tokens(routing.adv_gap, routing.q_teacher, routing.q_priv_student)
    return torch.where(bad, torch.full_like(per_token, float("nan")), per_token)


def settings_of(cfg) -> TermSettings:
    return TermSettings(cfg.top_k, cfg.js_beta, cfg.topk_from, cfg.topk_renorm, cfg.temperature)


class PassBackend:
    """Entry points built on a backend's passes (`stats_pass`, `full_value_pass`, `grad_pass`, `gather`)."""

    def dopd(self, student, teacher, priv, tokens: torch.Tensor, valid: torch.Tensor, cfg: DOPDConfig,
             thresholds: Optional[Thresholds], shard: Optional[VocabShard] = None, routing_group=None):
        routing = empty_routing(valid, thresholds)

        def plan(stats: Stats) -> List[Group]:
            lt = stats.logit_y[TEACHER] - stats.lse[TEACHER]
            lp = stats.logit_y[PRIV_STUDENT] - stats.lse[PRIV_STUDENT]
            rows = engine.rows
            for name, x in zip(("adv_gap", "q_teacher", "q_priv_student"), routing_statistics(lt, lp)):
                getattr(routing, name)[rows] = x
            if thresholds is None:
                routing.thresholds = batch_thresholds(routing.adv_gap, routing.q_teacher, routing.q_priv_student, valid, cfg.trim,
                                                     routing_group)
            routing.regime = assign_regimes(routing.adv_gap, routing.q_teacher, routing.q_priv_student, valid, routing.thresholds)
            r = routing.regime[rows]

            def pos(code: Regime) -> torch.Tensor:
                return (r == int(code)).nonzero()[:, 0]

            return [
                Group(pos(Regime.LH), TEACHER, "topk", "reverse_kl", cfg.beta_light),
                Group(pos(Regime.LL), PRIV_STUDENT, "topk", "reverse_kl", cfg.beta_weak),
                Group(pos(Regime.HT), TEACHER, "full", "js", cfg.beta_strong),
                Group(pos(Regime.HS), PRIV_STUDENT, "topk", "reverse_kl", cfg.beta_light),
            ]

        topk_streams = (STUDENT,) if cfg.topk_from == "student" else (TEACHER, PRIV_STUDENT)
        engine = LossEngine(self, (student, teacher, priv), tokens, valid, settings_of(cfg), topk_streams, plan, shard)
        return poison_nan_routed(run(engine, self), routing), routing

    def opd(self, student, teacher, tokens: torch.Tensor, valid: torch.Tensor, cfg: OPDConfig,
            shard: Optional[VocabShard] = None) -> torch.Tensor:
        def plan(stats: Stats) -> List[Group]:
            every = torch.arange(stats.lse[STUDENT].shape[0], device=tokens.device)
            return [Group(every, TEACHER, cfg.granularity, cfg.divergence, 1.0)]

        topk_streams = () if cfg.granularity != "topk" else ((STUDENT,) if cfg.topk_from == "student" else (TEACHER,))
        engine = LossEngine(self, (student, teacher), tokens, valid, settings_of(cfg), topk_streams, plan, shard)
        return run(engine, self)

    def rest_logsumexp(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """log Σ exp(scaled logit) over the valid columns of each row of `rows` that are not in
        `cols` [n, k] (entries < 0 are ignored): a tail bucket summed directly, [n] float64 formed like
        `Stats.lse` (running max and rescaled sum in the compute dtype, `max + log(sum)` added in
        float64). A plain tiled pass over `source.tile`; backends may override it with a kernel."""
        row_chunk, vocab_chunk = getattr(self, "row_chunk", 1024), getattr(self, "vocab_chunk", 8192)
        vocab = source.valid_vocab or source.vocab
        out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
        for i in range(0, rows.shape[0], row_chunk):
            r, c = rows[i:i + row_chunk], cols[i:i + row_chunk]
            m = torch.full((r.shape[0],), float("-inf"), dtype=source.dtype, device=r.device)
            s = torch.zeros_like(m)
            for c0 in range(0, vocab, vocab_chunk):
                tile = source.tile(r, c0, min(c0 + vocab_chunk, vocab))
                inside = (c >= c0) & (c < c0 + tile.shape[1])
                hits = torch.zeros(tile.shape, dtype=torch.int32, device=tile.device)
                hits.scatter_add_(1, torch.where(inside, c - c0, torch.zeros_like(c)), inside.to(torch.int32))
                tile = tile.masked_fill(hits > 0, float("-inf"))
                m_new = torch.maximum(m, tile.max(dim=1).values)
                shift = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
                s = s * torch.exp(m - shift) + torch.exp(tile - shift[:, None]).sum(dim=1)
                m = m_new
            m64 = m.to(torch.float64)
            out[i:i + row_chunk] = torch.where(m == float("-inf"), m64, m64 + torch.log(s).to(torch.float64))
        return out

    def token_logprobs(self, source, tokens: torch.Tensor, valid: torch.Tensor,
                       shard: Optional[VocabShard] = None) -> torch.Tensor:
        engine = LossEngine(self, (source,), tokens, valid, TermSettings(1, 0.5, "student", True, source.temperature),
                            (), lambda stats: [], shard)
        out = torch.zeros(valid.shape[0], dtype=source.dtype, device=valid.device)
        with torch.no_grad():
            stats = engine.run_stats_pass()
        out[engine.rows] = (stats.logit_y[STUDENT].to(torch.float64) - stats.lse[STUDENT].to(torch.float64)).to(out.dtype)
        return out
