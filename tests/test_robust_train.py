"""Robust training ("an interrupted run loses at most the work since the last checkpoint"):

- SIGTERM to a training process: it finishes the step, saves last.pth, exits 143, and the run resumes;
- kill -9 while checkpoints are being written: the previous last.pth stays readable and resumable;
- a NaN/inf loss stops training naming the iteration, without writing the bad weights over last.pth;
- an unwritable output folder or a full disk fail before training;
- an unreadable training file stops training naming it (bad_sample=stop), or is logged and skipped (skip).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny_config
from torch import nn

from ovenet import checkpoint
from ovenet.config import save_config
from ovenet.engine import train as train_mod
from ovenet.engine.train import train
from ovenet.errors import DataError, OvenetError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

RUNNER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    from ovenet.config import load_config
    from ovenet.engine.train import train
    from ovenet.errors import OvenetError

    torch.set_num_threads(1)
    cfg = load_config(sys.argv[1])
    if len(sys.argv) > 3 and sys.argv[3] == "as-nobody" and os.geteuid() == 0:
        os.setuid(65534)  # root ignores file permissions; an unprivileged user does not
    try:
        train(cfg, run_dir=Path(sys.argv[2]))
    except OvenetError as exc:
        print(f"OvenetError: {exc}", file=sys.stderr)
        sys.exit(2)
""")


def _start(tmp_path: Path, cfg, run_dir: Path, *extra: str) -> subprocess.Popen:
    script, config = tmp_path / "runner.py", tmp_path / "config.yaml"
    script.write_text(RUNNER)
    save_config(cfg, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(config), str(run_dir), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training process made no progress in time")
        time.sleep(0.002)


def test_sigterm_saves_last_checkpoint_exits_143_and_resumes(tmp_path):
    cfg = tiny_config("train.iters=20", "train.log_every=1")
    run_dir = tmp_path / "run"
    proc = _start(tmp_path, cfg, run_dir)
    log = run_dir / "train.log"
    _wait_for(lambda: log.is_file() and "iter 3/20" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 143, stderr[-2000:]
    assert "received SIGTERM: finishing the current step" in stderr
    stopped = checkpoint.read(run_dir / "last.pth")  # ckpt_every=100: this one comes from the stop
    assert 3 <= stopped["iteration"] < 20
    assert f"stopped by SIGTERM at iteration {stopped['iteration']}/20" in log.read_text()

    train(cfg, resume="auto", run_dir=run_dir)
    assert checkpoint.read(run_dir / "last.pth")["iteration"] == 20


def test_kill_9_during_checkpoint_writes_keeps_previous_last_readable(tmp_path):
    cfg = tiny_config("train.iters=100000", "train.ckpt_every=1", "train.log_every=1000")
    caught_mid_write = False
    for attempt in range(5):
        run_dir = tmp_path / f"run{attempt}"
        proc = _start(tmp_path, cfg, run_dir)
        last = run_dir / "last.pth"
        _wait_for(last.is_file, proc)
        temporaries: list[Path] = []

        def writing(run_dir: Path = run_dir, temporaries: list = temporaries) -> bool:
            temporaries[:] = list(run_dir.glob(".last.pth.*.tmp"))
            return bool(temporaries)

        _wait_for(writing, proc)
        proc.kill()
        proc.communicate(timeout=30)
        caught_mid_write = any(t.exists() for t in temporaries)  # killed before the rename: a torn temp file
        saved = checkpoint.read(last)  # the previous complete checkpoint
        assert saved["iteration"] >= 1
        if caught_mid_write:
            break
    assert caught_mid_write, "never managed to kill the process in the middle of a checkpoint write"

    # The torn temporary file does not disturb resuming from the intact last.pth.
    resumed_cfg = tiny_config(f"train.iters={saved['iteration'] + 1}")
    train(resumed_cfg, resume="auto", run_dir=run_dir)
    assert checkpoint.read(last)["iteration"] == saved["iteration"] + 1


@pytest.mark.parametrize("poison, ckpt_every, log_every", [("nan", 2, 3), ("inf", 1, 100)])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch, poison, ckpt_every, log_every
):
    real_build_loss = train_mod.build_loss

    class PoisonAtStep5(nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, output, target):
            loss, terms = self.criterion(output, target)
            self.calls += 1
            if self.calls == 5:
                loss = loss * float(poison)
            return loss, {**terms, "loss": loss.detach()}

    monkeypatch.setattr(train_mod, "build_loss", lambda *a, **k: PoisonAtStep5(real_build_loss(*a, **k)))
    run_dir = tmp_path / "run"
    cfg = tiny_config("train.iters=8", f"train.ckpt_every={ckpt_every}", f"train.log_every={log_every}")
    with pytest.raises(
        OvenetError,
        match=rf"^loss is {poison} at iteration 5; the last good checkpoint is kept "
        rf"at {run_dir / 'last.pth'}; lower train.lr or check the data$",
    ):
        train(cfg, run_dir=run_dir)
    last = checkpoint.read(run_dir / "last.pth")
    assert last["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (run_dir / "best.pth").exists()


def test_output_folder_below_a_file_fails_before_training(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(OvenetError, match=r"^cannot write to the output folder .*taken/run"):
        train(tiny_config(), run_dir=tmp_path / "taken" / "run")


def test_read_only_output_folder_fails_before_training(tmp_path):
    # Root ignores permissions, so the run drops to user "nobody" (who must be able to reach the folder).
    parent = Path(tempfile.mkdtemp(prefix="ovenet_ro_"))
    try:
        parent.chmod(0o755)
        read_only = parent / "read_only"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        script_dir = parent / "scripts"
        script_dir.mkdir(mode=0o755)
        proc = _start(script_dir, tiny_config(), read_only / "run", "as-nobody")
        for path in script_dir.iterdir():
            path.chmod(0o644)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, stderr[-2000:]
        assert (
            f"OvenetError: cannot write to the output folder {read_only / 'run'} (Permission denied)"
            in stderr
        )
        assert not (read_only / "run").exists()
    finally:
        read_only.chmod(0o755)
        for path in sorted(parent.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        parent.rmdir()


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 2**20)
    )
    with pytest.raises(OvenetError, match=r"^only 1 MiB free in .* but checkpoints need about \d+ MiB"):
        train(tiny_config(), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "last.pth").exists()


def _folder_dataset(root: Path) -> Path:
    """8 training images (img_3 is not an image at all) and 2 validation images, 32x32, 5 classes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / split / "images" / f"img_{i}.png"
            )
            Image.fromarray(rng.integers(0, 5, (32, 32), dtype=np.uint8)).save(
                root / split / "labels" / f"img_{i}.png"
            )
    broken = root / "train" / "images" / "img_3.png"
    broken.write_bytes(b"this is not a png")
    return broken


def _folder_config(root: Path, *overrides: str):
    return tiny_config(
        "data.name=folder",
        f"data.image_dir={root}/{{split}}/images",
        f"data.label_dir={root}/{{split}}/labels",
        "data.num_classes=5",
        "model.num_classes=5",
        "data.base_size=null",
        "data.scale_range=[1.0,1.0]",
        "train.iters=8",
        *overrides,
    )


def test_bad_sample_stop_names_the_file_even_from_a_worker(tmp_path):
    broken = _folder_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    with pytest.raises(DataError) as error:
        train(
            _folder_config(tmp_path / "data", "data.num_workers=1", "train.bad_sample=stop"), run_dir=run_dir
        )
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message  # unwrapped from the worker's re-raise
    assert message.startswith(f"cannot decode image {broken}")
    assert "train.bad_sample=skip" in message and "progress is saved" in message
    assert checkpoint.read(run_dir / "last.pth")["iteration"] < 4  # stopped within the first epoch


def test_bad_sample_skip_logs_the_file_and_finishes(tmp_path):
    broken = _folder_dataset(tmp_path / "data")
    run_dir = train(_folder_config(tmp_path / "data", "train.bad_sample=skip"), run_dir=tmp_path / "run")
    last = checkpoint.read(run_dir / "last.pth")
    assert last["iteration"] == 8
    assert len(last["skipped"]) == 2 and all(str(broken) in s for s in last["skipped"])  # once per epoch
    assert (
        f"skipped unreadable training sample: cannot decode image {broken}"
        in (run_dir / "train.log").read_text()
    )


def _bad_val_label(root: Path) -> Path:
    """The folder dataset with a sound training split and a validation label of the wrong size."""
    _folder_dataset(root)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "images" / "img_3.png")
    bad = root / "val" / "labels" / "img_1.png"
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(bad)
    return bad


def test_a_bad_validation_sample_in_a_worker_is_one_line_after_saving_the_work(tmp_path, capsys):
    from ovenet.cli.main import main
    from ovenet.config import save_config

    bad = _bad_val_label(tmp_path / "data")
    cfg = _folder_config(tmp_path / "data", "data.num_workers=2", "train.val_every=4", "train.ckpt_every=100")
    save_config(cfg, tmp_path / "cfg.yaml")
    assert main(["train", str(tmp_path / "cfg.yaml"), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ovenet: error:")]
    assert len(err) == 1 and err[0].startswith("ovenet: error: validation: ")
    assert str(bad) in err[0] and "DataLoader worker" not in err[0]
    assert "progress is saved in" in err[0] and "train.bad_sample=skip" in err[0]
    assert checkpoint.read(tmp_path / "run" / "last.pth")["iteration"] == 4  # the 4 iterations before it are kept


def test_bad_sample_skip_covers_validation_and_reports_it(tmp_path):
    bad = _bad_val_label(tmp_path / "data")
    run_dir = train(_folder_config(tmp_path / "data", "data.num_workers=2", "train.val_every=4",
                                   "train.bad_sample=skip"), run_dir=tmp_path / "run")
    last = checkpoint.read(run_dir / "last.pth")
    assert last["iteration"] == 8 and len(last["skipped"]) == 2 and all(str(bad) in s for s in last["skipped"])
    log = (run_dir / "train.log").read_text()
    assert log.count(f"skipped unreadable validation sample: image ") == 2 and "val iter 8" in log
