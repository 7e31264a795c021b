"""torch.distributed for the embedding job: ranks from torchrun (or SLURM) variables, one device per local rank.

The job needs little from it: a barrier around the shared setup, a broadcast of setup errors (so every rank stops
instead of waiting at a barrier) and a gather of the per-shard records for the manifest. Shards are assigned
statically (``k % world_size == rank``), so no work queue is needed and a rerun finds the same assignment.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext"]

_logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @classmethod
    def from_env(cls) -> DistContext:
        """Join the process group torchrun describes (``env://``); a single process when there is none."""
        from open_clip_train.distributed import is_using_distributed, world_info_from_env

        local_rank, rank, world_size = world_info_from_env()
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
        if not is_using_distributed():
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # SLURM without torchrun sets no RANK/WORLD_SIZE for env://; open_clip_train exports them the same way
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        _logger.info("rank %d of %d (%s)", rank, world_size, backend)
        return cls(rank, world_size, local_rank, owns_group=True)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def default_device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
