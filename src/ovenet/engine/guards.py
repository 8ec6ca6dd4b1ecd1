"""What keeps a training run from losing or misrecording work: run-folder and resume checks, disk space, stop
signals and requests, and the NaN watch.

A run folder that holds checkpoints is never started over by accident: a fresh start there needs
``overwrite=True`` (``--overwrite``), which removes the old checkpoints first. A resume may change only
:data:`RESUMABLE_KEYS` (how long, how it logs, where it runs); any other difference from the checkpoint's config
is refused, so ``config.yaml`` and the checkpoints always describe the weights they hold. The data may move
(:data:`DATA_LOCATION_KEYS`): checkpoints record the data's identity, which a resume checks at the new place.

Stopping: the first SIGINT/SIGTERM lets the current step finish, saves ``last.pth`` and raises
:class:`TrainingInterrupted`, a ``SystemExit`` with code 128 + signal (130 for SIGINT, 143 for SIGTERM), which
schedulers read as "not finished". A second signal aborts at once (``last.pth`` is written atomically, so the
previous one survives). A caller's :class:`StopRequest` (e.g. the quickstart's time budget) stops the same way,
without a signal, and ``train`` returns.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..errors import CheckpointError, ConfigError, OvenetError
from ..files import disk_full_message, is_disk_full
from . import distributed as D

RUN_CHECKPOINTS = ("last.pth", "best.pth")
# What a full disk during training asks of the user (ovenet.files.disk_full_message).
DISK_FULL_FIX = ("free space there or train into another folder (--run-dir, or output_dir=...); `--resume auto` "
                 "continues from the last checkpoint")


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints a run wrote in ``run_dir``: last.pth, best.pth and the kept iter_N.pth."""
    from ..checkpoint import history

    return [p for p in (run_dir / name for name in RUN_CHECKPOINTS) if p.is_file()] + history(run_dir)
# Config keys a resumed run may change: its length, logging, checkpoint/validation cadence, device, loader workers,
# speed options and the evaluation defaults. Every other key (model, data, loss, optimiser, schedule shape, seed)
# shaped the weights in the checkpoint, so changing it would make config.yaml describe weights it did not train.
RESUMABLE_KEYS = frozenset({
    "name", "output_dir", "device", "data.num_workers",
    "train.iters", "train.epochs", "train.log_every", "train.ckpt_every", "train.val_every", "train.tensorboard",
    "train.keep_checkpoints", "train.dist_timeout", "train.report", "train.amp",
    "train.bad_sample", "train.compile", "train.channels_last", "train.deterministic",
    "train.activation_checkpointing", "loss.chunked",  # memory levers: same numbers, so a run can resume with them
    "eval.mode", "eval.crop_size", "eval.stride", "eval.scales", "eval.flip", "eval.boundary_width",
    "data.val_samples", "data.val_split", "data.eval_resize_short",  # validation only: the weights never saw them
})
# Where the data lies. A resume may change them when the data found there is the data the checkpoint recorded
# (:func:`check_same_data`): the run follows its data when the data moves.
DATA_LOCATION_KEYS = frozenset({"data.root", "data.image_dir", "data.label_dir", "data.list_file"})


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGINT/SIGTERM after saving ``last.pth``; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteWatch:
    """Remembers, on the device, the first iteration whose loss was NaN/inf, so each step adds no host sync;
    :meth:`check` (one sync) runs before logging, validation and every checkpoint write. Meanwhile the weights
    stay finite because :func:`train_step` skips updates with a non-finite loss on the device."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: Tensor, iteration: int) -> None:
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(newly_bad, iteration, self.first_bad)
        self.bad_value = torch.where(newly_bad, loss.float(), self.bad_value)

    def check(self, info: D.DistInfo, last_ckpt: Path) -> None:
        # Ranks agree on the earliest bad iteration (any rank's NaN poisons everyone's weights through DDP).
        never = torch.iinfo(torch.int64).max
        first = D.min_over_ranks(info, torch.where(self.first_bad < 0, never, self.first_bad))
        first = int(first)
        if first == never:
            return
        # This rank's value if the first bad step was its own (nan, inf or -inf); another rank's: say nan.
        value = float(self.bad_value) if int(self.first_bad) == first else math.nan
        kept = (
            f"the last good checkpoint is kept at {last_ckpt}"
            if last_ckpt.is_file()
            else "no checkpoint had been written yet"
        )
        raise OvenetError(f"loss is {value} at iteration {first}; {kept}; lower train.lr or check the data")


class StopSignals:
    """While active, the first SIGINT/SIGTERM only sets ``signum`` (the loop stops after the current step);
    a second one aborts immediately. Handlers can only be installed from the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited this handler: the main process decides when to stop
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\nreceived {name} again: aborting now\n".encode())
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        # os.write, not logging or print: it is safe inside a signal handler.
        os.write(
            2,
            f"\nreceived {name}: finishing the current step, then saving last.pth "
            f"(send {name} again to abort at once)\n".encode(),
        )

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


class DeferredWorkerCheck:
    """Holds back torch's SIGCHLD handler during a training step: on a DataLoader worker's death it raises at
    whatever line runs (possibly inside ``optimizer.step()``, leaving half-updated weights). Inside ``with`` a
    SIGCHLD is only noted; :meth:`raise_pending` runs torch's handler where the loop is between two steps, so
    the failure is reported there and the checkpoint written is of a whole step."""

    def __init__(self) -> None:
        self.pending = False
        self._torch_handler: Any = None

    def __enter__(self) -> DeferredWorkerCheck:  # noqa: PYI034
        handler = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
        if callable(handler) and threading.current_thread() is threading.main_thread():
            self._torch_handler = handler
            signal.signal(signal.SIGCHLD, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.pending = True

    def __exit__(self, *exc: object) -> None:
        if self._torch_handler is not None:
            signal.signal(signal.SIGCHLD, self._torch_handler)

    def raise_pending(self) -> None:
        """Run the held-back handler now (it raises RuntimeError if a DataLoader worker died)."""
        if self.pending:
            self.pending = False
            handler = signal.getsignal(signal.SIGCHLD)
            if callable(handler):
                handler(signal.SIGCHLD, None)


class StopRequest:
    """A stop asked from inside the program (a time budget, a test), not by a signal: the loop finishes its
    step, saves ``last.pth`` and :func:`train` returns normally, printing no signal message. :meth:`request` may
    be called from another thread. ``stopped_at``: the iteration where the loop stopped for it; None when the
    request came after the last step (nothing was cut short).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.stopped_at: int | None = None

    def request(self, reason: str = "") -> None:
        self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder and prove it is writable, before any work is done."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OvenetError(
            f"cannot write to the output folder {run_dir} ({exc.strerror or exc}); set output_dir "
            "(or name) to a writable folder or fix its permissions"
        ) from None


def resumes_own_run(run_dir: Path, ckpt: dict | None) -> bool:
    return ckpt is not None and Path(ckpt["path"]).resolve().parent == run_dir.resolve()


def check_run_folder(run_dir: Path, resume: str | Path | None, ckpt: dict | None, overwrite: bool) -> None:
    """Refuse a start that would replace another run's checkpoints, unless ``overwrite``.

    Starting fresh, or resuming a checkpoint from elsewhere, in a folder that holds ``last.pth``/``best.pth``
    would overwrite them (and a stale ``best.pth`` would outlive the new run); a folder without checkpoints
    (e.g. a start that failed early) is fine.
    """
    held = [p.name for p in run_checkpoints(run_dir)]
    if not held or overwrite or resumes_own_run(run_dir, ckpt):
        return
    if ckpt is not None:
        raise OvenetError(
            f"run folder {run_dir} holds another run ({', '.join(held)}); resuming {ckpt['path']} there would "
            "replace its checkpoints: choose another --run-dir"
        )
    if resume is not None:  # --resume auto found no last.pth
        raise OvenetError(
            f"--resume auto: run folder {run_dir} holds {', '.join(held)} but no last.pth to resume from; start "
            "it again with --overwrite or choose another --run-dir"
        )
    raise OvenetError(
        f"run folder {run_dir} already holds a run ({', '.join(held)}); continue it with --resume auto, start it "
        "again with --overwrite, or choose another --run-dir"
    )


def resume_changes(ckpt: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for each config key that differs from the checkpoint's config; raises
    :class:`ConfigError` naming them when any is outside :data:`RESUMABLE_KEYS`."""
    from ..config import _flatten, from_dict, saved_config

    from ..data.factory import absolute_data_paths

    try:  # through from_dict, so keys added since the checkpoint was written compare with their defaults
        old_cfg = from_dict(saved_config(copy.deepcopy(ckpt["config"])))
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt['path']} holds a config this version cannot read ({exc})") from None
    # An older checkpoint's relative data paths meant the working directory's, as now.
    old_cfg.data = absolute_data_paths(old_cfg.data)
    old, new = _flatten(old_cfg.to_dict()), _flatten(cfg.to_dict())
    changes = [(key, old.get(key), new.get(key)) for key in new if old.get(key) != new.get(key)]
    refused = [change for change in changes if change[0] not in RESUMABLE_KEYS | DATA_LOCATION_KEYS]
    if refused:
        shown = ", ".join(f"{key} {a} -> {b}" for key, a, b in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"cannot resume {ckpt['path']}: this config changes what its weights were trained with ({shown}{more}); "
            "resume with the original config (a resume may change only train.iters/epochs, logging, checkpoint "
            "and validation intervals, device, data.num_workers, where the data lies, the validation set and eval "
            "settings), or start a new run with "
            f"another --run-dir (model.init_from={ckpt['path']} starts from its weights)"
        )
    return changes


def check_same_data(ckpt: dict, changes: list[tuple[str, Any, Any]], identity: dict, datasets: dict
                    ) -> list[tuple[int, str]]:
    """Compare the data found now (``identity`` of ``datasets``, see :mod:`ovenet.data.identity`) with the data
    the checkpoint recorded. Data that moved (a changed :data:`DATA_LOCATION_KEYS` key) must be the same data,
    else :class:`ConfigError`; data changed in place, or another validation set, is allowed with a warning.
    Returns ``(logging level, message)`` lines for the log."""
    from ..data.identity import identity_difference

    moved = [(key, old, new) for key, old, new in changes if key in DATA_LOCATION_KEYS]
    before = ", ".join(str(old) for _, old, _ in moved)
    after = ", ".join(str(new) for _, _, new in moved)
    recorded = ckpt.get("data_identity")
    if recorded is None:
        # Written before checkpoints recorded their data. Refusing would leave such a run no way to continue
        # (the old place may be gone); the class count is still checked against the model, and the log says
        # what could not be verified.
        if not moved:
            return []
        return [(logging.WARNING, f"data moved from {before} to {after}: {ckpt['path']} was written by an older "
                                  "ovenet that recorded no data identity, so it is not verified that this is the "
                                  "data the run trained on")]
    notes = []
    difference = identity_difference(recorded["train"], identity["train"], datasets["train"])
    if difference is not None and moved:
        raise ConfigError(
            f"cannot resume {ckpt['path']}: the training data at {after} is not the data it was trained on at "
            f"{before} ({difference}); point --data-root (data.root) at that data, or train on this data as a "
            f"new run from its weights: --run-dir NEW_DIR model.init_from={ckpt['path']}"
        )
    if difference is not None:
        notes.append((logging.WARNING, f"the training data changed since {ckpt['path']} was written "
                                       f"({difference}); the run continues on the data as it is now"))
    elif moved:
        notes.append((logging.INFO, f"data moved from {before} to {after}: same {identity['train']['samples']} "
                                    "training samples"))
    old_val, new_val = recorded.get("val"), identity["val"]
    if old_val is not None and new_val is not None:
        difference = identity_difference(old_val, new_val, datasets["val"])
        if difference is not None:
            notes.append((logging.WARNING, f"the validation set differs from the one {ckpt['path']} was validated "
                                           f"on ({difference}): the best mIoU so far, which picks best.pth, was "
                                           "scored on that one"))
    return notes


def check_free_space(run_dir: Path, model: nn.Module) -> None:
    """Fail before training when the disk cannot hold the checkpoints (model + momentum, ~3 files at once)."""
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = 3 * 2 * state_bytes + 64 * 2**20
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise OvenetError(
            f"only {free / 2**20:.0f} MiB free in {run_dir} but checkpoints need about "
            f"{needed / 2**20:.0f} MiB; free some space or set output_dir to another disk"
        )


def on_main_rank(info: D.DistInfo, check: Any) -> None:
    """Run a check on rank 0 only and raise its OvenetError on every rank (so no rank waits forever)."""
    problem = None
    if info.is_main:
        try:
            check()
        except OvenetError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = disk_full_message(exc, DISK_FULL_FIX) if is_disk_full(exc) else (
                f"cannot write to the output folder ({exc.strerror or exc}); check its permissions and space"
            )
    problem = D.broadcast_object(info, problem)
    if problem:
        raise OvenetError(problem)
