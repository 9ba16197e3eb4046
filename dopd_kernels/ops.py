"""The losses as `torch.library` custom ops, so that `torch.compile(fullgraph=True)` keeps them in its graph.

A public loss function (`api.py`) checks types and shapes in Python (reading no tensor data), then
calls one op here. An op's implementation reads the data — token range, `check_finite`, the values of
`thresholds` and `normalizer` — before any kernel, then runs the engine (`engine.py`), so the loss
flow keeps one implementation and this module is a thin layer over it. Its fake (meta) implementations
give every output's shape from the input shapes alone, so dynamic (symbolic) shapes trace.

Ops, namespace `dopd_kernels` (schemas built from the config dataclasses by `_schemas`):

    dopd(Tensor[] student, Tensor[] teacher, Tensor[] priv_student, float[] scale, float[] softcap,
         Tensor tokens, Tensor? thresholds, Tensor? normalizer, str backend, bool check_finite,
         bool[] needs_grad, <the fields of DOPDConfig, in order>)
      -> (Tensor loss, Tensor per_token, Tensor[] grads, Tensor regime, Tensor adv_gap,
          Tensor q_teacher, Tensor q_priv_student, Tensor thresholds_used)
    opd(Tensor[] student, Tensor[] teacher, float[] scale, float[] softcap, Tensor tokens,
        Tensor? normalizer, str backend, bool check_finite, bool[] needs_grad, <the fields of OPDConfig>)
      -> (Tensor loss, Tensor per_token, Tensor[] grads)
    dopd_backward(Tensor grad, <dopd's streams, scale, softcap, tokens>, Tensor thresholds, str backend,
                  bool[] needs_grad, <DOPDConfig's fields>) -> Tensor[]
    opd_backward(Tensor grad, <opd's streams, scale, softcap, tokens>, str backend, bool[] needs_grad,
                 <OPDConfig's fields>) -> Tensor[]
    token_logprobs(Tensor[] stream, float[] scale, float[] softcap, Tensor tokens, float temperature,
                   int ignore_index, int? valid_vocab, str backend) -> Tensor

Arguments. A stream is `[logits]` (`[N, V]`) or, in fused-linear mode, `[hidden, weight]` or
`[hidden, weight, bias]` (`[N, H]`, `[V, H]`, `[V]`; a head's padding rows already sliced off), and
`scale`/`softcap` hold each stream's head transform (softcap 0: none; both lists empty in logits mode).
`tokens` has the token shape `[*]` (`[N]` or `[B, T]`, N = its numel). `backend` is a pass backend's name
or "auto" (not "reference": its float64 autograd is not a hand-derived gradient). `needs_grad`: which
student tensors get a gradient.

Outputs. `loss`: `[]` for a scalar reduction, `[*]` for reduction="none"; the only differentiable
output. `per_token` `[*]` (fp32, or fp64 for fp64 inputs). `grads`: one per student tensor, the eagerly
formed gradient of the scalar loss for each `needs_grad` entry, 0-element otherwise (always with
reduction="none"). DOPD also returns the routing: regime `[*]` int8, the three statistics `[*]` float64
and the thresholds used `[3]` float64 (CPU).

Autograd. Scalar reductions keep the eager-gradient plan: the forward's one sweep forms value and
gradient (the reduction's weights are known before the loss), and the backward multiplies the `grads`
outputs by the upstream scalar (no copy when it is 1, outside a trace). reduction="none" defers the
gradient to the `*_backward` op, exact for any upstream per-token gradient. Second derivatives raise.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import engine
from .backends import resolve_backend
from .config import DOPDConfig, OPDConfig
from .parallel import VocabShard
from .passes import Passes
from .reductions import Reduction
from .sources import LinearSource, LogitsSource, accum_dtype
from .validation import (check_finite_logits, check_finite_rows, check_thresholds, check_token_range,
                         check_valid_vocab, normalizer_value)

NAMESPACE = "dopd_kernels"
LINEAR_PARTS = ("hidden", "weight", "bias")


class Streams(NamedTuple):
    """A call's streams after the static checks, the student first.

    tensors: per stream `(logits [N, V],)` or `(hidden [N, H], weight [V, H][, bias [V]])`, rows
             flattened, the frozen streams detached, heads' padding rows sliced off.
    heads:   per stream `(scale, softcap or None)` in fused-linear mode; None in logits mode.
    tokens:  `[N]` or `[B, T]` as given.
    """

    tensors: Tuple[Tuple[torch.Tensor, ...], ...]
    heads: Optional[Tuple[Tuple[float, Optional[float]], ...]]
    tokens: torch.Tensor


def local_vocab(streams: Streams) -> int:
    """Columns of the streams' logits as given (one vocabulary shard's with vocab_parallel_group)."""
    student = streams.tensors[0]
    return student[0].shape[-1] if streams.heads is None else student[1].shape[0]


def prepare(names: Sequence[str], streams: Streams, cfg, check_finite: bool, shard: Optional[VocabShard] = None):
    """The checks that read tensor data, run before any kernel (token range, `check_finite`), and the
    call's flat sources: `(sources, tokens [N] int64, valid [N] bool, token shape, shard)`. `names`: the
    streams' names, for messages. `shard`: this rank's vocabulary shard, before `with_valid_vocab`."""
    tokens = streams.tokens
    vocab = check_valid_vocab(cfg.valid_vocab, local_vocab(streams) if shard is None else shard.vocab)
    check_token_range(tokens, vocab, cfg.ignore_index)
    valid_vocab = cfg.valid_vocab
    if shard is not None:
        shard = shard.with_valid_vocab(cfg.valid_vocab)
        valid_vocab = shard.local_valid_vocab()
    if check_finite:
        for name, stream in zip(names, streams.tensors):
            if streams.heads is None:
                check_finite_logits(f"{name}_logits", stream[0], valid_vocab, whole_rows=shard is None)
            else:
                for part, t in zip(LINEAR_PARTS, stream):  # a head's padding rows are read by no softmax
                    check_finite_rows(f"{name}_{part}", t if part == "hidden" or valid_vocab is None else t[:valid_vocab])
    if streams.heads is None:
        sources = [LogitsSource(t, cfg.temperature, valid_vocab) for (t,) in streams.tensors]
    else:
        sources = [LinearSource(*(*ts, None)[:3], cfg.temperature, valid_vocab, scale, softcap)
                   for ts, (scale, softcap) in zip(streams.tensors, streams.heads)]
    flat = tokens.reshape(-1).long()
    return sources, flat, flat != cfg.ignore_index, tokens.shape, shard


def routing_outputs(routing, token_shape: torch.Size) -> tuple:
    """A DOPD call's routing as the `dopd` op returns it: regime and statistics `[*]`, thresholds `[3]`."""
    stats = (routing.regime, routing.adv_gap, routing.q_teacher, routing.q_priv_student)
    return (*(t.reshape(token_shape) for t in stats), torch.stack(list(routing.thresholds)).to("cpu", torch.float64))


# -- the ops -------------------------------------------------------------------------------------------


class Kind(NamedTuple):
    """One loss family: its op names, config dataclass and the names of its fields (read once here: Dynamo
    traces `getattr` of a name, not `dataclasses.fields`), streams (the student first) and whether it
    routes (DOPD: thresholds in, routing statistics out)."""

    name: str
    config: type
    fields: Tuple[str, ...]
    streams: Tuple[str, ...]
    routed: bool


DOPD = Kind("dopd", DOPDConfig, tuple(f.name for f in fields(DOPDConfig)), ("student", "teacher", "priv_student"), True)
OPD = Kind("opd", OPDConfig, tuple(f.name for f in fields(OPDConfig)), ("student", "teacher"), False)
ROUTING = ("regime", "adv_gap", "q_teacher", "q_priv_student", "thresholds_used")
_SCHEMA_TYPES = {"int": "int", "float": "float", "str": "str", "bool": "bool", "Optional[int]": "int?"}


def _schemas(kind: Kind) -> Tuple[List[str], str, List[str], str]:
    """Forward and backward arguments ("type name") and returns of `kind`'s ops; the config's fields are
    the last arguments, in its field order."""
    config = [f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in fields(kind.config)]
    inputs = [*(f"Tensor[] {s}" for s in kind.streams), "float[] scale", "float[] softcap", "Tensor tokens"]
    routed_in = ["Tensor? thresholds"] if kind.routed else []
    forward = [*inputs, *routed_in, "Tensor? normalizer", "str backend", "bool check_finite", "bool[] needs_grad", *config]
    routed_out = "".join(f", Tensor {r}" for r in ROUTING) if kind.routed else ""
    backward = ["Tensor grad", *inputs, *(["Tensor thresholds"] if kind.routed else []), "str backend",
                "bool[] needs_grad", *config]
    return forward, f"(Tensor loss, Tensor per_token, Tensor[] grads{routed_out})", backward, "Tensor[]"


def _heads(scale: Sequence[float], softcap: Sequence[float]) -> Optional[tuple]:
    """`Streams.heads` from the ops' `scale`/`softcap` lists (softcap 0: none; empty lists: logits mode)."""
    return tuple((s, c if c > 0 else None) for s, c in zip(scale, softcap)) if scale else None


def _passes(backend: str, device: torch.device) -> Passes:
    passes = resolve_backend(backend, device)
    if not isinstance(passes, Passes):
        raise ValueError(f"backend {backend!r} does not run as a custom op (the public functions call it directly)")
    return passes


def _call(kind: Kind, a: Dict[str, object], check_finite: bool):
    """The call an op's arguments `a` describe, checked: `(engine, finish, routing or None, valid, token shape)`."""
    cfg = kind.config(*(a[f] for f in kind.fields))
    streams = Streams(tuple(tuple(a[s]) for s in kind.streams), _heads(a["scale"], a["softcap"]), a["tokens"])
    sources, tokens, valid, token_shape, _ = prepare(kind.streams, streams, cfg, check_finite)
    thresholds = check_thresholds(a.get("thresholds"))
    passes = _passes(a["backend"], tokens.device)
    if kind.routed:
        call = engine.dopd_call(passes, *sources, tokens, valid, cfg, thresholds)
    else:
        call = (*engine.opd_call(passes, *sources, tokens, valid, cfg), None)
    return (*call, valid, token_shape)


def _needs(student: Sequence[torch.Tensor], needs: Sequence[bool]) -> List[bool]:
    """`needs_grad` aligned with `gradients.student_tensors`: (logits,) or (hidden, weight, bias)."""
    return [*needs, *[False] * ((1 if len(student) == 1 else 3) - len(needs))]


def _grad_outputs(student: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """One output per student tensor: its gradient, or a 0-element tensor where none was formed."""
    return [t.new_empty(0) if g is None else g for t, g in zip(student, grads)]


def _forward(kind: Kind, a: Dict[str, object]) -> tuple:
    eng, finish, routing, valid, token_shape = _call(kind, a, a["check_finite"])
    reduction = Reduction(valid, a["reduction"], token_shape, normalizer_value(a["normalizer"]))
    student = a[kind.streams[0]]
    needs = [need and reduction.scalar for need in _needs(student, a["needs_grad"])]
    if any(needs):
        per_token, grads = engine.with_gradients(eng, finish, reduction.weights, needs)
    else:
        per_token, grads = finish(eng.forward()), [None] * len(needs)
    loss = reduction.value(per_token)
    per_token = per_token.reshape(token_shape)
    if not reduction.scalar:  # "none" returns the per-token loss twice: outputs of an op never share memory
        per_token = per_token.clone()
    out = (loss, per_token, _grad_outputs(student, grads))
    return (*out, *routing_outputs(routing, token_shape)) if kind.routed else out


def _forward_fake(kind: Kind, a: Dict[str, object]) -> tuple:
    tokens, student = a["tokens"], a[kind.streams[0]]
    scalar = a["reduction"] != "none"
    per_token = tokens.new_empty(tokens.shape, dtype=accum_dtype(student[0].dtype))
    grads = [t.new_empty(t.shape if need and scalar else 0) for t, need in zip(student, a["needs_grad"])]
    out = (per_token.new_empty(() if scalar else tokens.shape), per_token, grads)
    if not kind.routed:
        return out
    stats = [tokens.new_empty(tokens.shape, dtype=torch.float64) for _ in range(3)]
    return (*out, tokens.new_empty(tokens.shape, dtype=torch.int8), *stats, torch.empty(3, dtype=torch.float64))


def _backward(kind: Kind, a: Dict[str, object]) -> List[torch.Tensor]:
    """d(Σ_n grad_n · loss_n)/d(student) for reduction="none": the forward again (stats pass, routing with
    the thresholds the forward used, so no collective and the same regimes; the per-row terms), with the
    gradient formed in its sweep. Cost: about one scalar-reduction forward (every stream's logits or
    projections once more, plus the gradient work), in exchange for keeping no per-row state between
    forward and backward."""
    eng, finish, _, _, _ = _call(kind, a, check_finite=False)
    grad = a["grad"].reshape(-1)
    student = a[kind.streams[0]]
    _, grads = engine.with_gradients(eng, finish, lambda: grad, _needs(student, a["needs_grad"]))
    return _grad_outputs(student, grads)


def _backward_fake(kind: Kind, a: Dict[str, object]) -> List[torch.Tensor]:
    return [t.new_empty(t.shape if need else 0) for t, need in zip(a[kind.streams[0]], a["needs_grad"])]


def _define(kind: Kind):
    """Register `kind`'s forward and backward ops, their fake implementations and the autograd formula."""
    forward_args, forward_returns, backward_args, backward_returns = _schemas(kind)
    names = [arg.split()[-1] for arg in forward_args]
    backward_names = [arg.split()[-1] for arg in backward_args]
    student = kind.streams[0]

    def op(name: str, args: List[str], returns: str, impl):
        return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(),
                                       schema=f"({', '.join(args)}) -> {returns}")(impl)

    forward = op(kind.name, forward_args, forward_returns, lambda *args: _forward(kind, dict(zip(names, args))))
    backward = op(f"{kind.name}_backward", backward_args, backward_returns,
                  lambda *args: _backward(kind, dict(zip(backward_names, args))))
    forward.register_fake(lambda *args: _forward_fake(kind, dict(zip(names, args))))
    backward.register_fake(lambda *args: _backward_fake(kind, dict(zip(backward_names, args))))

    def setup_context(ctx, inputs, output):
        a = dict(zip(names, inputs))
        loss, per_token, grads, *routing = output
        ctx.mark_non_differentiable(per_token, *grads, *routing)
        # Only the loss carries a gradient. Materialized, the unused outputs' incoming gradients would be
        # zeros shaped like every output, the eager dH / dW / db among them: a second [V, H] in the backward.
        ctx.set_materialize_grads(False)
        ctx.sizes = {s: len(a[s]) for s in kind.streams}
        # Autograd takes back one entry per tensor of each list of tensors (an empty list counts as one).
        ctx.lists = [len(v) if isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v) else None
                     for v in inputs]
        ctx.scalar = a["reduction"] != "none"
        if ctx.scalar:  # the eager gradients are all the backward needs
            ctx.formed = list(a["needs_grad"])
            ctx.save_for_backward(*(g for g, formed in zip(grads, ctx.formed) if formed))
            return
        # reduction="none": the backward op recomputes from the inputs, routed with the thresholds used
        ctx.args = {n: a[n] for n in ("scale", "softcap", "backend", *kind.fields)}
        ctx.save_for_backward(*(t for s in kind.streams for t in a[s]), a["tokens"], *routing[-1:])

    def formula(ctx, grad_loss, *_):
        if grad_loss is None:  # a gradient for another output only (gradcheck differentiates each): none here
            return tuple(None if size is None else [None] * size for size in ctx.lists)
        traced = type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling()
        if torch.is_grad_enabled() and not traced:  # create_graph=True: the gradient has no graph of its own
            raise RuntimeError(engine.DOUBLE_BACKWARD_ERROR)
        needs = list(dict(zip(names, ctx.needs_input_grad))[student])
        saved = list(ctx.saved_tensors)
        if ctx.scalar:
            grads = engine.scale_eager(grad_loss, [saved.pop(0) if formed else None for formed in ctx.formed])
        else:
            args = dict(ctx.args, needs_grad=needs)
            for s in kind.streams:
                args[s], saved = saved[:ctx.sizes[s]], saved[ctx.sizes[s]:]
            args["tokens"], *thresholds = saved
            if kind.routed:
                args["thresholds"] = thresholds[0]
            grads = backward(grad_loss, **args)
        out = [None if size is None else [None] * size for size in ctx.lists]
        out[names.index(student)] = [g if need else None for g, need in zip(grads, needs)]
        return tuple(out)

    forward.register_autograd(formula, setup_context=setup_context)
    return forward, backward


dopd, dopd_backward = _define(DOPD)
opd, opd_backward = _define(OPD)
OPS = {DOPD: dopd, OPD: opd}


def _head_args(streams: Streams) -> dict:
    """The ops' `scale` and `softcap` lists of `streams` (empty in logits mode; softcap 0: none)."""
    heads = streams.heads or ()
    return dict(scale=[float(scale) for scale, _ in heads], softcap=[float(cap or 0.0) for _, cap in heads])


def op_arguments(kind: Kind, streams: Streams, cfg, backend: str, check_finite: bool,
                 thresholds: Optional[torch.Tensor] = None, normalizer: Optional[torch.Tensor] = None) -> dict:
    """The arguments of `kind`'s forward op for statically checked `streams`, by name; `needs_grad` from
    the student tensors' `requires_grad` and the grad mode."""
    args = dict(zip(kind.streams, (list(t) for t in streams.tensors)), **_head_args(streams), tokens=streams.tokens,
                normalizer=normalizer, backend=backend, check_finite=check_finite,
                needs_grad=[torch.is_grad_enabled() and t.requires_grad for t in streams.tensors[0]])
    if kind.routed:
        args["thresholds"] = thresholds
    return dict(args, **{f: getattr(cfg, f) for f in kind.fields})


def loss_op(kind: Kind, streams: Streams, cfg, backend: str, check_finite: bool,
            thresholds: Optional[torch.Tensor] = None, normalizer: Optional[torch.Tensor] = None) -> tuple:
    """Run `kind`'s forward op on statically checked `streams`; returns its outputs (module docstring)."""
    return OPS[kind](**op_arguments(kind, streams, cfg, backend, check_finite, thresholds, normalizer))


def logprobs_op(streams: Streams, cfg: OPDConfig, backend: str) -> torch.Tensor:
    """Run the `token_logprobs` op on the one statically checked stream of `streams` (detached)."""
    return token_logprobs([t.detach() for t in streams.tensors[0]], **_head_args(streams), tokens=streams.tokens,
                          temperature=cfg.temperature, ignore_index=cfg.ignore_index, valid_vocab=cfg.valid_vocab,
                          backend=backend)


@torch.library.custom_op(f"{NAMESPACE}::token_logprobs", mutates_args=())
def token_logprobs(stream: List[torch.Tensor], scale: List[float], softcap: List[float], tokens: torch.Tensor,
                   temperature: float, ignore_index: int, valid_vocab: Optional[int], backend: str) -> torch.Tensor:
    """log π(y) `[*]` of each sampled token (0 where ignored), fp32 or fp64; not differentiable."""
    cfg = OPDConfig(temperature=temperature, ignore_index=ignore_index, valid_vocab=valid_vocab)
    streams = Streams((tuple(stream),), _heads(scale, softcap), tokens)
    (source,), flat, valid, token_shape, _ = prepare(("student",), streams, cfg, False)
    return engine.token_logprobs(_passes(backend, flat.device), source, flat, valid).reshape(token_shape)


@token_logprobs.register_fake
def _(stream, scale, softcap, tokens, temperature, ignore_index, valid_vocab, backend):
    return tokens.new_empty(tokens.shape, dtype=accum_dtype(stream[0].dtype))
