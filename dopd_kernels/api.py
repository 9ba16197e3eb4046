"""Public loss functions: validation, flattening, backend dispatch, reduction.

Shapes: `N` tokens (or `B, T` sequences × positions), `V` vocabulary, `H` hidden size. The logits
(or hidden states) at position n are the distribution that produced `tokens[n]`: shift before
calling, as for a causal-LM cross-entropy.

Under `torch.compile` each call of a public function here is one deliberate graph break
(`torch.compiler.disable`): the computation validates and routes on data (token ranges, `nonzero`,
trimmed means) and launches kernels, which Dynamo would otherwise cut into dozens of small graphs.
The model before the loss and the code after it still compile; autograd runs across the break.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import engine
from .backends import resolve_backend
from .passes import Passes
from .config import DOPDConfig, DOPDOutput, OPDConfig, OPDOutput, Thresholds
from .heads import LMHead
from .parallel import VocabShard
from .reductions import Reduction
from .sources import LinearSource, LogitsSource
from .validation import (
    check_finite_logits,
    check_finite_rows,
    check_float_tensor,
    check_head_transform,
    check_linear,
    check_normalizer,
    check_config,
    check_same_device,
    check_seq_mean,
    check_tokens,
    check_valid_vocab,
    coerce_thresholds,
    common_vocab,
)

BackendArg = Union[str, object]
HeadArg = Union[torch.Tensor, LMHead]
LOGITS_SHAPE = "[N, V] or [B, T, V]"


def _prepare_tokens(tokens, token_shape, local_vocab, cfg, lead_name, vocab_parallel_group):
    """Validated flat tokens [N] (int64), valid mask [N], the vocabulary shard (None when the
    vocabulary is whole) and the `valid_vocab` the local sources use."""
    shard = None
    vocab = local_vocab
    if vocab_parallel_group is not None:
        device = tokens.device if isinstance(tokens, torch.Tensor) else torch.device("cpu")
        shard = VocabShard.create(vocab_parallel_group, local_vocab, device)
        vocab = shard.vocab
    v_eff = check_valid_vocab(cfg.valid_vocab, vocab)
    check_tokens(tokens, token_shape, v_eff, cfg.ignore_index, lead_name)
    check_seq_mean(cfg.reduction, tokens)
    flat = tokens.reshape(-1).long()
    if shard is None:
        return flat, flat != cfg.ignore_index, None, cfg.valid_vocab
    shard = shard.with_valid_vocab(cfg.valid_vocab)
    return flat, flat != cfg.ignore_index, shard, shard.local_valid_vocab()


def _logits_sources(named: dict, tokens, cfg, check_finite: bool, vocab_parallel_group=None):
    """Validate logits streams (first one is the student) and wrap them as flat sources."""
    for name, t in named.items():
        check_float_tensor(name, t, (2, 3), LOGITS_SHAPE)
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {list(first.shape)}, got {list(t.shape)}")
    if first.shape[-1] == 0:
        raise ValueError(f"{first_name} must have a vocabulary V >= 1, got shape {list(first.shape)}")
    check_same_device({**named, "tokens": tokens} if isinstance(tokens, torch.Tensor) else named)
    flat_tokens, valid, shard, valid_vocab = _prepare_tokens(tokens, first.shape[:-1], first.shape[-1], cfg, first_name,
                                                             vocab_parallel_group)
    if check_finite:
        for name, t in named.items():
            check_finite_logits(name, t, valid_vocab, whole_rows=shard is None)
    v = first.shape[-1]
    sources = [LogitsSource(t.reshape(-1, v) if i == 0 else t.detach().reshape(-1, v), cfg.temperature, valid_vocab)
               for i, t in enumerate(named.values())]
    return sources, flat_tokens, valid, first.shape[:-1], shard


def _as_head(prefix: str, weight: HeadArg, bias: Optional[torch.Tensor]) -> LMHead:
    """A stream's head: an `LMHead` as given, or a raw weight (and bias) with no transform."""
    if isinstance(weight, LMHead):
        if bias is not None:
            raise ValueError(f"{prefix}_bias was given together with an LMHead as {prefix}_weight; "
                             f"put the bias in the LMHead (LMHead(weight, bias=...))")
        return weight
    return LMHead(weight, bias)


def _linear_sources(streams: list, tokens, cfg, check_finite: bool, vocab_parallel_group=None):
    """streams: [(prefix, hidden, LMHead)], the student first. Returns flat sources.

    Vocabulary (see `validation.common_vocab`): the streams share the student's real vocabulary;
    rows of any head past it are padding and are sliced off (views, no copy), so no softmax sees them.
    """
    h0 = streams[0][1]
    for prefix, h, head in streams:
        check_linear(prefix, h, head.weight, head.bias, None if prefix == streams[0][0] else h0.shape[:-1])
        check_head_transform(prefix, head.scale, head.softcap)
    if vocab_parallel_group is None:
        vocab = common_vocab([(p, head.weight.shape[0], head.vocab_size) for p, _, head in streams])
    else:  # each rank holds a shard of rows: padding is declared through config.valid_vocab instead
        vocab = streams[0][2].weight.shape[0]
        for prefix, _, head in streams:
            if head.vocab_size is not None:
                raise ValueError(f"{prefix}_weight: LMHead.vocab_size is not supported with vocab_parallel_group; "
                                 f"use config.valid_vocab for padding rows")
            if head.weight.shape[0] != vocab:
                raise ValueError(f"{prefix}_weight has {head.weight.shape[0]} rows but {streams[0][0]}_weight has {vocab}: "
                                 f"every stream's shard must hold the same rows")
    named = {f"{p}_{k}": t for p, h, head in streams
             for k, t in (("hidden", h), ("weight", head.weight), ("bias", head.bias)) if t is not None}
    check_same_device({**named, "tokens": tokens} if isinstance(tokens, torch.Tensor) else named)
    flat_tokens, valid, shard, valid_vocab = _prepare_tokens(tokens, h0.shape[:-1], vocab, cfg, "student_hidden",
                                                             vocab_parallel_group)
    if check_finite:
        for name, t in named.items():
            check_finite_rows(name, t)
    sources = []
    for i, (_, h, head) in enumerate(streams):
        w, b = head.weight[:vocab], (head.bias[:vocab] if head.bias is not None else None)
        if i:  # frozen streams never receive a gradient
            h, w, b = h.detach(), w.detach(), (b.detach() if b is not None else None)
        sources.append(LinearSource(h.reshape(-1, h.shape[-1]), w, b, cfg.temperature, valid_vocab,
                                    float(head.scale), None if head.softcap is None else float(head.softcap)))
    return sources, flat_tokens, valid, h0.shape[:-1], shard


def _detached(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _dopd(prepared, cfg: DOPDConfig, thresholds, backend, normalizer, routing_group) -> DOPDOutput:
    sources, tokens, valid, token_shape, shard = prepared
    normalizer = check_normalizer(normalizer, cfg.reduction)
    thresholds = coerce_thresholds(thresholds)
    impl = resolve_backend(backend, tokens.device)
    reduction = Reduction(valid, cfg.reduction, token_shape, normalizer)
    if isinstance(impl, Passes):
        loss, per_token, routing = engine.dopd(impl, *sources, tokens, valid, cfg, thresholds, reduction, shard,
                                               routing_group)
    else:
        per_token, routing = impl.dopd(*sources, tokens, valid, cfg, thresholds, shard=shard, routing_group=routing_group)
        loss = reduction.value(per_token)

    def shape(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(token_shape)

    return DOPDOutput(
        loss=loss,
        per_token_loss=shape(per_token),
        regime=shape(routing.regime),
        adv_gap=shape(routing.adv_gap),
        q_teacher=shape(routing.q_teacher),
        q_priv_student=shape(routing.q_priv_student),
        thresholds=routing.thresholds,
    )


@torch.compiler.disable
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
        backend: "auto", a backend name (see `available_backends()`) or a backend object.
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
    prepared = _logits_sources(
        {"student_logits": student_logits, "teacher_logits": teacher_logits, "priv_student_logits": priv_student_logits},
        tokens, cfg, check_finite, vocab_parallel_group)
    return _dopd(prepared, cfg, thresholds, backend, normalizer, routing_group)


@torch.compiler.disable
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
            (check_finite checks hidden states, weights and biases for NaN/inf).
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
    prepared = _linear_sources(streams, tokens, cfg, check_finite, vocab_parallel_group)
    return _dopd(prepared, cfg, thresholds, backend, normalizer, routing_group)


def _opd(prepared, cfg: OPDConfig, backend, normalizer) -> OPDOutput:
    sources, tokens, valid, token_shape, shard = prepared
    normalizer = check_normalizer(normalizer, cfg.reduction)
    impl = resolve_backend(backend, tokens.device)
    reduction = Reduction(valid, cfg.reduction, token_shape, normalizer)
    if isinstance(impl, Passes):
        loss, per_token = engine.opd(impl, *sources, tokens, valid, cfg, reduction, shard)
    else:
        per_token = impl.opd(*sources, tokens, valid, cfg, shard=shard)
        loss = reduction.value(per_token)
    return OPDOutput(loss, per_token.detach().reshape(token_shape))


@torch.compiler.disable
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
    prepared = _logits_sources({"student_logits": student_logits, "teacher_logits": teacher_logits}, tokens, cfg,
                               check_finite, vocab_parallel_group)
    return _opd(prepared, cfg, backend, normalizer)


@torch.compiler.disable
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
    prepared = _linear_sources(streams, tokens, cfg, check_finite, vocab_parallel_group)
    return _opd(prepared, cfg, backend, normalizer)


@torch.compiler.disable
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
        (source,), flat, valid, token_shape, shard = _logits_sources({"logits": logits_or_hidden}, tokens, cfg, False,
                                                                     vocab_parallel_group)
    else:
        (source,), flat, valid, token_shape, shard = _linear_sources(
            [("student", logits_or_hidden, _as_head("student", weight, bias))], tokens, cfg, False, vocab_parallel_group)
    impl = resolve_backend(backend, flat.device)
    if isinstance(impl, Passes):
        out = engine.token_logprobs(impl, source, flat, valid, shard)
    else:
        out = impl.token_logprobs(source, flat, valid, shard=shard)
    return out.to(source.dtype).reshape(token_shape)
