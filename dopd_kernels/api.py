"""Public loss functions: validation, flattening, backend dispatch, reduction.

Shapes: `N` tokens (or `B, T` sequences × positions), `V` vocabulary, `H` hidden size. The logits
(or hidden states) at position n are the distribution that produced `tokens[n]`: shift before
calling, as for a causal-LM cross-entropy.

Each function checks its arguments' kinds, dtypes and shapes here, in Python, without reading tensor
data (a bad argument is a ValueError/TypeError naming it, before any kernel), then calls a
`torch.library` custom op (`ops.py`) whose implementation reads the data (token range, `check_finite`,
the values of thresholds and normalizer) before running the engine. Under `torch.compile` the whole
function therefore traces into the graph, `fullgraph=True` included; the op's autograd formula gives
the gradient (`ops.py`).

What an op cannot take keeps a deliberate graph break (`torch.compiler.disable`) around the same engine,
differentiated by its autograd Functions (`engine.run`): a backend given as an object (e.g.
`TorchBackend(row_chunk=...)`) or as "reference" (float64 autograd, second derivatives), and the process
groups `vocab_parallel_group`/`routing_group` (collectives). The model before the loss and the code after
it still compile then; autograd runs across the break.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import torch

from . import engine, ops
from .backends import resolve_backend
from .config import DOPDConfig, DOPDOutput, OPDConfig, OPDOutput, Thresholds
from .heads import LMHead
from .ops import DOPD, OPD, Streams
from .parallel import VocabShard
from .passes import Passes
from .reductions import Reduction
from .validation import (
    check_config,
    check_float_tensor,
    check_head_transform,
    check_linear,
    check_normalizer,
    check_same_device,
    check_seq_mean,
    check_thresholds,
    check_tokens,
    check_valid_vocab,
    common_vocab,
    normalizer_value,
    thresholds_tensor,
)

BackendArg = Union[str, object]
HeadArg = Union[torch.Tensor, LMHead]
LOGITS_SHAPE = "[N, V] or [B, T, V]"


def _logits_streams(named: dict, tokens, cfg) -> Streams:
    """Static checks of logits streams (the first one is the student) and their flat `[N, V]` views."""
    for name, t in named.items():
        check_float_tensor(name, t, (2, 3), LOGITS_SHAPE)
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {list(first.shape)}, got {list(t.shape)}")
    if first.shape[-1] == 0:
        raise ValueError(f"{first_name} must have a vocabulary V >= 1, got shape {list(first.shape)}")
    check_same_device({**named, "tokens": tokens} if isinstance(tokens, torch.Tensor) else named)
    check_tokens(tokens, first.shape[:-1], first_name)
    check_seq_mean(cfg.reduction, tokens)
    v = first.shape[-1]
    tensors = tuple((t.reshape(-1, v) if i == 0 else t.detach().reshape(-1, v),) for i, t in enumerate(named.values()))
    return Streams(tensors, None, tokens)


def _as_head(prefix: str, weight: HeadArg, bias: Optional[torch.Tensor]) -> LMHead:
    """A stream's head: an `LMHead` as given, or a raw weight (and bias) with no transform."""
    if isinstance(weight, LMHead):
        if bias is not None:
            raise ValueError(f"{prefix}_bias was given together with an LMHead as {prefix}_weight; "
                             f"put the bias in the LMHead (LMHead(weight, bias=...))")
        return weight
    return LMHead(weight, bias)


def _linear_streams(streams: list, tokens, cfg, sharded: bool) -> tuple:
    """streams: [(prefix, hidden, LMHead)], the student first. Static checks; returns the flat streams
    and `cfg` with the padding rows declared as `valid_vocab`.

    Vocabulary (see `validation.common_vocab`): the streams share the student's real vocabulary V;
    rows of any head past it are padding, which no softmax sees. Every head is cut to the fewest rows
    any stream has (R >= V, views), and when R > V the rows [V, R) are excluded as `valid_vocab` columns
    rather than sliced off: the student's weight then usually reaches the loss whole, so its gradient
    is the loss's own `[R, H]` buffer (zero in the padding rows). A slice of a leaf that requires grad
    would cost a second `[R, H]` in the backward (`_leading_rows`).
    """
    h0 = streams[0][1]
    for prefix, h, head in streams:
        check_linear(prefix, h, head.weight, head.bias, None if prefix == streams[0][0] else h0.shape[:-1])
        check_head_transform(prefix, head.scale, head.softcap)
    if not sharded:
        vocab = common_vocab([(p, head.weight.shape[0], head.vocab_size) for p, _, head in streams])
        check_valid_vocab(cfg.valid_vocab, vocab)
        rows = min(head.weight.shape[0] for _, _, head in streams)
        if rows > vocab and cfg.valid_vocab is None:
            cfg = dataclasses.replace(cfg, valid_vocab=vocab)
    else:  # each rank holds a shard of rows: padding is declared through config.valid_vocab instead
        rows = streams[0][2].weight.shape[0]
        for prefix, _, head in streams:
            if head.vocab_size is not None:
                raise ValueError(f"{prefix}_weight: LMHead.vocab_size is not supported with vocab_parallel_group; "
                                 f"use config.valid_vocab for padding rows")
            if head.weight.shape[0] != rows:
                raise ValueError(f"{prefix}_weight has {head.weight.shape[0]} rows but {streams[0][0]}_weight has {rows}: "
                                 f"every stream's shard must hold the same rows")
    named = {f"{p}_{k}": t for p, h, head in streams
             for k, t in (("hidden", h), ("weight", head.weight), ("bias", head.bias)) if t is not None}
    check_same_device({**named, "tokens": tokens} if isinstance(tokens, torch.Tensor) else named)
    check_tokens(tokens, h0.shape[:-1], "student_hidden")
    check_seq_mean(cfg.reduction, tokens)
    tensors, heads = [], []
    for i, (_, h, head) in enumerate(streams):
        ts = [h.reshape(-1, h.shape[-1]), _leading_rows(head.weight, rows)]
        if head.bias is not None:
            ts.append(_leading_rows(head.bias, rows))
        tensors.append(tuple(t.detach() if i else t for t in ts))  # frozen streams never receive a gradient
        heads.append((float(head.scale), None if head.softcap is None else float(head.softcap)))
    return Streams(tuple(tensors), tuple(heads), tokens), cfg


def _leading_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t[:rows]`, or `t` itself when it has no more rows. Even a slice of every row puts a SliceBackward
    between the loss and the weight, and its backward allocates a fresh `[V, H]` gradient and copies the
    loss's one into it: twice dW's memory at the peak. Unsliced, the loss's own buffer becomes `.grad`."""
    return t if t.shape[0] == rows else t[:rows]


def _as_op(backend: BackendArg, *groups) -> bool:
    """Whether a call runs as a custom op: a pass backend by name and no process group."""
    return isinstance(backend, str) and backend != "reference" and all(g is None for g in groups)


def _traceable(fn):
    """A public function that `torch.compile` traces into its graph when the call runs as an op
    (`_as_op`), and treats as one deliberate graph break otherwise (`backend`, `vocab_parallel_group` and
    `routing_group` are keyword-only arguments)."""
    direct = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        groups = (kwargs.get("vocab_parallel_group"), kwargs.get("routing_group"))
        return (fn if _as_op(kwargs.get("backend", "auto"), *groups) else direct)(*args, **kwargs)

    return call


def _prepare(names, streams: Streams, cfg, check_finite: bool, vocab_parallel_group):
    """`ops.prepare` for a call outside the ops, where the vocabulary may be sharded over a group."""
    shard = None
    if vocab_parallel_group is not None:
        shard = VocabShard.create(vocab_parallel_group, ops.local_vocab(streams), streams.tokens.device)
    return ops.prepare(names, streams, cfg, check_finite, shard)


def _detached(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _dopd(streams: Streams, cfg: DOPDConfig, thresholds, backend, normalizer, check_finite, vocab_parallel_group,
          routing_group) -> DOPDOutput:
    normalizer = check_normalizer(normalizer, cfg.reduction)
    thresholds = thresholds_tensor(thresholds)
    if _as_op(backend, vocab_parallel_group, routing_group):
        check_valid_vocab(cfg.valid_vocab, ops.local_vocab(streams))
        loss, per_token, _, *routing = ops.loss_op(DOPD, streams, cfg, backend, check_finite, thresholds, normalizer)
    else:
        loss, per_token, *routing = _dopd_autograd(streams, cfg, thresholds, backend, normalizer, check_finite,
                                                   vocab_parallel_group, routing_group)
    shape = streams.tokens.shape
    regime, adv_gap, q_teacher, q_priv_student = (t.detach().reshape(shape) for t in routing[:4])
    return DOPDOutput(loss=loss, per_token_loss=per_token.detach().reshape(shape), regime=regime, adv_gap=adv_gap,
                      q_teacher=q_teacher, q_priv_student=q_priv_student, thresholds=Thresholds(*routing[4].unbind()))


def _dopd_autograd(streams: Streams, cfg: DOPDConfig, thresholds, backend, normalizer, check_finite,
                   vocab_parallel_group, routing_group) -> tuple:
    """The `dopd` op's outputs (less its gradients) for a call no op can take, differentiable through the
    engine's autograd Functions (a graph break under torch.compile: `_traceable`)."""
    sources, tokens, valid, token_shape, shard = _prepare(DOPD.streams, streams, cfg, check_finite,
                                                          vocab_parallel_group)
    thresholds = check_thresholds(thresholds)
    reduction = Reduction(valid, cfg.reduction, token_shape, normalizer_value(normalizer))
    impl = resolve_backend(backend, tokens.device)
    if isinstance(impl, Passes):
        loss, per_token, routing = engine.dopd(impl, *sources, tokens, valid, cfg, thresholds, reduction, shard,
                                               routing_group)
    else:
        per_token, routing = impl.dopd(*sources, tokens, valid, cfg, thresholds, shard=shard, routing_group=routing_group)
        loss = reduction.value(per_token)
    return (loss, per_token, *ops.routing_outputs(routing, token_shape))


@_traceable
def dopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    priv_student_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    config: Optional[DOPDConfig] = None,
    thresholds: Optional[Union[Thresholds, tuple, torch.Tensor]] = None,
    backend: BackendArg = "auto",
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    check_finite: bool = False,
    vocab_parallel_group=None,
    routing_group=None,
) -> DOPDOutput:
    """Dual on-policy distillation loss from three logit tensors (DESIGN.md section 1).

    Args:
        student_logits: `[N, V]` or `[B, T, V]` (bf16, fp16, fp32 or fp64); receives the gradient.
        teacher_logits: same shape; the privileged teacher π_T (never differentiated).
        priv_student_logits: same shape; the privileged student π_P (or any frozen reference).
        tokens: `[N]` or `[B, T]` sampled tokens; `config.ignore_index` marks masked positions.
        config: `DOPDConfig` (paper defaults when None).
        thresholds: routing thresholds (Ā, q̄_T, q̄_P) to use instead of this batch's trimmed means.
        backend: "auto", a backend name (see `available_backends()`) or a backend object. A name other
            than "reference" runs the loss as a custom op that `torch.compile` traces into its graph; an
            object, "reference", `vocab_parallel_group` or `routing_group` makes the call one graph break.
        normalizer: with reduction "mean"/"sum", divide the summed loss by this token count instead.
        check_finite: raise ValueError (naming the stream and the row) if a row has a NaN or +inf
            logit, or no finite logit in the valid vocabulary; a single -inf logit is allowed (an
            impossible token, padding). With False (the default), see "Non-finite values" below.
        vocab_parallel_group: a `torch.distributed` group over which the vocabulary is sharded:
            each rank passes its contiguous shard `[..., V_r]` (shards in rank order), the same
            tokens (global ids) and gets the loss of the whole vocabulary (see `parallel.py`).
        routing_group: a `torch.distributed` group (e.g. data parallel) whose ranks' valid tokens
            together define the routing thresholds.

    Non-finite values (the same on every backend): a row of any stream with a NaN or +inf logit, or
    without a finite logit, has a NaN loss on that token (never a finite value hiding it), and a
    token whose routing statistics are NaN is routed to HS and left out of the thresholds' trimmed
    means, so it never changes another token's routing. A -inf logit at the sampled token is legal:
    ℓ = -inf gives A = +inf (left out of the means, routed by the table), ℓ_T = ℓ_P = -inf gives A = 0.

    Second derivatives are not available (a backward with create_graph=True raises); the
    `reference` backend is plain float64 autograd and differentiates twice.

    Returns:
        `DOPDOutput`; see its docstring. A batch without valid tokens has loss 0 (gradient 0) and
        all tokens in regime IGNORED.
    """
    cfg = check_config(config, DOPDConfig)
    streams = _logits_streams(
        {"student_logits": student_logits, "teacher_logits": teacher_logits, "priv_student_logits": priv_student_logits},
        tokens, cfg)
    return _dopd(streams, cfg, thresholds, backend, normalizer, check_finite, vocab_parallel_group, routing_group)


@_traceable
def fused_linear_dopd_loss(
    student_hidden: torch.Tensor,
    student_weight: HeadArg,
    teacher_hidden: torch.Tensor,
    teacher_weight: HeadArg,
    priv_student_hidden: torch.Tensor,
    tokens: torch.Tensor,
    *,
    priv_student_weight: Optional[HeadArg] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    priv_student_bias: Optional[torch.Tensor] = None,
    config: Optional[DOPDConfig] = None,
    thresholds: Optional[Union[Thresholds, tuple, torch.Tensor]] = None,
    backend: BackendArg = "auto",
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    check_finite: bool = False,
    vocab_parallel_group=None,
    routing_group=None,
) -> DOPDOutput:
    """DOPD loss from final hidden states and `lm_head` weights; logits are never materialized.

    Args:
        student_hidden: `[N, H_s]` or `[B, T, H_s]`; receives a gradient.
        student_weight: `[V, H_s]` student `lm_head`, or an `LMHead` (weight, bias, scale, soft-cap,
            vocab_size: the logits are `softcap(scale·(h·Wᵀ + b))` before the temperature);
            receives a gradient unless it does not require one (a frozen head: no dW is computed).
        teacher_hidden: `[N, H_t]` or `[B, T, H_t]`; teacher_weight: `[V_t, H_t]` or an `LMHead` (frozen).
        priv_student_hidden: `[N, H_p]` or `[B, T, H_p]` (frozen).
        tokens: `[N]` or `[B, T]`.
        priv_student_weight: `[V_p, H_p]` or an `LMHead`; None means the student's head (its bias,
            scale, soft-cap and vocab_size included), detached.
        student_bias, teacher_bias, priv_student_bias: optional `[V]` biases of raw-tensor weights
            (an `LMHead` carries its own; giving both for one stream is a ValueError).

    Vocabulary: the streams share the student's real vocabulary `V` (its `LMHead.vocab_size`, else its
    rows). A head with more rows (padding a checkpoint added) is accepted: rows past `V` take no
    probability in any softmax. A head declaring another `vocab_size`, or with fewer than `V` rows,
    belongs to another tokenizer and is refused (ValueError naming both sizes).

        config, thresholds, backend, normalizer, check_finite, routing_group: as in `dopd_loss`
            (check_finite checks hidden states, weights and biases for NaN/inf; a head's padding rows,
            which no softmax reads, are not checked).
        vocab_parallel_group: each rank holds the rows [offset_r, offset_r + V_r) of every
            `lm_head` (weights `[V_r, H]`, biases `[V_r]`) and the full hidden states; the hidden-state
            gradient is summed over the group, as a column-parallel linear's backward does.

    Returns:
        `DOPDOutput`; gradients reach `student_hidden`, `student_weight` and `student_bias` only.
    """
    cfg = check_config(config, DOPDConfig)
    student = _as_head("student", student_weight, student_bias)
    if priv_student_weight is None:  # the student's own head, detached (transforms and padding included)
        bias = priv_student_bias if priv_student_bias is not None else student.bias
        priv = LMHead(_detached(student.weight), _detached(bias), student.scale, student.softcap, student.vocab_size)
    else:
        priv = _as_head("priv_student", priv_student_weight, priv_student_bias)
    streams = [("student", student_hidden, student),
               ("teacher", teacher_hidden, _as_head("teacher", teacher_weight, teacher_bias)),
               ("priv_student", priv_student_hidden, priv)]
    flat, cfg = _linear_streams(streams, tokens, cfg, vocab_parallel_group is not None)
    return _dopd(flat, cfg, thresholds, backend, normalizer, check_finite, vocab_parallel_group, routing_group)


def _opd(streams: Streams, cfg: OPDConfig, backend, normalizer, check_finite, vocab_parallel_group) -> OPDOutput:
    normalizer = check_normalizer(normalizer, cfg.reduction)
    if _as_op(backend, vocab_parallel_group):
        check_valid_vocab(cfg.valid_vocab, ops.local_vocab(streams))
        loss, per_token, _ = ops.loss_op(OPD, streams, cfg, backend, check_finite, normalizer=normalizer)
    else:
        loss, per_token = _opd_autograd(streams, cfg, backend, normalizer, check_finite, vocab_parallel_group)
    return OPDOutput(loss, per_token.detach().reshape(streams.tokens.shape))


def _opd_autograd(streams: Streams, cfg: OPDConfig, backend, normalizer, check_finite, vocab_parallel_group) -> tuple:
    """(loss, per-token loss) of a call no op can take (see `_dopd_autograd`)."""
    sources, tokens, valid, token_shape, shard = _prepare(OPD.streams, streams, cfg, check_finite, vocab_parallel_group)
    reduction = Reduction(valid, cfg.reduction, token_shape, normalizer_value(normalizer))
    impl = resolve_backend(backend, tokens.device)
    if isinstance(impl, Passes):
        return engine.opd(impl, *sources, tokens, valid, cfg, reduction, shard)
    per_token = impl.opd(*sources, tokens, valid, cfg, shard=shard)
    return reduction.value(per_token), per_token


@_traceable
def opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    granularity: str = "full",
    top_k: int = 128,
    js_beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: BackendArg = "auto",
    topk_from: str = "student",
    topk_renorm: bool = True,
    valid_vocab: Optional[int] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    check_finite: bool = False,
    vocab_parallel_group=None,
) -> OPDOutput:
    """Vanilla on-policy distillation loss (DESIGN.md section 2) from two logit tensors.

    Args:
        student_logits: `[N, V]` or `[B, T, V]`; receives the gradient.
        teacher_logits: same shape (never differentiated).
        tokens: `[N]` or `[B, T]` sampled tokens.
        divergence, granularity, top_k, js_beta, temperature, topk_from, topk_renorm, ignore_index,
        reduction, valid_vocab: see `OPDConfig`.
        backend, normalizer, check_finite, vocab_parallel_group: as in `dopd_loss` (a row with a NaN
            or +inf logit, or no finite one, gives a NaN loss on its token).

    Returns:
        `OPDOutput(loss, per_token_loss)`. JS values never exceed their bound (log 2 for js_beta=0.5).
    """
    cfg = OPDConfig(divergence, granularity, top_k, js_beta, temperature, topk_from, topk_renorm,
                    ignore_index, reduction, valid_vocab)
    streams = _logits_streams({"student_logits": student_logits, "teacher_logits": teacher_logits}, tokens, cfg)
    return _opd(streams, cfg, backend, normalizer, check_finite, vocab_parallel_group)


@_traceable
def fused_linear_opd_loss(
    student_hidden: torch.Tensor,
    student_weight: HeadArg,
    teacher_hidden: torch.Tensor,
    teacher_weight: HeadArg,
    tokens: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    divergence: str = "reverse_kl",
    granularity: str = "full",
    top_k: int = 128,
    js_beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: BackendArg = "auto",
    topk_from: str = "student",
    topk_renorm: bool = True,
    valid_vocab: Optional[int] = None,
    normalizer: Optional[Union[float, torch.Tensor]] = None,
    check_finite: bool = False,
    vocab_parallel_group=None,
) -> OPDOutput:
    """Vanilla OPD loss from hidden states `[N, H]`/`[B, T, H]` and `lm_head` weights `[V, H]`
    (optional biases `[V]`) or `LMHead`s; options as in `opd_loss` (heads, vocabulary rule and
    `vocab_parallel_group` as in `fused_linear_dopd_loss`). Gradients reach the student's hidden
    states, weight and bias only (those that require grad)."""
    cfg = OPDConfig(divergence, granularity, top_k, js_beta, temperature, topk_from, topk_renorm,
                    ignore_index, reduction, valid_vocab)
    streams = [("student", student_hidden, _as_head("student", student_weight, student_bias)),
               ("teacher", teacher_hidden, _as_head("teacher", teacher_weight, teacher_bias))]
    flat, cfg = _linear_streams(streams, tokens, cfg, vocab_parallel_group is not None)
    return _opd(flat, cfg, backend, normalizer, check_finite, vocab_parallel_group)


@_traceable
def token_logprobs(
    logits_or_hidden: torch.Tensor,
    tokens: torch.Tensor,
    weight: Optional[HeadArg] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    valid_vocab: Optional[int] = None,
    backend: BackendArg = "auto",
    vocab_parallel_group=None,
) -> torch.Tensor:
    """log softmax(z / temperature)[y] of each sampled token, without materializing the logits.

    Args:
        logits_or_hidden: logits `[N, V]`/`[B, T, V]`, or hidden states `[N, H]`/`[B, T, H]` when
            `weight` `[V, H]` (and optionally `bias` `[V]`) is given.
        tokens: `[N]` or `[B, T]`.

    Returns:
        `[N]` or `[B, T]` detached log-probs (fp32, or fp64 for fp64 inputs); 0 at ignored positions.
    """
    cfg = OPDConfig(temperature=temperature, ignore_index=ignore_index, valid_vocab=valid_vocab)
    if weight is None:
        streams = _logits_streams({"logits": logits_or_hidden}, tokens, cfg)
    else:
        streams, cfg = _linear_streams([("student", logits_or_hidden, _as_head("student", weight, bias))], tokens,
                                       cfg, vocab_parallel_group is not None)
    if not _as_op(backend, vocab_parallel_group):
        return _token_logprobs_direct(streams, cfg, backend, vocab_parallel_group)
    check_valid_vocab(cfg.valid_vocab, ops.local_vocab(streams))
    return ops.logprobs_op(streams, cfg, backend)


def _token_logprobs_direct(streams: Streams, cfg: OPDConfig, backend, vocab_parallel_group) -> torch.Tensor:
    """`token_logprobs` for a call no op can take (a backend object or "reference", a vocabulary group)."""
    (source,), flat, valid, token_shape, shard = _prepare(("student",), streams, cfg, False, vocab_parallel_group)
    impl = resolve_backend(backend, flat.device)
    if isinstance(impl, Passes):
        out = engine.token_logprobs(impl, source, flat, valid, shard)
    else:
        out = impl.token_logprobs(source, flat, valid, shard=shard)
    return out.to(source.dtype).reshape(token_shape)
