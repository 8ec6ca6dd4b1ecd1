"""What a new user met in the first hour (issue 20), each as the CLI behaves now: exit code, message, files.

- `ovenet export` without the onnx package: one line naming the pip install, exit 2, no file;
- training piped to a log prints a progress line with the ETA between the log_every lines;
- `ovenet train RUN_DIR --resume auto` continues a run from its folder alone;
- config.yaml records the precision that ran (fp32 on the CPU, whatever train.amp said).
"""

from __future__ import annotations

import sys

import yaml
from test_cli import TINY, assert_one_line_error, run

from ovenet import checkpoint
from ovenet.engine import logging as train_logging

TRAIN = ["train", "quickstart", *TINY, "train.batch_size=2", "--device", "cpu"]


def test_export_without_onnx_is_one_line_naming_the_extra(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, *TRAIN, "train.iters=1", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a plain install
    code, _, err = run(capsys, "export", str(tmp_path / "run" / "last.pth"), "--out", str(tmp_path / "m.onnx"))
    assert code == 2
    assert_one_line_error(err, "needs the onnx package", "pip install 'ovenet[export]'")
    assert not (tmp_path / "m.onnx").exists()


def test_training_in_a_log_prints_progress_with_an_eta(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(train_logging, "PROGRESS_EVERY", 0.0)  # every step, instead of every 10 s
    code, _, err = run(capsys, *TRAIN, "train.iters=4", "train.log_every=100", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    log = (tmp_path / "run" / "train.log").read_text()
    for i in range(1, 4):
        assert f"progress: iteration {i}/4, " in log and " it/s, eta " in log


def test_resume_auto_on_the_run_folder_alone(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, *TRAIN, "train.iters=2", "--run-dir", str(run_dir))
    assert code == 0, err
    code, _, err = run(capsys, "train", str(run_dir), "--resume", "auto", "train.iters=3")
    assert code == 0, err
    assert checkpoint.read(run_dir / "last.pth")["iteration"] == 3
    assert f"resumed from {run_dir / 'last.pth'} at iteration 2/3" in (run_dir / "train.log").read_text()
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "train", str(tmp_path / "empty"), "--resume", "auto")
    assert code == 2
    assert_one_line_error(err, "is a folder without config.yaml")


def test_config_yaml_records_the_precision_that_ran(capsys, tmp_path):
    code, _, err = run(capsys, *TRAIN, "train.iters=1", "train.amp=bf16", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["amp"] == "fp32"
    assert checkpoint.read(tmp_path / "run" / "last.pth")["config"]["train"]["amp"] == "fp32"
