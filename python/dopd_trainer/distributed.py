"""Data parallelism under `torchrun`: every rank samples and scores its share of each step's prompts,
DistributedDataParallel averages the student's gradients, and DOPD's routing thresholds are trimmed
means over the global batch (`routing_group`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Workers:
    """This process's place among the data-parallel ranks; the default is a single process."""

    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls, device: str) -> tuple["Workers", str]:
        """Join the process group `torchrun` describes in the environment (gloo on CPU, nccl on CUDA,
        one GPU per rank: `cuda` means `cuda:LOCAL_RANK`). Returns the workers and this rank's device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(), device
        if torch.device(device).type == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size()), device

    def stop(self) -> None:
        """Leave the group together: without the barrier a rank that finishes first tears down its
        gloo connections (rank 0 also the TCP store) while a peer still uses them, and the peer
        aborts at exit ("terminate called without an active exception")."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and shows progress."""
        return self.rank == 0

    @property
    def group(self):
        """The group to pass as `routing_group` (None for a single process)."""
        return dist.group.WORLD if self.world > 1 else None

    def shard(self, items: list) -> list:
        """Every `world`-th item from this rank's index: disjoint shares that together are `items`."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` in DistributedDataParallel when there are several ranks. Every trainable parameter
        must receive a gradient in each backward (`find_unused_parameters=False`)."""
        if self.world == 1:
            return module
        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
