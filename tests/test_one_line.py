"""One line, exit code 2, nothing lost: a checkpoint given as a config, a label_map written without a space, a disk
that fills during predict or train, Ctrl-C in predict; install hints that work for a source checkout; `ovenet
configs` showing whole descriptions."""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CLI as TINY, run, save_tiny_checkpoint
from PIL import Image

from ovenet import errors
from ovenet.config import CONFIG_DIR


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_one_line_error(err: str, *fragments: str) -> None:
    """The error is one line, the last one (progress lines of a command that ran before it may precede it)."""
    assert "Traceback" not in err and err.endswith("\n"), err
    last = err.splitlines()[-1]
    assert last.startswith("ovenet: error: ") and not [line for line in err.splitlines()[:-1] if "error" in line], err
    for fragment in fragments:
        assert fragment in last, err


# --- a checkpoint or a binary file given as the config ----------------------------------------------------------

def test_a_checkpoint_given_to_train_says_how_to_resume_or_start_from_it(capsys, tmp_path):
    run_dir = tmp_path / "runs" / "x"
    best = save_tiny_checkpoint(run_dir / "best.pth", TINY)
    (run_dir / "config.yaml").write_text("name: x\n")
    code, _, err = run(capsys, "train", str(best), "--resume", "auto")
    assert code == 2
    assert_one_line_error(err, f"'{best}' is a checkpoint", f"ovenet train {run_dir} --resume auto",
                          f"model.init_from={best}")
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pth", "config.yaml"]  # nothing written


def test_a_config_that_is_not_text_names_the_file(capsys, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_bytes(b"name: x\n\xff\xfe\x00binary")
    code, _, err = run(capsys, "configs", str(config))
    assert code == 2
    assert_one_line_error(err, f"config '{config}' is not a text file", "byte 8")


# --- label_map written without a space: {11:255} ------------------------------------------------------------------

def test_label_map_without_a_space_names_the_key_and_the_fix(capsys):
    code, _, err = run(capsys, "configs", "quickstart", "data.label_map={11:255}")
    assert code == 2
    assert_one_line_error(err, "'data.label_map'", "'11:255' has no value", "write {11: 255}, with a space")
    code, _, err = run(capsys, "configs", "quickstart", "data.label_map={1:30}")  # YAML 1.1: base 60, {90: null}
    assert code == 2
    assert_one_line_error(err, "'data.label_map'", "entry '90' has no value", "with a space after the colon")
    code, out, _ = run(capsys, "configs", "quickstart", "data.label_map={11: 255}")
    assert code == 0 and "label_map:\n    11: 255\n" in out


@pytest.mark.parametrize("value, entry", [("{a: 1}", "'a': 1"), ("{3: 2.5}", "3: 2.5"), ("{3: road}", "3: 'road'")])
def test_label_map_entries_of_the_wrong_type_are_named(capsys, value, entry):
    code, _, err = run(capsys, "configs", "quickstart", f"data.label_map={value}")
    assert code == 2
    assert_one_line_error(err, "'data.label_map'", f"entry {entry} must be int: int")


# --- install hints ------------------------------------------------------------------------------------------------

class _Installed:
    version = "0.0"

    def __init__(self, direct_url: dict | None):
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        return json.dumps(self.direct_url) if self.direct_url is not None and name == "direct_url.json" else None


@pytest.mark.parametrize("direct_url, expected", [
    ({"url": "file:///home/me/ovenet", "dir_info": {"editable": True}}, 'pip install -e "/home/me/ovenet[report]"'),
    ({"url": "file:///home/me/my%20ovenet", "dir_info": {}}, 'pip install "/home/me/my ovenet[report]"'),
    (None, 'pip install "ovenet[report]"'),  # from the package index: no direct_url.json
    ({"url": "https://example.org/ovenet-1.0.tar.gz", "archive_info": {}}, 'pip install "ovenet[report]"'),
])
def test_install_command_fits_how_ovenet_was_installed(monkeypatch, direct_url, expected):
    monkeypatch.setattr(metadata, "distribution", lambda name: _Installed(direct_url))
    assert errors.install_command("report") == expected


def test_install_command_without_an_installation_names_the_checkout(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    checkout = Path(errors.__file__).resolve().parents[2]
    assert errors.install_command("export") == f'pip install -e "{checkout}[export]"'


def test_no_hint_in_src_hard_codes_an_install_from_the_package_index():
    source = Path(errors.__file__).parent
    hard_coded = [f"{p.relative_to(source)}:{n}" for p in source.rglob("*.py") if p.name != "errors.py"
                  for n, line in enumerate(p.read_text().splitlines(), 1) if "pip install 'ovenet[" in line
                  or "pip install ovenet[" in line or "pip install av" in line]
    assert hard_coded == []


def test_missing_extra_hint_is_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "distribution", lambda name: _Installed(
        {"url": "file:///src/ovenet", "dir_info": {"editable": True}}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    (run_dir / "train.log").write_text("")
    code, _, err = run(capsys, "report", str(run_dir))
    assert code == 2
    assert_one_line_error(err, 'pip install -e "/src/ovenet[report]"')


# --- ovenet configs ---------------------------------------------------------------------------------------------

def _description(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


@pytest.mark.parametrize("columns", ["120", "80"])  # beside the names; under them
def test_configs_shows_every_description_whole(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = run(capsys, "configs")
    assert code == 0
    listed = [line for line in out.splitlines() if not line.startswith("files under")]
    assert max(len(line) for line in listed) < int(columns), out
    text = " ".join(out.split())  # the wrapping undone
    recipes = [p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("_")]
    long = CONFIG_DIR / "camvid" / "camvid_efficientnet_lite0_ovenet.yaml"
    assert long in recipes and _description(long).count("\n") == 0 and len(_description(long)) > 300
    for path in recipes:
        assert f"{path.stem} {' '.join(_description(path).split())}" in text, path.stem


# --- Ctrl-C in predict --------------------------------------------------------------------------------------------

def _images(folder: Path, count: int, size: tuple[int, int] = (192, 256)) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = [folder / f"im{i:02d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return paths


def test_ctrl_c_in_predict_says_how_far_it_got_and_a_rerun_continues(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pth", TINY)
    images = _images(tmp_path / "in", 6, (96, 128))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ovenet.cli", "--threads", "1", "predict", str(ckpt), str(tmp_path / "in"),
               "--out", str(out), "--runtime", "torch", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*_color.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    done = re.fullmatch(rf"ovenet: interrupted after (\d+) of 6 input\(s\); the outputs written to "
                        rf"{re.escape(str(out))} are complete; rerun the same command to continue", lines[-1])
    assert done, err
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary file left
    written = sorted(out.glob("*.png"))
    assert written and len(written) < 6 * 5  # stopped part-way
    assert len(written) >= 5 * int(done.group(1))
    for path in written:
        with Image.open(path) as png:
            png.load()  # a whole PNG (a cut one raises)

    code, rerun_out, rerun_err = run(capsys, *command[3:])  # the same command, in-process
    assert code == 0, rerun_err
    kinds = {p.name.split("_", 1)[1] for p in out.glob("*.png")}
    assert {f"{i.stem}_{kind}" for i in images for kind in kinds} == {p.name for p in out.glob("*.png")}
    assert f"wrote {len(images) * len(kinds) - len(written)} file(s)" in rerun_out  # only what was missing


# --- a full disk --------------------------------------------------------------------------------------------------

def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


def _assert_only_whole_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")], "a temporary file was left"
    for path in folder.rglob("*.png"):
        with Image.open(path) as png:
            png.load()  # a cut PNG raises
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())


@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    ckpt = save_tiny_checkpoint(folder / "tiny.pth", TINY)
    _images(folder / "in", 4, (48, 64))
    return ckpt, folder / "in"


def test_disk_full_during_predict_leaves_whole_files_and_names_the_folder(capsys, tmp_path, monkeypatch,
                                                                           predict_setup):
    ckpt, images = predict_setup
    original, calls = Image.Image.save, []

    def fills_up(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) < 7:
            return original(self, fp, *args, **kwargs)
        with open(fp, "wb") as file:  # the first bytes land, then the disk is full
            file.write(b"\x89PNG\r\n\x1a\n")
        raise _disk_full()

    monkeypatch.setattr(Image.Image, "save", fills_up)
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", str(ckpt), str(images), "--out", str(out), "--runtime", "torch")
    assert code == 2
    assert_one_line_error(err, f"disk full: no space left in {out} (", "free space there or choose another --out",
                          "rerunning the same command continues")
    _assert_only_whole_files(out)
    assert len(list(out.glob("*.png"))) == 6  # the six written before the disk filled
    monkeypatch.setattr(Image.Image, "save", original)
    code, out_text, _ = run(capsys, "predict", str(ckpt), str(images), "--out", str(out), "--runtime", "torch")
    assert code == 0 and f"wrote {4 * 5 - 6} file(s)" in out_text  # the rerun finishes the rest


@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs: a real ENOSPC (needs the right to mount, e.g. root in a container)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_real_full_disk_during_predict(capsys, small_disk, predict_setup, tmp_path):
    ckpt, images = predict_setup
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):  # enough outputs to fill 192 KiB
        (many / f"im{i:02d}.png").write_bytes((images / f"im{i % 4:02d}.png").read_bytes())
    out = small_disk / "out"
    code, _, err = run(capsys, "predict", str(ckpt), str(many), "--out", str(out), "--runtime", "torch")
    assert code == 2
    assert_one_line_error(err, f"disk full: no space left in {out} (No space left on device)")
    _assert_only_whole_files(out)
    assert list(out.glob("*.png"))


@pytest.mark.parametrize("name", ["config.yaml", "val_last.json"])
def test_disk_full_while_training_writes_a_small_file(capsys, tmp_path, monkeypatch, name):
    original = Path.write_text

    def fills_up(self, text, *args, **kwargs):
        if self.name in (name, f".{name}.part"):  # written in place, or under a temporary name
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise _disk_full()
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fills_up)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "quickstart", *TINY, "train.iters=1", "--device", "cpu", "--run-dir",
                       str(run_dir))
    assert code == 2
    assert_one_line_error(err, f"disk full: no space left in {run_dir} (", "--resume auto")
    assert not (run_dir / name).exists()
    if run_dir.exists():
        _assert_only_whole_files(run_dir)


def test_disk_full_while_writing_train_log_cuts_no_line(capsys, tmp_path, monkeypatch):
    class FillsAfterALine:
        def __init__(self, file):
            self.file, self.writes = file, 0

        def write(self, data):
            self.writes += 1
            if self.writes < 3:
                return self.file.write(data)
            self.file.write(data[:5])  # part of the line lands
            raise _disk_full()

        def __getattr__(self, name):
            return getattr(self.file, name)

    def opens(file, *args, **kwargs):
        opened = real_open(file, *args, **kwargs)
        return FillsAfterALine(opened) if Path(str(file)).name == "train.log" else opened

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", opens)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "quickstart", *TINY, "train.iters=2", "--device", "cpu", "--run-dir",
                       str(run_dir))
    assert code == 2
    assert_one_line_error(err, f"disk full: no space left in {run_dir} (")
    log = (run_dir / "train.log").read_bytes()
    assert log.endswith(b"\n") and log.count(b"\n") == 2  # the two lines written whole, nothing of the third


def test_disk_full_during_export_leaves_no_cut_file(capsys, tmp_path, monkeypatch, predict_setup):
    import torch

    def fills_up(model, args, path, **kwargs):
        Path(path).write_bytes(b"\x08\x07")  # the first bytes of a model, then the disk is full
        raise _disk_full()

    monkeypatch.setattr(torch.onnx, "export", fills_up)
    out = tmp_path / "exports" / "model.onnx"
    code, _, err = run(capsys, "export", str(predict_setup[0]), "--out", str(out))
    assert code == 2
    assert_one_line_error(err, f"disk full: no space left in {out.parent} (", "choose another --out")
    assert list(out.parent.iterdir()) == []
