"""torchrun / DistributedDataParallel plumbing: process-group setup from the environment, device choice, and
the few collectives the training loop needs (all of them no-ops in a single process).

Launch multi-GPU training with ``torchrun --nproc_per_node=N -m ovenet.cli train ...``: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and :func:`init_distributed` reads them. Under torchrun's elastic agent (``--max-restarts``,
several nodes) the workers meet in a store that rank 0 hosts (:func:`_fresh_store`), new for every attempt: torch's
own ``env://`` join reuses the agent's store, where the dead workers' gloo addresses are still written, and a
restarted group fails with "Gloo connectFullMesh failed ... Connection refused".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import OvenetError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A gloo group for small CPU flags (stop requests), so that agreeing on them never syncs a GPU stream.
    cpu_group: Any = None
    owns_group: bool = False  # True when init_distributed created the process group (and must destroy it)
    restart: int = 0  # torchrun's restart count: 0 on the first attempt
    max_restarts: int = 0

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


def init_distributed(device_name: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (nccl on CUDA, else gloo).

    Without those variables (or with WORLD_SIZE=1) this is a single-process run and nothing is initialised.
    ``timeout_s`` bounds every collective: a rank whose peers are gone stops with an error instead of hanging.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if world_size <= 1:
        return DistInfo(restart=restart, max_restarts=max_restarts)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    timeout = timedelta(seconds=timeout_s)
    if dist.is_initialized():  # the caller set it up (e.g. a notebook or a test harness)
        owns = False
    else:
        use_cuda = resolve_device(device_name, local_rank).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if use_cuda else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _fresh_store(rank, world_size, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        owns = True
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
    # Each node counts only its own failures: a restart is one when any node's agent restarted.
    counts = torch.tensor([restart, max_restarts], dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=cpu_group)
    restart, max_restarts = counts.tolist()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, cpu_group, owns, restart, max_restarts)


def _fresh_store(rank: int, world_size: int, timeout: timedelta) -> Any:
    """The group's store, hosted by rank 0 on MASTER_PORT + 1 (or $OVENET_STORE_PORT): a new one for each attempt.

    torchrun's agent store outlives its workers and still holds the dead workers' gloo addresses after a restart
    (the new group then fails: "connectFullMesh failed ... Connection refused"); the restart count cannot name a
    fresh namespace in it, since each node counts only its own failures. Rank 0's own store dies with rank 0, so
    every attempt starts empty; ranks start together, and a client waits for the server up to ``timeout``.
    """
    port = int(os.environ.get("OVENET_STORE_PORT") or int(os.environ["MASTER_PORT"]) + 1)
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], port, world_size, is_master=rank == 0, timeout=timeout,
                             wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        raise OvenetError(f"rank {rank}: cannot open the training group's store on {os.environ['MASTER_ADDR']}:{port} "
                          f"({str(exc).splitlines()[0][:160]}); free that port or set OVENET_STORE_PORT to a free one "
                          "(the same on every node)") from None


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
