"""The ``ovenet`` command line: exit codes, one-line errors, and each subcommand end to end on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_CLI as TINY, assert_one_line_error, run, save_tiny_checkpoint
from PIL import Image

from ovenet import checkpoint
from ovenet.cli.main import main
from ovenet.config import load_config
from ovenet.models import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "official_ovenet_ocr_tiny.pt"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained quickstart-sized OVeNet saved as an ovenet checkpoint with a tiny synthetic data config."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", TINY, iteration=7)


# --- help and parsing -------------------------------------------------------------------------------------------

def test_module_entry_point_runs_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "ovenet.cli", "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for command in ("train", "eval", "predict", "export", "convert-official", "check-data", "configs", "info",
                    "quickstart"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["train", "eval", "predict", "export", "convert-official", "convert-labels",
                                     "check-data", "configs", "info", "quickstart"])
def test_every_command_has_help_with_examples(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "examples:" in out and f"ovenet {command}" in out


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "no-such-command")[0] == 2
    assert run(capsys, "--debug")[0] == 2  # a command is still required once anything is given
    code, _, err = run(capsys, "info", "a.pth", "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err
    code, _, err = run(capsys, "info", "a.pth", "train.lr=1")
    assert code == 2 and "takes no config overrides" in err


def test_overrides_may_follow_options(capsys):
    code, out, _ = run(capsys, "configs", "quickstart", "--debug", "model.offset.tau=0.3", "train.lr=0.02")
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["model"]["offset"]["tau"] == 0.3 and printed["train"]["lr"] == 0.02
    assert printed == load_config("quickstart", ["model.offset.tau=0.3", "train.lr=0.02"]).to_dict()


def test_configs_lists_usable_configs_only(capsys):
    code, out, _ = run(capsys, "configs")
    assert code == 0
    assert "cityscapes_hrnetv2_w48_ocr_ovenet" in out and "camvid_ablation_tau0.2" in out and "quickstart" in out
    # no base config is listed (a description may mention `_base_:`, as the own-data template's does)
    assert not [line for line in out.splitlines() if line.strip().startswith("_base_")]


# --- errors -------------------------------------------------------------------------------------------------------

def test_unknown_override_key_suggests_the_nearest(capsys):
    code, out, err = run(capsys, "train", "quickstart", "model.offset.taux=0.3")
    assert code == 2 and out == ""
    assert_one_line_error(err, "unknown config key 'model.offset.taux'", "did you mean 'model.offset.tau'?")


def test_bad_value_exits_2(capsys):
    code, _, err = run(capsys, "train", "quickstart", "model.offset.tau=0")
    assert code == 2
    assert_one_line_error(err, "model.offset.tau", "must be > 0")
    code, _, err = run(capsys, "train", "quickstart", "train.lr=fast")
    assert code == 2
    assert_one_line_error(err, "train.lr", "wrong type")


@pytest.mark.parametrize("argv", [["eval", "MISSING"], ["eval", "quickstart", "MISSING"],
                                  ["predict", "MISSING", "x.png", "--out", "o"], ["info", "MISSING"],
                                  ["export", "MISSING"]])
def test_missing_checkpoint_names_the_path(capsys, tmp_path, argv):
    missing = str(tmp_path / "nope" / "best.pth")
    code, _, err = run(capsys, *[missing if a == "MISSING" else a for a in argv])
    assert code == 2
    assert_one_line_error(err, missing, "does not exist")


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--debug", "info", str(tmp_path / "missing.pth"))
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_is_a_clear_error(capsys, tiny_checkpoint, tmp_path):
    for argv in (["train", "quickstart", "--device", "cuda"],
                 ["eval", str(tiny_checkpoint), "--device", "cuda:1"],
                 ["predict", str(tiny_checkpoint), str(tiny_checkpoint), "--out", str(tmp_path), "--device", "cuda"],
                 ["train", "quickstart", "device=cuda"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        assert_one_line_error(err, "no CUDA GPU is available", "--device cpu")


def test_engine_failures_map_to_one_line(capsys, monkeypatch):
    import ovenet.engine.train as engine_train

    def oom(cfg, resume=None, run_dir=None, overwrite=False):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine_train, "train", oom)
    code, _, err = run(capsys, "train", "quickstart", "train.batch_size=6")
    assert code == 2
    assert_one_line_error(err, "CUDA out of memory at batch size 6, crop 96x160", "train.batch_size=3")

    def missing_file(cfg, resume=None, run_dir=None, overwrite=False):
        raise FileNotFoundError(2, "No such file or directory", "data/x.png")

    monkeypatch.setattr(engine_train, "train", missing_file)
    code, _, err = run(capsys, "train", "quickstart")
    assert code == 2
    assert_one_line_error(err, "cannot open 'data/x.png'", "No such file")

    def interrupted(cfg, resume=None, run_dir=None, overwrite=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_train, "train", interrupted)
    assert run(capsys, "train", "quickstart") == (130, "", "")

    def bug(cfg, resume=None, run_dir=None, overwrite=False):
        raise ValueError("a bug keeps its traceback")

    monkeypatch.setattr(engine_train, "train", bug)
    with pytest.raises(ValueError):
        main(["train", "quickstart"])


def test_train_passes_config_resume_and_run_dir(capsys, monkeypatch, tmp_path):
    import ovenet.engine.train as engine_train

    seen = {}

    def fake_train(cfg, resume=None, run_dir=None, overwrite=False):
        seen.update(cfg=cfg, resume=resume, run_dir=run_dir, overwrite=overwrite)
        return Path(run_dir)

    monkeypatch.setattr(engine_train, "train", fake_train)
    code, out, _ = run(capsys, "train", "quickstart", "train.lr=0.02", "--resume", "auto", "--run-dir",
                       str(tmp_path), "--device", "cpu")
    assert code == 0  # the engine logs where the run folder is; the CLI adds no second "finished" line
    assert seen["cfg"].train.lr == 0.02 and seen["cfg"].device == "cpu"
    assert seen["resume"] == "auto" and seen["run_dir"] == str(tmp_path) and seen["overwrite"] is False
    assert seen["cfg"].train.deterministic is False
    code, _, _ = run(capsys, "train", "quickstart", "--deterministic", "--run-dir", str(tmp_path), "--overwrite")
    assert code == 0 and seen["cfg"].train.deterministic is True and seen["overwrite"] is True
    code, _, err = run(capsys, "train", "quickstart", "--resume", str(tmp_path / "last.pth"))
    assert code == 2 and "last.pth' does not exist" in err


# --- convert-official -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    if not FIXTURE.is_file():
        pytest.skip(f"shared fixture {FIXTURE} is absent")
    fixture = torch.load(FIXTURE, weights_only=True)
    folder = tmp_path_factory.mktemp("official")
    (folder / "official.yaml").write_text(fixture["official_yaml"])
    torch.save(fixture["checkpoint"], folder / "final_state.pth")
    return folder, fixture


@pytest.mark.parametrize("sampling", ["official", "exact"])
def test_convert_official_writes_a_loadable_checkpoint(capsys, official_files, sampling):
    folder, fixture = official_files
    out = folder / f"converted_{sampling}.pth"
    args = ["convert-official", str(folder / "official.yaml"), str(folder / "final_state.pth"), str(out)]
    code, stdout, err = run(capsys, *args, *(["--sampling", sampling] if sampling == "exact" else []))
    assert code == 0, err
    assert str(out) in stdout
    model = checkpoint.load(out, "cpu")
    assert model.config.model.offset.sampling == sampling and model.config.model.offset.tau == 0.2
    with torch.no_grad():
        result = model(fixture["input"])
    expected = fixture["eval_outputs"]["s_f"][1]  # fused OCR logits of the official code
    error = (result.logits_final - expected).abs().max().item()
    if sampling == "official":
        assert error < 1e-4  # what the official code computes today
    else:
        assert error > 1e-3  # a different resampling convention, so visibly different outputs

    code, stdout, _ = run(capsys, "info", str(out))
    assert code == 0 and f"sampling {sampling}" in stdout and "OCR head" in stdout
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e6:.2f} M" in stdout


def test_convert_official_errors(capsys, official_files, tmp_path):
    folder, _ = official_files
    code, _, err = run(capsys, "convert-official", str(folder / "official.yaml"), str(tmp_path / "nope.pth"),
                       str(tmp_path / "o.pth"))
    assert code == 2
    assert_one_line_error(err, "nope.pth", "does not exist")
    code, _, err = run(capsys, "convert-official", str(folder / "official.yaml"), str(folder / "final_state.pth"),
                       str(tmp_path / "o.pth"), "--sampling", "bilinear")
    assert code == 2 and "invalid choice" in err


# --- info, eval, predict, export, check-data on a tiny checkpoint --------------------------------------------

def test_info(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "info", str(tiny_checkpoint))
    assert code == 0
    assert "hrnetv2_w18_small_v1 + FCN head, OVeNet" in out and "tau 0.5" in out
    assert "8 (synthetic): sky, building" in out and "iteration 7" in out


def test_info_shows_validation_figures_in_percent(capsys, tmp_path):
    cfg = load_config("quickstart", TINY)
    path = tmp_path / "best.pth"
    checkpoint.save(path, build_model(cfg.model), cfg, iteration=7, best_miou=0.5154)
    code, out, _ = run(capsys, "info", str(path))
    assert code == 0 and "best_miou 51.54 %" in out and "0.5154" not in out


@pytest.mark.parametrize("overrides, says", [
    (["model.offset.zero_offsets=true"], "OVeNet (offset branch at stage 4, tau 0.5, fusion logits, sampling exact), "
                                         "zero-offset control (offsets fixed at 0)"),
    (["model.backbone=efficientnet_lite0", "model.head=coarse", "model.offset.content_free=true"],
     "coarse (stride-32) head, OVeNet, content-free control (offsets from pixel coordinates only, tau 0.5)")])
def test_info_names_a_study_control(capsys, tmp_path, overrides, says):
    """A control's checkpoint is not read as a plain OVeNet: info names the control it is."""
    cfg = load_config("quickstart", [*TINY, *overrides])
    path = tmp_path / "control.pth"
    checkpoint.save(path, build_model(cfg.model), cfg, iteration=1)
    code, out, _ = run(capsys, "info", str(path))
    assert code == 0 and says in out, out


def test_every_data_reading_command_takes_data_root(capsys, tmp_path):
    """train, eval and check-data all read --data-root (before, train and check-data rejected it), and a wrong
    root says how to set it."""
    empty = tmp_path / "not_camvid"
    empty.mkdir()
    code, out, err = run(capsys, "train", "camvid_hrnetv2_w18s_ovenet", "--data-root", str(empty),
                         "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert_one_line_error(err, str(empty), "set it with --data-root DIR or data.root=DIR")
    code, out, err = run(capsys, "check-data", "camvid_hrnetv2_w18s_ovenet", "--data-root", str(empty))
    assert code == 2 and str(empty) in out and "--data-root DIR" in out


def test_eval_with_and_without_config(capsys, tiny_checkpoint, tmp_path):
    code, out, err = run(capsys, "eval", str(tiny_checkpoint), "--out", str(tmp_path / "a"), "--device", "cpu")
    assert code == 0, err
    result = json.loads((tmp_path / "a" / "eval_val.json").read_text())
    assert result["num_images"] == 2 and 0 <= result["miou"] <= 1 and "boundary_miou" in result
    assert "eval_val.md" in out
    # Both means, named: an untrained model on 2 scenes misses classes, so they differ (the official code and the
    # paper's tables average over all classes; cityscapesScripts over those present).
    assert result["miou"] != result["miou_all"]
    lines = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in out.splitlines()
             if line.startswith("  ")}
    assert lines["mIoU, classes present"] == f"{100 * result['miou']:.2f}"
    assert lines["mIoU, all 8 classes (official code, paper tables)"] == f"{100 * result['miou_all']:.2f}"
    markdown = (tmp_path / "a" / "eval_val.md").read_text()
    assert f"(the official code's, as in the paper's tables) | {100 * result['miou_all']:.2f} |" in markdown

    # Refuses to overwrite, then does with --overwrite; CONFIG + overrides + flags all apply.
    code, _, err = run(capsys, "eval", str(tiny_checkpoint), "--out", str(tmp_path / "a"))
    assert code == 2 and "--overwrite" in err
    code, _, err = run(capsys, "eval", "quickstart", str(tiny_checkpoint), *TINY, "--out", str(tmp_path / "a"),
                       "--overwrite", "--scales", "0.75", "1.0", "--flip")
    assert code == 0, err
    result = json.loads((tmp_path / "a" / "eval_val.json").read_text())
    assert result["eval"]["scales"] == [0.75, 1.0] and result["eval"]["flip"] is True


def test_eval_with_a_dataset_of_another_class_count_names_checkpoint_and_fix(capsys, tiny_checkpoint, tmp_path,
                                                                           shared_dir):
    code, _, err = run(capsys, "eval", "camvid_hrnetv2_w18s_ovenet", str(tiny_checkpoint),
                       "--data-root", str(shared_dir / "data" / "camvid"), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(err, f"checkpoint {tiny_checkpoint} predicts", "dataset 'camvid'", "has 11",
                          "omit CONFIG to use the checkpoint's own")
    assert not (tmp_path / "o").exists()


def test_eval_model_overrides_reach_the_loaded_network(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    from ovenet import checkpoint

    seen = []
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: seen.append(k.get("overrides")) or real_load(*a, **k))
    code, _, err = run(capsys, "eval", str(tiny_checkpoint), "model.offset.sampling=official",
                       "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert seen == [["model.offset.sampling=official"]]
    code, _, err = run(capsys, "eval", str(tiny_checkpoint), "model.offset.sampling=bilinear",
                       "--out", str(tmp_path / "p"))
    assert code == 2
    assert_one_line_error(err, "model.offset.sampling")


def test_eval_argument_errors(capsys):
    code, _, err = run(capsys, "eval", "a.yaml", "b.pth", "c.pth")
    assert code == 2
    assert_one_line_error(err, "[CONFIG] CHECKPOINT")


def test_predict_writes_labels_offsets_and_confidence(capsys, tiny_checkpoint, tmp_path):
    image = tmp_path / "in" / "street.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "--out", str(out), "--device", "cpu")
    assert code == 0, err
    for kind in ("color", "overlay", "labels", "offsets", "confidence"):
        assert Image.open(out / f"street_{kind}.png").size == (56, 40)
    assert f"wrote 5 file(s) to {out}" in stdout
    # One image does not pay for an ONNX export (nothing cached yet): PyTorch, and the reason, said.
    assert "runtime: torch on cpu (0.0 Mpx to segment: ONNX Runtime pays from 5.5 Mpx with its one-time export" \
        in stdout
    # Sliding windows of the config's eval.crop_size, several scales and flip: same files, same size.
    code, stdout, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "--out", str(out), "--overwrite",
                            "--mode", "slide", "--scales", "0.5", "1.0", "--flip", "--save", "labels,confidence")
    assert code == 0, err
    assert f"wrote 2 file(s) to {out}" in stdout
    assert Image.open(out / "street_labels.png").size == (56, 40)
    # A rerun with other settings than the outputs in --out were made with would mix them: refused.
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "--out", str(out))
    assert code == 2
    assert_one_line_error(err, "made with other settings (scales, flip, mode, crop_size differ)", "--overwrite")
    # key=value words change the loaded model (e.g. the sampling convention of a converted checkpoint).
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "model.offset.sampling=official",
                       "--out", str(tmp_path / "official"))
    assert code == 0, err
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "model.offset.samplin=official",
                       "--out", str(tmp_path / "typo"))
    assert code == 2
    assert_one_line_error(err, "did you mean 'model.offset.sampling'")
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(tmp_path / "none.png"), "--out", str(out))
    assert code == 2
    assert_one_line_error(err, "none.png", "does not exist")


def test_predict_save_kinds_are_one_argument_and_must_apply(capsys, tiny_checkpoint, tmp_path):
    image = tmp_path / "street.png"
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    # "--save color img.png" used to swallow the image as a kind; the kinds are one comma-separated argument.
    code, stdout, err = run(capsys, "predict", str(tiny_checkpoint), "--save", "color", str(image), "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == ["street_color.png"]
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "--save", "raw", "--out", str(out))
    assert code == 2 and "unknown kind(s) raw" in err and "labels" in err
    # A kind that does not apply to this model is an error, not silently dropped into "nothing to write".
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "--save", "labelids",
                       "--out", str(tmp_path / "ids"))
    assert code == 2
    assert_one_line_error(err, "--save labelids needs a Cityscapes/ACDC model", "save labels instead")
    assert not (tmp_path / "ids").exists()


def test_export_onnx(capsys, tiny_checkpoint, tmp_path):
    pytest.importorskip("onnx")
    out = tmp_path / "tiny.onnx"
    code, stdout, err = run(capsys, "export", str(tiny_checkpoint), "--out", str(out), "--height", "48",
                            "--width", "64")
    assert code == 0, err
    assert out.is_file() and out.stat().st_size > 1000 and str(out) in stdout
    code, _, err = run(capsys, "export", str(tiny_checkpoint), "--out", str(out), "--height", "48")
    assert code == 2 and "both --height and --width" in err


def test_export_torch_program(capsys, tiny_checkpoint, tmp_path):
    out = tmp_path / "tiny.pt2"
    code, stdout, err = run(capsys, "export", str(tiny_checkpoint), "--format", "torch-export", "--out", str(out))
    assert code == 0, err
    outputs = torch.export.load(str(out)).module()(torch.randn(1, 3, 50, 70))
    assert len(outputs) == 3 and outputs[0].shape[-2:] == (13, 18)


def test_check_data_lists_every_problem(capsys, tmp_path):
    code, out, err = run(capsys, "check-data", "quickstart", *TINY)
    assert code == 0, err
    assert out.count("OK") == 2  # train and val splits

    root = tmp_path / "data"
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "labels").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "val" / "images" / f"im{i}.png")
    label = np.zeros((8, 10), np.uint8)
    Image.fromarray(label).save(root / "val" / "labels" / "im0.png")  # good
    Image.fromarray(label + 7).save(root / "val" / "labels" / "im1.png")  # class 7 of 3
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "val" / "labels" / "im2.png")  # wrong size
    (root / "val" / "labels" / "im3.png").write_bytes(b"not a png")  # corrupt
    config = tmp_path / "folder.yaml"
    config.write_text(yaml.safe_dump({
        "_base_": "quickstart", "model": {"num_classes": 3},
        "data": {"name": "folder", "root": str(root), "image_dir": "{split}/images", "label_dir": "{split}/labels",
                 "num_classes": 3}}))
    code, out, err = run(capsys, "check-data", str(config), "--split", "val")
    assert code == 2
    assert_one_line_error(err, "3 problem(s)")
    lines = [line for line in out.splitlines() if line.startswith("[val]")]
    assert any("im1" in line for line in lines) and any("im2" in line for line in lines)
    assert any("im3" in line for line in lines) and not any("im0" in line for line in lines[:-1])


def test_mistyped_config_name_suggests_the_nearest_shipped_one(capsys):
    code, out, err = run(capsys, "train", "camvid_hrnet_w18s_ovenet")
    assert code == 2 and out == ""
    assert_one_line_error(err, "config 'camvid_hrnet_w18s_ovenet'", "did you mean 'camvid_hrnetv2_w18s_ovenet'?")
    assert "_base_" not in err and "quickstart" not in err  # no dump of every name
    code, _, err = run(capsys, "check-data", "no_such_recipe_at_all")
    assert code == 2
    assert_one_line_error(err, "`ovenet configs` lists them")


def test_bare_ovenet_prints_the_help_and_version_is_reported(capsys):
    from ovenet import __version__

    code, out, err = run(capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: ovenet") and "first steps:" in out and "quickstart" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"ovenet {__version__}"


def test_train_says_it_finished_once(capsys, tmp_path):
    code, out, err = run(capsys, "train", "quickstart", *TINY, "train.iters=2", "train.epochs=null",
                         "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert (out + err).count("training finished") == 1


def test_predict_default_runtime_exports_once_and_only_when_it_pays(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    """--runtime auto on the CPU: PyTorch until the pixels pay for an ONNX export, then ONNX Runtime with the export
    kept in the cache; once cached, ONNX Runtime from fewer pixels (the session's cost), with no export. Either
    runtime, and an exported .onnx file, record the same weights fingerprint in the outputs they write."""
    pytest.importorskip("onnxruntime")
    from ovenet.cli import commands

    monkeypatch.setenv("OVENET_CACHE_DIR", str(tmp_path / "cache"))
    # The thresholds in pixels of this test's 36x40 images (the shipped ones are sized for real photographs).
    monkeypatch.setattr(commands, "ORT_EXPORT_PAYS_MPX", 12 * 36 * 40 / 1e6)
    monkeypatch.setattr(commands, "ORT_SESSION_PAYS_MPX", 3 * 36 * 40 / 1e6)
    rng = np.random.default_rng(0)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"f{i:02d}.png")
    few = [str(folder / f"f{i:02d}.png") for i in range(3)]

    def predict(*inputs: str, out: str, checkpoint: Path = tiny_checkpoint) -> str:
        code, stdout, err = run(capsys, "predict", str(checkpoint), *inputs, "--out", str(tmp_path / out),
                                "--save", "labels")
        assert code == 0, err
        return stdout

    assert "runtime: torch on cpu (0.0 Mpx to segment: ONNX Runtime pays from" in predict(*few, out="all")
    assert not (tmp_path / "cache").exists()
    # The same --out again with 9 images more: ONNX Runtime now pays, and the outputs PyTorch made are kept, since
    # predict's settings record holds the weights' fingerprint, not the runtime (issue 25: "weights differ").
    output = predict(str(folder), out="all")
    assert "pay for the one-time ONNX export (then cached)" in output and "kept the outputs of 3 image(s)" in output
    [cached_export] = (tmp_path / "cache" / "onnx").glob("*.onnx")
    from ovenet import export

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although cached")

    monkeypatch.setattr(export, "export_onnx", no_export)
    assert "runtime: torch on cpu" in predict(few[0], out="one")  # one image: the session costs more than it saves
    assert "pay for the cached ONNX export's session" in predict(*few, out="cached")
    # Same labels from either runtime (their logits differ by float rounding only).
    assert "runtime: torch" in predict(str(folder), "--runtime", "torch", out="torch")
    for i in range(12):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "all" / f"f{i:02d}_labels.png")),
                              np.asarray(Image.open(tmp_path / "torch" / f"f{i:02d}_labels.png"))), i

    # An .onnx export carries the checkpoint's fingerprint (the cached one is written as `ovenet export` writes
    # its files): its rerun keeps every output. One from an older ovenet has none; its file hash stands for the
    # weights, and the refusal says so and names the runtimes that match the checkpoint's outputs.
    assert "kept the outputs of 12 image(s)" in predict(str(folder), out="all", checkpoint=cached_export)
    import onnx

    graph = onnx.load(str(cached_export))
    kept = [p for p in graph.metadata_props if p.key != "weights_digest"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(tmp_path / "old.onnx"))
    code, _, err = run(capsys, "predict", str(tmp_path / "old.onnx"), str(folder), "--out", str(tmp_path / "all"))
    assert code == 2
    assert_one_line_error(err, "(weights differ)", "known by its file hash", "--runtime torch")


def test_check_data_lists_every_kind_of_problem_in_one_run(capsys, tmp_path):
    """The issue's copy: a missing label, a truncated JPEG, a text file named .jpg, a label with value 50 and a
    label of the wrong size, all reported by one run (before, only the missing label was)."""
    import io

    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = np.zeros((8, 10), np.uint8)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(root / "val" / "images" / f"im{i}.png")
        Image.fromarray(good).save(root / "val" / "labels" / f"im{i}.png")
    (root / "val" / "labels" / "im1.png").unlink()  # missing label
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (root / "val" / "images" / "im2.png").unlink()
    (root / "val" / "images" / "im2.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # truncated
    (root / "val" / "images" / "im3.png").unlink()
    (root / "val" / "images" / "im3.jpg").write_text("not an image at all")  # text named .jpg
    Image.fromarray(good + 50).save(root / "val" / "labels" / "im4.png")  # value 50 of 3 classes
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "val" / "labels" / "im5.png")  # wrong size
    for i in range(2):
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "train" / "images" / f"t{i}.png")
    (root / "train" / "labels" / "t0.png").write_bytes(b"")  # an empty label in the other split
    Image.fromarray(good).save(root / "train" / "labels" / "t1.png")
    config = tmp_path / "folder.yaml"
    config.write_text(yaml.safe_dump({
        "_base_": "quickstart", "model": {"num_classes": 3},
        "data": {"name": "folder", "root": str(root), "image_dir": "{split}/images", "label_dir": "{split}/labels",
                 "num_classes": 3}}))
    code, out, err = run(capsys, "check-data", str(config))
    assert code == 2
    assert_one_line_error(err, "6 problem(s)")
    val = [line for line in out.splitlines() if line.startswith("[val]")]
    for name in ("im1", "im2", "im3", "im4", "im5"):
        assert sum(name in line for line in val[:-1]) == 1, (name, val)
    assert any("t0" in line for line in out.splitlines() if line.startswith("[train]"))
    assert not any("im0" in line for line in val[:-1])
