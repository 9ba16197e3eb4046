"""The compiled backends `cpp` (C++/OpenMP, CPU tensors) and `cuda` (CUDA kernels, GPU tensors).

Both run the passes of `passes.Passes` in the extension built from `csrc/` (see `_build.py`): the
O(N·V) loops — online log-sum-exp, top-K, divergence sums, gradient tiles with the explicit columns
folded in, and in fused-linear mode the tile matmuls and the dH/dW contraction — happen there, as do
the K-column gathers, and on CPU the fused-linear contraction of renormalized top-K gradients and
the tail buckets: the sampled token's (sampled forward KL / JS) in the stats pass's sweep, a top-K
support's (`topk_renorm=False`) in `rest_logsumexp`; the `cuda` backend inherits the tiled PyTorch
pass of `backends/base.py` for both. The O(N·K) work
(`row_terms.py`, routing) stays in the shared Python code. On CPU, full-vocabulary rows take the
fewest sweeps exactness allows without a `[chunk, V]` buffer (`full_pass`), and the extension counts
the matmul FLOPs it performs (`matmul_flops`, for tests/test_matmul_floor.py). The `cpp` backend's fused-linear
gradient tiles leave out the contractions of provably negligible column blocks, row by row, with the rule and
constants of `skipping.py` (`CppBackend(skip_negligible=True)`, counted in `skip_counter`); wide
full-vocabulary rows also leave out whole tiles, not even recomputed, that the per-tile statistics of their
online or value sweep bound as negligible (csrc/kernels_cpu.cpp, TileSkips; `skip_counter.unformed`).

Fused-linear streams carry their output-head transform (`LinearSource.scale`, `.softcap`) into the
kernels, which apply it in the tile epilogue and multiply gradient tiles by its jacobian. The stats
pass returns each row's max and `log Σ exp(z − max)` separately, added here in float64 (`Stats.lse`);
the other passes receive a log-sum-exp as the (hi, lo) pair of `passes.split_lse`. Tensors of any
strides are read in place (a transposed logits tensor, gradient buffer or weight is never copied).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._build import load_extension
from .. import gradients, skipping
from ..codes import Divergence
from ..passes import STUDENT, FullRows, Grads, Stats, split_lse
from ..row_terms import RowTerm
from ..sources import LogitsSource
from .base import PassBackend, skips_whole_tiles
from .torch_chunked import TorchBackend

# The `kind` argument of the passes: codes.Divergence, which csrc/row_math.h's dopd::Kind mirrors
# (tests/test_constants.py checks them against the extension's KINDS).
KIND_CODES = {d.key: d.value for d in Divergence}


class CompiledBackend(PassBackend):
    """Passes in the compiled extension. `row_chunk × vocab_chunk` bounds every logit tile."""

    name = "compiled"
    _kind = "cpu"
    # The CPU extension also sums tail buckets and has the fused-linear sparse contraction; the CUDA
    # one leaves both to the PyTorch defaults (`PassBackend.rest_logsumexp`, `gradients.add_sparse`).
    _cpu_only_passes = True

    skip_negligible = False  # the CUDA passes contract every gradient tile whole

    def __init__(self, row_chunk: int = 2048, vocab_chunk: int = 1024):
        if row_chunk < 1 or vocab_chunk < 1:
            raise ValueError(f"row_chunk and vocab_chunk must be >= 1, got {row_chunk}, {vocab_chunk}")
        self.row_chunk, self.vocab_chunk = row_chunk, vocab_chunk
        self._ext = load_extension(self._kind)
        self._ops = self._ext if self._kind == "cpu" else self._ext.cuda
        self._tiling = self._ext.Tiling(row_chunk, vocab_chunk)
        self.skip_counter = skipping.SkipCounter()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(row_chunk={self.row_chunk}, vocab_chunk={self.vocab_chunk})"

    def _stream(self, src):
        if isinstance(src, LogitsSource):
            return self._ext.Stream(src.logits, None, None, 1.0 / src.temperature, src.effective_vocab)
        return self._ext.Stream(src.hidden, src.weight, src.bias, 1.0 / src.temperature, src.effective_vocab,
                                scale=float(src.scale), softcap=float(src.softcap or 0.0))

    @staticmethod
    def _split(lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A float64 log-sum-exp [n] as the kernels take it: the rows (hi, lo) [2, n] of `split_lse`."""
        return torch.stack(split_lse(lse, dtype))

    def tile_shape(self) -> tuple:
        return self.row_chunk, self.vocab_chunk

    @torch.no_grad()
    def gather(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self._ops.gather(self._stream(source), rows.contiguous(), cols)

    @torch.no_grad()
    def rest_logsumexp(self, source, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        if not self._cpu_only_passes:
            return super().rest_logsumexp(source, rows, cols)
        mx, log_sum = self._ops.rest_lse_pass(self._stream(source), rows.contiguous(), cols, self._tiling)
        return mx.double() + log_sum.double()

    @torch.no_grad()
    def stats_pass(self, sources: Sequence, rows: torch.Tensor, tokens: torch.Tensor, topk_streams, top_k: int,
                   rest_streams: Sequence[int] = (), share_streams: Sequence[int] = ()) -> Stats:
        """The `passes.Passes` stats pass, one sweep per stream. On CPU the tail buckets of `rest_streams` are
        summed in that sweep (the extension's `tail_tokens`), and so are the tile shares of `share_streams`
        where `full_pass` can leave whole tiles out (`base.skips_whole_tiles`); the `cuda` backend composes the
        tail buckets from `rest_logsumexp`, a sweep of its own per stream, and keeps no tile shares."""
        rows, dt = rows.contiguous(), sources[STUDENT].dtype
        k = min(top_k, sources[STUDENT].effective_vocab)
        lse, topk, logit_y, rest, shares = [], {}, [], {}, {}
        wide = self._cpu_only_passes and skips_whole_tiles(sources[STUDENT], self.skip_negligible, self.vocab_chunk)
        for j, src in enumerate(sources):
            stream, k_j = self._stream(src), k if j in topk_streams else 0
            if self._cpu_only_passes:
                tail = tokens.contiguous() if j in rest_streams else None
                mx, log_sum, idx, tail_mx, tail_log_sum, log_shares = self._ops.stats_pass(
                    stream, rows, k_j, self._tiling, tail, shares=wide and j in share_streams)
                if tail is not None:
                    rest[j] = tail_mx.double() + tail_log_sum.double()
                if log_shares.numel():
                    shares[j] = log_shares
            else:
                mx, log_sum, idx = self._ops.stats_pass(stream, rows, k_j, self._tiling)
                if j in rest_streams:
                    rest[j] = self.rest_logsumexp(src, rows, tokens[:, None])
            lse.append(mx.double() + log_sum.double())  # float64: see Stats
            if j in topk_streams:
                topk[j] = idx
            logit_y.append(self._ops.gather(stream, rows, tokens[:, None])[:, 0].to(dt))
        return Stats(lse, logit_y, topk, rest, shares)

    @torch.no_grad()
    def full_value_pass(self, student, target, rows, lse_s, lse_t, kind: str, beta: float):
        """Σ_v of the divergence per row and the gradient constant c (see the torch backend)."""
        if self._cpu_only_passes:
            return self.full_pass(student, target, rows, lse_s, lse_t, kind, beta, None, None)[2:4]
        dt = student.dtype
        return self._ops.full_value_pass(self._stream(student), self._stream(target), rows.contiguous(),
                                         self._split(lse_s, dt), self._split(lse_t, dt), KIND_CODES[kind], beta, self._tiling)

    @torch.no_grad()
    def full_pass(self, student, target, rows, lse_s, lse_t, kind: str, beta: float, scale, grads,
                  plan_skips: bool = False, tile_shares=None) -> FullRows:
        """`passes.Passes.full_pass` in the CPU extension's fewest sweeps (csrc/passes_cpu.h `full_pass`): one
        sweep when a row's valid vocabulary fits one tile (V <= `vocab_chunk`), a row's phases in one thread
        in logits mode; wider fused-linear rows without given log-sum-exps compute them with the reverse /
        forward KL value online in one sweep (JS: its log-mixture needs them first, so a value sweep
        follows, leaving out the tiles `skipping.plan_js_value_skips` bounds when a gradient follows; with given
        log-sum-exps, from `tile_shares`), then the gradient sweep, or with `plan_skips` (no `scale`) plan the whole
        tiles a deferred gradient sweep skips. The `cuda` backend composes the separate passes
        (`PassBackend.full_pass`)."""
        if not self._cpu_only_passes:
            return super().full_pass(student, target, rows, lse_s, lse_t, kind, beta, scale, grads)
        dt, given = student.dtype, lse_s is not None
        args = self._grad_args(kind, beta, grads if scale is not None else Grads())
        if scale is None:  # without a gradient, the extension's `skip` asks for the planned tile skips
            args["skip"] = self.skip_negligible and plan_skips
        parts, value, c, keep, spent, counts = self._ops.full_pass(
            self._stream(student), self._stream(target), rows.contiguous(), self._split(lse_s, dt) if given else None,
            self._split(lse_t, dt) if given else None, scale=scale, **args,
            **(dict(shares_s=tile_shares[0], shares_t=tile_shares[1]) if tile_shares is not None and given else {}))
        self._count_skipped(counts)
        if not given:  # (max, log-sum) pairs added in float64, as the stats pass does (Stats.lse)
            lse_s, lse_t = parts[0].double() + parts[1].double(), parts[2].double() + parts[3].double()
        return FullRows(lse_s, lse_t, value, c, None if keep is None else skipping.TileSkips(keep, spent))

    def matmul_flops(self) -> int:
        """Matmul FLOPs the extension's passes performed since `reset_matmul_flops` (all CPU extension calls of
        this process: tile GEMMs, dH/dW contractions, K-column dot products); the `cuda` backend counts none."""
        return int(self._ext.matmul_flops())

    def reset_matmul_flops(self) -> None:
        self._ext.reset_matmul_flops()

    @torch.no_grad()
    def full_grad_pass(self, student, target, rows, lse_s, lse_t, c, kind: str, beta: float, scale: torch.Tensor,
                       grads: Grads, tile_skips: Optional[skipping.TileSkips] = None) -> None:
        """Gradient tiles of full-vocabulary rows; on CPU, `full_pass`'s planned `tile_skips` are skipped whole
        (the CUDA passes form every tile)."""
        dt, args = student.dtype, self._grad_args(kind, beta, grads)
        if tile_skips is not None and self._cpu_only_passes:
            args.update(tile_keep=tile_skips.keep, tile_spent=tile_skips.spent)
        self._count_skipped(self._ops.grad_pass(
            self._stream(student), self._stream(target), rows.contiguous(), self._split(lse_s, dt),
            self._split(lse_t, dt), c, None, None, None, False, scale, **args))

    @torch.no_grad()
    def term_grad_pass(self, student, rows, lse_s, term: RowTerm, scale: torch.Tensor, grads: Grads) -> None:
        rows = rows.contiguous()
        if term.dense is None:  # renormalized top-K: only K logits move
            coef = (term.sparse * scale[:, None]).to(student.dtype)
            if grads.logits is None and self._cpu_only_passes:
                self._ops.sparse_grad(self._stream(student), rows, term.cols, coef, grads.dh, grads.dw, grads.db)
            else:
                gradients.add_sparse(grads, student, rows, term.cols, coef, self.sparse_rows(student, term.cols.shape[1]))
            return
        # p·dense everywhere, formed as ±exp(z − lse) with |dense| folded into lse (RowTerm.dense_normalizer:
        # exact where p_v underflows and dense overflows); on the explicit columns their whole gradient, or
        # the sparse part added
        explicit = term.explicit is not None
        lse, dense = term.dense_normalizer(lse_s)
        self._count_skipped(self._ops.grad_pass(
            self._stream(student), None, rows, self._split(lse, student.dtype), None, None, dense, term.cols,
            term.explicit if explicit else term.sparse, explicit, scale,
            **self._grad_args("reverse_kl", 0.5, grads)))  # kind and β: unused by dense terms

    def _grad_args(self, kind: str, beta: float, grads: Grads) -> dict:
        """Keyword arguments of the extension's `grad_pass`: the divergence code, β, the tiling, the
        gradient buffers the kernels write into and (CPU) whether negligible blocks are skipped."""
        args = dict(kind=KIND_CODES[kind], beta=beta, tiling=self._tiling,
                    grad_logits=grads.logits, dh=grads.dh, dw=grads.dw, db=grads.db)
        if self._cpu_only_passes:
            args["skip"] = self.skip_negligible
        return args

    def _count_skipped(self, counts) -> None:
        """Add a CPU pass's (entries, skipped, unformed[, value_unformed]) to `skip_counter` (the CUDA passes
        return None; grad_pass has no value sweep)."""
        if counts is not None:
            self.skip_counter.entries += counts[0]
            self.skip_counter.skipped += counts[1]
            self.skip_counter.unformed += counts[2]
            self.skip_counter.value_unformed += counts[3] if len(counts) > 3 else 0


class CppBackend(CompiledBackend):
    """C++/OpenMP passes for CPU tensors."""

    name = "cpp"
    _kind = "cpu"

    def __init__(self, row_chunk: int = 2048, vocab_chunk: int = 1024, skip_negligible: bool = True):
        """`skip_negligible`: skip the fused-linear contractions of negligible gradient blocks (`skipping.py`;
        never for float64 inputs or in logits mode); `skip_counter` (a `skipping.SkipCounter`) counts them
        across calls."""
        if not isinstance(skip_negligible, bool):
            raise TypeError(f"skip_negligible must be a bool, got {type(skip_negligible).__name__}")
        super().__init__(row_chunk, vocab_chunk)
        self.skip_negligible = skip_negligible

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(row_chunk={self.row_chunk}, vocab_chunk={self.vocab_chunk}, "
                f"skip_negligible={self.skip_negligible})")

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"


class CudaBackend(CompiledBackend):
    """CUDA passes for GPU tensors (needs a CUDA build of torch; the extension is built with nvcc)."""

    name = "cuda"
    _kind = "cuda"
    _cpu_only_passes = False
    _fallback: Optional[PassBackend] = None  # the torch backend, made on the first top-K past MAX_TOPK

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    def select(self, sources: Sequence, top_k: int) -> PassBackend:
        """This backend, or the torch one for a top-K beyond what the stats kernel's shared-memory sort
        keeps (the extension's `MAX_TOPK`, csrc/kernels_cuda.h), as the triton backend does past its own."""
        if min(top_k, sources[STUDENT].effective_vocab) > self._ops.MAX_TOPK:
            if self._fallback is None:
                self._fallback = TorchBackend()
            return self._fallback
        return self
