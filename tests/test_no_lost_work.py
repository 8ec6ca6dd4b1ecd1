"""Work is never lost or misrecorded, end to end through the ``ovenet`` command line:

- ``train`` into a folder that holds a run refuses unless ``--resume`` or ``--overwrite`` says what to do;
- ``--resume`` with a config that changes the model or data is refused (nothing rewritten); allowed changes are
  logged and recorded; a resume with nothing left to train says so and trains nothing;
- ``--out`` / ``--run-dir`` that are files or not writable are one-line errors naming the flag;
- ``predict --skip-bad`` reports unreadable inputs at the end (exit 2), and a rerun continues where the last one
  stopped, keeping complete outputs, unless the outputs were made with other settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_cli
import yaml
from PIL import Image
from test_cli import TINY, assert_one_line_error, run

from ovenet import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
tiny_checkpoint = test_cli.tiny_checkpoint  # the module-scoped fixture, shared

# The quickstart model on 8 synthetic 48x64 scenes: 4 iterations per epoch, about a second per short run.
TRAIN = ["train", "quickstart", *TINY, "train.batch_size=2", "train.log_every=1", "train.report=false", "--device",
         "cpu"]


def assert_ends_with_error(err: str, *fragments: str) -> None:
    """An error raised once work has started: progress lines may precede it; the last line is the error."""
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("ovenet: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. train into a folder that holds a run ---------------------------------------------------------------

def test_train_refuses_a_folder_that_holds_a_run_unless_resume_or_overwrite(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, *TRAIN, "train.iters=2", "--run-dir", str(run_dir))
    assert code == 0, err
    before = snapshot(run_dir)
    assert {"last.pth", "best.pth", "config.yaml", "train.log"} <= set(before)

    # Same command again: refused, and the folder is byte for byte as it was (no log line, no config rewrite).
    code, out, err = run(capsys, *TRAIN, "train.iters=3", "--run-dir", str(run_dir))
    assert code == 2 and out == ""
    assert_one_line_error(err, f"run folder {run_dir} already holds a run (last.pth, best.pth)", "--resume auto",
                          "--overwrite", "--run-dir")
    assert snapshot(run_dir) == before

    # --resume and --overwrite contradict each other.
    code, _, err = run(capsys, *TRAIN, "--run-dir", str(run_dir), "--resume", "auto", "--overwrite")
    assert code == 2 and "not allowed with argument" in err
    assert snapshot(run_dir) == before

    # --overwrite starts again from iteration 0: new checkpoints, new config, nothing of the old run beside them.
    (run_dir / "eval_val.json").write_text('{"miou": 0.0933}')
    (run_dir / "eval_val.md").write_text("mIoU 9.33")
    (run_dir / "best.onnx").write_bytes(b"old export")
    (run_dir / "report").mkdir()
    (run_dir / "report" / "index.html").write_text("old page")
    old_log = (run_dir / "train.log").read_text()
    code, _, err = run(capsys, *TRAIN, "train.iters=3", "--run-dir", str(run_dir), "--overwrite")
    assert code == 0, err
    last = checkpoint.read(run_dir / "last.pth")
    assert last["iteration"] == 3 and last["config"]["train"]["iters"] == 3
    assert checkpoint.read(run_dir / "best.pth")["config"]["train"]["iters"] == 3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["iters"] == 3
    log = (run_dir / "train.log").read_text()
    assert "--overwrite: removed the previous run's last.pth, best.pth" in log
    assert "training finished: 2 iterations" in old_log and "training finished: 2 iterations" not in log
    for stale in ("eval_val.json", "eval_val.md", "best.onnx", "report"):
        assert not (run_dir / stale).exists(), stale


def test_train_into_a_folder_without_checkpoints_starts(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("an earlier start that failed before its first checkpoint\n")
    code, _, err = run(capsys, *TRAIN, "train.iters=1", "--run-dir", str(run_dir))
    assert code == 0, err
    assert checkpoint.read(run_dir / "last.pth")["iteration"] == 1


def test_resume_auto_with_best_but_no_last_checkpoint_is_refused(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, *TRAIN, "train.iters=1", "--run-dir", str(run_dir))[0] == 0
    (run_dir / "last.pth").unlink()  # e.g. killed after the first validation, before the first last.pth
    before = snapshot(run_dir)
    code, _, err = run(capsys, *TRAIN, "train.iters=1", "--run-dir", str(run_dir), "--resume", "auto")
    assert code == 2
    assert_one_line_error(err, "holds best.pth but no last.pth to resume from", "--overwrite")
    assert snapshot(run_dir) == before


def test_train_help_documents_overwrite(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "--overwrite" in out and "refuses a run folder that holds checkpoints" in out


# --- 2. resume with a changed config -----------------------------------------------------------------------

def test_resume_refuses_model_or_data_changes_and_records_allowed_ones(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, *TRAIN, "train.iters=2", "--run-dir", str(run_dir))[0] == 0
    before = snapshot(run_dir)

    code, out, err = run(capsys, *TRAIN, "--run-dir", str(run_dir), "--resume", "auto",
                         "model.offset.tau=0.2", "data.flip=false", "train.iters=3")
    assert code == 2 and out == ""
    assert_one_line_error(err, "model.offset.tau 0.5 -> 0.2", "data.flip True -> False",
                          "resume with the original config", "--run-dir", "model.init_from=")
    assert "train.iters 2 -> 3" not in err  # an allowed change is not blamed
    assert snapshot(run_dir) == before  # config.yaml still says tau 0.5, like the checkpoints

    # Allowed: train longer, log more often. Logged, recorded in config.yaml and in the new checkpoints.
    code, _, err = run(capsys, *TRAIN, "--run-dir", str(run_dir), "--resume", "auto", "train.iters=4",
                       "train.log_every=2")
    assert code == 0, err
    log = (run_dir / "train.log").read_text()
    assert "resume changes train.iters: 2 -> 4" in log and "resume changes train.log_every: 1 -> 2" in log
    assert f"resumed from {run_dir / 'last.pth'} at iteration 2/4" in log
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    last = checkpoint.read(run_dir / "last.pth")
    assert last["iteration"] == 4 and last["config"] == saved
    assert saved["train"]["iters"] == 4 and saved["model"]["offset"]["tau"] == 0.5
    code, out, _ = run(capsys, "info", str(run_dir / "last.pth"))
    assert code == 0 and "tau 0.5" in out and "iteration 4" in out


def test_resume_with_nothing_left_to_train_says_so_and_trains_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, *TRAIN, "train.iters=2", "--run-dir", str(run_dir))[0] == 0
    before = snapshot(run_dir)

    for iters in (2, 1):  # finished, and a resume that plans fewer iterations than were done
        code, _, err = run(capsys, *TRAIN, f"train.iters={iters}", "--run-dir", str(run_dir), "--resume", "auto")
        assert code == 0, err
        assert (f"run already finished: {run_dir / 'last.pth'} is at iteration 2 of {iters} planned; raise "
                "train.iters above 2 to train longer") in err
        after = snapshot(run_dir)
        assert after.pop("train.log").startswith(before["train.log"])  # the notice is logged, nothing else
        assert after == {k: v for k, v in before.items() if k != "train.log"}


# --- 3. --out and --run-dir that cannot hold the results ----------------------------------------------------

def test_out_that_is_a_file_is_a_one_line_error(capsys, tiny_checkpoint, tmp_path):
    image = tmp_path / "street.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image)
    taken = tmp_path / "taken.pth"
    taken.write_bytes(b"not a folder")
    code, _, err = run(capsys, "predict", str(tiny_checkpoint), str(image), "--out", str(taken))
    assert code == 2
    assert_one_line_error(err, f"--out {taken} is a file; predictions go to a folder: choose another --out")
    code, _, err = run(capsys, "eval", str(tiny_checkpoint), "--out", str(taken))
    assert code == 2
    assert_one_line_error(err, f"--out {taken} is a file; results go to a folder: choose another --out")
    assert taken.read_bytes() == b"not a folder"


@pytest.mark.parametrize("where", ["proc", "below_a_file"])
def test_unwritable_out_and_run_dir_name_the_flag(capsys, tiny_checkpoint, tmp_path, where):
    if where == "proc":
        if not Path("/proc").is_dir():
            pytest.skip("needs /proc")
        base = Path("/proc")
    else:
        base = tmp_path / "a_file"
        base.write_text("x")
    image = tmp_path / "street.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image)
    for argv, flag in ((["predict", str(tiny_checkpoint), str(image), "--out"], "--out"),
                       (["eval", str(tiny_checkpoint), "--out"], "--out"),
                       ([*TRAIN, "--run-dir"], "--run-dir")):
        target = base / "preds"
        code, _, err = run(capsys, *argv, str(target))
        assert code == 2
        assert_one_line_error(err, f"{flag} {target} is not writable", f"choose another {flag}")
        assert "output_dir" not in err and "cannot open" not in err
        assert not target.exists()


# --- 4. predict: unreadable inputs, and a rerun that continues ----------------------------------------------

def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_skip_bad_and_rerun_continues_where_it_stopped(capsys, tiny_checkpoint, tmp_path):
    images = _images(tmp_path / "in", 3)
    good = images[1].read_bytes()
    images[1].write_bytes(b"\x89PNG corrupt")
    out = tmp_path / "out"
    predict = ["predict", str(tiny_checkpoint), str(tmp_path / "in"), "--out", str(out), "--save", "color,labels"]

    # Without --skip-bad: stops at the corrupt file, naming it and the flag; img0's outputs stay.
    code, _, err = run(capsys, *predict)
    assert code == 2
    assert_ends_with_error(err, f"cannot decode image {images[1]}", "--skip-bad")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == ["img0_color.png", "img0_labels.png"]
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("img0_*.png")}

    # Rerun with --skip-bad, no --overwrite: img0 kept as it is, img2 done, img1 reported at the end, exit 2.
    code, stdout, err = run(capsys, *predict, "--skip-bad")
    assert code == 2
    assert_ends_with_error(err, "1 input(s) could not be read and were skipped (listed above)")
    assert f"skipped unreadable input {images[1]}: cannot decode image" in stdout
    assert "kept the outputs of 1 image(s) already done" in stdout and "wrote 2 file(s)" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("img0_*.png")} == first
    assert (out / "img2_color.png").is_file() and not (out / "img1_color.png").exists()

    # The file fixed: a plain rerun finishes the folder.
    images[1].write_bytes(good)
    code, stdout, err = run(capsys, *predict)
    assert code == 0, err
    assert "kept the outputs of 2 image(s) already done" in stdout and "wrote 2 file(s)" in stdout
    assert Image.open(out / "img1_labels.png").size == (32, 24)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # Other settings never mix with the kept outputs: refused, then --overwrite redoes everything.
    code, _, err = run(capsys, *predict, "--flip")
    assert code == 2
    assert_one_line_error(err, f"outputs in {out} were made with other settings", "--overwrite")
    code, stdout, err = run(capsys, *predict, "--flip", "--overwrite")
    assert code == 0, err
    assert "wrote 6 file(s)" in stdout and "already done" not in stdout


def test_predict_help_documents_skip_bad_and_rerun(capsys):
    code, out, _ = run(capsys, "predict", "--help")
    assert code == 0 and "--skip-bad" in out and "already done" in out



def test_a_failed_start_leaves_no_run_folder(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "camvid_hrnetv2_w18s_ovenet", f"data.root={tmp_path / 'missing'}",
                       "--run-dir", str(run_dir))  # data.root, not --data-root: the CLI checks that one itself
    assert code == 2 and "CamVid" in err
    assert not run_dir.exists()
    kept = tmp_path / "kept"  # a folder the user made is never removed
    (kept / "notes").mkdir(parents=True)
    code, _, _ = run(capsys, "train", "camvid_hrnetv2_w18s_ovenet", f"data.root={tmp_path / 'missing'}",
                     "--run-dir", str(kept))
    assert code == 2 and (kept / "notes").is_dir()
