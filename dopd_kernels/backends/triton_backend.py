"""The `triton` backend: the passes of `engine.py` as Triton kernels (`dopd_kernels/kernels/`).

Flow (DESIGN.md section 4; the O(N) and O(N·K) steps are shared with every backend):

1. stats pass — `kernels.stats.stats_kernel`, one launch for all streams: log-sum-exp, sampled
   logit and the running top-K of the valid rows.
2. routing / planning — `backends/base.py` on the `[N]` statistics (float64, O(N)).
3. values — full-vocabulary rows (DOPD's HT rows, full OPD) are compacted to their row ids and run
   through `kernels.divergence.full_value_kernel`; top-K and sampled rows use `[n, K]` gathers and
   `row_terms.py`.
4. backward — `kernels.divergence.grad_kernel` forms the gradient tiles of full rows (and the dense
   `p·dense` part of sampled / tail-bucket rows); in logits mode it stores them into the student
   gradient (the only `[N, V]` tensor), in fused-linear mode it contracts them into dH / dW / db
   inside the kernel. Sparse top-K coefficients are scattered on `[n, K]`.

Memory: logits mode reads the logits in their dtype (bf16/fp16/fp32) and allocates no fp32 copy;
fused-linear mode allocates `[n]` statistics, `[n, K]` top-K columns and logits, and the fp32
dH/dW/db accumulators — never a tensor with a vocabulary axis per token (`kernels/sparse.py`
computes the K logits of a row and contracts its sparse gradient without `[rows, K, H]` gathers).

Tile sizes (`_Config`), Hopper defaults chosen per shape. Each is the largest tile that Triton 3.9's
compiler and ptxas build for sm_90a without register spills (bf16 and fp32 inputs), checked by
compiling every kernel variant ahead of time without a GPU (`tests/triton_sm90.py`, run in CI);
they have not yet been timed on a GPU:
  * fused-linear bf16/fp16: BLOCK_N = 64 rows (32 for the full reverse-KL gradient, which spills
    at 64), BLOCK_V = 128, BLOCK_H = 32, num_warps = 8, num_stages = 3 — tiles feed wgmma with fp32
    accumulators. When the stats pass keeps a top-K, BLOCK_N = 16 and BLOCK_H = 4096 / K_PAD
    (32 for K ≤ 128, 16 for K = 256): the running `[BLOCK_N, K_PAD]` int64 key block and the tile
    being sorted live in registers;
  * fused-linear with fp32 operands (IEEE `tl.dot`, no tensor cores): 64 × 64 tiles and
    BLOCK_H = 8 (16 × 128 × 8 with a top-K);
  * logits mode (memory bound): BLOCK_N = 8, BLOCK_V = 512 (K_PAD when the stats pass keeps a
    top-K), num_warps = 8 (4 for a top-K of K_PAD ≤ 128);
  * sparse top-K kernels (one program per row): a `[K_PAD, BLOCK_H]` weight block of 4K elements;
  * the fused-linear gradient grid splits the vocabulary so that about 4 programs per SM exist.
Under the interpreter (`TRITON_INTERPRET=1`, CPU tensors) the blocks are as large as the shapes
allow and num_warps/num_stages are ignored. Every knob can be fixed through the constructor.
`triton.autotune` is not used: its first-call benchmarking would multiply compile time for every
new (N, V, H), it cannot run in the interpreter, and the gradient kernels accumulate with atomics
(each trial would need its outputs reset); the fixed per-shape rules keep first-call compile time to
one config per kernel variant.

float64 inputs are delegated to the `torch` backend (the kernels compute in fp32).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton  # noqa: F401  (fails here, so the registry reports the backend as unavailable)

from ..engine import STUDENT, Group, LinearGradSink, LogitsGradSink, Stats
from ..sources import LinearSource, LogitsSource
from .base import PassBackend
from .torch_chunked import TorchBackend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def stream_args(src) -> tuple:
    """The eight kernel arguments of a stream (see `kernels/tiles.py`)."""
    if isinstance(src, LogitsSource):
        x = src.logits
        return (x, x.stride(0), x.stride(1), x, 0, 0, x, 0)
    h, w, b = src.hidden, src.weight, src.bias
    return (h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), w if b is None else b, h.shape[1])


def _masks(sources) -> tuple:
    """(bias bit mask, upcast bit mask): bit j for stream j. A fused-linear stream multiplies in
    fp32 when its hidden states and weight differ in dtype, and under the interpreter when either
    is bf16: Triton 3.9's interpreter runs tl.dot on the raw uint16 bit patterns of bf16 operands.
    (bf16 × bf16 products are exact in fp32, so this changes no result, only the instruction.)"""
    def upcast(s) -> bool:
        dts = (s.hidden.dtype, s.weight.dtype)
        return dts[0] != dts[1] or (_interpreting() and torch.bfloat16 in dts)

    bias = sum(1 << j for j, s in enumerate(sources) if isinstance(s, LinearSource) and s.bias is not None)
    up = sum(1 << j for j, s in enumerate(sources) if isinstance(s, LinearSource) and upcast(s))
    return bias, up


@dataclass
class _Config:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


class TritonBackend(PassBackend):
    """Triton kernels; `None` knobs are chosen per shape (see the module docstring)."""

    name = "triton"

    def __init__(self, block_n: Optional[int] = None, block_v: Optional[int] = None, block_h: Optional[int] = None,
                 num_warps: Optional[int] = None, num_stages: Optional[int] = None, vocab_splits: Optional[int] = None,
                 allow_tf32: bool = False):
        for name, v in (("block_n", block_n), ("block_v", block_v), ("block_h", block_h)):
            if v is not None and (v < 16 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        self.block_n, self.block_v, self.block_h = block_n, block_v, block_h
        self.num_warps, self.num_stages, self.vocab_splits = num_warps, num_stages, vocab_splits
        self.dot_precision = "tf32" if allow_tf32 else "ieee"
        self._fallback = TorchBackend()

    # The kernel modules are imported at the first launch, not when the backend is built (as
    # backend="auto" does on any device): the kernels are decorated with the TRITON_INTERPRET
    # setting of that moment.
    @property
    def _stats(self):
        from ..kernels import stats
        return stats

    @property
    def _tail(self):
        from ..kernels import tail
        return tail

    @property
    def _sparse(self):
        from ..kernels import sparse
        return sparse

    @property
    def _div(self):
        from ..kernels import divergence
        return divergence

    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and _interpreting())

    def __repr__(self) -> str:
        return f"TritonBackend(block_n={self.block_n}, block_v={self.block_v}, block_h={self.block_h})"

    # -- entry points (float64 inputs: the torch backend) --------------------------------------------

    def dopd(self, student, teacher, priv, tokens, valid, cfg, thresholds, **kw):
        impl = self._fallback if student.dtype == torch.float64 else super()
        return impl.dopd(student, teacher, priv, tokens, valid, cfg, thresholds, **kw)

    def opd(self, student, teacher, tokens, valid, cfg, **kw):
        impl = self._fallback if student.dtype == torch.float64 else super()
        return impl.opd(student, teacher, tokens, valid, cfg, **kw)

    def token_logprobs(self, source, tokens, valid, **kw):
        impl = self._fallback if source.dtype == torch.float64 else super()
        return impl.token_logprobs(source, tokens, valid, **kw)

    # -- configuration -----------------------------------------------------------------------------

    def _config(self, source, n: int, k_pad: int = 0, rows: int = 64) -> _Config:
        """Blocks for a pass over `n` rows of `source`; `k_pad` > 0 when a running top-K is kept
        (then BLOCK_V = max(BLOCK_V, K_PAD): the stats kernel merges whole tiles into it); `rows`
        is BLOCK_N of a bf16/fp16 fused-linear pass without top-K. The CUDA defaults are the largest
        tiles that ptxas compiles without register spills for sm_90a (`tests/triton_sm90.py`)."""
        linear = isinstance(source, LinearSource)
        v = source.effective_vocab
        if _interpreting():
            bn = min(32, max(16, _pow2(n)))
            bv = min(256, max(16, _pow2(v)))
            bh = min(64, max(16, _pow2(source.hidden.shape[1]))) if linear else 16
            warps, stages = 4, 1
        elif linear:
            # IEEE fp32 tl.dot (fp32 or mixed-dtype operands) needs far more registers per tile than
            # bf16/fp16 on tensor cores. A running top-K of K_PAD int64 keys per row shares the
            # registers with the logit tile.
            fp32_dot = torch.float32 in (source.hidden.dtype, source.weight.dtype) \
                or source.hidden.dtype != source.weight.dtype
            if k_pad:
                bn, bv = 16, 128
                bh = 8 if fp32_dot else 4096 // max(k_pad, bv)
            else:
                bn, bv, bh = (64, 64, 8) if fp32_dot else (rows, 128, 32)
            warps, stages = 8, 3
        else:
            bn, bv, bh, stages = 8, (k_pad or 512), 16, 2
            warps = 4 if 0 < k_pad <= 128 else 8
        bn = self.block_n or bn
        bv = max(self.block_v or bv, k_pad)
        bh = self.block_h or bh
        return _Config(bn, bv, bh, self.num_warps or warps, self.num_stages or stages)

    def _launch(self, kernel, grid, cfg: _Config, *args, **constexprs):
        kernel[grid](*args, DOT_PRECISION=self.dot_precision, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                     BLOCK_H=cfg.block_h, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **constexprs)

    # -- passes ------------------------------------------------------------------------------------

    def sparse_rows(self, source, k: int) -> int:
        """Rows per chunk of `[rows, K, H]` weight gathers, for the engine's `LinearGradSink` (this
        backend contracts sparse gradients with `kernels.sparse` and never calls it)."""
        width = source.hidden.shape[1] if isinstance(source, LinearSource) else 1
        return max(1, (1 << 22) // max(1, k * width))

    def _sparse_block_h(self, source, k_pad: int) -> int:
        """H chunk of the sparse kernels: a `[K_PAD, BLOCK_H]` weight block of at most 4K elements
        (larger blocks spill registers on sm_90a with the default 4 warps)."""
        return self.block_h or max(16, min(_pow2(source.hidden.shape[1]), 4096 // k_pad, 128))

    def gather(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scaled logits at `cols` [n, K] of `rows`; fused-linear mode: K dot products per row in
        `kernels.sparse.gather_kernel`."""
        if isinstance(source, LogitsSource) or rows.shape[0] == 0:
            return source.gather(rows, cols)
        n, k = cols.shape
        out = torch.empty(n, k, dtype=torch.float32, device=rows.device)
        k_pad = _pow2(k)
        x, sx0, sx1, w, sw0, sw1, b, hdim = stream_args(source)
        self._sparse.gather_kernel[(n,)](rows.contiguous(), cols.contiguous(), k, out, x, sx0, sx1, w, sw0, sw1, b,
                                         hdim, source.effective_vocab, 1.0 / source.temperature,
                                         HAS_BIAS=source.bias is not None, K_PAD=k_pad,
                                         BLOCK_H=self._sparse_block_h(source, k_pad))
        return out

    def _add_sparse(self, sink, source, rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor) -> None:
        """Sparse gradient `g` [n, k] at `cols`: a scatter into the logit gradient, or in fused-linear
        mode contracted into dH / dW / db by `kernels.sparse.sparse_grad_kernel`."""
        if isinstance(sink, LogitsGradSink):
            sink.add_sparse(rows, cols, g)
            return
        n, k = cols.shape
        dummy = g = g.to(torch.float32).contiguous()
        dh, dw, db = sink.dh, sink.dw, sink.db
        k_pad = _pow2(k)
        x, sx0, sx1, w, sw0, sw1, _, hdim = stream_args(source)
        self._sparse.sparse_grad_kernel[(n,)](
            rows.contiguous(), cols.contiguous(), g, k, dummy if dh is None else dh, 0 if dh is None else dh.stride(0),
            dummy if dw is None else dw, 0 if dw is None else dw.stride(0), dummy if db is None else db,
            x, sx0, sx1, w, sw0, sw1, hdim, NEED_DH=dh is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
            K_PAD=k_pad, BLOCK_H=self._sparse_block_h(source, k_pad))

    def stats_pass(self, sources: Sequence, rows: torch.Tensor, tokens: torch.Tensor, topk_streams, top_k: int) -> Stats:
        student = sources[STUDENT]
        n, dev = rows.shape[0], rows.device
        vv = student.effective_vocab
        k = min(top_k, vv)
        order = sorted(topk_streams)
        k_pad = _pow2(k) if order else 0
        cfg = self._config(student, n, k_pad)
        lse = torch.empty(len(sources), n, dtype=torch.float32, device=dev)
        logit_y = torch.empty_like(lse)
        topk = torch.empty(len(order), n, k, dtype=torch.long, device=dev) if order else lse
        args = [stream_args(sources[min(j, len(sources) - 1)]) for j in range(3)]
        bias, upcast = _masks(sources)
        self._launch(self._stats.stats_kernel, (triton_cdiv(n, cfg.block_n),), cfg,
                     rows.contiguous(), tokens.contiguous(), n, lse, logit_y, topk, k, *args[0], *args[1], *args[2],
                     student.vocab, vv, 1.0 / student.temperature,
                     NUM_STREAMS=len(sources), LINEAR=isinstance(student, LinearSource), BIAS_MASK=bias,
                     UPCAST_MASK=upcast, TOPK_MASK=sum(1 << j for j in order), LOG_K=int(math.log2(cfg.block_v)))
        return Stats(list(lse.unbind(0)), list(logit_y.unbind(0)), {j: topk[i] for i, j in enumerate(order)})

    def rest_logsumexp(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """log Σ exp(scaled logit) over the valid columns of each row not in `cols` [n, k] (entries < 0
        ignored): the tail bucket, summed directly by `kernels.tail.tail_lse_kernel`."""
        n = rows.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=rows.device)
        if n == 0:
            return out
        cfg = self._config(source, n)
        bias, upcast = _masks((source,))
        self._launch(self._tail.tail_lse_kernel, (triton_cdiv(n, cfg.block_n),), cfg,
                     rows.contiguous(), n, cols.contiguous(), cols.shape[1], out, *stream_args(source),
                     source.vocab, source.effective_vocab, 1.0 / source.temperature,
                     LINEAR=isinstance(source, LinearSource), BIAS_MASK=bias, UPCAST_MASK=upcast)
        return out

    @staticmethod
    def _js_args(beta: float) -> tuple:
        """β, log β, log(1 − β) of the JS mixture (β ∈ (0, 1), validated by the configs)."""
        return (beta, math.log(beta), math.log1p(-beta))

    def full_value_pass(self, student, target, rows, lse_s, lse_t, kind: str, beta: float):
        n = rows.shape[0]
        cfg = self._config(student, n)
        value = torch.empty(n, dtype=torch.float32, device=rows.device)
        c = torch.empty_like(value)
        bias, upcast = _masks((student, target))
        self._launch(self._div.full_value_kernel, (triton_cdiv(n, cfg.block_n),), cfg,
                     rows.contiguous(), n, lse_s.float().contiguous(), lse_t.float().contiguous(), value, c,
                     *stream_args(student), *stream_args(target), student.vocab, student.effective_vocab,
                     1.0 / student.temperature, *self._js_args(beta),
                     KIND=self._div.KINDS[kind], LINEAR=isinstance(student, LinearSource), BIAS_MASK=bias,
                     UPCAST_MASK=upcast)
        return value.double(), c.double()

    def grad_pass(self, engine, g: Group, rows: torch.Tensor, scale: torch.Tensor, sink) -> None:
        """Gradient of one group's rows, scaled per row by `scale` (upstream · weight / τ)."""
        student, target = engine.student, engine.sources[g.target]
        lse_s, lse_t = engine.stats.lse[STUDENT][g.pos], engine.stats.lse[g.target][g.pos]
        term = g.term
        if term is not None and term.dense is None:  # renormalized top-K: only K logits move
            self._add_sparse(sink, student, rows, term.cols, (term.sparse * scale[:, None]).to(student.dtype))
            return
        kind = self._div.DENSE if term is not None else self._div.KINDS[g.divergence]
        coef = term.dense if term is not None else g.full_c
        explicit = None if term is None else term.explicit
        logits = isinstance(sink, LogitsGradSink)
        in_kernel = explicit is not None and not logits
        self._grad_tiles(student, target, rows, lse_s, lse_t, coef, scale, kind, engine.settings.js_beta, sink,
                         (term.cols, explicit) if in_kernel else None)
        if term is None or in_kernel:
            return
        if explicit is not None:
            # Logits mode: the explicit columns get their whole gradient in one O(n·k) write over the
            # kernel's p·dense there (a row's explicit columns are distinct).
            # Columns marked -1 belong to another vocabulary shard.
            mine = term.cols >= 0
            sink.grad[rows[:, None].expand_as(term.cols)[mine], term.cols[mine]] = \
                (explicit * scale[:, None])[mine].to(sink.grad.dtype)
        else:  # sampled reverse KL: d·(δ_vy − p_v), the sparse d at y added to p·dense (no cancellation)
            self._add_sparse(sink, student, rows, term.cols, (term.sparse * scale[:, None]).to(student.dtype))

    def _grad_tiles(self, student, target, rows, lse_s, lse_t, coef, scale, kind: int, beta: float, sink,
                    explicit=None) -> None:
        """Launch `grad_kernel`; `explicit` = (cols [n, k], whole gradient [n, k] before `scale`) or None."""
        n = rows.shape[0]
        # The full reverse-KL bf16 gradient tile spills at 64 fused-linear rows on sm_90a (ptxas).
        cfg = self._config(student, n, rows=32 if kind == self._div.REVERSE_KL else 64)
        linear = isinstance(student, LinearSource)
        vv = student.effective_vocab
        row_blocks, vocab_tiles = triton_cdiv(n, cfg.block_n), triton_cdiv(vv, cfg.block_v)
        f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
        dummy = scale
        if linear:
            assert isinstance(sink, LinearGradSink)
            splits = self.vocab_splits or self._vocab_splits(rows.device, row_blocks, vocab_tiles)
            per_program = triton_cdiv(vocab_tiles, min(splits, vocab_tiles))
            grid = (row_blocks, triton_cdiv(vocab_tiles, per_program))
            dh, dw, db = sink.dh, sink.dw, sink.db
            outs = (dummy, 0, 0, dummy if dh is None else dh, 0 if dh is None else dh.stride(0),
                    dummy if dw is None else dw, 0 if dw is None else dw.stride(0), dummy if db is None else db)
            needs = dict(NEED_DH=dh is not None, NEED_DW=dw is not None, NEED_DB=db is not None)
        else:
            per_program, grid = 1, (row_blocks, vocab_tiles)
            gr = sink.grad
            outs = (gr, gr.stride(0), gr.stride(1), dummy, 0, dummy, 0, dummy)
            needs = dict(NEED_DH=False, NEED_DW=False, NEED_DB=False)
        bias, upcast = _masks((student, target))
        ex = (dummy, dummy, 0) if explicit is None else (explicit[0].contiguous(), f32(explicit[1]), explicit[0].shape[1])
        self._launch(self._div.grad_kernel, grid, cfg,
                     rows.contiguous(), n, f32(lse_s), f32(lse_t), f32(coef), f32(scale), *ex, *outs,
                     *stream_args(student), *stream_args(target), student.vocab, vv, 1.0 / student.temperature,
                     *self._js_args(beta), per_program,
                     KIND=kind, EXPLICIT=explicit is not None, LINEAR=linear, BIAS_MASK=bias, UPCAST_MASK=upcast,
                     **needs)

    @staticmethod
    def _vocab_splits(device: torch.device, row_blocks: int, vocab_tiles: int) -> int:
        """Vocabulary splits of the fused-linear gradient grid: ~4 programs per SM on a GPU (each
        split adds one atomic contribution per dH element); 2 under the interpreter so the split
        path is exercised."""
        if device.type == "cuda":
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            return max(1, min(vocab_tiles, triton_cdiv(target, row_blocks)))
        return 2


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
