"""``ovenet quickstart``: trains, evaluates and predicts on synthetic scenes and writes what it promises."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import ovenet.engine.train as train_module
from ovenet import checkpoint
from ovenet.cli.main import main
from ovenet.engine.train import train
from ovenet.quickstart import (
    MARKER,
    MAX_ITERS,
    MIN_ITERS,
    plan_iterations,
    quickstart_config,
    seconds_per_iteration,
)

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
    assert summary["iterations"] == summary["iterations_done"] == MIN_ITERS  # 3 s pay for no more than the minimum
    assert summary["stopped_at_time_budget"] is False
    planned = next(line for line in lines if "s per training step on cpu" in line)
    assert f"{MIN_ITERS} iterations" in planned
    assert (tmp_path / "qs" / "predictions" / "scene_00_offsets.png").is_file()


def test_bad_quickstart_override_fails_before_touching_the_folder(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--iters", "3", "data.num_sample=16"]) == 2
    assert "did you mean 'data.num_samples'" in capsys.readouterr().err
    assert not out.exists()


def test_iterations_fit_the_budget():
    # 147 s of training at 0.2 s/step, 10% kept for what the timed steps leave out -> 661 steps.
    assert plan_iterations(147.0, 0.2) == 661
    assert plan_iterations(-5.0, 0.2) == MIN_ITERS  # never fewer than a minimal run
    assert plan_iterations(1e9, 0.2) == MAX_ITERS


def test_step_timing_uses_the_quickstart_model(tmp_path):
    cfg = quickstart_config(tmp_path, 1, "cpu", SMALL)
    assert cfg.model.offset.enabled and cfg.data.name == "synthetic"
    assert 0 < seconds_per_iteration(cfg, "cpu", steps=1) < 30


@pytest.mark.parametrize("single,multi,expected", [(0.5, 5.0, 1), (0.5, 0.3, 2), (0.5, 0.45, 2)])
def test_a_rule_choice_of_several_threads_is_checked_against_one(monkeypatch, tmp_path, single, multi, expected):
    import ovenet.quickstart as qs
    from ovenet.threads import ThreadChoice

    def fake_timing(cfg, device, steps=3, give_up_after=float("inf")):
        return single if torch.get_num_threads() == 1 else multi

    monkeypatch.setattr(qs, "seconds_per_iteration", fake_timing)
    torch.set_num_threads(1)
    cfg = quickstart_config(tmp_path, 1, "cpu", SMALL)
    threads, seconds = qs.fastest_thread_count(cfg, "cpu", ThreadChoice(2, "rule"))
    assert (threads, seconds) == (expected, single if expected == 1 else multi)
    assert torch.get_num_threads() == 1  # the caller decides; the probe leaves the setting as it was
    # The user's own count (--threads) is timed as it is, never replaced.
    assert qs.fastest_thread_count(cfg, "cpu", ThreadChoice(2, "--threads")) == (2, multi)


def test_quickstart_uses_the_commands_thread_rule(monkeypatch, tmp_path):
    from ovenet import threads
    from ovenet.quickstart import run_quickstart

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 0.1)
    torch.set_num_threads(2)
    lines: list[str] = []
    run_quickstart(tmp_path / "qs", iters=1, overrides=SMALL, num_predictions=1, log=lines.append)
    assert "quickstart: cpu: 1 thread (2 cores, load 0.1, one core left free); --threads N to change" in lines
    assert torch.get_num_threads() == 2  # put back afterwards


def test_deadline_stops_training_without_a_signal(tmp_path, capfd):
    from ovenet.quickstart import TrainingDeadline

    cfg = quickstart_config(tmp_path, 100000, "cpu", SMALL)
    before = signal.getsignal(signal.SIGTERM)
    with TrainingDeadline(1.0) as timer:
        run_dir = train(cfg, run_dir=tmp_path / "run", stop=timer.stop)  # returns: no TrainingInterrupted
    assert timer.cut and 0 < timer.stop.stopped_at < 100000
    assert checkpoint.read(run_dir / "last.pth")["iteration"] == timer.stop.stopped_at  # progress saved
    assert "SIGTERM" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    # A deadline that passes after training (here, outside it) cuts nothing.
    with TrainingDeadline(0.01) as timer:
        time.sleep(0.2)
    assert timer.stop.requested and not timer.cut


def _budget_runs_out(monkeypatch, when: str) -> list:
    """Make the quickstart's deadline fire at a chosen moment: 'during' training, or 'after' its last iteration
    (during the final validation), whatever the speed of this machine."""
    import ovenet.quickstart as qs

    deadlines: list = []

    class Recorded(qs.TrainingDeadline):
        def __enter__(self):
            deadlines.append(self)
            return super().__enter__()

    monkeypatch.setattr(qs, "TrainingDeadline", Recorded)
    real_validate, real_step = train_module.validate, train_module.train_step
    steps = [0]

    def validate(*args, **kwargs):
        result = real_validate(*args, **kwargs)
        if when == "after":
            deadlines[-1].stop.request("test")
        return result

    def step(*args, **kwargs):
        steps[0] += 1
        if when == "during" and steps[0] == 3:
            deadlines[-1].stop.request("test")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "validate", validate)
    monkeypatch.setattr(train_module, "train_step", step)
    return deadlines


def test_a_budget_that_runs_out_after_the_last_iteration_cuts_nothing(monkeypatch, tmp_path, capfd):
    from ovenet.quickstart import run_quickstart

    _budget_runs_out(monkeypatch, "after")
    lines: list[str] = []
    summary = run_quickstart(tmp_path / "qs", minutes=0.05, overrides=SMALL, num_predictions=1, log=lines.append)
    assert summary["stopped_at_time_budget"] is False
    assert summary["iterations_done"] == summary["iterations"] == MIN_ITERS
    assert not any("time budget" in line for line in lines)
    assert "SIGTERM" not in capfd.readouterr().err


def test_a_budget_that_cuts_training_says_so_in_its_own_words(monkeypatch, tmp_path, capfd):
    from ovenet.quickstart import run_quickstart

    _budget_runs_out(monkeypatch, "during")
    lines: list[str] = []
    summary = run_quickstart(tmp_path / "qs", minutes=0.05, overrides=SMALL, num_predictions=1, log=lines.append)
    assert summary["stopped_at_time_budget"] is True
    assert summary["iterations_done"] == 3 and summary["iterations"] == MIN_ITERS
    said = [line for line in lines if "time budget" in line]
    assert len(said) == 1 and "time budget of 3 s reached at iteration 3/20" in said[0], lines
    assert "evaluating the weights it reached" in said[0]
    assert "SIGTERM" not in capfd.readouterr().err
    assert summary["checkpoint"].endswith("last.pth") and Path(summary["eval_json"]).is_file()


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
