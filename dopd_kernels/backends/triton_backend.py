"""The `triton` backend: the passes of `passes.Passes` as Triton kernels (`dopd_kernels/kernels/`).

Flow (DESIGN.md section 4; the O(N) and O(N·K) steps are shared with every backend):

1. stats pass — `kernels.stats.stats_kernel`, one launch for all streams: the row max and
   log Σ exp(z − max) (added here in float64 into `Stats.lse`), sampled logit and the running top-K
   of the valid rows.
2. routing / planning — `plan.py` on the `[N]` statistics (float64, O(N)).
3. values — full-vocabulary rows (DOPD's HT rows, full OPD) are compacted to their row ids and run
   through `kernels.divergence.full_value_kernel`; full-vocabulary reverse / forward KL OPD runs no
   stats pass: `kernels.divergence.kl_online_kernel` computes the log-sum-exps with the KL in one
   sweep (`full_pass`); top-K and sampled rows use `[n, K]` gathers and
   `row_terms.py`. The fp32 kernels receive each float64 log-sum-exp as `passes.split_lse`'s
   (hi, lo) pair and form log p = (z − hi) − lo.
4. backward — `kernels.divergence.grad_kernel` forms the gradient tiles of full rows (and the dense
   `p·dense` part of sampled / tail-bucket rows); in logits mode it stores them into the student
   gradient (the only `[N, V]` tensor), in fused-linear mode it contracts them into dH / dW / db
   inside the kernel. Sparse top-K coefficients are scattered on `[n, K]`.

Output-head transforms (fused-linear, per stream: `LinearSource.scale` and `.softcap`) are applied
in the tile epilogue of every kernel that forms logits (after the bias, before 1/τ), selected by a
constexpr code per stream so the untransformed kernels are unchanged; the gradient tiles are
multiplied by the jacobian `scale·(1 − u²)` before they are contracted.

Memory: logits mode reads the logits in their dtype (bf16/fp16/fp32) and allocates no fp32 copy;
fused-linear mode allocates `[n]` statistics, `[n, K]` top-K columns and logits, and the fp32
dH/dW/db accumulators (dW only when the student's weight requires grad) — never a tensor with a
vocabulary axis per token (`kernels/sparse.py` computes the K logits of a row and contracts its
sparse gradient without `[rows, K, H]` gathers). With several vocabulary splits, dH goes through a
`[splits, n, H]` scratch bounded by ~4·SMs·BLOCK_N·H floats (`kernels/divergence.py`).

Determinism: `TritonBackend(deterministic=True)`, or `torch.use_deterministic_algorithms(True)`,
avoids every float atomic: dW / db of full-vocabulary rows come from `grad_dw_kernel` (vocabulary-
major, one writer per dW row; it recomputes the gradient tiles: one more projection per stream the
gradient reads, i.e. full JS costs 6 GEMMs instead of 4), and the sparse top-K dW / db from
`sparse_dw_kernel` (entries stably sorted by column, one program per column; an O(n·K) sort). dH
never uses atomics. Without it, dW / db use relaxed fp32 atomics and their last bits vary by run.

Tile rules (`_config`). CUDA defaults are the largest tiles that Triton's compiler and ptxas build
for sm_90a without register spills, checked by compiling every kernel variant ahead of time without
a GPU (`tests/triton_sm90.py`); they have not yet been timed on a GPU. Invariants, whatever the
shape or K:
  * every tl.dot has M, N, K ≥ 16 (Triton 3.6 rejects smaller K, fp32 operands included): in
    fused-linear tiles BLOCK_N, BLOCK_V, BLOCK_H ≥ 16 (the logits-mode and sparse kernels have
    no tl.dot);
  * a running top-K keeps K_PAD = BLOCK_V ≥ next power of two ≥ K entries per row in registers;
    one stats launch keeps running top-Ks whose K_PADs sum to at most MAX_TOPK = 256 (128 with
    fp32-operand fused-linear tiles: `_topk_width`). Measured on sm_90a: bf16 1 × 256 and 2 × 128
    fit, 2 × 256 spills 0.8 KB; logits 2 × 128 fits with 8 warps, 2 × 256 spills; fp32 1 × 128
    fits with num_stages = 1, 2 × 128 and 1 × 256 spill. A second top-K stream that does not fit
    (DOPD with topk_from="target") gets a stats launch of its own (its logits once more); a call
    whose single top-K (after clamping to the valid vocabulary) exceeds the budget runs on the
    `torch` backend (vocabulary-chunked, any K);
  * logits-mode tiles are at least 128 columns wide (a top-K of 1 no longer means 1-column tiles).
Defaults:
  * fused-linear bf16/fp16: BLOCK_N = 64 rows (32 in the gradient kernels, which spill at 64 once
    dH is accumulated in place or a soft-cap is applied), BLOCK_V = 128 (64 in `grad_dw_kernel`,
    which spills 36 B at 128 with soft-capped heads),
    BLOCK_H = 32, num_warps = 8, num_stages = 3 — tiles feed wgmma with fp32 accumulators. With a
    running top-K: BLOCK_N = 16, BLOCK_V = max(128, K_PAD) and BLOCK_H = max(16, 4096 / BLOCK_V)
    (32 for K ≤ 128, 16 for K = 256), 16 with two running top-Ks;
  * fused-linear with fp32 operands (IEEE `tl.dot`, no tensor cores): BLOCK_V = 64, BLOCK_H = 16,
    BLOCK_N = 32 in the stats pass (num_stages = 2), 64 in the tail pass, 16 in the value pass, 32 in
    `grad_kernel`, 16 in `grad_dw_kernel` (num_stages = 3); with a top-K 16 × 128 × 16, 1 stage.
    The value pass, `grad_kernel` of few-column terms and `grad_dw_kernel` launch with
    `maxnreg = 255`: at 8 warps ptxas capped them at 128 registers under some Triton versions and
    spilled, and no warps / stages / BLOCK_V choice compiled every variant without spills under 3.4,
    3.6 and 3.9 (`tests/triton_matrix.py`);
  * logits mode (memory bound): BLOCK_N = 8, BLOCK_V = 512 (256 in the tail pass, which spills at
    512; max(128, K_PAD) with a top-K, and BLOCK_N = 4 once the running top-Ks' K_PADs sum to 256),
    num_warps = 8 (4 with one running top-K: at K_PAD 256 8 warps spilled under Triton 3.9); the tail
    pass with `maxnreg = 128` and the stats pass without a top-K with 255 (ptxas capped them at 64 and
    128 registers under 3.7.1 / 3.8.0 and spilled);
  * sparse top-K kernels (one program per row, no tl.dot): a `[K_PAD, BLOCK_H]` weight block of
    at most 4K elements; `gather_kernel` with 8 warps at K_PAD = 256 (4 spilled), else 4;
  * the fused-linear gradient grid splits the vocabulary so that about 4 programs per SM exist.
Under the interpreter (`TRITON_INTERPRET=1`, CPU tensors) the blocks are as large as the shapes
allow (at most 32 × 256 × 64) and num_warps/num_stages are ignored; `TritonBackend(cuda_tiles=True)`
takes the CUDA defaults there too, so that interpreter tests run block boundaries and masking at
the exact tiles a GPU runs (slow in the interpreter: tests keep such shapes tiny). On CUDA the option
changes nothing. Every knob can be fixed through the constructor.
`triton.autotune` is not used: its first-call benchmarking would multiply compile time for every
new (N, V, H), it cannot run in the interpreter, and the gradient kernels accumulate in place
(each trial would need its outputs reset); the fixed per-shape rules keep first-call compile time to
one config per kernel variant.

Every launch runs under `torch.cuda.device(<the inputs' device>)`: Triton launches on the current
device and its stream, which need not be the inputs'.

float64 inputs are delegated to the `torch` backend (the kernels compute in fp32).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton  # noqa: F401  (fails here, so the registry reports the backend as unavailable)

from .. import gradients
from ..passes import STUDENT, FullRows, Grads, Stats, split_lse
from ..row_terms import RowTerm
from ..sources import LinearSource, LogitsSource
from .base import PassBackend
from .torch_chunked import TorchBackend

MAX_TOPK = 256  # largest top-K the kernels keep in registers (module docstring)
MAX_REGISTERS = 255  # registers per thread a tile may take when ptxas's own cap would spill (module docstring)
MIN_LOGITS_BLOCK_V = 128  # narrowest logits-mode tile, whatever K is


def _topk_block(k_pad: int) -> int:
    """BLOCK_V of a stats launch that keeps running top-Ks of K_PAD: the kernel keeps BLOCK_V keys
    per row and top-K stream (it merges whole tiles into them), never fewer than 128."""
    return max(MIN_LOGITS_BLOCK_V, k_pad)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def device_guard(device: torch.device):
    """Context that makes `device` current for a launch (Triton launches on the current CUDA device
    and its current stream); nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def head_code(src) -> int:
    """`kernels.tiles` HEAD code of a stream: 0 none, 1 multiplier only, 2 soft-cap (multiplier folded in)."""
    if not isinstance(src, LinearSource):
        return 0
    return 2 if src.softcap is not None else int(src.scale != 1.0)


def stream_args(src) -> tuple:
    """The ten kernel arguments of a stream (see `kernels/tiles.py`): its tensors and strides, and
    the head transform's runtime scalars (a, c): (scale, 1) or, with a soft-cap c, (scale / c, c).
    The kernels read a bias [V] at unit stride: a strided one is made contiguous here ([V] values, a
    copy only when it is strided)."""
    if isinstance(src, LogitsSource):
        x = src.logits
        return (x, x.stride(0), x.stride(1), x, 0, 0, x, 0, 1.0, 1.0)
    h, w, b = src.hidden, src.weight, src.bias
    cap = src.softcap
    a, c = (float(src.scale), 1.0) if cap is None else (float(src.scale) / cap, float(cap))
    return (h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), w if b is None else b.contiguous(), h.shape[1],
            a, c)


def _bound(src) -> int:
    """The kernels' `vocab` argument: the columns they may read or write. A fused-linear stream's rows at
    or past `valid_vocab` are never read (a checkpoint's padding rows may hold NaN, and a masked logit
    still enters dH = G·W as 0 · W), so its dW / db keep their zeros there. Logits mode stores the
    padding columns' zero gradients too, so the whole row is in bounds."""
    return src.effective_vocab if isinstance(src, LinearSource) else src.vocab


def _masks(sources) -> tuple:
    """(bias, upcast, head) bit masks: bit j (head: bits 2j..2j+1) for stream j. A fused-linear
    stream multiplies in fp32 when its hidden states and weight differ in dtype, and under the
    interpreter when either is bf16: Triton 3.9's interpreter runs tl.dot on the raw uint16 bit
    patterns of bf16 operands. (bf16 × bf16 products are exact in fp32, so this changes no result,
    only the instruction.)"""
    def upcast(s) -> bool:
        dts = (s.hidden.dtype, s.weight.dtype)
        return dts[0] != dts[1] or (_interpreting() and torch.bfloat16 in dts)

    bias = sum(1 << j for j, s in enumerate(sources) if isinstance(s, LinearSource) and s.bias is not None)
    up = sum(1 << j for j, s in enumerate(sources) if isinstance(s, LinearSource) and upcast(s))
    head = sum(head_code(s) << (2 * j) for j, s in enumerate(sources))
    return bias, up, head


def _lse64(hi_max: torch.Tensor, logsum: torch.Tensor) -> torch.Tensor:
    """float64 log-sum-exp from the kernels' fp32 (row max, log Σ exp(z − max)); -inf for empty rows."""
    return hi_max.double() + logsum.double()


@dataclass
class _Config:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None  # ptxas `.maxnreg` (Triton's `maxnreg`); None: ptxas chooses


class TritonBackend(PassBackend):
    """Triton kernels; `None` knobs are chosen per shape (see the module docstring).
    `deterministic=True` (or torch's global deterministic flag) avoids float atomics at some cost.
    `cuda_tiles=True` chooses the CUDA default tiles under the interpreter too (tests; no effect on CUDA)."""

    name = "triton"

    def __init__(self, block_n: Optional[int] = None, block_v: Optional[int] = None, block_h: Optional[int] = None,
                 num_warps: Optional[int] = None, num_stages: Optional[int] = None, vocab_splits: Optional[int] = None,
                 allow_tf32: bool = False, deterministic: bool = False, cuda_tiles: bool = False):
        for name, v in (("block_n", block_n), ("block_v", block_v), ("block_h", block_h)):
            if v is not None and (v < 16 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        self.block_n, self.block_v, self.block_h = block_n, block_v, block_h
        self.num_warps, self.num_stages, self.vocab_splits = num_warps, num_stages, vocab_splits
        self.dot_precision = "tf32" if allow_tf32 else "ieee"
        self.deterministic = deterministic
        self.cuda_tiles = cuda_tiles
        self._fallback = TorchBackend()

    @property
    def _deterministic(self) -> bool:
        return self.deterministic or torch.are_deterministic_algorithms_enabled()

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
        tiles = ", cuda_tiles=True" if self.cuda_tiles else ""
        return (f"TritonBackend(block_n={self.block_n}, block_v={self.block_v}, block_h={self.block_h}, "
                f"deterministic={self.deterministic}{tiles})")

    # -- delegation (float64 inputs and top-K > MAX_TOPK: the torch backend) -------------------------

    def select(self, sources: Sequence, top_k: int):
        """This backend, or the torch one for float64 inputs and for a top-K the kernels cannot keep."""
        student = sources[0]
        if student.dtype == torch.float64 or _pow2(min(top_k, student.effective_vocab)) > self._topk_width(sources):
            return self._fallback
        return self

    # -- configuration -----------------------------------------------------------------------------

    @staticmethod
    def _fp32_dot(sources: Sequence) -> bool:
        """Whether some fused-linear stream's tiles multiply as IEEE fp32 (fp32 or mixed-dtype
        operands): no tensor cores, and far more registers per tile than bf16/fp16."""
        def fp32(s) -> bool:
            dts = (s.hidden.dtype, s.weight.dtype)
            return torch.float32 in dts or dts[0] != dts[1]
        return any(isinstance(s, LinearSource) and fp32(s) for s in sources)

    def _topk_width(self, sources: Sequence) -> int:
        """Register budget of one stats launch over `sources` for running top-Ks: the sum of their
        K_PAD (module docstring). Above it the top-K streams run in separate launches; a single
        stream above it runs on the torch backend."""
        return MAX_TOPK // 2 if self._fp32_dot(sources) else MAX_TOPK

    def _config(self, sources: Sequence, n: int, k_pad: int = 0, role: str = "stats", n_topk: int = 1) -> _Config:
        """Blocks for a pass over `n` rows of `sources` (the student, or the stream alone, first):
        `role` is "stats", "tail", "value", "grad", "grad_term" (`grad_kernel` of a few-column term's
        dense part) or "grad_dw" (gradient tiles hold more live values); `k_pad` > 0 when
        `n_topk` running top-Ks are kept (then BLOCK_V = max(BLOCK_V, K_PAD): the stats kernel merges
        whole tiles into them). The rules are the module docstring's; the CUDA defaults are the
        largest tiles that ptxas compiles without register spills for sm_90a (`tests/triton_sm90.py`);
        under the interpreter, unless `cuda_tiles`, small tiles that fit the shape."""
        source = sources[0]
        linear = isinstance(source, LinearSource)
        v = source.effective_vocab
        max_registers = None
        if _interpreting() and not self.cuda_tiles:
            bn = min(32, max(16, _pow2(n)))
            bv = min(256, max(16, _pow2(v)))
            bh = min(64, max(16, _pow2(source.hidden.shape[1]))) if linear else 16
            warps, stages = 4, 1
        elif linear:
            # A running top-K of K_PAD int64 keys per row shares the registers with the logit tile;
            # tl.dot needs BLOCK_N, BLOCK_V, BLOCK_H ≥ 16.
            fp32_dot = self._fp32_dot(sources)
            warps, stages = 8, 3
            if k_pad:
                bn, bv = 16, _topk_block(k_pad)
                # Two running top-Ks (K_PAD 128 each) at BLOCK_H 32 spilled 176-284 B under Triton 3.7.1.
                bh = 16 if fp32_dot or n_topk > 1 else max(16, 4096 // bv)
                stages = 1 if fp32_dot else 3  # fp32 spills with its loads pipelined
            elif fp32_dot:
                # IEEE fp32 tiles (FMA units, no wgmma): ptxas allocates them erratically across
                # Triton versions, so each role takes the setting that compiled without spills on
                # sm_90a under 3.4.0, 3.6.0 and 3.9.0: stats 32 rows, 2 stages (64 rows spilled 20 B
                # under 3.6 at 3 stages, 12 B under 3.4 at 1; 32 rows at 1 stage spilled 8 B under 3.9
                # with two streams); tail 64 rows, 3 stages (1 stage spilled 32 B under 3.4); value
                # 16 rows, gradients 32 rows (grad_dw 16), 3 stages. With 8 warps ptxas capped the
                # value tile, grad_kernel's few-column-term tile and grad_dw at 128 registers under
                # some versions and spilled 4-32 B (no warps / stages / block choice fitted all
                # three versions): those launch with `.maxnreg 255` (255 × 256 threads fit the SM's
                # 64K registers). Not the other gradient tiles: there 255 spilled under 3.4 and 3.6
                # where ptxas's own choice fits.
                bn = {"tail": 64, "value": 16, "grad_dw": 16}.get(role, 32)
                bv, bh = 64, 16
                stages = 2 if role == "stats" else 3
                if role in ("value", "grad_term", "grad_dw"):
                    max_registers = MAX_REGISTERS
            else:
                bn = 32 if role in ("grad", "grad_term", "grad_dw") else 64
                bv, bh = (64 if role == "grad_dw" else 128), 32
        else:
            # The running top-Ks are BLOCK_V keys wide each (the kernel's K_PAD), not K_PAD: two top-Ks of
            # K = 16 hold 2 × 128 keys per row, and 8 rows of them spilled on sm_90a.
            keys = _topk_block(k_pad) * n_topk if k_pad else 0
            bn, bh, stages = (4 if keys >= 256 else 8), 16, 2
            bv = _topk_block(k_pad) if k_pad else (256 if role == "tail" else 512)
            # One running top-K: 4 warps (8 spilled at K_PAD 256 under Triton 3.9, ptxas stopping at 128
            # registers); two (K_PAD 128 each) fit only with 8.
            warps = 4 if k_pad and n_topk == 1 else 8
            if role == "tail":  # ptxas capped it at 64 registers under Triton 3.7.1 and spilled 8 B
                max_registers = 128
            elif role == "stats" and not k_pad:  # capped at 128 under 3.8.0, spilled 28 B
                max_registers = MAX_REGISTERS
        bn = self.block_n or bn
        bv = max(self.block_v or bv, k_pad)
        bh = self.block_h or bh
        return _Config(bn, bv, bh, self.num_warps or warps, self.num_stages or stages, max_registers)

    @staticmethod
    def _run(kernel, grid, device: torch.device, *args, **kw) -> None:
        """Every launch: on the inputs' device (`device_guard`)."""
        with device_guard(device):
            kernel[grid](*args, **kw)

    def _launch(self, kernel, grid, cfg: _Config, device: torch.device, *args, **constexprs):
        registers = {} if cfg.max_registers is None else {"maxnreg": cfg.max_registers}
        self._run(kernel, grid, device, *args, DOT_PRECISION=self.dot_precision, BLOCK_N=cfg.block_n,
                  BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  **registers, **constexprs)

    # -- passes ------------------------------------------------------------------------------------

    def tile_shape(self) -> tuple:
        """Tiles of the PyTorch defaults this backend uses (logits-mode sparse scatters only)."""
        return 1024, 4096

    def _sparse_block_h(self, source, k_pad: int) -> int:
        """H chunk of the sparse kernels: a `[K_PAD, BLOCK_H]` weight block of at most 4K elements
        (larger blocks spill registers on sm_90a with the default 4 warps)."""
        return self.block_h or max(16, min(_pow2(source.hidden.shape[1]), 4096 // k_pad, 128))

    @staticmethod
    def _gather_warps(k_pad: int) -> int:
        """num_warps of `gather_kernel`: 8 at K_PAD = 256 (Triton's default 4 spilled 8–20 B there under
        3.4 and 3.6, ptxas stopping at 64 registers; 8 warps use 32), else 4."""
        return 8 if k_pad >= MAX_TOPK else 4

    def _gather(self, source, rows: torch.Tensor, cols: torch.Tensor, want_jac: bool = False) -> tuple:
        """(scaled logits at `cols` [n, K] of `rows`, head jacobian there or None): K dot products
        per row in `kernels.sparse.gather_kernel`."""
        n, k = cols.shape
        out = torch.empty(n, k, dtype=torch.float32, device=rows.device)
        jac = torch.empty_like(out) if want_jac else out
        k_pad = _pow2(k)
        x, sx0, sx1, w, sw0, sw1, b, hdim, a, c = stream_args(source)
        self._run(self._sparse.gather_kernel, (n,), rows.device, rows.contiguous(), cols.contiguous(), k, out, jac,
                  x, sx0, sx1, w, sw0, sw1, b, hdim, a, c, source.effective_vocab, 1.0 / source.temperature,
                  HAS_BIAS=source.bias is not None, HEAD=head_code(source), WANT_JAC=want_jac, K_PAD=k_pad,
                  BLOCK_H=self._sparse_block_h(source, k_pad), num_warps=self._gather_warps(k_pad))
        return out, (jac if want_jac else None)

    def gather(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scaled logits at `cols` [n, K] of `rows`; fused-linear mode: `kernels.sparse.gather_kernel`."""
        if isinstance(source, LogitsSource) or rows.shape[0] == 0:
            return source.gather(rows, cols)
        return self._gather(source, rows, cols)[0]

    def _add_sparse(self, grads: Grads, source, rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor) -> None:
        """Sparse gradient `g` [n, k] (with respect to the final logits) at `cols`: a scatter into the
        logit gradient, or in fused-linear mode, times the head jacobian, contracted into dH / dW /
        db by `kernels.sparse` (dW / db by `sparse_dw_kernel` when deterministic)."""
        if grads.logits is not None:
            gradients.add_sparse(grads, source, rows, cols, g, rows.shape[0])
            return
        n, k = cols.shape
        if n == 0:
            return
        rows, cols = rows.contiguous(), cols.contiguous()
        g = g.to(torch.float32)
        if head_code(source):
            g = g * self._gather(source, rows, cols, want_jac=True)[1]
        dummy = g = g.contiguous()
        dh, dw, db = grads.dh, grads.dw, grads.db
        det = self._deterministic
        k_pad = _pow2(k)
        block_h = self._sparse_block_h(source, k_pad)
        x, sx0, sx1, w, sw0, sw1, _, hdim, _, _ = stream_args(source)
        atomic_dw, atomic_db = dw is not None and not det, db is not None and not det
        self._run(self._sparse.sparse_grad_kernel, (n,), rows.device,
                  rows, cols, g, k, dummy if dh is None else dh, 0 if dh is None else dh.stride(0),
                  dw if atomic_dw else dummy, dw.stride(0) if atomic_dw else 0, db if atomic_db else dummy,
                  x, sx0, sx1, w, sw0, sw1, hdim, NEED_DH=dh is not None, NEED_DW=atomic_dw, NEED_DB=atomic_db,
                  K_PAD=k_pad, BLOCK_H=block_h)
        if det and (dw is not None or db is not None):
            # Entries stably sorted by column: one program per distinct column sums them in order.
            flat = cols.reshape(-1)
            order = torch.sort(flat, stable=True).indices
            counts = torch.unique_consecutive(flat[order], return_counts=True)[1]
            seg = torch.zeros(counts.shape[0] + 1, dtype=torch.long, device=rows.device)
            torch.cumsum(counts, 0, out=seg[1:])
            self._run(self._sparse.sparse_dw_kernel, (counts.shape[0],), rows.device,
                      order, seg, rows, cols, g, k, dummy if dw is None else dw, 0 if dw is None else dw.stride(0),
                      dummy if db is None else db, x, sx0, sx1, hdim, NEED_DW=dw is not None, NEED_DB=db is not None,
                      BLOCK_E=16, BLOCK_H=block_h)

    def stats_pass(self, sources: Sequence, rows: torch.Tensor, tokens: torch.Tensor, topk_streams, top_k: int,
                   rest_streams: Sequence[int] = (), share_streams: Sequence[int] = ()) -> Stats:
        """One launch for every stream, keeping as many running top-Ks as `_topk_width` allows, and the
        tail buckets of `rest_streams` in the same sweep; each further top-K stream gets a launch of its
        own (its logits are computed once more). No tile shares: `full_pass` skips no tile."""
        student = sources[STUDENT]
        n, dev = rows.shape[0], rows.device
        k = min(top_k, student.effective_vocab)
        order = sorted(topk_streams)
        k_pad = _pow2(k) if order else 0
        fit = max(1, self._topk_width(sources) // _topk_block(k_pad)) if order else 0
        hi = torch.empty(len(sources), n, dtype=torch.float32, device=dev)
        logsum, logit_y = torch.empty_like(hi), torch.empty_like(hi)
        tail = torch.empty(2, *hi.shape, dtype=hi.dtype, device=dev) if rest_streams else (None, None)
        topk = torch.empty(len(order), n, k, dtype=torch.long, device=dev) if order else hi
        self._stats_launch(sources, rows, tokens, order[:fit], k, hi, logsum, logit_y, topk[:fit] if order else hi,
                           rest_streams, *tail)
        for i, j in enumerate(order[fit:], start=fit):
            scratch = torch.empty(3, 1, n, dtype=torch.float32, device=dev)
            self._stats_launch([sources[j]], rows, tokens, [0], k, *scratch, topk[i:i + 1])
        lse = _lse64(hi, logsum)
        rest = {j: _lse64(tail[0, j], tail[1, j]) for j in rest_streams}
        return Stats(list(lse.unbind(0)), list(logit_y.unbind(0)), {j: topk[i] for i, j in enumerate(order)}, rest)

    def _stats_launch(self, sources: Sequence, rows: torch.Tensor, tokens: torch.Tensor, topk_streams, k: int,
                      hi, logsum, logit_y, topk, tail_streams: Sequence[int] = (), tail_hi=None, tail_logsum=None) -> None:
        """`stats_kernel` over `sources` (1–3), with running top-Ks of the streams `topk_streams`
        (positions in `sources`) written to `topk` [len(topk_streams), n, k] and the tail buckets of
        `tail_streams` to `tail_hi`, `tail_logsum` [len(sources), n]."""
        student = sources[0]
        n = rows.shape[0]
        k_pad = _pow2(k) if topk_streams else 0
        cfg = self._config(sources, n, k_pad, n_topk=len(topk_streams))
        args = [stream_args(sources[min(j, len(sources) - 1)]) for j in range(3)]
        bias, upcast, head = _masks(sources)
        self._launch(self._stats.stats_kernel, (triton_cdiv(n, cfg.block_n),), cfg, rows.device,
                     rows.contiguous(), tokens.contiguous(), n, hi, logsum, logit_y, topk, k,
                     hi if tail_hi is None else tail_hi, logsum if tail_logsum is None else tail_logsum,
                     *args[0], *args[1], *args[2], _bound(student), student.effective_vocab, 1.0 / student.temperature,
                     NUM_STREAMS=len(sources), LINEAR=isinstance(student, LinearSource), BIAS_MASK=bias,
                     UPCAST_MASK=upcast, HEAD_MASK=head, TOPK_MASK=sum(1 << j for j in topk_streams),
                     TAIL_MASK=sum(1 << j for j in tail_streams), LOG_K=int(math.log2(cfg.block_v)))

    def rest_logsumexp(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """log Σ exp(scaled logit) over the valid columns of each row not in `cols` [n, k] (entries < 0
        ignored): the tail bucket, summed directly by `kernels.tail.tail_lse_kernel`; float64 [n]
        (the kernel's row max plus log of the rescaled sum, like `Stats.lse`)."""
        n = rows.shape[0]
        if n == 0:
            return torch.empty(0, dtype=torch.float64, device=rows.device)
        hi = torch.empty(n, dtype=torch.float32, device=rows.device)
        logsum = torch.empty_like(hi)
        cfg = self._config((source,), n, role="tail")
        bias, upcast, head = _masks((source,))
        self._launch(self._tail.tail_lse_kernel, (triton_cdiv(n, cfg.block_n),), cfg, rows.device,
                     rows.contiguous(), n, cols.contiguous(), cols.shape[1], hi, logsum, *stream_args(source),
                     _bound(source), source.effective_vocab, 1.0 / source.temperature,
                     LINEAR=isinstance(source, LinearSource), BIAS_MASK=bias, UPCAST_MASK=upcast, HEAD_MASK=head)
        return _lse64(hi, logsum)

    @staticmethod
    def _js_args(beta: float) -> tuple:
        """β, log β, log(1 − β) of the JS mixture (β ∈ (0, 1), validated by the configs)."""
        return (beta, math.log(beta), math.log1p(-beta))

    @staticmethod
    def _lse_args(lse_s: torch.Tensor, lse_t: torch.Tensor) -> tuple:
        """(hi, lo) fp32 pairs of the student's and the target's float64 log-sum-exps."""
        return tuple(t.contiguous() for lse in (lse_s, lse_t) for t in split_lse(lse.double(), torch.float32))

    def full_pass(self, student, target, rows, lse_s, lse_t, kind: str, beta: float, scale, grads,
                  plan_skips: bool = False, tile_shares=None) -> FullRows:
        """`passes.Passes.full_pass`: reverse / forward KL rows whose log-sum-exps are not given (full-
        vocabulary OPD) compute them with the value in one sweep (`kl_online_kernel`), then the gradient
        sweep: 6 projections per fused-linear row instead of 8. JS (its log-mixture needs both
        log-sum-exps first) and rows with given log-sum-exps (DOPD's HT rows, a vocabulary shard) take the
        separate sweeps (`PassBackend.full_pass`). No whole tile is skipped: `plan_skips` plans none."""
        if lse_s is not None or kind == "js":
            return super().full_pass(student, target, rows, lse_s, lse_t, kind, beta, scale, grads)
        n = rows.shape[0]
        parts = torch.empty(4, n, dtype=torch.float32, device=rows.device)  # max, log-sum of s and t
        mean = torch.empty(n, dtype=torch.float64, device=rows.device)  # K = E_a[a − b]
        cfg = self._config((student, target), n, role="value")
        bias, upcast, head = _masks((student, target))
        self._launch(self._div.kl_online_kernel, (triton_cdiv(n, cfg.block_n),), cfg, rows.device,
                     rows.contiguous(), n, *parts.unbind(0), mean, *stream_args(student), *stream_args(target),
                     _bound(student), student.effective_vocab, 1.0 / student.temperature,
                     KIND=self._div.KINDS[kind], LINEAR=isinstance(student, LinearSource), BIAS_MASK=bias,
                     UPCAST_MASK=upcast, HEAD_MASK=head)
        lse_s, lse_t = _lse64(parts[0], parts[1]), _lse64(parts[2], parts[3])
        # KL = K − lse_a + lse_b, a the weighting stream, in float64.
        value = mean - lse_s + lse_t if kind == "reverse_kl" else mean - lse_t + lse_s
        c = value if kind == "reverse_kl" else torch.zeros_like(value)
        if scale is not None:
            self.full_grad_pass(student, target, rows, lse_s, lse_t, c, kind, beta, scale, grads)
        return FullRows(lse_s, lse_t, value, c)

    def full_value_pass(self, student, target, rows, lse_s, lse_t, kind: str, beta: float):
        n = rows.shape[0]
        cfg = self._config((student, target), n, role="value")
        value = torch.empty(n, dtype=torch.float32, device=rows.device)
        c = torch.empty_like(value)
        bias, upcast, head = _masks((student, target))
        self._launch(self._div.full_value_kernel, (triton_cdiv(n, cfg.block_n),), cfg, rows.device,
                     rows.contiguous(), n, *self._lse_args(lse_s, lse_t), value, c,
                     *stream_args(student), *stream_args(target), _bound(student), student.effective_vocab,
                     1.0 / student.temperature, *self._js_args(beta),
                     KIND=self._div.KINDS[kind], LINEAR=isinstance(student, LinearSource), BIAS_MASK=bias,
                     UPCAST_MASK=upcast, HEAD_MASK=head)
        return value.double(), c.double()

    def full_grad_pass(self, student, target, rows, lse_s, lse_t, c, kind: str, beta: float, scale: torch.Tensor,
                       grads: Grads, tile_skips=None) -> None:
        """Gradient of full-vocabulary rows, scaled per row by `scale` (upstream · weight / τ). Reverse KL's
        kernel constant is K = c + lse_s − lse_t (`divergence.grad_tile`). Every tile is formed
        (`tile_skips`: none are planned here)."""
        coef = c + lse_s - lse_t if kind == "reverse_kl" else c
        self._grad_tiles(student, target, rows, lse_s, lse_t, coef, scale, self._div.KINDS[kind], beta, grads)

    def term_grad_pass(self, student, rows, lse_s, term: RowTerm, scale: torch.Tensor, grads: Grads) -> None:
        """Gradient of few-column terms: renormalized top-K on its K columns (`kernels.sparse`), otherwise
        `p·dense` tiles from `grad_kernel` plus the explicit or sparse columns."""
        if term.dense is None:  # renormalized top-K: only K logits move
            self._add_sparse(grads, student, rows, term.cols, term.sparse * scale[:, None])
            return
        explicit = term.explicit
        logits = grads.logits is not None
        in_kernel = explicit is not None and not logits
        # p·dense formed as unit·exp(z − lse), |dense| folded into lse where it is huge
        # (RowTerm.dense_normalizer: exact where p_v underflows and dense overflows)
        lse, dense = term.dense_normalizer(lse_s)
        self._grad_tiles(student, student, rows, lse, lse, dense, scale, self._div.DENSE.value, 0.5, grads,
                         (term.cols, explicit) if in_kernel else None)
        if in_kernel:
            return
        if explicit is not None:
            # Logits mode: the explicit columns get their whole gradient in one O(n·k) write over the
            # kernel's p·dense there (a row's explicit columns are distinct).
            # Columns marked -1 belong to another vocabulary shard.
            mine = term.cols >= 0
            grads.logits[rows[:, None].expand_as(term.cols)[mine], term.cols[mine]] = \
                (explicit * scale[:, None])[mine].to(grads.logits.dtype)
        else:  # sampled reverse KL: d·(δ_vy − p_v), the sparse d at y added to p·dense (no cancellation)
            self._add_sparse(grads, student, rows, term.cols, term.sparse * scale[:, None])

    def _grad_tiles(self, student, target, rows, lse_s, lse_t, coef, scale, kind: int, beta: float, grads: Grads,
                    explicit=None) -> None:
        """Launch `grad_kernel` (and `grad_dw_kernel` when deterministic); `explicit` = (cols [n, k],
        whole gradient [n, k] before `scale`) or None."""
        n = rows.shape[0]
        dev = rows.device
        cfg = self._config((student, target), n, role="grad_term" if kind == self._div.DENSE.value else "grad")
        linear = isinstance(student, LinearSource)
        vv = student.effective_vocab
        row_blocks, vocab_tiles = triton_cdiv(n, cfg.block_n), triton_cdiv(vv, cfg.block_v)
        f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
        dummy = scale = f32(scale)
        rows = rows.contiguous()
        bias, upcast, head = _masks((student, target))
        ex = (dummy, dummy, 0) if explicit is None else (explicit[0].contiguous(), f32(explicit[1]), explicit[0].shape[1])
        # The row constant as an fp32 (hi, lo) pair, like the log-sum-exps: reverse KL's K needs both parts.
        coef_hi, coef_lo = (t.contiguous() for t in split_lse(coef.double(), torch.float32))
        common = (rows, n, *self._lse_args(lse_s, lse_t), coef_hi, coef_lo, scale, *ex)
        streams = (*stream_args(student), *stream_args(target), _bound(student), vv, 1.0 / student.temperature,
                   *self._js_args(beta))
        flags = dict(KIND=kind, EXPLICIT=explicit is not None, BIAS_MASK=bias, UPCAST_MASK=upcast, HEAD_MASK=head)
        scratch = None
        if linear:
            splits = self.vocab_splits or self._vocab_splits(dev, row_blocks, vocab_tiles)
            per_program = triton_cdiv(vocab_tiles, min(splits, vocab_tiles))
            grid = (row_blocks, triton_cdiv(vocab_tiles, per_program))
            dh, dw, db = grads.dh, grads.dw, grads.db
            det = self._deterministic
            if dh is not None and grid[1] > 1:  # one [n, H] slice per split, summed below in a fixed order
                scratch = dh = torch.zeros(grid[1], n, dh.shape[1], dtype=torch.float32, device=dev)
            kdw, kdb = (None, None) if det else (dw, db)  # dW / db in this kernel: atomics
            outs = (dummy, 0, 0, dummy if dh is None else dh, 0 if dh is None else dh.stride(-2),
                    dummy if kdw is None else kdw, 0 if kdw is None else kdw.stride(0), dummy if kdb is None else kdb)
            needs = dict(NEED_DH=dh is not None, DH_SCRATCH=scratch is not None, NEED_DW=kdw is not None,
                         NEED_DB=kdb is not None)
        else:
            per_program, grid = 1, (row_blocks, vocab_tiles)
            gr = grads.logits
            outs = (gr, gr.stride(0), gr.stride(1), dummy, 0, dummy, 0, dummy)
            needs = dict(NEED_DH=False, DH_SCRATCH=False, NEED_DW=False, NEED_DB=False)
        if not linear or any(needs.values()):
            self._launch(self._div.grad_kernel, grid, cfg, dev, *common, *outs, *streams, per_program,
                         LINEAR=linear, **needs, **flags)
        if scratch is not None:
            grads.dh[rows] += scratch.sum(0)
        if linear and det and (dw is not None or db is not None):
            cfg = self._config((student, target), n, role="grad_dw")
            self._launch(self._div.grad_dw_kernel, (triton_cdiv(vv, cfg.block_v),), cfg, dev, *common,
                         dummy if dw is None else dw, 0 if dw is None else dw.stride(0), dummy if db is None else db,
                         *streams, NEED_DW=dw is not None, NEED_DB=db is not None, **flags)

    @staticmethod
    def _vocab_splits(device: torch.device, row_blocks: int, vocab_tiles: int) -> int:
        """Vocabulary splits of the fused-linear gradient grid: ~4 programs per SM on a GPU (with
        more than one split dH goes through a per-split scratch); 2 under the interpreter so the
        split path is exercised."""
        if device.type == "cuda":
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            return max(1, min(vocab_tiles, triton_cdiv(target, row_blocks)))
        return 2


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
