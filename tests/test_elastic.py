"""Training on more than one process, launched as a team launches it (torchrun, the CLI), when things go wrong.

- torchrun ``--max-restarts``: a worker killed with SIGKILL mid-run; torchrun restarts the group, every rank
  resumes from the last checkpoint and the final weights equal an uninterrupted run's (max abs difference 0).
- two torchrun "nodes" on 127.0.0.1 (c10d rendezvous), one worker killed: the same.
- two torchrun jobs at once on one node, with consecutive --master-port values: both finish (the group's store
  takes a port the OS chooses, not MASTER_PORT + 1, which is the other job's).
- SIGTERM to one rank (a preempted node): both ranks stop at the same iteration, one checkpoint of it, exit 143.
- a rank that hangs (SIGSTOP): the other gives up after ``train.dist_timeout`` with one clear line.

Ports on 127.0.0.1 only; every process has a time limit. Linux (/proc finds torchrun's workers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from ovenet import checkpoint
from ovenet.config import save_config
from ovenet.engine import distributed as D
from ovenet.errors import OvenetError

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find workers")

ITERS = 40  # 16 samples / (2 ranks x batch 2) = 4 iterations per epoch; a checkpoint every 5
LIMIT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_free_ports() -> int:
    """A port P such that P and P + 1 are both free."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("elastic") / "tiny.yaml"
    save_config(tiny_config(f"train.iters={ITERS}", "train.ckpt_every=5", "train.log_every=5",
                            "data.num_samples=16", "train.deterministic=true"), path)
    return path


def _train_cmd(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "ovenet.cli", "train", str(config), "--run-dir", str(run_dir), "--resume", "auto",
            "--device", "cpu", *extra]


def _torchrun(*args: str, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> list[int]:
    deadline = time.time() + LIMIT_S
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)  # the agent and its workers
        pytest.fail("a launch hung:\n" + "\n".join(log.read_text()[-3000:] for log in logs))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _worker_of_rank(agents: list[subprocess.Popen], rank: int) -> int:
    for agent in agents:
        for pid in _children(agent.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
    raise AssertionError(f"no worker of rank {rank} found")


def _wait_for(path: Path, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + LIMIT_S
    while not path.is_file():
        assert all(p.poll() is None for p in procs), "the launch ended before its first checkpoint"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.read(run_dir / "last.pth")
    assert ckpt["iteration"] == ITERS and ckpt["world_size"] == 2
    return ckpt["model"]


def _max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.double() - b[k].double()).abs().max().item() if x.numel() else 0.0 for k, x in a.items())


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one torchrun launch, two workers, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    log = out / "torchrun.log"
    proc = _torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                     *_train_cmd(config_file, out / "run"), log=log)
    assert _wait([proc], [log]) == [0], log.read_text()[-3000:]
    return _weights(out / "run")


def _check_restarted(run_dir: Path, reference: dict, logs: list[Path]) -> None:
    text = "\n".join(log.read_text() for log in logs)
    assert _max_abs_difference(_weights(run_dir), reference) == 0.0, text[-3000:]
    train_log = (run_dir / "train.log").read_text()
    assert "torchrun restarted the group (restart 1 of at most 2, the most any node has counted)" in train_log
    assert f"at iteration {ITERS}" not in train_log.split("resumed from")[0]  # it was cut short before
    assert "resumed from" in train_log and f"training finished: {ITERS} iterations" in train_log


def test_torchrun_restart_after_a_killed_worker_equals_an_uninterrupted_run(config_file, uninterrupted, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    agent = _torchrun("--nproc-per-node", "2", "--max-restarts", "2", "--master-addr", "127.0.0.1",
                      "--master-port", str(_free_port()), *_train_cmd(config_file, run_dir), log=log)
    _wait_for(run_dir / "last.pth", [agent])
    os.kill(_worker_of_rank([agent], 1), signal.SIGKILL)
    assert _wait([agent], [log]) == [0], log.read_text()[-3000:]
    _check_restarted(run_dir, uninterrupted, [log])


def test_two_nodes_c10d_restart_after_a_killed_worker_equals_an_uninterrupted_run(config_file, uninterrupted,
                                                                                 tmp_path):
    run_dir, port = tmp_path / "run", _free_port()
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    agents = [_torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(n), "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--max-restarts", "2",
                        *_train_cmd(config_file, run_dir), log=logs[n]) for n in range(2)]
    _wait_for(run_dir / "last.pth", agents)
    os.kill(_worker_of_rank(agents, 1), signal.SIGKILL)
    assert _wait(agents, logs) == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    _check_restarted(run_dir, uninterrupted, logs)
    # rank 0 survived the first attempt: it said in train.log why it stopped
    assert "rank 0: lost the other processes of the run" in (run_dir / "train.log").read_text()


def test_two_jobs_on_one_node_with_consecutive_master_ports_both_finish(config_file, tmp_path):
    port = _two_free_ports()
    logs = [tmp_path / f"job{n}.log" for n in range(2)]
    agents = [_torchrun("--nproc-per-node", "2", "--max-restarts", "1", "--master-addr", "127.0.0.1",
                        "--master-port", str(port + n), *_train_cmd(config_file, tmp_path / f"run{n}", "train.iters=2"),
                        log=logs[n]) for n in range(2)]
    assert _wait(agents, logs) == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    for n in range(2):
        ckpt = checkpoint.read(tmp_path / f"run{n}" / "last.pth")
        assert ckpt["iteration"] == 2 and ckpt["world_size"] == 2
        assert "restarted the group" not in (tmp_path / f"run{n}" / "train.log").read_text()  # first attempt


def test_a_new_attempt_joins_only_the_store_its_rank_0_published(monkeypatch):
    """torchrun's store outlives attempts: the key may still name a dead attempt's store (nothing listens there)
    or a port that another store took since. Rank 1 must wait for the store of its own rank 0."""
    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.delenv("OVENET_STORE_PORT", raising=False)
    key, timeout = f"{D.STORE_KEY}/job", timedelta(seconds=20)
    agent.set(key, f"127.0.0.1 {_free_port()} dead-attempt")
    with ThreadPoolExecutor(1) as pool:
        joining = pool.submit(D._fresh_store, 1, 2, timeout)
        time.sleep(0.5)
        reused = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        reused.set(D.NONCE_KEY, "another-store")
        agent.set(key, f"127.0.0.1 {reused.port} dead-attempt")
        time.sleep(0.5)
        assert not joining.done()
        hosted = D._fresh_store(0, 2, timeout)
        joined = joining.result(timeout=30)
    assert joined.port == hosted.port != reused.port
    assert joined.get(D.NONCE_KEY) == hosted.get(D.NONCE_KEY)
    fixed = _free_port()  # behind a firewall: the port the user opened
    monkeypatch.setenv("OVENET_STORE_PORT", str(fixed))
    hosted = D._fresh_store(0, 2, timeout)
    assert hosted.port == fixed == D._fresh_store(1, 2, timeout).port
    with pytest.raises(OvenetError, match=r"rank 1: rank 0 did not publish a reachable store .* within "
                                          r"train.dist_timeout=1 s .*OVENET_STORE_PORT"):
        agent.set(key, f"127.0.0.1 {_free_port()} dead-attempt")
        D._fresh_store(1, 2, timedelta(seconds=1))


def _ranks(config: Path, run_dir: Path, tmp_path: Path, *overrides: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two ranks started the way torchrun starts them, without an agent that would restart or kill them."""
    port, procs, logs = _free_port(), [], []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(tmp_path / f"rank{rank}.log")
        with logs[-1].open("w") as f:
            procs.append(subprocess.Popen([sys.executable, *_train_cmd(config, run_dir, *overrides)], env=env,
                                          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    return procs, logs


def test_sigterm_to_one_rank_stops_both_at_the_same_iteration_with_one_checkpoint(config_file, tmp_path):
    run_dir = tmp_path / "run"
    procs, logs = _ranks(config_file, run_dir, tmp_path, "train.iters=400")
    _wait_for(run_dir / "last.pth", procs)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait(procs, logs) == [143, 143], "\n".join(log.read_text()[-2000:] for log in logs)
    ckpt = checkpoint.read(run_dir / "last.pth")
    assert 5 <= ckpt["iteration"] < 400 and len(ckpt["rng"]) == 2
    message = f"stopped by SIGTERM at iteration {ckpt['iteration']}/400; saved {run_dir / 'last.pth'}"
    assert message in logs[0].read_text() and message in (run_dir / "train.log").read_text()
    assert "received SIGTERM: finishing the current step" in logs[1].read_text()  # rank 1 logs warnings only
    assert not list(run_dir.glob(".*.tmp"))  # no torn checkpoint left behind


def test_a_hung_rank_makes_the_other_give_up_after_dist_timeout(config_file, tmp_path):
    run_dir = tmp_path / "run"
    procs, logs = _ranks(config_file, run_dir, tmp_path, "train.iters=400", "train.dist_timeout=5")
    try:
        _wait_for(run_dir / "last.pth", procs)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        assert procs[0].wait(timeout=60) == 2
        assert time.time() - stopped < 45
    finally:
        procs[1].kill()
        procs[1].wait()
    lines = [line for line in logs[0].read_text().splitlines() if line.startswith("ovenet: error:")]
    assert len(lines) == 1, logs[0].read_text()[-3000:]
    assert "rank 0: lost the other processes of the run" in lines[0]
    assert "train.dist_timeout=5 s" in lines[0] and f"{run_dir / 'last.pth'} is kept" in lines[0]
    assert checkpoint.read(run_dir / "last.pth")["iteration"] >= 5


@pytest.mark.parametrize("message", ["Connection closed by peer [127.0.0.1]:1234",
                                     "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error",
                                     "Application timeout caused pair closure"])
def test_what_a_collective_raises_when_a_peer_is_gone_reads_as_a_lost_peer(message):
    """Each is a real gloo message for a dead or hung peer; the last came out of DDP's backward on a loaded 2-core
    machine (a hung rank past train.dist_timeout) and was a traceback instead of the one line before it was listed."""
    from ovenet.engine.train import lost_peers

    assert lost_peers(RuntimeError(message))
    assert not lost_peers(RuntimeError("CUDA error: an illegal memory access was encountered"))
