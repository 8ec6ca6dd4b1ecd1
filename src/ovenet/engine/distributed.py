"""torchrun / DistributedDataParallel plumbing: process-group setup from the environment, device choice, and
the few collectives the training loop needs (all of them no-ops in a single process).

Launch multi-GPU training with ``torchrun --nproc_per_node=N -m ovenet.cli train ...``: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and :func:`init_distributed` reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..device import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A gloo group for small CPU flags (stop requests), so that agreeing on them never syncs a GPU stream.
    cpu_group: Any = None
    owns_group: bool = False  # True when init_distributed created the process group (and must destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: from the process group once it is up, else from torchrun's
    RANK/WORLD_SIZE (so a command can tell before joining), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (nccl on CUDA, else gloo).

    Without those variables (or with WORLD_SIZE=1) this is a single-process run and nothing is initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dist.is_initialized():  # the caller set it up (e.g. a notebook or a test harness)
        owns = False
    else:
        use_cuda = resolve_device(device_name, local_rank).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        owns = True
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, cpu_group, owns)


def cleanup(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier(group=info.cpu_group)


def any_rank(info: DistInfo, *flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags over ranks (through the CPU group: no GPU sync)."""
    if not info.distributed:
        return [bool(f) for f in flags]
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return [bool(v) for v in tensor.tolist()]


def min_over_ranks(info: DistInfo, value: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of a tensor over ranks (on its own device)."""
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.cpu_group)
    return box[0]


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any | None] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.cpu_group)
    return out
