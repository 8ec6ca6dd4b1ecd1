"""`ovenet report`: the page's figures are the run's numbers, and the page points only at files that exist.

- the curves' points are train.log's values (parsed here on their own), later lines winning after a resume;
- the confusion matrix is the evaluation's (eval_val.json), row-normalised, and its diagonal gives the IoUs;
- the per-class bars beside a second run hold that run's IoUs;
- every src/href of index.html exists; without matplotlib the command is one line naming the pip install;
- the header's facts are the run's (config.yaml, train.log, val_last.json), the learning-rate curve is the
  scheduler's rate at every iteration (warmup included, never 0 while training), the gallery is spread over the
  val set, and --compare says (page and terminal) when the two runs were scored on different val images;
- the page renders in headless Chromium when it is installed (Debian's `chromium`; CI skips it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from test_train import tiny_config

from ovenet.cli.main import main
from ovenet.config import load_config
from ovenet.data import build_dataset
from ovenet.engine.evaluate import evaluate, samples_digest
from ovenet.engine.train import train
from ovenet.errors import install_command
from ovenet.report import DPI, STYLE, build_report, spread_indices

pytest.importorskip("matplotlib", reason="ovenet report needs matplotlib (pip install 'ovenet[report]')")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("report") / "run"
        # A warmup (the learning rate's first iterations) and 5 val scenes (room for a spread gallery).
        train(tiny_config("train.iters=6", "train.log_every=1", "train.val_every=3", "train.report=true",
                          "train.warmup_iters=3", "data.val_samples=5"), run_dir=out)
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
    assert data["header"]["figures_from"] == ("eval_val.json: `ovenet eval` of last.pth on val, 5 images, mode whole, "
                                              "scales [1.0], flip False")


def test_compare_puts_the_second_runs_ious_beside(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    names = [f"c{i}" for i in range(8)]
    ious = [0.1 * i for i in range(8)]
    (other / "val_last.json").write_text(json.dumps({"class_names": names, "iou": ious, "miou": 0.35}))
    assert main(["report", str(run_dir), "--compare", str(other), "--out", str(tmp_path / "r"), "--gallery", "0"]) == 0
    data = _data(tmp_path / "r")
    assert data["per_class"]["compare"] == ious
    err = capsys.readouterr().err  # a val set it cannot check, and classes that are not this run's
    assert "cannot tell whether both were scored on the same val images" in err
    assert "its classes are not this run's (8 vs 8, first 'c0' vs 'sky')" in err
    assert data["per_class"]["iou"] == json.loads((run_dir / "val_last.json").read_text())["iou"]


def test_bad_input_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and install_command("report") in err[0]
    assert not (tmp_path / "r").exists()


def test_the_header_states_the_runs_model_data_iterations_and_evaluation(run_dir):
    import torch

    header = _data(run_dir / "report")["header"]
    cfg = load_config(run_dir / "config.yaml")
    _, val_points = _log_values(run_dir / "train.log")
    state = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=False)
    params = sum(v.numel() for k, v in state["model"].items() if not k.endswith(("running_mean", "running_var",
                                                                                   "num_batches_tracked")))
    assert header["model"] == {"network": cfg.model.network, "head": "ocr", "method": "OVeNet (offset head)",
                               "params_m": pytest.approx(params / 1e6, abs=0.005)}
    assert header["data"] == {"dataset": "synthetic", "root": cfg.data.root, "train_split": "train",
                              "val_split": "val"}
    assert header["val_images"] == len(build_dataset(cfg.data, train=False)) == 5
    assert header["iterations"] == {"done": 6, "planned": 6}
    best = max(val_points, key=lambda i: (val_points[i], -i))
    assert header["best_val"] == {"iteration": best, "miou": val_points[best]}
    assert header["last_val"] == {"iteration": 6, "miou": val_points[6]}
    assert header["figures_from"].startswith("val_last.json: the validation at iteration 6, 5 images")
    written = datetime.strptime(header["written"], "%Y-%m-%d %H:%M UTC").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - written).total_seconds()) < 3600
    page = (run_dir / "report" / "index.html").read_text()
    for text in ("hrnetv2_w18_small_v1, ocr head, OVeNet (offset head)", "5 images", "6 of 6 planned",
                 f"best {100 * val_points[best]:.2f} at iteration {best}", f"last {100 * val_points[6]:.2f} at "
                 "iteration 6", "val_last.json: the validation at iteration 6", header["written"]):
        assert text in page, text


def test_the_learning_rate_curve_is_the_schedule_at_every_iteration(run_dir):
    schedule = _data(run_dir / "report")["lr_schedule"]
    train_points, _ = _log_values(run_dir / "train.log")
    total, warmup, lr0 = 6, 3, 0.01
    assert schedule["first_iteration"] == 1 and len(schedule["lr"]) == total
    # ovenet.engine.optim's definition: step i (0-based) trains with lr0 * (1 - i/N)^0.9 * min(1, (i + 1)/warmup).
    expected = [lr0 * (1 - i / total) ** 0.9 * min(1.0, (i + 1) / warmup) for i in range(total)]
    assert schedule["lr"] == pytest.approx(expected, rel=1e-9)
    assert min(schedule["lr"]) > 0  # no iteration trained at lr 0 (the log's last point is the schedule's end)
    # Tied to the run: the log prints, after step k, the rate step k + 1 will use.
    for k in range(1, total):
        assert schedule["lr"][k] == pytest.approx(train_points[k]["lr"], abs=1e-6)
    assert train_points[total]["lr"] == 0.0


def test_the_gallery_is_spread_over_the_val_set(run_dir):
    assert spread_indices(4, 101) == [0, 33, 67, 100]
    assert spread_indices(4, 5) == [0, 1, 3, 4]
    assert spread_indices(10, 3) == [0, 1, 2] and spread_indices(1, 7) == [0] and spread_indices(3, 0) == []
    gallery = _data(run_dir / "report")["gallery"]
    assert [g["index"] for g in gallery] == [0, 1, 3, 4]
    assert [g["name"] for g in gallery] == [f"synthetic/1_00000{i}" for i in (0, 1, 3, 4)]
    assert all((run_dir / "report" / g["file"]).stat().st_size > 1000 for g in gallery)
    assert all(g["confidence_ticks"] == [0.0, 0.5, 1.0] for g in gallery)  # read back from the drawn colour bar


def test_the_class_legend_is_the_val_sets_names_and_colours(run_dir):
    from ovenet.data.synthetic import synthetic_class_info

    names, palette = synthetic_class_info(8)
    page = (run_dir / "report" / "index.html").read_text()
    swatches = re.findall(r'<span class="swatch"><i style="background:rgb\((\d+),(\d+),(\d+)\)"></i>([^<]+)</span>', page)
    assert [(name, tuple(map(int, rgb))) for *rgb, name in swatches] == [(n, tuple(c)) for n, c in zip(names, palette)]


def test_validation_and_eval_record_the_val_set(run_dir, tmp_path):
    cfg = load_config(run_dir / "config.yaml")
    val_set = build_dataset(cfg.data, train=False)
    recorded = json.loads((run_dir / "val_last.json").read_text())
    assert recorded["num_images"] == 5 and recorded["samples_digest"] == samples_digest(val_set)
    assert (recorded["dataset"], recorded["split"]) == ("synthetic", "val")
    result = evaluate(None, run_dir / "last.pth", out_dir=tmp_path, progress=False)
    assert (result["num_images"], result["samples_digest"]) == (5, recorded["samples_digest"])
    cfg.data.val_samples = 3
    assert samples_digest(build_dataset(cfg.data, train=False)) != recorded["samples_digest"]


def test_compare_warns_when_the_val_sets_differ_and_overlays_the_curves(run_dir, tmp_path, capsys):
    other = tmp_path / "small_val"
    evaluate(tiny_config("data.val_samples=3"), run_dir / "last.pth", out_dir=other, progress=False)
    shutil.copy(run_dir / "train.log", other / "train.log")  # its curves: the same log, to check the overlay
    assert main(["report", str(run_dir), "--compare", str(other), "--out", str(tmp_path / "r"), "--gallery", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: --compare" in err and "different val images: 5" in err and "vs 3" in err
    data = _data(tmp_path / "r")
    assert data["compare"]["same_val_set"] == "different"
    assert [s["num_images"] for s in data["compare"]["val_sets"]] == [5, 3]
    page = (tmp_path / "r" / "index.html").read_text()
    assert page.count('class="warning"') >= 2 and "different val images: 5" in page
    assert data["compare"]["curves"] == data["curves"]  # the other run's curves are in the figure's data

    # The same val images: said so, no warning.
    same = tmp_path / "same_val"
    evaluate(None, run_dir / "last.pth", out_dir=same, progress=False)
    assert main(["report", str(run_dir), "--compare", str(same), "--out", str(tmp_path / "r2"), "--gallery", "0"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert _data(tmp_path / "r2")["compare"]["same_val_set"] == "same"
    assert 'class="warning"' not in (tmp_path / "r2" / "index.html").read_text()


def test_figures_are_shown_at_their_size_with_readable_text(run_dir):
    from PIL import Image

    # The page is at most 1400 px wide (2em margins): a figure no wider than 1330 px is shown 1:1, so 11-12 pt
    # text saved at DPI is 15-17 px on screen (matplotlib's default, 10 pt at the old widths, came out ~6 px).
    assert min(STYLE[k] for k in ("font.size", "axes.titlesize", "axes.labelsize")) * DPI / 72 >= 15
    for png in (run_dir / "report").glob("*.png"):
        assert Image.open(png).width <= 1330, png.name


def test_the_page_renders_in_chromium(run_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless Chromium here (apt-get install chromium); the page's files are checked above")
    from PIL import Image

    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1400,2400",
                    (run_dir / "report" / "index.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    page = Image.open(shot)
    assert page.size == (1400, 2400)
    ink = np.asarray(page.convert("L")) < 200
    colour = np.asarray(page.convert("HSV"))[..., 1] > 80
    # Measured: the page ~3% ink and ~1.2% saturated colour (figures), 1.4% and 0.07% with its PNGs removed.
    assert ink.mean() > 0.02 and ink[1200:].mean() > 0.01  # text and figures, top and bottom: not a blank page
    assert colour.mean() > 0.005  # the figures loaded (a missing image shows only its alt text)
