"""What a new user met in the first hour (issue 20), each as the CLI behaves now: exit code, message, files.

- `ovenet export` without the onnx package: one line naming the pip install, exit 2, no file;
- training piped to a log prints a progress line with the ETA between the log_every lines;
- `ovenet train RUN_DIR --resume auto` continues a run from its folder alone;
- config.yaml records the precision that ran (fp32 on the CPU, whatever train.amp said).
"""

from __future__ import annotations

import sys

import pytest
import yaml
from test_cli import TINY, assert_one_line_error, run

from ovenet import checkpoint
from ovenet.engine import logging as train_logging
from ovenet.errors import install_command

TRAIN = ["train", "quickstart", *TINY, "train.batch_size=2", "--device", "cpu"]


def test_export_without_onnx_is_one_line_naming_the_extra(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, *TRAIN, "train.iters=1", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a plain install
    code, _, err = run(capsys, "export", str(tmp_path / "run" / "last.pth"), "--out", str(tmp_path / "m.onnx"))
    assert code == 2
    assert_one_line_error(err, "needs the onnx package", install_command("export"))
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


def test_the_onnx_file_carries_what_a_program_needs_and_info_reads_it(capsys, tmp_path):
    import json

    pytest.importorskip("onnx")
    code, _, err = run(capsys, *TRAIN, "train.iters=1", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    onnx_path = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", str(tmp_path / "run" / "last.pth"), "--out", str(onnx_path))
    assert code == 0, err
    from ovenet.export import read_onnx_metadata

    meta = read_onnx_metadata(onnx_path)
    assert json.loads(meta["class_names"]) == ["sky", "building", "road", "sidewalk", "vegetation", "pole", "car",
                                               "person"]
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert json.loads(meta["offset_head"])["tau"] == 0.5 and json.loads(meta["outputs"])[0] == "logits"
    assert len(json.loads(meta["palette"])) == int(meta["num_classes"]) == 8
    assert json.loads(meta["config"])["model"]["offset"]["tau"] == 0.5
    code, out, err = run(capsys, "info", str(onnx_path))
    assert code == 0, err
    assert "class_names: [\"sky\"" in out and "producer: ovenet" in out
    (tmp_path / "bad.onnx").write_text("not onnx")
    code, _, err = run(capsys, "info", str(tmp_path / "bad.onnx"))
    assert code == 2
    assert_one_line_error(err, "is not an ONNX file")


def test_small_mistakes_say_the_fix(capsys, tmp_path):
    code, _, err = run(capsys, "train", "quickstart", "iters=40")
    assert code == 2
    assert_one_line_error(err, "unknown config key 'iters'", "did you mean 'train.iters'?")
    for command in (["check-data", "quickstart"], ["train", "quickstart"]):
        code, _, err = run(capsys, *command, "--data-root", str(tmp_path / "nowhere"))
        assert code == 2
        assert_one_line_error(err, f"--data-root {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_eval_writes_its_log_beside_its_results(capsys, tmp_path):
    code, _, err = run(capsys, *TRAIN, "train.iters=1", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    code, out, err = run(capsys, "eval", str(tmp_path / "run" / "last.pth"), "--out", str(tmp_path / "ev"))
    assert code == 0, err
    log = (tmp_path / "ev" / "eval_val.log").read_text()
    assert log.startswith("ovenet eval ") and out in log and "mIoU" in log


def test_predict_runs_an_onnx_file_alone_with_the_checkpoints_labels(capsys, tmp_path):
    import numpy as np
    from PIL import Image

    pytest.importorskip("onnxruntime")
    code, _, err = run(capsys, *TRAIN, "train.iters=2", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    code, _, err = run(capsys, "export", str(tmp_path / "run" / "last.pth"), "--out", str(tmp_path / "m.onnx"))
    assert code == 0, err
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code, out, err = run(capsys, "predict", str(tmp_path / "m.onnx"), str(tmp_path / "a.png"), "--out",
                         str(tmp_path / "from_onnx"), "--save", "labels,offsets")
    assert code == 0, err
    assert "runtime: onnxruntime on cpu (an ONNX file)" in out
    code, _, err = run(capsys, "predict", str(tmp_path / "run" / "last.pth"), str(tmp_path / "a.png"), "--out",
                       str(tmp_path / "from_pth"), "--save", "labels", "--runtime", "torch")
    assert code == 0, err
    onnx_labels = np.asarray(Image.open(tmp_path / "from_onnx" / "a_labels.png"))
    torch_labels = np.asarray(Image.open(tmp_path / "from_pth" / "a_labels.png"))
    assert onnx_labels.shape == (48, 64) and (onnx_labels == torch_labels).mean() > 0.999
    assert (tmp_path / "from_onnx" / "a_offsets.png").is_file()
    code, _, err = run(capsys, "predict", str(tmp_path / "m.onnx"), str(tmp_path / "a.png"), "--out",
                       str(tmp_path / "x"), "model.offset.tau=0.2")
    assert code == 2
    assert_one_line_error(err, "an .onnx file runs as exported")
