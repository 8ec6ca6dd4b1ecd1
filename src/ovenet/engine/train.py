"""Training: :func:`train`, readable top to bottom, plus :func:`train_step` and :func:`validate`.

Single process: ``train(cfg)``. Several GPUs: ``torchrun --nproc_per_node=N -m ovenet.cli train ...``; every
process runs the same ``train`` and :mod:`ovenet.engine.distributed` joins them.

What a run folder holds: ``config.yaml``, ``train.log``, ``last.pth`` (every ``ckpt_every`` iterations, on a
stop request and at the end), ``best.pth`` (best validation mIoU) and TensorBoard events under ``tb/``.

A run folder that holds checkpoints is never started over by accident: a fresh start there needs
``overwrite=True`` (``--overwrite``), which removes the old checkpoints first. A resume may change only
:data:`RESUMABLE_KEYS` (how long, how it logs, where it runs); any other difference from the checkpoint's config
is refused, so ``config.yaml`` and the checkpoints always describe the weights they hold. A resume with no
iterations left logs so and trains nothing.

Exact resume: a checkpoint holds the model, optimizer, scheduler, grad scaler, iteration and per-rank RNG
states. The data order is a pure function of (seed, epoch) and each sample's augmentation a pure function of
(seed, epoch, index), so a run resumed mid-epoch sees the same remaining batches, augmented the same way, as
the run that never stopped.

Stopping: the first SIGINT/SIGTERM lets the current step finish, saves ``last.pth`` and raises
:class:`TrainingInterrupted`, a ``SystemExit`` with code 128 + signal (130 for SIGINT, 143 for SIGTERM), so
the process exits with the conventional "killed by signal" status, which schedulers read as "not finished".
A second signal aborts at once (``last.pth`` is written atomically, so the previous one survives). A caller's
:class:`StopRequest` (e.g. the quickstart's time budget) stops the same way, without a signal, and ``train``
returns.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import checkpoint
from ..config import Config, save_config
from ..data import build_dataset, build_loader, collate_samples, seed_worker
from ..device import resolve_device
from ..errors import CheckpointError, ConfigError, DataError, OvenetError
from ..losses import build_loss
from ..metrics import ConfusionMatrix
from ..models import build_model
from ..models.hrnet import HighResolutionModule
from ..threads import take_note
from ..weights import load_initial_weights
from . import distributed as D
from .logging import (
    Progress,
    TensorBoard,
    close_logger,
    format_seconds,
    progress_bar,
    setup_logger,
    visualise_sample,
)
from .optim import build_optimizer, build_scheduler, step_unless_nonfinite

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
_MAX_SKIPS_IN_A_ROW = 16
RUN_CHECKPOINTS = ("last.pth", "best.pth")
# Config keys a resumed run may change: its length, logging, checkpoint/validation cadence, device, loader workers,
# speed options and the evaluation defaults. Every other key (model, data, loss, optimiser, schedule shape, seed)
# shaped the weights in the checkpoint, so changing it would make config.yaml describe weights it did not train.
RESUMABLE_KEYS = frozenset({
    "name", "output_dir", "device", "data.num_workers",
    "train.iters", "train.epochs", "train.log_every", "train.ckpt_every", "train.val_every", "train.tensorboard",
    "train.bad_sample", "train.compile", "train.channels_last", "train.deterministic",
    "eval.mode", "eval.crop_size", "eval.stride", "eval.scales", "eval.flip", "eval.boundary_width",
})


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGINT/SIGTERM after saving ``last.pth``; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- data: seeded per-sample augmentation, bad-sample policy, resumable order -----------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainingSet(Dataset):
    """Wraps a dataset for training: item ``(epoch, index)`` is sample ``index`` augmented with RNGs seeded
    from (seed, epoch, index): augmentation does not depend on worker count, batch order or a resume point.

    ``bad_sample="skip"``: a sample that raises :class:`DataError` is replaced by the next index and the error
    text travels with the batch under ``"skipped"`` (so the main process can log it, whichever worker hit it).
    """

    def __init__(self, dataset: Dataset, seed: int, bad_sample: str = "stop"):
        self.dataset = dataset
        self.seed = seed
        self.bad_sample = bad_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        failures: list[str] = []
        for _ in range(_MAX_SKIPS_IN_A_ROW):
            try:
                sample = self._augmented(epoch, index)
                break
            except DataError as exc:
                if self.bad_sample == "stop":
                    raise
                failures.append(str(exc))
                index = (index + 1) % len(self.dataset)
        else:
            raise DataError(
                f"{len(failures)} training samples in a row could not be read (last: {failures[-1]}); "
                "the dataset looks broken, check it with `ovenet check-data`"
            )
        sample["skipped"] = "\n".join(failures)
        return sample

    def _augmented(self, epoch: int, index: int) -> dict:
        # Transforms draw from the global `random`/numpy RNGs; seed them for this sample and put the caller's
        # state back, so that loading data never disturbs the main process's RNG streams.
        py_state, np_state = random.getstate(), np.random.get_state()
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(Sampler):
    """``(epoch, index)`` keys of this rank's share of a seeded permutation, optionally starting mid-epoch.

    Like ``DistributedSampler(shuffle=True, drop_last=True)``: the permutation depends only on (seed, epoch)
    and is identical on all ranks, and rank r takes every world_size-th entry from r.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = num_samples // world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next pass yields epoch ``epoch``'s order from its ``start``-th entry on (mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[: self.per_rank * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        return iter([(self.epoch, index) for index in mine[self.start :]])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def epoch_batches(
    loader: DataLoader, sampler: ResumableSampler, iteration: int, iters_per_epoch: int
) -> Iterator[dict]:
    """Endless batches, epoch after epoch, starting at global ``iteration`` (mid-epoch if need be)."""
    while True:
        epoch, done = divmod(iteration, iters_per_epoch)
        sampler.set_epoch(epoch, start=done * loader.batch_size)
        for batch in loader:
            yield batch
            iteration += 1


def loader_error(exc: BaseException) -> OvenetError | None:
    """The user-facing error behind a DataLoader exception, or None if it is not one.

    A worker's exception is re-raised in the main process with the worker's whole traceback as its message;
    the original one-line message is the traceback's last line.
    """
    if not isinstance(exc, OvenetError):
        return None
    text = str(exc)
    if "\n" not in text:
        return exc
    for line in reversed(text.strip().splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == type(exc).__name__:
            return type(exc)(message)
    return type(exc)(text.strip().splitlines()[-1])


# --- one optimisation step and validation -------------------------------------------------------------------


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def batch_to_device(batch: dict[str, Tensor], device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Images (channels_last if asked) and labels of a batch on ``device``, copied asynchronously."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(device, non_blocking=True)


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    channels_last: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward, loss, backward and optimizer step on one batch (``image`` [B,3,H,W], ``label`` [B,H,W]).

    A NaN/inf loss skips the parameter update on the device (fp16: GradScaler skips it). Returns the detached
    loss and the loss terms as device tensors: nothing here waits for the GPU.
    """
    device = next(model.parameters()).device
    images, labels = batch_to_device(batch, device, channels_last)
    with autocast(device, amp_dtype):
        output = model(images)
        loss, terms = criterion(output, labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        step_unless_nonfinite(optimizer, loss.detach())
    return loss.detach(), terms


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    align_corners: bool = True,
    ignore_index: int = 255,
    channels_last: bool = False,
    progress: bool = False,
    write: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Single-scale whole-image mIoU of ``logits_final`` upsampled to the label size (summed over ranks).

    Returns the metrics and, for visualisation, the first sample's prediction, label, offsets and confidence.
    ``progress``: a bar on a terminal (under training's), otherwise a line every few seconds through ``write``.
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device=device)
    first = None
    images_total = len(loader.sampler) if isinstance(loader, DataLoader) else None  # this rank's images
    with Progress(images_total, "val", enabled=progress, write=write, leave=False) as meter:
        for batch in loader:
            images, labels = batch_to_device(batch, device, channels_last)
            with autocast(device, amp_dtype):
                output = model(images)
            logits = F.interpolate(
                output.logits_final.float(), size=labels.shape[-2:], mode="bilinear", align_corners=align_corners
            )
            prediction = logits.argmax(1)
            matrix.update(prediction, labels)
            if first is None:
                first = {
                    "prediction": prediction[0],
                    "label": labels[0],
                    "offsets": None if output.offsets is None else output.offsets[0].float(),
                    "confidence": None if output.confidence is None else output.confidence[0, 0].float(),
                }
            meter.update(images.shape[0])
    matrix.all_reduce()
    model.train(was_training)
    return matrix.compute(), first


# --- state that checkpoints carry -------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )


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


# --- signals ----------------------------------------------------------------------------------------------


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


# --- setup helpers ----------------------------------------------------------------------------------------


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


def _resumes_own_run(run_dir: Path, ckpt: dict | None) -> bool:
    return ckpt is not None and Path(ckpt["path"]).resolve().parent == run_dir.resolve()


def check_run_folder(run_dir: Path, resume: str | Path | None, ckpt: dict | None, overwrite: bool) -> None:
    """Refuse a start that would replace another run's checkpoints, unless ``overwrite``.

    Starting fresh, or resuming a checkpoint from elsewhere, in a folder that holds ``last.pth``/``best.pth``
    would overwrite them (and a stale ``best.pth`` would outlive the new run); a folder without checkpoints
    (e.g. a start that failed early) is fine.
    """
    held = [name for name in RUN_CHECKPOINTS if (run_dir / name).is_file()]
    if not held or overwrite or _resumes_own_run(run_dir, ckpt):
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
    from ..config import _flatten, from_dict

    try:  # through from_dict, so keys added since the checkpoint was written compare with their defaults
        old = _flatten(from_dict(copy.deepcopy(ckpt["config"])).to_dict())
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt['path']} holds a config this version cannot read ({exc})") from None
    new = _flatten(cfg.to_dict())
    changes = [(key, old.get(key), new.get(key)) for key in new if old.get(key) != new.get(key)]
    refused = [change for change in changes if change[0] not in RESUMABLE_KEYS]
    if refused:
        shown = ", ".join(f"{key} {a} -> {b}" for key, a, b in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"cannot resume {ckpt['path']}: this config changes what its weights were trained with ({shown}{more}); "
            "resume with the original config (a resume may change only train.iters/epochs, logging, checkpoint "
            "and validation intervals, device, data.num_workers and eval settings), or start a new run with "
            f"another --run-dir (model.init_from={ckpt['path']} starts from its weights)"
        )
    return changes


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


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
        # warn_only: bilinear-upsample and grid_sample backward have no deterministic CUDA kernels.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels


def compile_regions(model: nn.Module) -> int:
    """Compile each repeated HRNet module in place (``train.compile=regional``): a short compile for most of
    the gain of compiling the whole model. Returns how many modules were compiled."""
    modules = [m for m in model.modules() if isinstance(m, HighResolutionModule)]
    for module in modules:
        module.compile()
    return len(modules)


def write_checkpoint(
    path: Path, model: nn.Module, cfg: Config, info: D.DistInfo, device: torch.device, **state: Any
) -> None:
    """Every rank contributes its RNG state (a collective); rank 0 writes the file atomically."""
    rngs = D.gather_objects(info, rng_state(device))
    if not info.is_main:
        return
    try:
        checkpoint.save(path, model, cfg, rng=rngs, world_size=info.world_size, **state)
    except OSError as exc:
        raise OvenetError(
            f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous file is kept; "
            "free disk space and resume with --resume auto"
        ) from None


# --- the training run ------------------------------------------------------------------------------------


def train(
    cfg: Config,
    resume: str | Path | None = None,
    run_dir: Path | None = None,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> Path:
    """Train ``cfg`` (optionally resuming from a checkpoint, or ``"auto"`` = ``run_dir/last.pth`` if present).

    A run folder that already holds checkpoints is refused for a fresh start unless ``overwrite`` (which
    removes them before the first step). Returns the run folder (default ``output_dir/name``). Raises
    :class:`OvenetError` for user-caused failures and :class:`TrainingInterrupted` (exit code 130/143) after a
    SIGINT/SIGTERM stop. ``stop``: a :class:`StopRequest` the caller may fire (e.g. a time budget); the loop
    then saves ``last.pth`` and returns normally.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
    info = D.init_distributed(cfg.device)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, resume, run_dir, info, overwrite, stop)
    finally:
        close_logger()
        if torch.are_deterministic_algorithms_enabled() != deterministic_before:  # leave the process as found
            torch.use_deterministic_algorithms(deterministic_before)
        D.cleanup(info)


def _train(
    cfg: Config,
    resume: str | Path | None,
    run_dir: Path,
    info: D.DistInfo,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> Path:
    t = cfg.train
    device = resolve_device(cfg.device, info.local_rank)
    on_cuda = device.type == "cuda"
    amp_dtype = AMP_DTYPES[t.amp] if on_cuda else None  # CPU trains in fp32
    channels_last = t.channels_last and on_cuda

    # What this start does to the run folder is settled before anything is written: a refused start (a folder
    # holding another run, a resume whose config changes the model or data) leaves the folder as it was.
    ckpt = _read_resume(resume, run_dir)
    _on_main_rank(info, lambda: check_run_folder(run_dir, resume, ckpt, overwrite))
    resume_diff = resume_changes(ckpt, cfg) if ckpt is not None else []

    # Output folder next: an unwritable one must fail before anything slow happens.
    _on_main_rank(info, lambda: prepare_run_dir(run_dir))
    log = setup_logger(run_dir, info.is_main)
    if resume is not None and ckpt is None:
        log.info(f"--resume auto: no {run_dir / 'last.pth'} yet, starting from scratch")
    for key, old, new in resume_diff:
        log.info(f"resume changes {key}: {old} -> {new}")
    tb = TensorBoard(run_dir / "tb", t.tensorboard and info.is_main, log)

    # Reproducibility: each rank its own stream (DDP broadcasts rank 0's initial weights anyway).
    configure_determinism(t.deterministic)
    torch.manual_seed(t.seed + info.rank)
    random.seed(t.seed + info.rank)
    np.random.seed(t.seed + info.rank)

    # Data.
    dataset = build_dataset(cfg.data, train=True)
    if dataset.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes} but the {cfg.data.name} training set has "
            f"{dataset.num_classes} classes; set model.num_classes={dataset.num_classes}"
        )
    train_set = TrainingSet(dataset, t.seed, t.bad_sample)
    sampler = ResumableSampler(len(train_set), t.seed, info.rank, info.world_size)
    iters_per_epoch = sampler.per_rank // t.batch_size
    if iters_per_epoch == 0:
        raise DataError(
            f"the training set has {len(train_set)} samples, fewer than one batch "
            f"({t.batch_size} per GPU x {info.world_size} processes); lower train.batch_size or add data"
        )
    loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_samples,
        pin_memory=on_cuda,
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=seed_worker,
        # Own generator: creating loader iterators must not draw from the global torch RNG.
        generator=torch.Generator().manual_seed(t.seed + info.rank),
    )
    total_iters = t.iters if t.iters is not None else t.epochs * iters_per_epoch
    if ckpt is not None and ckpt["iteration"] >= total_iters:
        # Nothing to do: say so, and leave config.yaml and the checkpoints describing the weights they hold.
        log.info(
            f"run already finished: {ckpt['path']} is at iteration {ckpt['iteration']} of {total_iters} planned; "
            f"raise train.iters above {ckpt['iteration']} to train longer"
        )
        tb.close()
        return run_dir
    val_loader = None
    try:
        val_set = build_dataset(cfg.data, train=False, label_resolution=cfg.eval.label_resolution)
        if not getattr(val_set, "has_labels", True):
            raise DataError(f"the {cfg.data.val_split} split has no labels")
        val_loader = build_loader(
            val_set,
            1,
            train=False,
            num_workers=min(cfg.data.num_workers, 2),
            distributed=info.distributed,
            seed=t.seed,
        )
    except DataError as exc:
        log.warning(f"validation is off, the validation split cannot be loaded: {exc}")

    # Model, loss, optimiser.
    model = build_model(cfg.model)
    if ckpt is not None:
        checkpoint.load_state(model, ckpt["model"], f"checkpoint {ckpt['path']}")
    else:  # a resumed run has its weights already; a fresh one starts from model.pretrained, then model.init_from
        load_initial_weights(model, cfg.model, log)
    _on_main_rank(info, lambda: check_free_space(run_dir, model))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if info.distributed and t.sync_bn:
        if on_cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.info("train.sync_bn: SyncBatchNorm needs CUDA; keeping per-process BatchNorm on the CPU")
    criterion = build_loss(cfg.loss, cfg.model.num_classes, dataset.ignore_index, cfg.model.align_corners,
                           cfg.model.offset.sampling)
    criterion.to(device)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, total_iters, t.poly_power, t.warmup_iters)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    iteration, best_miou, skipped = 0, None, []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        iteration, best_miou, skipped = (
            ckpt["iteration"],
            ckpt.get("best_miou"),
            list(ckpt.get("skipped", [])),
        )
        rngs = ckpt["rng"]
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank], device)
        else:
            log.warning(
                f"checkpoint was written by {len(rngs)} processes, this run has {info.world_size}: "
                "weights and schedule resume exactly, random streams do not"
            )
        log.info(f"resumed from {ckpt['path']} at iteration {iteration}/{total_iters}")

    raw_model = model  # what checkpoints and validation use (no DDP hooks, no compile wrapper)
    if t.compile == "regional":
        log.info(f"train.compile=regional: compiled {compile_regions(model)} HRNet modules")
    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    if t.compile == "full":
        model = torch.compile(model)

    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info(
        f"run folder {run_dir} | {cfg.model.arch} {cfg.model.head} offset={cfg.model.offset.enabled} "
        f"{n_params / 1e6:.2f}M params | {len(train_set)} train samples, {iters_per_epoch} it/epoch, "
        f"{total_iters} iterations | device {device}, {info.world_size} process(es), amp {amp_dtype}"
    )
    threads_note = take_note()  # the CLI's CPU thread choice (ovenet.threads), here and in train.log
    if threads_note:
        log.info(threads_note)

    def save(name: str, **extra: Any) -> None:
        write_checkpoint(
            run_dir / name,
            raw_model,
            cfg,
            info,
            device,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            epoch=iteration // iters_per_epoch,
            iteration=iteration,
            best_miou=best_miou,
            skipped=list(skipped),
            **extra,
        )

    # From here on the run writes: its config, after removing an overwritten run's checkpoints (a stale best.pth
    # would otherwise outlive the new run).
    def start_writing() -> None:
        if overwrite and not _resumes_own_run(run_dir, ckpt):
            removed = [name for name in RUN_CHECKPOINTS if (run_dir / name).is_file()]
            for name in removed:
                (run_dir / name).unlink()
            if removed:
                log.info(f"--overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")
        save_config(cfg, run_dir / "config.yaml")

    _on_main_rank(info, start_writing)

    # The loop.
    model.train()
    watch = NonFiniteWatch(device)
    sums: dict[str, Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()
    signal_seen, data_failed, data_problem, stop_seen = False, False, None, False
    stream = epoch_batches(loader, sampler, iteration, iters_per_epoch)
    with (
        contextlib.closing(tb),
        StopSignals() as signals,
        progress_bar(total_iters, iteration, info.is_main) as bar,
    ):
        while iteration < total_iters:
            batch, data_problem = _next_batch(stream)
            # Ranks agree before each step, so that they all stop at the same one (else DDP would hang).
            signal_seen, data_failed, stop_seen = D.any_rank(
                info, signals.signum is not None, data_problem is not None, stop is not None and stop.requested
            )
            if signal_seen or data_failed or stop_seen:
                break

            loss, terms = train_step(
                model, criterion, optimizer, batch, scaler, amp_dtype, t.grad_clip, channels_last
            )
            scheduler.step()
            iteration += 1
            watch.update(loss, iteration)
            for key, value in terms.items():
                sums[key] = sums[key] + value if key in sums else value.clone()
            window_steps += 1
            bar.update(1)
            for failure in filter(None, batch["skipped"]):
                for line in failure.splitlines():
                    log.warning(f"skipped unreadable training sample: {line}")
                    skipped.append(line)

            finished = iteration == total_iters
            if iteration % t.log_every == 0 or finished:
                watch.check(info, run_dir / "last.pth")
                means = dict(zip(sums, (torch.stack(list(sums.values())) / window_steps).tolist()))
                elapsed = time.perf_counter() - window_start
                images_per_s = window_steps * t.batch_size * info.world_size / max(elapsed, 1e-9)
                lr = scheduler.get_last_lr()[0]
                eta = (total_iters - iteration) * elapsed / window_steps
                memory = f" mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G" if on_cuda else ""
                log.info(
                    f"iter {iteration}/{total_iters} epoch {iteration / iters_per_epoch:.2f} | "
                    + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + f" | lr {lr:.6f} | {images_per_s:.1f} img/s | eta {format_seconds(eta)}{memory}"
                )
                bar.set_postfix_str(f"loss {means['loss']:.4f} lr {lr:.2e} {images_per_s:.1f} img/s")
                tb.scalars({**means, "lr": lr, "images_per_s": images_per_s}, iteration, "train/")
                sums, window_steps, window_start = {}, 0, time.perf_counter()

            end_of_epoch = iteration % iters_per_epoch == 0
            if val_loader is not None and (
                finished
                or (t.val_every > 0 and iteration % t.val_every == 0)
                or (t.val_every == 0 and t.iters is None and end_of_epoch)
            ):
                watch.check(info, run_dir / "last.pth")
                val_start = time.perf_counter()
                # fp32 whatever train.amp: this mIoU picks best.pth, so it must not move with bf16 rounding.
                metrics, first = validate(
                    raw_model,
                    val_loader,
                    cfg.model.num_classes,
                    device,
                    None,
                    cfg.model.align_corners,
                    dataset.ignore_index,
                    channels_last,
                    progress=info.is_main,
                    write=log.info,
                )
                improved = best_miou is None or metrics["miou"] > best_miou
                if improved:
                    best_miou = metrics["miou"]
                log.info(
                    f"val iter {iteration} (fp32, whole image, one scale): mIoU {100 * metrics['miou']:.2f} "
                    f"pixel acc {100 * metrics['pixel_acc']:.2f} (best {100 * best_miou:.2f})"
                )
                tb.scalars(
                    {
                        "miou": metrics["miou"],
                        "pixel_acc": metrics["pixel_acc"],
                        "mean_acc": metrics["mean_acc"],
                    },
                    iteration,
                    "val/",
                )
                if first is not None and tb.writer is not None:
                    images = visualise_sample(
                        first["prediction"],
                        first["label"],
                        first["offsets"],
                        first["confidence"],
                        getattr(dataset, "palette", None),
                        dataset.ignore_index,
                    )
                    for name, image in images.items():
                        tb.image(f"val/{name}", image, iteration)
                if improved:
                    save("best.pth", val_metrics={k: metrics[k] for k in ("miou", "pixel_acc", "mean_acc")})
                # The next log line's images/s and ETA are about training steps: validation is not one.
                window_start += time.perf_counter() - val_start
                bar.unpause()

            if iteration % t.ckpt_every == 0 or finished:
                watch.check(info, run_dir / "last.pth")
                save("last.pth")

    # Stopped early: keep the progress, then say why.
    if signal_seen or data_failed:
        watch.check(info, run_dir / "last.pth")  # never write NaN weights over a good checkpoint
        save("last.pth")
        D.barrier(info)
        if data_failed:
            if data_problem is None:
                raise DataError(
                    "another process hit an unreadable training sample (see its error); "
                    f"progress is saved in {run_dir / 'last.pth'}"
                )
            raise DataError(
                f"{data_problem}; progress is saved in {run_dir / 'last.pth'}; fix or remove the "
                "file and resume with --resume auto, or set train.bad_sample=skip"
            )
        signum = signals.signum or signal.SIGTERM  # None here when only another rank received it
        message = (
            f"stopped by {signal.Signals(signum).name} at iteration {iteration}/{total_iters}; saved "
            f"{run_dir / 'last.pth'}; continue with --resume auto"
        )
        log.info(message)
        raise TrainingInterrupted(signum, message)
    if stop_seen:  # asked from inside the program (e.g. a time budget): a normal return, no signal message
        watch.check(info, run_dir / "last.pth")
        save("last.pth")
        D.barrier(info)
        if stop is not None:
            stop.stopped_at = iteration
        reason = f" ({stop.reason})" if stop is not None and stop.reason else ""
        log.info(f"stopped at iteration {iteration}/{total_iters}{reason}; saved {run_dir / 'last.pth'}")
        return run_dir

    D.barrier(info)
    best = f", best val mIoU {100 * best_miou:.2f}" if best_miou is not None else ""
    log.info(f"training finished: {total_iters} iterations{best}; checkpoints in {run_dir}")
    return run_dir


def _on_main_rank(info: D.DistInfo, check: Any) -> None:
    """Run a check on rank 0 only and raise its OvenetError on every rank (so no rank waits forever)."""
    problem = None
    if info.is_main:
        try:
            check()
        except OvenetError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = (
                f"cannot write to the output folder ({exc.strerror or exc}); check its permissions and space"
            )
    problem = D.broadcast_object(info, problem)
    if problem:
        raise OvenetError(problem)


def _next_batch(stream: Iterator[dict]) -> tuple[dict | None, OvenetError | None]:
    try:
        return next(stream), None
    except Exception as exc:
        problem = loader_error(exc)
        if problem is None:
            raise
        return None, problem


def _read_resume(resume: str | Path | None, run_dir: Path) -> dict | None:
    """The checkpoint dict to resume from (with its ``path``), or None to start fresh."""
    if resume is None:
        return None
    path = run_dir / "last.pth" if str(resume) == "auto" else Path(resume)
    if str(resume) == "auto" and not path.is_file():
        return None
    ckpt = checkpoint.read(path)
    missing = [k for k in ("optimizer", "scheduler", "iteration", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no training state ({', '.join(missing)} missing): it holds "
            "weights only; use it as model.pretrained or for evaluation, not for --resume"
        )
    ckpt["path"] = path
    return ckpt
