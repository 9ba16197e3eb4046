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

    `torch.topk` leaves the choice among values tied at the K-th place to its implementation; here every
    value above the K-th is taken, then the first of those equal to it, as many as the set has room for.
    No host synchronisation. Values are NaN-free (validated upstream); −inf ties like any value.
    """
    n, m = values.shape
    if k == 0:
        return torch.empty(n, 0, dtype=torch.long, device=values.device)
    kth = torch.topk(values, k, dim=1).values[:, -1:]
    above = values > kth
    tied = values == kth
    room = k - above.sum(1, keepdim=True)
    take = above | (tied & (tied.cumsum(1) <= room))
    # Exactly k positions are taken per row: rank them by m − position to list them in order.
    earlier_first = torch.arange(m, 0, -1, device=values.device)
    return torch.topk(take * earlier_first, k, dim=1).indices
