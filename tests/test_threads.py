"""CPU thread count: the rule (benchmarks/THREADS.md), ``--threads`` before or after the command, one note saying
what was chosen and why, nothing changed on CUDA, and the process's setting put back when a command ends."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_checkpoint
from PIL import Image

from ovenet import threads
from ovenet.cli.main import main
from ovenet.threads import choose_cpu_threads, configure_threads, restore_threads, take_note

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.num_samples=8", "data.image_size=[48,64]", "data.crop_size=[48,64]", "eval.crop_size=[48,64]"]


@pytest.mark.parametrize("cores,load,default,env,expected", [
    (2, 0.0, 2, {}, 1),  # 2 cores: one left free, even idle (a busy second core made 2 threads 2.6-7x slower)
    (2, 3.1, 2, {}, 1),
    (1, 0.0, 1, {}, 1),
    (8, 0.2, 8, {}, 7),
    (8, 3.1, 8, {}, 4),  # three cores busy, one left free
    (8, 30.0, 8, {}, 1),
    (16, 0.0, 8, {}, 8),  # never more than PyTorch's own count
    (8, 0.0, 8, {"LOCAL_WORLD_SIZE": "2"}, 3),  # two processes share the 8 cores
])
def test_rule_leaves_a_core_free_and_skips_busy_ones(cores, load, default, env, expected):
    choice = choose_cpu_threads(cores=cores, load=load, default=default, env=env)
    assert (choice.threads, choice.source) == (expected, "rule")
    message = choice.message()
    assert message.startswith(f"cpu: {expected} thread")
    assert f"({cores} cores" in message and f"load {load:.1f}" in message and "--threads N to change" in message


def test_explicit_choices_win_over_the_rule():
    assert choose_cpu_threads(3, cores=2, load=5.0, default=2, env={}).threads == 3
    assert choose_cpu_threads(3, env={}).source == "--threads"
    from ovenet.errors import OvenetError

    with pytest.raises(OvenetError, match="--threads"):
        choose_cpu_threads(0, env={})
    # OMP_NUM_THREADS is the user's choice too: PyTorch applied it at start-up; it is reported, not replaced.
    choice = choose_cpu_threads(cores=8, load=0.0, default=8, env={"OMP_NUM_THREADS": "5"})
    assert choice.source == "OMP_NUM_THREADS" and "OMP_NUM_THREADS=5" in choice.message()


def test_configure_applies_on_cpu_leaves_cuda_alone_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "load_average", lambda: 0.9)
    torch.set_num_threads(3)
    try:
        choice = configure_threads("cpu")
        assert choice.threads == 2 == torch.get_num_threads()  # 4 cores - 1 busy - 1 free
        assert take_note() == "cpu: 2 threads (4 cores, load 0.9, one core left free); --threads N to change"
        assert take_note() is None  # said once
        restore_threads()
        assert torch.get_num_threads() == 3
        # CUDA: PyTorch's setting stays and nothing is said, unless --threads asks.
        assert configure_threads("cuda").source == "cuda" and torch.get_num_threads() == 3 and take_note() is None
        configure_threads("cuda:0", 2)
        assert torch.get_num_threads() == 2 and "(--threads)" in take_note()
        restore_threads()
        assert torch.get_num_threads() == 3
    finally:
        restore_threads()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", TINY)
    image = tmp_path_factory.mktemp("img") / "scene.png"
    Image.new("RGB", (64, 48), (90, 120, 60)).save(image)
    return path, image


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_threads_option_sets_the_count_for_the_command_only(monkeypatch, capsys, tmp_path, tiny_checkpoint,
                                                                where):
    import ovenet.engine.predict as predict_module

    ckpt, image = tiny_checkpoint
    seen = []
    real_predict = predict_module.predict

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict", spy)
    torch.set_num_threads(1)
    command = ["predict", str(ckpt), str(image), "--out", str(tmp_path / "out")]
    argv = ["--threads", "2", *command] if where == "before" else [*command, "--threads", "2"]
    assert main(argv) == 0
    assert seen == [2]  # the model ran at the requested count...
    assert torch.get_num_threads() == 1  # ...and the process got its own setting back
    assert "cpu: 2 threads (--threads); --threads N to change" in capsys.readouterr().err


def test_cli_default_follows_the_rule_and_says_so(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    import ovenet.engine.evaluate as evaluate_module

    ckpt, _ = tiny_checkpoint
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 0.3)
    seen = []
    real_infer = evaluate_module.infer_logits

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "infer_logits", spy)
    torch.set_num_threads(2)  # PyTorch's default on a 2-core machine
    assert main(["eval", str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    assert "cpu: 1 thread (2 cores, load 0.3, one core left free); --threads N to change" in capsys.readouterr().err


def test_bad_threads_value_is_a_usage_error(capsys):
    assert main(["--threads", "0", "configs"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["configs", "--threads", "two"]) == 2


def test_the_note_waits_for_the_work_so_errors_stay_one_line(capsys, tmp_path):
    # A command refused on its arguments prints its one error line, not the thread choice before it.
    code = main(["predict", str(tmp_path / "missing.pth"), str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "thread" not in err
    assert take_note() is None  # and nothing is left over for the next command in this process
