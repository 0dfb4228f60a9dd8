"""Data-parallel training across processes started by `torchrun` (one per GPU, or CPU processes over gloo).

`torchrun --nproc_per_node N -m har.cli train ...` (or under SLURM, `srun torchrun ...`) sets RANK, WORLD_SIZE
and LOCAL_RANK; without them a run is a single process and nothing here communicates. Each process trains on
its share of every global batch (see `har.data.loader`), DistributedDataParallel averages the gradients, and
the trainer scales each process's loss so that the average is the gradient of the one-process loss of the
global batch. Batch norm statistics are per process unless `train.sync_batchnorm` is on (CUDA only), as in
the usual ImageNet recipes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the run: rank, number of processes, GPU index on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """The process that writes the run folder and logs."""
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """The tensor reduced over all processes (a copy on the tensor's device; itself when the run is one
        process). NCCL reduces only GPU tensors, so a host tensor makes the round trip through this process's GPU."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        if dist.get_backend() == "nccl" and not out.is_cuda:
            out = out.cuda()
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def all_reduce_int(self, value: int, op: str = "sum") -> int:
        """A host integer reduced over all processes (for counts and flags; one read-back)."""
        return int(self.all_reduce(torch.tensor(value), op)) if self.enabled else value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_environment() -> Distributed:
    """The process's place from torchrun's environment variables (a single process without them)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc}); start the run with "
                           f"torchrun, which sets them") from exc
    return Distributed(rank, world, local_rank)


@contextmanager
def process_group(ctx: Distributed, device: torch.device) -> Iterator[None]:
    """Join the process group for the run (NCCL on GPUs, gloo on the CPU) and leave it afterwards."""
    created = ctx.enabled and not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ctx.rank, world_size=ctx.world)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()
