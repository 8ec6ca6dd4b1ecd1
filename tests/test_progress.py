"""Progress of eval, predict and the validation inside training: a bar on a terminal, periodic lines otherwise;
and the first training log line after a validation reports training speed, not validation time."""

from __future__ import annotations

import re
import sys
import time

import pytest
import torch
from helpers import save_tiny_checkpoint
from PIL import Image

import ovenet.engine.logging as logmod
import ovenet.engine.train as train_module
from ovenet.cli.main import main
from ovenet.config import load_config
from ovenet.engine.logging import Progress
from ovenet.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 validation scenes (num_samples / 4) of 48x64.
TINY = ["data.num_samples=16", "data.image_size=[48,64]", "data.crop_size=[48,64]", "eval.crop_size=[48,64]",
        "train.batch_size=2", "device=cpu"]


@pytest.fixture
def every_update(monkeypatch):
    """A progress line at every update (instead of every 10 s), so that short loops show them."""
    monkeypatch.setattr(logmod, "PROGRESS_EVERY", 0.0)


def test_lines_off_a_terminal_with_rate_and_eta(every_update):
    lines: list[str] = []
    with Progress(3, "eval", write=lines.append, note="cpu: 1 thread (why)") as meter:
        for _ in range(3):
            meter.update()
    assert lines[0] == "cpu: 1 thread (why)"
    assert re.fullmatch(r"eval 1/3 images, [\d.]+ img/s, eta \d+:\d\d:\d\d", lines[1]), lines[1]
    assert re.fullmatch(r"eval 3/3 images, [\d.]+ img/s, \d+:\d\d:\d\d in all", lines[3]), lines[3]
    assert len(lines) == 4  # the last periodic line was already the end: no repeat at close


def test_quiet_loops_print_nothing_and_an_unknown_total_has_no_eta(monkeypatch):
    lines: list[str] = []
    with Progress(5, "eval", write=lines.append) as meter:  # under PROGRESS_EVERY seconds: nothing to say
        meter.update(5)
    assert lines == []
    monkeypatch.setattr(logmod, "PROGRESS_EVERY", 0.0)
    with Progress(None, "predict", write=lines.append) as meter:
        meter.update()
    assert re.fullmatch(r"predict 1 images, [\d.]+ img/s", lines[0]), lines


def test_a_terminal_gets_the_bar_not_lines(monkeypatch, capsys, every_update):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    lines: list[str] = []
    with Progress(2, "eval", write=lines.append) as meter:
        meter.update(2)
    assert lines == []
    err = capsys.readouterr().err
    assert "eval" in err and "2/2" in err  # tqdm's bar


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", TINY)


def test_eval_command_reports_progress_when_not_on_a_terminal(capsys, tmp_path, tiny_checkpoint, every_update):
    assert main(["eval", str(tiny_checkpoint), "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    for done in range(1, 5):
        assert re.search(rf"^eval {done}/4 images, [\d.]+ img/s", err, flags=re.MULTILINE), err
    assert "cpu: " in err.splitlines()[0]  # the thread choice, said when the work starts


def test_predict_command_reports_progress_when_not_on_a_terminal(capsys, tmp_path, tiny_checkpoint, every_update):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 60)).save(folder / f"f{i}.png")
    assert main(["predict", str(tiny_checkpoint), str(folder), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    for done in range(1, 4):
        assert re.search(rf"^predict {done}/3 images, [\d.]+ img/s", err, flags=re.MULTILINE), err


def test_validation_inside_training_reports_progress_and_is_not_counted_as_training(
        tmp_path, monkeypatch, every_update):
    """Validation after iteration 2 takes '1000 s' (a clock jump): the log line at iteration 4 must report the
    speed of iterations 3-4 alone, as the line at iteration 2 did."""
    offset = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    real_validate = train_module.validate

    def slow_validate(*args, **kwargs):
        result = real_validate(*args, **kwargs)
        offset[0] += 1000.0
        return result

    monkeypatch.setattr(train_module, "validate", slow_validate)
    cfg = load_config("quickstart", [*TINY, "train.iters=4", "train.log_every=2", "train.val_every=2",
                                     "train.ckpt_every=100", f"output_dir={tmp_path}", "name=run"])
    run_dir = train_module.train(cfg, run_dir=tmp_path / "run")
    log = (run_dir / "train.log").read_text()

    speed = {int(m[1]): (float(m[2]), m[3]) for m in
             re.finditer(r"iter (\d+)/4 .* \| ([\d.]+) img/s \| eta (\d+:\d\d:\d\d)", log)}
    assert set(speed) == {2, 4}
    images_per_s, _ = speed[4]
    assert images_per_s > 4 / 100, log  # 4 images (2 steps of 2) in well under the 1000 s validation
    # Validation's own progress lines, 4 validation scenes, in the log.
    assert re.search(r"val 4/4 images, [\d.]+ img/s", log), log


def test_validate_counts_images_of_its_loader(every_update):
    from ovenet.data import build_dataset, build_loader

    cfg = load_config("quickstart", TINY)
    model = build_model(cfg.model)
    loader = build_loader(build_dataset(cfg.data, train=False), 1, train=False, num_workers=0)
    lines: list[str] = []
    metrics, _ = train_module.validate(model, loader, cfg.model.num_classes, torch.device("cpu"), progress=True,
                                       write=lines.append)
    assert 0 <= metrics["miou"] <= 1
    assert [line.split(",")[0] for line in lines] == [f"val {i}/4 images" for i in range(1, 5)]
    lines.clear()
    train_module.validate(model, loader, cfg.model.num_classes, torch.device("cpu"), write=lines.append)
    assert lines == []  # off by default (the Python API, other ranks)
