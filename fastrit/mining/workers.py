"""The processes a mining run is split over: torch.distributed when launched with torchrun / accelerate."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Workers"]


@dataclass
class Workers:
    """This process's rank among ``world`` processes; ``owns_group`` when :meth:`start` created the group."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def start(cls, device: torch.device) -> Workers:
        """Join the running process group, or create one (gloo on CPU, nccl on CUDA) when the environment of
        torchrun / accelerate launch says there are several processes; else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), owns_group=False)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=True)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
