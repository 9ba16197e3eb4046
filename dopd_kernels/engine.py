"""The fused loss computation of DESIGN.md section 4, independent of how the passes are run.

    1. stats pass   — per valid row: log-sum-exp and sampled-token logit of every stream, running top-K
    2. planning     — rows grouped by the term they need (`plan.py`: DOPD routes into regimes, OPD has one group)
    3. values       — full-vocabulary rows: a value pass; top-K and sampled rows: O(K) gathers
    4. gradient     — gradient pass over the rows that touch the whole vocabulary, sparse scatter for the rest

Calls go one way: the public API (`api.py`) calls the entry points here (`dopd`, `opd`,
`token_logprobs`), which run a backend's passes (`passes.Passes`) with tensors only. This module owns
the flow, the per-row bookkeeping and the autograd glue, so every backend computes the same thing.
With a scalar reduction the gradient is formed in the forward (`EagerFusedLoss`: the reduction's
weights are known before the loss), full-vocabulary rows in the sweep that computes their value
where the backend can (`full_pass`). With `reduction="none"` it is deferred to the backward
(`FusedLoss`), exact for any upstream gradient; everything that backward reads is saved with
`save_for_backward` (an in-place change to a student or target tensor between forward and backward is
an error, as for any autograd op). Under `torch.no_grad()` no gradient work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import gradients
from .divergences import clamp_js
from .parallel import VocabShard
from .passes import STUDENT, Grads, Passes, Stats
from .plan import (Group, Plan, dopd_plan, dopd_rest_streams, dopd_share_streams, dopd_topk_streams, opd_plan,
                   opd_rest_streams, opd_topk_streams)
from .reductions import Reduction
from .routing import Routing, nan_routed
from .row_terms import RowTerm, sampled_term, topk_term
from .skipping import TileSkips

DOUBLE_BACKWARD_ERROR = (
    "dopd_kernels: the fused losses cannot differentiate twice (backward with create_graph=True, a double "
    "backward or a Hessian-vector product); their backward is hand-derived and first-order. Use backend='reference' "
    "(float64 autograd) for second derivatives.")


@dataclass(frozen=True)
class TermSettings:
    top_k: int
    js_beta: float
    topk_from: str
    topk_renorm: bool
    temperature: float


def settings_of(cfg) -> TermSettings:
    return TermSettings(cfg.top_k, cfg.js_beta, cfg.topk_from, cfg.topk_renorm, cfg.temperature)


@dataclass
class GroupResult:
    """What the forward computed for one group and the backward reads: the group's valid-row ids
    `rows` [g], the student's and the target's log-sum-exps [g] (None until a full pass computes them,
    when no stats pass ran), and either its few-column `term` or, for full-vocabulary rows, the gradient
    constant `full_c` [g] and, where the full pass planned them for a deferred gradient, the whole tiles its
    gradient sweep skips (`tile_keep` [g, tiles], `tile_spent` [g]: `skipping.TileSkips`)."""

    group: Group
    rows: torch.Tensor
    lse_s: Optional[torch.Tensor]
    lse_t: Optional[torch.Tensor]
    term: Optional[RowTerm] = None
    full_c: Optional[torch.Tensor] = None
    tile_keep: Optional[torch.Tensor] = None
    tile_spent: Optional[torch.Tensor] = None
    grad_done: bool = False  # its gradient was added in the forward's value sweep (eager, `full_pass`)


class LossEngine:
    """Runs the flow for one call. `plan(stats) -> List[Group]` decides each row's term."""

    def __init__(self, passes: Passes, sources: Sequence, tokens: torch.Tensor, valid: torch.Tensor,
                 settings: TermSettings, topk_streams: Sequence[int], plan: Plan, shard: Optional[VocabShard] = None,
                 stats_in_sweep: bool = False, rest_streams: Sequence[int] = (), share_streams: Sequence[int] = ()):
        # rest_streams: streams whose sampled-token tail bucket the stats pass sums (`Stats.rest_lse`,
        # read by the plan's sampled forward KL / JS rows).
        # share_streams: streams whose per-tile shares the stats pass keeps when a gradient follows
        # (`Stats.tile_shares`, read by full-vocabulary JS rows' value sweeps; not with a vocabulary shard).
        # stats_in_sweep: every row is a full-vocabulary row and the plan reads no statistics, so the
        # full pass computes the log-sum-exps in its own sweep and no stats pass runs.
        self.stats_in_sweep = stats_in_sweep and shard is None
        self.passes = passes
        self.shard = shard
        self.sources = list(sources)
        self.rows = valid.nonzero()[:, 0]
        self.tokens = tokens[self.rows]
        self.n_total = valid.shape[0]
        self.settings = settings
        self.topk_streams = tuple(topk_streams)
        self.rest_streams = tuple(rest_streams)
        self.share_streams = tuple(share_streams)
        self.plan = plan
        self.results: List[GroupResult] = []
        self.deferred = False  # `forward(deferred=True)`: the full pass plans the deferred gradient's tile skips

    @property
    def student(self):
        return self.sources[STUDENT]

    def forward(self, eager: Optional[Tuple[Callable[[], torch.Tensor], Grads]] = None,
                deferred: bool = False) -> torch.Tensor:
        """Per-token weighted loss [N] in the compute dtype (0 at rows that are not valid).

        eager = (weights, grads): also add d(Σ_n w_n · loss_n)/d(student) into `grads`, with `weights()`
        [N] (float64) read once the rows are planned. Full-vocabulary rows then form their gradient in
        the sweep that computes their value (`full_pass`); the other rows get theirs right after.
        deferred: `backward` follows (`FusedLoss`); the full pass also plans the whole tiles its gradient
        sweep may skip (not with a vocabulary shard: the plan needs the all-reduced constant)."""
        self.deferred = deferred and eager is None and self.shard is None
        out = torch.zeros(self.n_total, dtype=self.student.dtype, device=self.tokens.device)
        stats = None if self.stats_in_sweep else self.run_stats_pass(shares=eager is not None or self.deferred)
        groups = self.plan(stats)  # planned even without rows: routing may be collective
        weights, grads = (eager[0](), eager[1]) if eager is not None else (None, None)
        self.results = []
        for g in groups:
            if g.pos.numel() == 0:
                continue
            rows = self.rows[g.pos]
            lse = (stats.lse[STUDENT][g.pos], stats.lse[g.target][g.pos]) if stats is not None else (None, None)
            res = GroupResult(g, rows, *lse)
            # With a vocabulary shard a full row's gradient constant is known only after the all-reduce.
            in_sweep = weights is not None and g.granularity == "full" and self.shard is None
            value = self._group_value(res, stats, self._scale(weights, res) if in_sweep else None, grads)
            res.grad_done = in_sweep
            out[res.rows] = (g.weight * value).to(out.dtype)
            self.results.append(res)
        if weights is not None:
            self.backward(weights, grads)
        return out

    def _scale(self, grad_per_token: torch.Tensor, res: GroupResult) -> torch.Tensor:
        """Per-row gradient scale [g] of a group: upstream gradient · weight / τ (float64)."""
        return grad_per_token[res.rows].to(torch.float64) * (res.group.weight / self.settings.temperature)

    def run_stats_pass(self, shares: bool = False) -> Stats:
        """The stats pass; with a vocabulary shard, local statistics merged across the group. `shares`: a
        gradient follows, so the full rows' value sweeps may use tile shares (`share_streams`, unsharded)."""
        k, n, dt = self.settings.top_k, self.rows.shape[0], self.student.dtype
        if n == 0:
            empty = self.tokens.new_zeros(0, dtype=dt)
            none = self.tokens.new_zeros(0, dtype=torch.float64)
            return Stats([none] * len(self.sources), [empty] * len(self.sources),
                         {j: self.tokens.new_zeros(0, 0) for j in self.topk_streams}, {j: none for j in self.rest_streams})
        if self.shard is None:
            return self.passes.stats_pass(self.sources, self.rows, self.tokens, self.topk_streams, k, self.rest_streams,
                                          self.share_streams if shares else ())
        sh = self.shard
        local_tokens, owned = sh.localize(self.tokens)
        stats = self.passes.stats_pass(self.sources, self.rows, local_tokens, self.topk_streams, k, self.rest_streams)
        # A row whose sampled token another shard owns leaves nothing out here (its local token, column 0,
        # is a placeholder): its local tail is all of this shard's columns, the local log-sum-exp.
        stats.rest_lse = {j: sh.merge_logsumexp(torch.where(owned, rest, stats.lse[j]))
                          for j, rest in stats.rest_lse.items()}
        stats.lse = [sh.merge_logsumexp(lse) for lse in stats.lse]
        stats.logit_y = [sh.owned_max(z, owned) for z in stats.logit_y]
        k_global = min(k, sh.valid_vocab)
        for j, idx in stats.topk.items():
            values = self.passes.gather(self.sources[j], self.rows, idx)
            stats.topk[j] = sh.merge_topk(values, idx + sh.offset, k_global)
        return stats

    def _gather(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scaled logits of `source` at global columns `cols` [n, K]."""
        if self.shard is None:
            return self.passes.gather(source, rows, cols)
        local, owned = self.shard.localize(cols)
        return self.shard.owned_max(self.passes.gather(source, rows, local), owned)

    def _localize(self, term: RowTerm) -> RowTerm:
        """A term's explicit columns as this shard sees them. Added `sparse` values: foreign columns
        become local column 0 with value 0. Written `explicit` values: foreign columns become -1,
        which every writer skips (writing 0 at column 0 would erase that column's gradient)."""
        if self.shard is None:
            return term
        local, owned = self.shard.localize(term.cols)
        if term.explicit is None:
            return replace(term, cols=local, sparse=term.sparse.masked_fill(~owned, 0.0))
        return replace(term, cols=local.masked_fill(~owned, -1), sparse=None,
                       explicit=term.explicit.masked_fill(~owned, 0.0))

    def _rest_logprob(self, source, rows: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """Log-probability [n] (float64) of the tail bucket: the valid columns outside `cols` [n, k]
        (global), summed directly. 1 − Σp over the explicit columns cancels: a tail below the rounding
        of the log-sum-exp came out as 0 or negative, and KL as inf (e.g. sampled forward KL when the
        student is confident of its sampled token)."""
        if self.shard is None:
            rest = self.passes.rest_logsumexp(source, rows, cols)
        else:  # each shard sums its own columns outside the support (foreign columns marked -1)
            local, owned = self.shard.localize(cols)
            rest = self.shard.merge_logsumexp(self.passes.rest_logsumexp(source, rows, local.masked_fill(~owned, -1)))
        return rest.to(torch.float64) - lse.to(torch.float64)

    def _vocab_size(self) -> int:
        """Size of the valid vocabulary top-K supports are drawn from (over all shards)."""
        if self.shard is not None:
            return self.shard.valid_vocab
        return self.student.effective_vocab

    def _group_value(self, res: GroupResult, stats: Optional[Stats], scale: Optional[torch.Tensor] = None,
                     grads: Optional[Grads] = None) -> torch.Tensor:
        """Per-row value of a group. A row whose student or target log-sum-exp is not finite (a NaN or
        +inf logit, or no finite logit in the valid vocabulary) has no distribution: its value is NaN
        whatever the term (a top-K term would otherwise never look past its K columns)."""
        g = res.group
        value = self._term_value(res, stats, scale, grads)
        if g.divergence == "js":
            value = clamp_js(value, self.settings.js_beta, self.student.dtype)
        ok = torch.isfinite(res.lse_s) & torch.isfinite(res.lse_t)
        return torch.where(ok.to(value.device), value, torch.full_like(value, float("nan")))

    def _term_value(self, res: GroupResult, stats: Optional[Stats], scale: Optional[torch.Tensor],
                    grads: Optional[Grads]) -> torch.Tensor:
        s, g, rows = self.settings, res.group, res.rows
        lse_s, lse_t = res.lse_s, res.lse_t
        target = self.sources[g.target]
        if g.granularity == "full":
            shares = None
            if stats is not None and STUDENT in stats.tile_shares and g.target in stats.tile_shares:
                shares = (stats.tile_shares[STUDENT][g.pos], stats.tile_shares[g.target][g.pos])
            res.lse_s, res.lse_t, value, res.full_c, skips = self.passes.full_pass(
                self.student, target, rows, lse_s, lse_t, g.divergence, s.js_beta, scale, grads, plan_skips=self.deferred,
                tile_shares=shares)
            if skips is not None:
                res.tile_keep, res.tile_spent = skips
            if self.shard is not None:  # partial sums over this shard's columns
                value, res.full_c = self.shard.all_reduce(value), self.shard.all_reduce(res.full_c)
            return value
        f64 = torch.float64
        if g.granularity == "sampled":
            y = self.tokens[g.pos]
            rests = (None, None)
            if g.divergence != "reverse_kl":  # two buckets {y, not y}: the second summed in the stats pass
                rests = (stats.rest_lse[STUDENT][g.pos] - lse_s.to(f64), stats.rest_lse[g.target][g.pos] - lse_t.to(f64))
            term = sampled_term(stats.logit_y[STUDENT][g.pos].to(f64) - lse_s.to(f64),
                                stats.logit_y[g.target][g.pos].to(f64) - lse_t.to(f64), y, g.divergence, s.js_beta,
                                *rests)
        else:
            cols = stats.topk[STUDENT if s.topk_from == "student" else g.target][g.pos]
            # A support covering the whole valid vocabulary (K >= V) leaves an empty tail, and the tail
            # form equals the renormalized one. Computing that empty tail as 1 − Σp from rounded
            # log-sum-exps gave one stream a spurious tail mass and the other none: KL = inf.
            renorm = s.topk_renorm or cols.shape[1] >= self._vocab_size()
            rests = (None, None)
            if not renorm:
                rests = (self._rest_logprob(self.student, rows, cols, lse_s), self._rest_logprob(target, rows, cols, lse_t))
            term = topk_term(self._gather(self.student, rows, cols).to(f64), self._gather(target, rows, cols).to(f64),
                             lse_s.to(f64), lse_t.to(f64), cols, g.divergence, s.js_beta, renorm, *rests)
        res.term = self._localize(term)
        return res.term.value

    def backward(self, grad_per_token: torch.Tensor, grads: Grads) -> None:
        """Accumulate d(Σ_n grad_n · loss_n)/d(student) into `grads` (groups whose gradient the forward
        sweep added are done)."""
        s = self.settings
        for res in self.results:
            if res.grad_done:
                continue
            g = res.group
            scale = self._scale(grad_per_token, res)
            if res.term is None:
                skips = None if res.tile_keep is None else TileSkips(res.tile_keep, res.tile_spent)
                self.passes.full_grad_pass(self.student, self.sources[g.target], res.rows, res.lse_s, res.lse_t,
                                           res.full_c, g.divergence, s.js_beta, scale, grads, tile_skips=skips)
            else:
                self.passes.term_grad_pass(self.student, res.rows, res.lse_s, res.term, scale, grads)
        if self.shard is not None and grads.dh is not None:
            self.shard.all_reduce(grads.dh)  # dH sums every vocabulary shard's part (column-parallel linear)

    # -- autograd state ----------------------------------------------------------------------------------

    def state(self) -> Tuple[List[torch.Tensor], Callable[[Sequence[torch.Tensor]], None]]:
        """Every tensor the backward reads (the streams' inputs and the forward's per-group results),
        and a function that puts the unpacked tensors back in their places (`FusedLoss`)."""
        objects = [*self.sources, *self.results, *(r.term for r in self.results if r.term is not None)]
        slots = [(obj, f.name) for obj in objects for f in fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor)]
        tensors = [getattr(obj, name) for obj, name in slots]

        def restore(saved: Sequence[torch.Tensor]) -> None:
            for (obj, name), t in zip(slots, saved):
                object.__setattr__(obj, name, t)

        return tensors, restore

    def release(self) -> None:
        """Drop every tensor reference the engine holds (autograd holds the saved ones now): what the
        backward reads comes back through `state`'s restore, nothing else survives the forward."""
        tensors, restore = self.state()
        restore([None] * len(tensors))
        for res in self.results:
            res.group = replace(res.group, pos=None)
        self.rows = self.tokens = self.plan = None


class FusedLoss(torch.autograd.Function):
    """Autograd face of a `LossEngine`: inputs are the student's tensors, output the per-token loss.
    The backward state is saved with `save_for_backward`; `ctx` keeps only the engine's structure."""

    @staticmethod
    def forward(ctx, engine: LossEngine, *tensors):
        out = engine.forward(deferred=True)
        saved, ctx.restore = engine.state()
        ctx.save_for_backward(*saved)
        engine.release()
        ctx.engine = engine
        return out

    @staticmethod
    def backward(ctx, grad_per_token):
        # The passes give hand-derived first derivatives only. Autograd runs a backward with grad mode
        # on exactly when a graph of the gradient is requested (create_graph=True, double backward):
        # refuse it rather than return a gradient whose own derivative would silently be wrong.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        ctx.restore(ctx.saved_tensors)
        engine = ctx.engine
        needs = ctx.needs_input_grad[1:]
        grads = gradients.allocate(engine.student, needs)
        engine.backward(grad_per_token, grads)
        out = gradients.results(grads, engine.student)
        return (None, *(gr if need else None for gr, need in zip(out, needs)))


class EagerFusedLoss(torch.autograd.Function):
    """A scalar-reduced loss whose gradient is formed in the forward: the reduction's weights
    d loss / d per_token are known before the loss is (`Reduction.weights`), so the gradient passes
    run right after the value passes and the backward only scales their result by the upstream scalar.
    Outputs: the reduced loss (differentiable) and the per-token loss (not differentiable)."""

    @staticmethod
    def forward(ctx, engine: LossEngine, reduction: Reduction, finish: Finish, *tensors):
        needs = ctx.needs_input_grad[3:]
        per_token, out = with_gradients(engine, finish, reduction.weights, needs)
        ctx.present = [g is not None and need for g, need in zip(out, needs)]
        ctx.save_for_backward(*(g for g, keep in zip(out, ctx.present) if keep))
        ctx.mark_non_differentiable(per_token)
        return reduction.value(per_token), per_token

    @staticmethod
    def backward(ctx, grad_loss, grad_per_token):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        saved = iter(ctx.saved_tensors)
        return (None, None, None, *scale_eager(grad_loss, [next(saved) if keep else None for keep in ctx.present]))


def scale_eager(grad_loss: torch.Tensor, grads: Sequence[Optional[torch.Tensor]]) -> list:
    """Eager gradients (None: not formed) times the upstream gradient of the scalar loss. The usual
    `loss.backward()` in eager mode (upstream 1) hands them over as they are, no copy of a [V, H] dW;
    a trace (torch.compile, export) cannot read the upstream value and always multiplies."""
    traced = type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling()
    unit = not traced and bool(grad_loss == 1)
    return [g if g is None or unit else g * grad_loss.to(g.dtype) for g in grads]


class Finish:
    """An entry point's last step on the per-token loss: `finish(per_token)` overwrites the tokens
    `dropped()` [N] (bool, or None: none) with NaN; `dropped` is known once the rows are planned."""

    def __init__(self, dropped: Callable[[], Optional[torch.Tensor]] = lambda: None):
        self.dropped = dropped

    def __call__(self, per_token: torch.Tensor) -> torch.Tensor:
        bad = self.dropped()
        return per_token if bad is None else torch.where(bad, torch.full_like(per_token, float("nan")), per_token)


def with_gradients(engine: LossEngine, finish: Finish, weights: Callable[[], torch.Tensor],
                   needs: Sequence[bool]) -> Tuple[torch.Tensor, tuple]:
    """One forward that also forms d(Σ_n w_n · loss_n)/d(student): `(per-token loss [N], gradients of
    `gradients.student_tensors` (None where `needs` is False))`. `weights()` [N] is read once the rows are
    planned (routing decides which tokens `finish` overwrites: those get no gradient). A scalar reduction
    passes its own weights (`EagerFusedLoss`, the `dopd`/`opd` custom ops); the deferred backward of
    reduction="none" passes the upstream gradient (`ops`)."""
    grads = gradients.allocate(engine.student, needs)

    def masked() -> torch.Tensor:
        dropped, w = finish.dropped(), weights()
        return w if dropped is None else w.masked_fill(dropped, 0.0)  # overwritten (NaN) tokens: no gradient

    per_token = finish(engine.forward(eager=(masked, grads)))
    return per_token, gradients.results(grads, engine.student)


def run(engine: LossEngine, reduction: Reduction, finish: Finish) -> Tuple[torch.Tensor, torch.Tensor]:
    """(reduced loss, per-token loss [N]) of a call; the loss is differentiable with respect to the
    student when it requires grad; `finish` is the entry point's last step on the per-token loss.
    Scalar reductions form the gradient eagerly (`EagerFusedLoss`); reduction="none" defers it to the
    backward, exact for any upstream gradient."""
    tensors = gradients.student_tensors(engine.student)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        per_token = finish(engine.forward())
        return reduction.value(per_token), per_token
    if reduction.scalar:
        return EagerFusedLoss.apply(engine, reduction, finish, *tensors)
    per_token = finish(FusedLoss.apply(engine, *tensors))
    return reduction.value(per_token), per_token.detach()


# -- entry points ------------------------------------------------------------------------------------------


def dopd_call(passes: Passes, student, teacher, priv, tokens: torch.Tensor, valid: torch.Tensor, cfg, thresholds,
              shard: Optional[VocabShard] = None, routing_group=None) -> Tuple[LossEngine, Finish, Routing]:
    """A DOPD call over the sources of the valid and masked rows, ready to run: its engine, the `Finish`
    that overwrites the tokens with NaN routing statistics, and the routing the plan fills as it runs."""
    sources = (student, teacher, priv)
    passes = passes.select(sources, cfg.top_k)
    rows = valid.nonzero()[:, 0]
    plan, routing = dopd_plan(cfg, rows, valid, thresholds, routing_group)
    engine = LossEngine(passes, sources, tokens, valid, settings_of(cfg), dopd_topk_streams(cfg), plan, shard,
                        rest_streams=dopd_rest_streams(cfg), share_streams=dopd_share_streams(cfg))
    return engine, Finish(lambda: nan_routed(routing)), routing


def opd_call(passes: Passes, student, teacher, tokens: torch.Tensor, valid: torch.Tensor, cfg,
             shard: Optional[VocabShard] = None) -> Tuple[LossEngine, Finish]:
    """A vanilla OPD call, ready to run: its engine and (trivial) `Finish`."""
    sources = (student, teacher)
    passes = passes.select(sources, cfg.top_k if cfg.granularity == "topk" else 1)
    rows = valid.nonzero()[:, 0]
    engine = LossEngine(passes, sources, tokens, valid, settings_of(cfg), opd_topk_streams(cfg), opd_plan(cfg, rows), shard,
                        stats_in_sweep=cfg.granularity == "full", rest_streams=opd_rest_streams(cfg))
    return engine, Finish()


def dopd(passes: Passes, student, teacher, priv, tokens: torch.Tensor, valid: torch.Tensor, cfg, thresholds,
         reduction: Reduction, shard: Optional[VocabShard] = None, routing_group=None):
    """(reduced loss, per-token DOPD loss [N], routing), differentiable through the autograd Functions."""
    engine, finish, routing = dopd_call(passes, student, teacher, priv, tokens, valid, cfg, thresholds, shard,
                                        routing_group)
    loss, per_token = run(engine, reduction, finish)
    return loss, per_token, routing


def opd(passes: Passes, student, teacher, tokens: torch.Tensor, valid: torch.Tensor, cfg, reduction: Reduction,
        shard: Optional[VocabShard] = None):
    """(reduced loss, per-token OPD loss [N]), differentiable through the autograd Functions."""
    engine, finish = opd_call(passes, student, teacher, tokens, valid, cfg, shard)
    return run(engine, reduction, finish)


def token_logprobs(passes: Passes, source, tokens: torch.Tensor, valid: torch.Tensor,
                   shard: Optional[VocabShard] = None) -> torch.Tensor:
    """log π(y) [N] in the compute dtype (0 where not valid); no gradient."""
    passes = passes.select((source,), 1)
    engine = LossEngine(passes, (source,), tokens, valid, TermSettings(1, 0.5, "student", True, source.temperature),
                        (), lambda stats: [], shard)
    out = torch.zeros(valid.shape[0], dtype=source.dtype, device=valid.device)
    with torch.no_grad():
        stats = engine.run_stats_pass()
    out[engine.rows] = (stats.logit_y[STUDENT].to(torch.float64) - stats.lse[STUDENT].to(torch.float64)).to(out.dtype)
    return out
