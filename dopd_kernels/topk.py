"""The top-K selection rule of every backend: a row's K largest values, equal values taken lower
column first.

A tie at the K-th place is not rare: bf16 heads and quantised logits give exactly equal logits, and
which of the tied columns enters the set changes the loss (the target's log-probabilities there
differ). The compiled kernels order candidates by the key (value, −column) (`kernels/tiles.py`
`topk_keys`, `csrc/row_math.h` `topk_before`); the PyTorch paths (the `reference` and `torch` backends,
the vocabulary-parallel merge) select with `select_top_k` below, so that every backend picks the same
columns.
"""

from __future__ import annotations

import torch


def select_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the `k` largest `values` of each row, equal values broken toward the lower position.

    values: [n, m] candidates in column order (a lower position holds a lower vocabulary column, so
    "lower position" is "lower column"); 0 <= k <= m. Returns [n, k] int64 positions, ascending (so
    the selected candidates stay in column order).

    `torch.topk` leaves the choice among values tied at the K-th place to its implementation. Its set is
    kept where that choice cannot matter (the (K+1)-th largest value is below the K-th, so no candidate
    left out equals it); the other rows (rare: one host synchronisation decides) take every value above
    the K-th, then the first of those equal to it, as many as the set has room for. Values are NaN-free
    (validated upstream); −inf ties like any value.
    """
    n, m = values.shape
    if k == 0:
        return torch.empty(n, 0, dtype=torch.long, device=values.device)
    top = torch.topk(values, min(k + 1, m), dim=1)  # sorted: one more than the set shows a tie left out
    picked = top.indices[:, :k].sort(dim=1).values
    if k == m:
        return picked
    kth = top.values[:, k - 1:k]
    ambiguous = top.values[:, k] == kth[:, 0]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero()[:, 0]
        sub, sub_kth = values[rows], kth[rows]
        above, tied = sub > sub_kth, sub == sub_kth
        take = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
        # Exactly k positions are taken per row: rank them by m − position to list them in order.
        earlier_first = torch.arange(m, 0, -1, device=values.device)
        picked[rows] = torch.topk(take * earlier_first, k, dim=1).indices
    return picked
