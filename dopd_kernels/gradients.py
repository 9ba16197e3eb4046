"""The student's gradient buffers (`passes.Grads`): allocation, the tiled-PyTorch accumulation a pass
may use, and the final gradients autograd receives.

Logits mode: one [N, V] buffer, a fresh contiguous tensor whatever the input's layout (a transposed
or strided input gets a row-major gradient that kernels can write rows of). Fused-linear mode: a
gradient tile G [rows, block] (w.r.t. the final logits) becomes dH += G·W, dW += Gᵀ·H, db += Σ G,
after the head's Jacobian turned it into the gradient w.r.t. the raw `h·Wᵀ + b`. Only the buffers
that are needed exist: a frozen head (weight not requiring grad) has `dw = None`, and passes skip
its contraction (no [V, H] buffer, no Gᵀ·H work).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .passes import Grads
from .skipping import SKIP_COLUMNS
from .sources import LogitsSource


def student_tensors(source) -> tuple:
    """The differentiable tensors of the student source, in a fixed order (`Grads` minus `logits`)."""
    if isinstance(source, LogitsSource):
        return (source.logits,)
    return (source.hidden, source.weight, source.bias)


def allocate(source, needs: Sequence[bool]) -> Grads:
    """Zeroed buffers for the student tensors flagged in `needs` (aligned with `student_tensors`)."""
    if isinstance(source, LogitsSource):
        z = source.logits
        return Grads(logits=torch.zeros(z.shape, dtype=z.dtype, device=z.device) if needs[0] else None)
    acc = source.dtype

    def zeros(t: Optional[torch.Tensor], need: bool) -> Optional[torch.Tensor]:
        return torch.zeros(t.shape, dtype=acc, device=t.device) if (t is not None and need) else None

    return Grads(None, zeros(source.hidden, needs[0]), zeros(source.weight, needs[1]), zeros(source.bias, needs[2]))


def results(grads: Grads, source) -> tuple:
    """The gradients of `student_tensors(source)`, each in its tensor's dtype (None where not needed)."""
    if isinstance(source, LogitsSource):
        return (grads.logits,)
    dtypes = (source.hidden.dtype, source.weight.dtype, source.bias.dtype if source.bias is not None else None)
    return tuple(None if t is None else t.to(d) for t, d in zip(grads[1:], dtypes))


def add_tile(grads: Grads, source, rows: torch.Tensor, start: int, g: torch.Tensor,
             logits: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None) -> None:
    """Add a gradient tile `g` [len(rows), block] at columns [start, start + block). `logits`: the
    student's tile there as `LinearSource.tile` returns it (recomputed when None and a head
    transform needs it). `keep` [len(rows), ceil(block / skipping.SKIP_COLUMNS)] (fused-linear mode):
    the column blocks of each row whose contractions run (`skipping.RowBudget.keep`); db stays exact."""
    if grads.logits is not None:
        grads.logits[rows, start:start + g.shape[1]] = g.to(grads.logits.dtype)
        return
    stop = start + g.shape[1]
    g = g.to(source.dtype)
    if source.has_transform:
        if logits is None:
            logits = source.tile(rows, start, stop)
        g = g * source.head_jacobian(logits.to(source.dtype))
    if grads.db is not None:
        grads.db[start:stop] += g.sum(0)
    if grads.dh is None and grads.dw is None:
        return
    hidden = source.hidden[rows].to(source.dtype) if grads.dw is not None else None
    if keep is None or bool(keep.all()):
        _contract(grads, source, rows, hidden, start, g)
        return
    # Each column block with the rows that keep it; consecutive blocks kept by every row contract at once.
    b0, nb = 0, keep.shape[1]
    while b0 < nb:
        b1 = b0 + 1
        everyone = bool(keep[:, b0].all())
        while everyone and b1 < nb and bool(keep[:, b1].all()):
            b1 += 1
        c0, c1 = b0 * SKIP_COLUMNS, min(b1 * SKIP_COLUMNS, g.shape[1])
        if everyone:
            _contract(grads, source, rows, hidden, start + c0, g[:, c0:c1])
        else:
            idx = keep[:, b0].nonzero()[:, 0]
            if idx.numel():
                _contract(grads, source, rows[idx], None if hidden is None else hidden[idx], start + c0,
                          g[idx, c0:c1])
        b0 = b1


def _contract(grads: Grads, source, rows: torch.Tensor, hidden: Optional[torch.Tensor], start: int,
              g: torch.Tensor) -> None:
    """dH[rows] += g·W[start:start+block], dW[start:start+block] += gᵀ·hidden (g [r, block], raw-logit
    gradient in the accumulation dtype; hidden [r, H] the rows' hidden states, None when dW is not needed)."""
    stop = start + g.shape[1]
    if grads.dh is not None:
        grads.dh.index_add_(0, rows, g @ source.weight[start:stop].to(source.dtype))
    if grads.dw is not None:
        grads.dw[start:stop] += g.T @ hidden


def add_sparse(grads: Grads, source, rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor, row_step: int) -> None:
    """Add the gradient `g` [n, k] at columns `cols` [n, k] of each row (entries < 0 skipped).
    Fused-linear: `row_step` rows at a time keep the gathered weight rows [r, K, H] within a pass's
    tile budget."""
    mine = cols >= 0
    if grads.logits is not None:
        gl = grads.logits
        gl.index_put_((rows[:, None].expand_as(cols)[mine], cols[mine]), g[mine].to(gl.dtype), accumulate=True)
        return
    acc = source.dtype
    g = torch.where(mine, g.to(acc), torch.zeros((), dtype=acc, device=g.device))
    cols = cols.clamp_min(0)
    for i in range(0, rows.shape[0], row_step):
        r, c, gi = rows[i:i + row_step], cols[i:i + row_step], g[i:i + row_step]
        if source.has_transform:  # the K logits again (K dot products per row) for the head's Jacobian
            gi = gi * source.head_jacobian(source.gather(r, c).to(acc))
        if grads.dh is not None:
            grads.dh.index_add_(0, r, torch.einsum("rk,rkh->rh", gi, source.weight[c].to(acc)))
        if grads.dw is not None:
            h = source.hidden[r].to(acc)
            grads.dw.index_add_(0, c.reshape(-1), (gi[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
        if grads.db is not None:
            grads.db.index_add_(0, c.reshape(-1), gi.reshape(-1))
