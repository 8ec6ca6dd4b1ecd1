"""What a resume does when the newest checkpoint is damaged, and what a dying DataLoader worker leaves behind.

- ``train.keep_checkpoints=k`` keeps ``last.pth`` and the k-1 before it (``iter_N.pth``): hard links, or whole
  copies on a file system without links, from which a run resumes as well.
- Checkpoint files get the umask's mode, as any file ``open()`` creates (not ``mkstemp``'s 0600).
- ``--resume auto`` with a truncated or bit-flipped ``last.pth`` names it, falls back to the newest intact
  checkpoint and ends with the weights of an uninterrupted run; with every checkpoint damaged it refuses
  (nothing silently trains from scratch). ``torch.load`` itself accepts a flipped bit: the zip CRC-32 catches it.
- A DataLoader worker killed mid-run: one clear line, ``last.pth`` holds the last whole step.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

import ovenet.engine.train as training
from ovenet import checkpoint
from ovenet.errors import CheckpointError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(run_dir: Path, iters: int, *overrides: str, resume: str | None = None) -> None:
    cfg = tiny_config(f"train.iters={iters}", "train.ckpt_every=2", "train.deterministic=true", *overrides)
    training.train(cfg, resume=resume, run_dir=run_dir)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_a_bit(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x04]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (module fixtures run before the one_thread fixture): same rounding
    try:
        _run(run_dir, 8)
    finally:
        torch.set_num_threads(threads)
    return checkpoint.read(run_dir / "last.pth")["model"]


def test_keep_checkpoints_keeps_last_and_the_ones_before(tmp_path):
    _run(tmp_path / "run", 8, "train.keep_checkpoints=3")
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pth")) == [
        "best.pth", "iter_00000004.pth", "iter_00000006.pth", "last.pth"]
    for name, iteration in (("iter_00000004.pth", 4), ("iter_00000006.pth", 6), ("last.pth", 8)):
        assert checkpoint.read(tmp_path / "run" / name)["iteration"] == iteration
    _run(tmp_path / "one", 4, "train.keep_checkpoints=1")
    assert not list((tmp_path / "one").glob("iter_*.pth"))


def test_kept_checkpoints_are_whole_copies_without_hard_links_and_resume(tmp_path, reference, monkeypatch):
    originals = {}

    def no_links(source, target, *args, **kwargs):  # as on FAT or an SMB share (EXDEV is handled the same)
        originals[Path(target).name] = Path(source).read_bytes()  # last.pth as it was, before it is replaced
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    run_dir = tmp_path / "run"
    _run(run_dir, 8, "train.keep_checkpoints=3")
    kept = sorted(run_dir.glob("iter_*.pth"))
    assert [p.name for p in kept] == ["iter_00000004.pth", "iter_00000006.pth"]
    assert sorted(originals) == ["iter_00000002.pth", "iter_00000004.pth", "iter_00000006.pth"]
    for path in kept:
        assert path.stat().st_nlink == 1 and not path.samefile(run_dir / "last.pth")
        assert path.read_bytes() == originals[path.name]
    assert checkpoint.read(kept[-1])["iteration"] == 6
    assert not list(run_dir.glob(".*.tmp"))
    _truncate(run_dir / "last.pth")
    _run(run_dir, 8, "train.keep_checkpoints=3", resume="auto")
    assert f"resumed from {kept[-1]} at iteration 6/8" in (run_dir / "train.log").read_text()
    final = checkpoint.read(run_dir / "last.pth")["model"]
    for name, value in reference.items():
        assert torch.equal(final[name], value), name


def _no_hard_links(*args, **kwargs):
    raise OSError(errno.EPERM, os.strerror(errno.EPERM))


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_checkpoints_get_the_mode_of_any_new_file(tmp_path, monkeypatch, umask):
    before = os.umask(umask)
    try:
        checkpoint.atomic_save({"a": torch.ones(2)}, tmp_path / "last.pth")
        (tmp_path / "plain.txt").open("w").close()
        monkeypatch.setattr(os, "link", _no_hard_links)
        checkpoint.keep_history(tmp_path, 2, 4, keep=2)  # the copy when links fail
    finally:
        os.umask(before)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("last.pth", "iter_00000002.pth"):
        assert oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) == oct(expected), name


def test_overwrite_removes_the_kept_checkpoints_too(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, 6)
    assert (run_dir / "iter_00000004.pth").is_file()
    cfg = tiny_config("train.iters=2", "train.ckpt_every=2")
    training.train(cfg, run_dir=run_dir, overwrite=True)
    assert not (run_dir / "iter_00000004.pth").exists()


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit], ids=["truncated", "bit_flipped"])
def test_damaged_last_falls_back_to_the_newest_intact_checkpoint(tmp_path, reference, damage):
    run_dir = tmp_path / "run"
    _run(run_dir, 8)  # last.pth at 8, iter_00000006.pth
    damage(run_dir / "last.pth")
    if damage is _flip_a_bit:  # what the CRC check is for: torch.load reads the flipped file without a word
        torch.load(run_dir / "last.pth", weights_only=True)
    _run(run_dir, 8, resume="auto")
    log = (run_dir / "train.log").read_text()
    warning = next(line for line in log.splitlines() if "WARNING --resume auto skipped a damaged checkpoint" in line)
    assert str(run_dir / "last.pth") in warning
    assert ("CRC-32" in warning) if damage is _flip_a_bit else ("damaged or incomplete" in warning)
    assert f"resumed from {run_dir / 'iter_00000006.pth'} at iteration 6/8" in log
    final = checkpoint.read(run_dir / "last.pth")
    assert final["iteration"] == 8
    for name, value in reference.items():
        assert torch.equal(final["model"][name], value), name


def test_every_checkpoint_damaged_refuses_to_start_over(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, 6)
    _truncate(run_dir / "last.pth")
    _flip_a_bit(run_dir / "iter_00000004.pth")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        _run(run_dir, 8, resume="auto")
    assert "last.pth" in str(info.value) and "iter_00000004.pth" in str(info.value)
    assert checkpoint.read_resume("auto", tmp_path / "empty") is None  # a folder with none: a fresh start


def test_an_explicit_damaged_resume_names_the_file(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, 4)
    _flip_a_bit(run_dir / "last.pth")
    with pytest.raises(CheckpointError, match=r"last\.pth' is damaged: its record .* fails its CRC-32"):
        checkpoint.read_resume(run_dir / "last.pth", run_dir)


class _KillsItsWorker(torch.utils.data.Dataset):
    """The training set, except that the DataLoader worker dies (SIGKILL, as the OOM killer does) at the
    ``at``-th sample it reads."""

    def __init__(self, dataset, at: int):
        self.dataset, self.at, self.reads = dataset, at, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        return getattr(self.__dict__["dataset"], name)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.at and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.dataset[index]


def test_a_killed_loader_worker_is_one_line_and_the_last_whole_step_is_saved(tmp_path, monkeypatch):
    real = training.build_dataset
    monkeypatch.setattr(training, "build_dataset",
                        lambda cfg, train=True, **kw: _KillsItsWorker(real(cfg, train=train, **kw), 7) if train
                        else real(cfg, train=train, **kw))
    run_dir = tmp_path / "run"
    with pytest.raises(DataError) as info:
        _run(run_dir, 40, "data.num_workers=1", "train.ckpt_every=100")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("rank 0: a data-loader worker died (DataLoader worker (pid")
    assert "lower data.num_workers" in message and f"progress is saved in {run_dir / 'last.pth'}" in message
    ckpt = checkpoint.read(run_dir / "last.pth")
    assert 1 <= ckpt["iteration"] <= 3  # the worker read 6 samples whole: 3 steps of 2 at most
