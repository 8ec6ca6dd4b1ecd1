"""DistributedDataParallel on the CPU: two processes (gloo), started the way torchrun starts them (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), train a few iterations of the tiny model.

They must end with identical parameters, split every epoch's samples between them without overlap, validate
together, and leave one checkpoint holding both ranks' RNG states.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from test_train import tiny_config

from ovenet import checkpoint
from ovenet.config import save_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    from ovenet.config import load_config
    import ovenet.engine.train as T

    torch.set_num_threads(1)
    cfg, out, rank = load_config(sys.argv[1]), Path(sys.argv[2]), int(os.environ["RANK"])
    seen = {"model": None, "names": []}
    real_step = T.train_step

    def recording_step(model, criterion, optimizer, batch, *args, **kwargs):
        seen["model"] = model
        seen["names"].append(list(batch["name"]))
        return real_step(model, criterion, optimizer, batch, *args, **kwargs)

    T.train_step = recording_step
    T.train(cfg, run_dir=out / "run")
    assert isinstance(seen["model"], torch.nn.parallel.DistributedDataParallel)
    torch.save(dict(seen["model"].module.named_parameters()), out / f"params{rank}.pt")
    (out / f"names{rank}.json").write_text(json.dumps(seen["names"]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_train_to_identical_weights(tmp_path):
    cfg = tiny_config(
        "train.iters=4", "train.log_every=1"
    )  # 8 samples / (2 ranks x 2) = 2 iterations per epoch
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(tmp_path / "rank.py"), str(tmp_path / "config.yaml"), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, stderr[-3000:]

    params = [torch.load(tmp_path / f"params{r}.pt", weights_only=True) for r in range(2)]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name

    names = [json.loads((tmp_path / f"names{r}.json").read_text()) for r in range(2)]
    assert len(names[0]) == len(names[1]) == 4
    for epoch in range(2):
        shares = [[n for batch in names[r][2 * epoch : 2 * epoch + 2] for n in batch] for r in range(2)]
        assert not set(shares[0]) & set(shares[1])  # a sample goes to one rank only
        assert len(set(shares[0]) | set(shares[1])) == 8  # together they see the whole set once

    last = checkpoint.read(tmp_path / "run" / "last.pth")
    assert last["iteration"] == 4 and last["world_size"] == 2 and len(last["rng"]) == 2
    for name, value in params[0].items():
        assert torch.equal(last["model"][name], value), name
    log = (tmp_path / "run" / "train.log").read_text()
    assert "2 process(es)" in log and "val iter 4 (fp32, whole image, one scale): mIoU" in log
    assert "SyncBatchNorm needs CUDA" in log
