"""Exact resume: training 2N iterations equals N iterations, a stop, a resume and N more.

The stop is a real SIGTERM delivered to this process after the N-th step (the handler lets the step finish and
saves last.pth). The model has OCR dropout, so the RNG states must be restored too, and N is chosen both
mid-epoch (the sampler must continue where it stopped) and on an epoch boundary.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train import tiny_config

from ovenet import checkpoint
from ovenet.engine import train as train_mod
from ovenet.engine.guards import TrainingInterrupted
from ovenet.engine.train import train
from ovenet.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

TOTAL = 6  # 4 iterations per epoch: the run crosses an epoch boundary


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    return checkpoint.read(
        train(tiny_config(), run_dir=tmp_path_factory.mktemp("straight") / "run") / "last.pth"
    )


def _sigterm_after(monkeypatch, steps: int) -> list:
    real_step = train_mod.train_step
    calls = []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    return calls


@pytest.mark.parametrize("stop_at", [3, 4])
def test_stop_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, stop_at):
    run_dir = tmp_path / "run"
    calls = _sigterm_after(monkeypatch, stop_at)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_config(), run_dir=run_dir)
    assert stopped.value.code == 128 + signal.SIGTERM == 143
    assert len(calls) == stop_at  # the step in flight finished, no further step started
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    saved = checkpoint.read(run_dir / "last.pth")
    assert saved["iteration"] == stop_at and saved["scheduler"]["last_epoch"] == stop_at

    monkeypatch.undo()  # back to the real train_step
    train(tiny_config(), resume="auto", run_dir=run_dir)
    resumed = checkpoint.read(run_dir / "last.pth")

    assert resumed["iteration"] == uninterrupted["iteration"] == TOTAL
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for key, state in uninterrupted["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(resumed["rng"][0]["torch"], uninterrupted["rng"][0]["torch"])
    assert resumed["best_miou"] == uninterrupted["best_miou"]
    log = (run_dir / "train.log").read_text()
    assert f"stopped by SIGTERM at iteration {stop_at}/{TOTAL}" in log
    assert f"resumed from {run_dir / 'last.pth'} at iteration {stop_at}/{TOTAL}" in log


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    run_dir = train(tiny_config("train.iters=2"), resume="auto", run_dir=tmp_path / "run")
    assert "--resume auto: no" in (run_dir / "train.log").read_text()
    assert checkpoint.read(run_dir / "last.pth")["iteration"] == 2


def test_resume_from_weights_only_checkpoint_is_refused(tmp_path):
    cfg = tiny_config()
    from ovenet.models import build_model

    path = checkpoint.save(tmp_path / "weights.pth", build_model(cfg.model), cfg)
    with pytest.raises(CheckpointError, match="no training state .* not for --resume"):
        train(cfg, resume=path, run_dir=tmp_path / "run")


def test_resume_refusals_leave_the_run_folder_untouched(tmp_path):
    from ovenet.errors import ConfigError, OvenetError

    first = train(tiny_config("train.iters=2"), run_dir=tmp_path / "first")
    second = train(tiny_config("train.iters=2", "train.seed=5"), run_dir=tmp_path / "second")
    files = {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()}
    # Resuming another run's checkpoint into a folder that holds a run would replace its checkpoints.
    with pytest.raises(OvenetError, match=rf"^run folder {second} holds another run \(last.pth, best.pth\)"):
        train(tiny_config("train.iters=3"), resume=first / "last.pth", run_dir=second)
    # A changed seed is part of what the weights were trained with.
    with pytest.raises(ConfigError, match=r"^cannot resume .*\(train.seed 5 -> 304\); resume with the original"):
        train(tiny_config("train.iters=3"), resume="auto", run_dir=second)
    assert {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()} == files
