"""A run follows its data when the data moves: config.yaml names it by absolute paths, checkpoints record what
data it is (sample names and file sizes), and a resume at a new place checks that identity instead of the path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_train import tiny_config

from ovenet import checkpoint
from ovenet.cli.main import main
from ovenet.config import DataConfig
from ovenet.data.factory import absolute_data_paths
from ovenet.engine.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny OVeNet on a folder dataset of 32x32 PNGs: 4 training and 2 validation images of 5 classes.
FOLDER = ["data.name=folder", "data.image_dir={split}/images", "data.label_dir={split}/labels",
          "data.num_classes=5", "model.num_classes=5", "data.crop_size=[32,32]", "data.base_size=null",
          "data.scale_range=[1.0,1.0]", "eval.crop_size=[32,32]", "train.batch_size=2", "train.report=false",
          "device=cpu"]


def _make_folder_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / split / "images" / f"img_{i}.png")
            Image.fromarray(np.repeat(np.arange(32, dtype=np.uint8)[None] // 7, 32, 0)).save(
                root / split / "labels" / f"img_{i}.png")


def _ovenet(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def test_paths_that_resolve_against_the_working_directory_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rooted = absolute_data_paths(DataConfig(name="folder", root="data/own", image_dir="images/{split}"))
    assert (rooted.root, rooted.image_dir) == (str(tmp_path / "data" / "own"), "images/{split}")  # moves with root
    bare = absolute_data_paths(DataConfig(name="list", root=None, list_file="../lists/{split}.txt",
                                          image_dir="/abs/images"))
    assert (bare.list_file, bare.image_dir) == (str(tmp_path.parent / "lists" / "{split}.txt"), "/abs/images")
    assert absolute_data_paths(DataConfig(name="synthetic", root="data/x")).root == "data/x"  # reads no files


@pytest.fixture
def moved_run(tmp_path, monkeypatch, capsys):
    """A run trained 2 iterations from ``tmp_path/a`` with relative paths, whose data then moved to
    ``tmp_path/b/moved``; the working directory is now ``tmp_path/c``."""
    (tmp_path / "a").mkdir()
    _make_folder_dataset(tmp_path / "a" / "data")
    monkeypatch.chdir(tmp_path / "a")
    code, output = _ovenet(capsys, "train", "quickstart", *FOLDER, "train.iters=2", "--data-root", "data",
                           "--run-dir", "run")
    assert code == 0, output
    (tmp_path / "b").mkdir()
    shutil.move(tmp_path / "a" / "data", tmp_path / "b" / "moved")
    (tmp_path / "c").mkdir()
    monkeypatch.chdir(tmp_path / "c")
    return tmp_path / "a" / "run"


def test_config_and_checkpoints_name_the_data_by_absolute_paths(moved_run, tmp_path):
    recorded = yaml.safe_load((moved_run / "config.yaml").read_text())["data"]
    assert recorded["root"] == str(tmp_path / "a" / "data")
    assert recorded["image_dir"] == "{split}/images"  # below the root: it moves with it
    identity = checkpoint.read(moved_run / "last.pth")["data_identity"]
    assert identity["train"]["samples"] == 4 and identity["val"]["samples"] == 2


def test_resume_follows_moved_data_from_another_folder(moved_run, tmp_path, capsys):
    code, output = _ovenet(capsys, "train", "../a/run", "--resume", "auto", "--data-root", "../b/moved",
                           "train.iters=4")
    assert code == 0, output
    assert checkpoint.read(moved_run / "last.pth")["iteration"] == 4
    log = (moved_run / "train.log").read_text()
    assert f"data moved from {tmp_path / 'a' / 'data'} to {tmp_path / 'b' / 'moved'}: same 4 training samples" in log
    assert yaml.safe_load((moved_run / "config.yaml").read_text())["data"]["root"] == str(tmp_path / "b" / "moved")


def test_resume_refuses_moved_data_that_is_not_the_same(moved_run, tmp_path, capsys):
    label = tmp_path / "b" / "moved" / "train" / "labels" / "img_2.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 5, (32, 32), dtype=np.uint8)).save(label)  # another size
    files = {p: p.read_bytes() for p in moved_run.iterdir() if p.is_file()}
    code, output = _ovenet(capsys, "train", "../a/run", "--resume", "auto", "--data-root", "../b/moved",
                           "train.iters=4")
    assert code == 2
    assert output.count("\n") == 1 and "Traceback" not in output, output
    assert "the training data at " + str(tmp_path / "b" / "moved") in output
    assert "4 vs 4 samples; sample img_2 has other file sizes" in output
    assert "--data-root" in output and "model.init_from=" in output
    assert {p: p.read_bytes() for p in moved_run.iterdir() if p.is_file()} == files  # nothing written

    label.unlink()
    (tmp_path / "b" / "moved" / "train" / "images" / "img_2.png").unlink()
    code, output = _ovenet(capsys, "train", "../a/run", "--resume", "auto", "--data-root", "../b/moved",
                           "train.iters=4")
    assert code == 2 and "4 vs 3 samples; sample 3 is img_3 here but another sample there" in output, output

    # Data changed where it lies (a fixed or removed file, as the bad-sample message suggests) is no move: the
    # resume goes on, and the log says what changed.
    shutil.move(tmp_path / "b" / "moved", tmp_path / "a" / "data")
    code, output = _ovenet(capsys, "train", "../a/run", "--resume", "auto", "train.iters=3")
    assert code == 0, output
    assert "the training data changed since" in (moved_run / "train.log").read_text()


def test_a_checkpoint_without_data_identity_resumes_moved_data_with_a_warning(moved_run, capsys):
    last = checkpoint.read(moved_run / "last.pth")
    del last["data_identity"]  # as an older ovenet wrote it
    checkpoint.atomic_save(last, moved_run / "last.pth")
    code, output = _ovenet(capsys, "train", "../a/run", "--resume", "auto", "--data-root", "../b/moved",
                           "train.iters=3")
    assert code == 0, output
    assert "recorded no data identity, so it is not verified" in (moved_run / "train.log").read_text()


def test_resume_may_change_the_validation_samples(tmp_path):
    run_dir = train(tiny_config("train.iters=2", "data.val_samples=2"), run_dir=tmp_path / "run")
    train(tiny_config("train.iters=3", "data.val_samples=3"), resume="auto", run_dir=run_dir)
    assert checkpoint.read(run_dir / "last.pth")["iteration"] == 3
    log = (run_dir / "train.log").read_text()
    assert "resume changes data.val_samples: 2 -> 3" in log
    assert "the validation set differs from the one" in log and "(2 vs 3 samples)" in log
