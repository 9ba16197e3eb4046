"""Vocabulary-parallel statistics and global-batch routing over `torch.distributed` groups.

Vocabulary parallelism (Megatron style): rank r of `vocab_parallel_group` holds the contiguous
columns [offset_r, offset_r + V_r) of every stream's logits (or rows of `lm_head`), with the ranks'
shards in rank order. Every rank sees the same tokens. The per-row statistics of a pass are
combined across the group:

- log-sum-exp: a max all-reduce, then a sum all-reduce of exp(lse_r − max);
- the sampled-token logit: owned by one shard, the others contribute −inf to a max all-reduce;
- top-K: each shard's local top-K (values and global columns) is all-gathered and merged;
- divergence partial sums over the vocabulary: a sum all-reduce;
- the hidden-state gradient: a sum all-reduce, as in the backward of a column-parallel linear.

Routing over a data-parallel `routing_group` gathers every rank's per-token statistics, so the
trimmed means are exact over the global batch whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .topk import select_top_k

NEG_INF = float("-inf")


def _all_gather_varlen(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenation over the group of each rank's 1-D tensor `t` (lengths may differ)."""
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def gather_routing_statistics(stats: Tuple[torch.Tensor, ...], group) -> Tuple[torch.Tensor, ...]:
    """Each statistic [n_valid] of this rank → the concatenation over the routing group."""
    return tuple(_all_gather_varlen(s.contiguous(), group) for s in stats)


@dataclass
class VocabShard:
    """This rank's contiguous slice [offset, offset + local_vocab) of a `vocab`-wide vocabulary
    whose first `valid_vocab` columns are real (the rest padding)."""

    group: object
    offset: int
    local_vocab: int
    vocab: int
    valid_vocab: int

    @classmethod
    def create(cls, group, local_vocab: int, device: torch.device) -> "VocabShard":
        """Collective over `group`: every rank passes its own shard width. `valid_vocab` starts as
        the whole vocabulary; set it with `with_valid_vocab`."""
        world = dist.get_world_size(group)
        mine = torch.tensor([local_vocab], dtype=torch.long, device=device)
        sizes = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(sizes, mine, group=group)
        sizes = [int(s) for s in sizes]
        rank = dist.get_rank(group)
        return cls(group, sum(sizes[:rank]), local_vocab, sum(sizes), sum(sizes))

    def with_valid_vocab(self, valid_vocab: Optional[int]) -> "VocabShard":
        return VocabShard(self.group, self.offset, self.local_vocab, self.vocab, self.vocab if valid_vocab is None else valid_vocab)

    def local_valid_vocab(self) -> Optional[int]:
        """The global `valid_vocab` cut seen from this shard (None: no padding in this shard)."""
        if self.valid_vocab >= self.offset + self.local_vocab:
            return None
        return max(self.valid_vocab - self.offset, 0)

    def localize(self, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global columns → (local columns clamped into the shard, mask of those it owns)."""
        local = cols - self.offset
        owned = (local >= 0) & (local < self.local_vocab)
        return torch.where(owned, local, torch.zeros_like(local)), owned

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def owned_max(self, values: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """Values known only on the owning shard (−inf elsewhere) → the owner's value everywhere."""
        return self.all_reduce(values.masked_fill(~owned, NEG_INF), dist.ReduceOp.MAX)

    def merge_logsumexp(self, lse: torch.Tensor) -> torch.Tensor:
        top = self.all_reduce(lse.clone(), dist.ReduceOp.MAX)
        shift = torch.where(top == NEG_INF, torch.zeros_like(top), top)
        total = self.all_reduce(torch.exp(lse - shift))
        return torch.where(top == NEG_INF, top, shift + torch.log(total))

    def merge_topk(self, values: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
        """Global top-k columns [n, k] from every shard's local candidates (values, global cols); equal
        values go to the lower column (`topk.select_top_k`), as within a shard."""
        world = dist.get_world_size(self.group)
        n, local_k = values.shape
        width = torch.tensor([local_k], dtype=torch.long, device=values.device)
        widths: List[torch.Tensor] = [torch.zeros_like(width) for _ in range(world)]
        dist.all_gather(widths, width, group=self.group)
        widest = int(max(int(w) for w in widths))
        pad_v = torch.full((n, widest), NEG_INF, dtype=values.dtype, device=values.device)
        # Padding sorts after every real column, so a tie at −inf never picks it.
        pad_c = torch.full((n, widest), torch.iinfo(cols.dtype).max, dtype=cols.dtype, device=cols.device)
        pad_v[:, :local_k], pad_c[:, :local_k] = values, cols
        all_v = [torch.empty_like(pad_v) for _ in range(world)]
        all_c = [torch.empty_like(pad_c) for _ in range(world)]
        dist.all_gather(all_v, pad_v, group=self.group)
        dist.all_gather(all_c, pad_c, group=self.group)
        cand_v, cand_c = torch.cat(all_v, dim=1), torch.cat(all_c, dim=1)
        by_col = cand_c.argsort(dim=1)  # `select_top_k` breaks ties by position: put the candidates in column order
        cand_v, cand_c = cand_v.gather(1, by_col), cand_c.gather(1, by_col)
        return cand_c.gather(1, select_top_k(cand_v, k))
