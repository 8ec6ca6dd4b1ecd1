"""`ovenet report`: the page's figures are the run's numbers, and the page points only at files that exist.

- the curves' points are train.log's values (parsed here on their own), later lines winning after a resume;
- the confusion matrix is the evaluation's (eval_val.json), row-normalised, and its diagonal gives the IoUs;
- the per-class bars beside a second run hold that run's IoUs;
- every src/href of index.html exists; without matplotlib the command is one line naming the pip install.
No headless browser is installed here: the PNGs were looked at by hand when this was written.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import tiny_config

from ovenet.cli.main import main
from ovenet.engine.evaluate import evaluate
from ovenet.engine.train import train
from ovenet.errors import install_command
from ovenet.report import build_report

pytest.importorskip("matplotlib", reason="ovenet report needs matplotlib (pip install 'ovenet[report]')")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("report") / "run"
        train(tiny_config("train.iters=6", "train.log_every=1", "train.val_every=3", "train.report=true"),
              run_dir=out)
        return out
    finally:
        torch.set_num_threads(threads)


def _log_values(log: Path) -> tuple[dict[int, dict[str, float]], dict[int, float]]:
    train_points, val_points = {}, {}
    for line in log.read_text().splitlines():
        message = line.split(" INFO ", 1)[-1]
        if message.startswith("iter "):
            fields = message.split(" | ")
            iteration = int(fields[0].split()[1].split("/")[0])
            words = fields[1].split()
            train_points[iteration] = {**dict(zip(words[::2], map(float, words[1::2]))),
                                       "lr": float(fields[2].split()[1])}
        elif message.startswith("val iter "):
            val_points[int(message.split()[2])] = float(re.search(r"mIoU ([\d.]+)", message).group(1)) / 100
    return train_points, val_points


def _data(report: Path) -> dict:
    return json.loads((report / "data.json").read_text())


def test_training_writes_the_report_and_its_curves_are_the_log(run_dir):
    report = run_dir / "report"
    data = _data(report)
    train_points, val_points = _log_values(run_dir / "train.log")
    assert len(train_points) == 6 and sorted(val_points) == [3, 6]
    assert {int(k): v for k, v in data["curves"]["train"].items()} == train_points
    assert {int(k): v["miou"] for k, v in data["curves"]["val"].items()} == val_points
    assert set(train_points[1]) == {"loss", "loss_initial", "loss_seed", "loss_final", "loss_confidence", "lr"}
    for name in ("curves.png", "per_class_iou.png", "confusion.png", "gallery_0.png"):
        assert (report / name).stat().st_size > 1000, name
    assert len(data["gallery"]) == 2  # the synthetic val split of 8 scenes / 4
    assert data["metrics_source"].endswith("val_last.json")


def test_the_page_references_only_files_that_exist(run_dir):
    page = (run_dir / "report" / "index.html").read_text()
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(references) >= 5
    for ref in references:
        assert (run_dir / "report" / ref).is_file(), ref


def test_the_confusion_matrix_is_the_evaluations(run_dir, tmp_path):
    result = evaluate(tiny_config(), run_dir / "last.pth", out_dir=tmp_path, overwrite=True)
    counts = np.array(result["confusion"], dtype=np.float64)
    tp = counts.diagonal()
    union = counts.sum(0) + counts.sum(1) - tp
    assert np.allclose(np.where(union > 0, tp / np.maximum(union, 1), np.nan), np.array(result["iou"], dtype=float),
                       equal_nan=True)  # the stored matrix is the one the IoUs came from
    build_report(run_dir, tmp_path / "report", gallery=0, metrics_path=tmp_path / "eval_val.json")
    data = _data(tmp_path / "report")
    shown = np.array([[np.nan if v is None else v for v in row] for row in data["confusion_normalised"]])
    rows = counts.sum(1, keepdims=True)
    expected = np.where(rows > 0, counts / np.maximum(rows, 1), np.nan)
    assert np.allclose(shown, expected, equal_nan=True)
    assert np.allclose(np.nansum(shown, 1)[rows[:, 0] > 0], 1.0)


def test_eval_into_the_run_folder_reports_its_own_figures(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = copy / "config.yaml"
    assert main(["eval", str(config), str(copy / "last.pth"), "--device", "cpu", "train.report=true"]) == 0
    assert f"report: {copy / 'report' / 'index.html'}" in capsys.readouterr().out
    data = _data(copy / "report")
    assert data["metrics_source"] == str(copy / "eval_val.json")
    assert data["per_class"]["iou"] == json.loads((copy / "eval_val.json").read_text())["iou"]


def test_compare_puts_the_second_runs_ious_beside(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    names = [f"c{i}" for i in range(8)]
    ious = [0.1 * i for i in range(8)]
    (other / "val_last.json").write_text(json.dumps({"class_names": names, "iou": ious, "miou": 0.35}))
    assert main(["report", str(run_dir), "--compare", str(other), "--out", str(tmp_path / "r"), "--gallery", "0"]) == 0
    data = _data(tmp_path / "r")
    assert data["per_class"]["compare"] == ious
    assert data["per_class"]["iou"] == json.loads((run_dir / "val_last.json").read_text())["iou"]


def test_bad_input_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and install_command("report") in err[0]
    assert not (tmp_path / "r").exists()
