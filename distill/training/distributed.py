"""``torch.distributed`` under ``torchrun``: one process per GPU (or CPU process with gloo), DDP on the trainable
parts only, metrics summed over ranks, files written by rank 0.

``torchrun --nproc_per_node=N -m distill.cli train RECIPE`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; every
rank draws the same global batch order and augmentation and trains on its own part of each global batch, so a
run's data equal those of one process with the same (global) ``data.batch_size``.
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over ranks (itself in a single process)."""
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group ``torchrun`` describes (nccl on CUDA, gloo on CPU); a plain process gets rank 0
    of 1."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return DistributedContext()
    context = DistributedContext(int(os.environ['RANK']), world_size, int(os.environ.get('LOCAL_RANK', '0')))
    if not dist.is_initialized():
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
        if device_type == 'cuda':
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return context


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
