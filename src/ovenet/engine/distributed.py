"""torchrun / DistributedDataParallel plumbing: process-group setup from the environment, device choice, and
the few collectives the training loop needs (all of them no-ops in a single process).

Launch multi-GPU training with ``torchrun --nproc_per_node=N -m ovenet.cli train ...``: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and :func:`init_distributed` reads them. Under torchrun's elastic agent (``--max-restarts``,
several nodes) the workers meet in a store that rank 0 hosts (:func:`_fresh_store`), new for every attempt: torch's
own ``env://`` join reuses the agent's store, where the dead workers' gloo addresses are still written, and a
restarted group fails with "Gloo connectFullMesh failed ... Connection refused". That store listens on a port the
OS chooses (no fixed extra port: two jobs on one node never collide) and is found through the agent's store.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
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


STORE_KEY = "ovenet/store"  # in torchrun's agent store: where this attempt's store is ("host port nonce")
NONCE_KEY = "ovenet/nonce"  # in the attempt's own store: proves that an address is this attempt's
PROBE_S = 2.0  # how long one look at a published address may take before it is tried again


def _fresh_store(rank: int, world_size: int, timeout: timedelta) -> Any:
    """The group's store, hosted by rank 0 on a port the OS chooses (or $OVENET_STORE_PORT): a new one for each
    attempt, found through torchrun's agent store.

    torchrun's agent store outlives its workers and still holds the dead workers' gloo addresses after a restart
    (the new group then fails: "connectFullMesh failed ... Connection refused"); the restart count cannot name a
    fresh namespace in it, since each node counts only its own failures. So rank 0 opens a store of its own, which
    dies with it, writes a random nonce into it and publishes its address and the nonce under one key of the
    agent store. That key may still hold a dead attempt's address (torchrun stops every worker of an attempt
    before it starts the next, so that store is closed; its port may be reused): the others accept an address
    only when the store there answers with the nonce published beside it, and read the key again otherwise.
    """
    master_addr, master_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    key = f"{STORE_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    try:
        agent = dist.TCPStore(master_addr, master_port, is_master=False, timeout=timeout)
    except (RuntimeError, OSError) as exc:
        raise OvenetError(f"rank {rank}: cannot reach torchrun's store at {master_addr}:{master_port} "
                          f"({_first_line(exc)}); check that the launch's nodes reach each other") from None
    if rank == 0:
        return _host_store(agent, key, master_addr, master_port, world_size, timeout)
    return _join_store(agent, key, rank, world_size, timeout)


def _host_store(agent: Any, key: str, master_addr: str, master_port: int, world_size: int,
                timeout: timedelta) -> Any:
    """Rank 0: open this attempt's store, mark it with a nonce, publish where it is."""
    host, port = _address_seen_from(master_addr, master_port), int(os.environ.get("OVENET_STORE_PORT") or 0)
    try:
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        raise OvenetError(f"rank 0: cannot open the training group's store on port {port} of {host} "
                          f"({_first_line(exc)}); free that port or set OVENET_STORE_PORT to a free one") from None
    nonce = secrets.token_hex(16)
    store.set(NONCE_KEY, nonce)
    agent.set(key, f"{host} {store.port} {nonce}")
    return store


def _join_store(agent: Any, key: str, rank: int, world_size: int, timeout: timedelta) -> Any:
    """The other ranks: connect to the store that rank 0 of this attempt published, and to no older one."""
    deadline = time.monotonic() + timeout.total_seconds()
    seen = "none published"
    while time.monotonic() < deadline:
        if agent.check([key]):
            host, port, nonce = agent.get(key).decode().rsplit(" ", 2)
            seen = f"{host}:{port}, not answering or not this attempt's"
            store = _store_with_nonce(host, int(port), nonce, world_size)
            if store is not None:
                store.set_timeout(timeout)
                return store
        time.sleep(0.1)
    raise OvenetError(f"rank {rank}: rank 0 did not publish a reachable store for this attempt within "
                      f"train.dist_timeout={timeout.total_seconds():g} s (last address: {seen}); check that rank 0 "
                      "started and that its node accepts connections from this one, or set OVENET_STORE_PORT on "
                      "every node to a port open between them")


def _store_with_nonce(host: str, port: int, nonce: str, world_size: int) -> Any | None:
    """A client of the store at host:port if it holds ``nonce``, else None (nothing there, or another store)."""
    try:  # a plain connection first: TCPStore would log a stack trace for every refused try
        socket.create_connection((host, port), timeout=PROBE_S).close()
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=PROBE_S))
        if store.check([NONCE_KEY]) and store.get(NONCE_KEY).decode() == nonce:
            return store
    except (RuntimeError, OSError):
        pass
    return None


def _address_seen_from(master_addr: str, master_port: int) -> str:
    """This machine's address for the other nodes: ``master_addr`` itself when it names this machine (rank 0 runs
    on the node that hosts torchrun's store, the usual case), else this machine's address on the route to it."""
    try:
        family, _, _, _, target = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)  # UDP: picks the route and the source address, sends nothing
            local = probe.getsockname()[0]
    except OSError:
        return master_addr
    return master_addr if local == target[0] else local


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


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
