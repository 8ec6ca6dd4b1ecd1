"""``ovenet quickstart``: trains, evaluates and predicts on synthetic scenes and writes what it promises."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ovenet.cli.main import main
from ovenet.quickstart import MARKER, MIN_ITERS, plan_iterations, quickstart_config, seconds_per_iteration

pytestmark = pytest.mark.usefixtures("one_thread")


# Small enough for a test: 16 training scenes, 4 validation scenes of 48x64, batch 4.
SMALL = ["data.num_samples=16", "data.image_size=[48,64]", "data.crop_size=[48,64]", "eval.crop_size=[48,64]",
         "train.batch_size=4"]


def test_quickstart_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--iters", "3", *SMALL]) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / MARKER).read_text())
    assert summary["status"] == "done" and summary["iterations"] == 3 and summary["device"] == "cpu"
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "last.pth").is_file()
    assert Path(summary["checkpoint"]).is_file()
    result = json.loads(Path(summary["eval_json"]).read_text())
    assert result["dataset"] == "synthetic" and result["num_images"] == 4
    assert 0 <= result["miou"] <= 1 and 0 <= result["boundary_miou"] <= 1
    assert result["miou"] == pytest.approx(summary["miou"])
    assert Path(summary["eval_table"]).read_text().startswith("# ")
    for i in range(4):
        for kind in ("color", "overlay", "offsets", "confidence", "truth"):
            assert Image.open(out / "predictions" / f"scene_{i:02d}_{kind}.png").size == (64, 48)
    assert set(summary["predictions"]) == {str(p) for p in (out / "predictions").iterdir()}
    # It says where to look.
    for path in (str(run_dir), summary["eval_table"], str(out / "predictions")):
        assert path in printed
    assert "mIoU" in printed and "boundary mIoU" in printed

    # A second run refuses to replace the first without --overwrite, and never deletes foreign folders.
    assert main(["quickstart", "--out", str(out), "--iters", "3", *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["quickstart", "--out", str(foreign), "--overwrite", "--iters", "3"]) == 2
    assert "refusing to delete" in capsys.readouterr().err and (foreign / "notes.txt").is_file()


def test_minutes_budget_path_times_the_steps_and_plans(tmp_path):
    from ovenet.quickstart import run_quickstart

    lines: list[str] = []
    summary = run_quickstart(tmp_path / "qs", minutes=0.05, overrides=SMALL, num_predictions=1, log=lines.append)
    assert summary["iterations"] == MIN_ITERS  # 3 s cannot pay for more than the minimum
    assert summary["stopped_at_time_budget"] is False
    assert "s per training step on cpu" in lines[0] and f"{MIN_ITERS} iterations" in lines[0]
    assert (tmp_path / "qs" / "predictions" / "scene_00_offsets.png").is_file()


def test_bad_quickstart_override_fails_before_touching_the_folder(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--iters", "3", "data.num_sample=16"]) == 2
    assert "did you mean 'data.num_samples'" in capsys.readouterr().err
    assert not out.exists()


def test_iterations_fit_the_budget():
    # 3 minutes at 0.2 s/step: 90% of 180 s minus 15 s of fixed costs = 147 s -> 735 steps.
    assert plan_iterations(3.0, 0.2) == 735
    assert plan_iterations(0.1, 0.2) == MIN_ITERS  # never fewer than a minimal run
    with pytest.raises(Exception, match="--minutes"):
        plan_iterations(0, 0.2)


def test_step_timing_uses_the_quickstart_model(tmp_path):
    cfg = quickstart_config(tmp_path, 1, "cpu", SMALL)
    assert cfg.model.offset.enabled and cfg.data.name == "synthetic"
    assert 0 < seconds_per_iteration(cfg, "cpu", steps=1) < 30


@pytest.mark.parametrize("single,multi,expected", [(0.5, 5.0, 1), (0.5, 0.3, 2), (0.5, 0.45, 2)])
def test_thread_choice_prefers_one_thread_only_when_clearly_faster(monkeypatch, tmp_path, single, multi, expected):
    import ovenet.quickstart as qs

    def fake_timing(cfg, device, steps=3, give_up_after=float("inf")):
        return single if torch.get_num_threads() == 1 else multi

    monkeypatch.setattr(qs, "seconds_per_iteration", fake_timing)
    torch.set_num_threads(2)
    threads, seconds = qs.fastest_thread_count(quickstart_config(tmp_path, 1, "cpu", SMALL), "cpu")
    assert (threads, seconds) == (expected, single if expected == 1 else multi)
    assert torch.get_num_threads() == 2  # the caller decides; the probe leaves the setting as it was


def test_deadline_stops_training_through_the_trainer_and_is_told_apart(tmp_path):
    from ovenet.engine.train import TrainingInterrupted, train
    from ovenet.quickstart import TrainingDeadline

    cfg = quickstart_config(tmp_path, 100000, "cpu", SMALL)
    with TrainingDeadline(1.0) as timer, pytest.raises(TrainingInterrupted):
        train(cfg, run_dir=tmp_path / "run")
    assert timer.fired
    assert (tmp_path / "run" / "last.pth").is_file()  # the trainer saved its progress before stopping
    # Outside training a late deadline is harmless, and the SIGTERM handler is restored afterwards.
    before = signal.getsignal(signal.SIGTERM)
    with TrainingDeadline(0.01) as timer:
        time.sleep(0.3)
    assert timer.fired and signal.getsignal(signal.SIGTERM) == before


def test_readme_python_snippet_runs_as_written_after_the_quickstart(tmp_path, monkeypatch):
    """The README's Python block, unchanged but for running in a temporary folder, after a (short) quickstart
    into its default place (runs/quickstart)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README has one Python snippet"
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--iters", "2", *SMALL]) == 0
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["result"].labels.shape == (48, 64) and len(namespace["results"]) == 2
    assert namespace["out"].logits_final.shape == (1, namespace["model"].num_classes, 24, 40)
    assert namespace["net"].cfg.offset.tau == 0.2
