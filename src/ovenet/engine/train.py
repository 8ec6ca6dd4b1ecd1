"""Training: :func:`train` builds a run (:func:`setup`) and runs :func:`train_loop`, which reads top to bottom.

Single process: ``train(cfg)``. Several GPUs: ``torchrun --nproc_per_node=N -m ovenet.cli train ...``; every
process runs the same ``train`` and :mod:`ovenet.engine.distributed` joins them.

What a run folder holds: ``config.yaml``, ``train.log``, ``last.pth`` (every ``ckpt_every`` iterations, on a
stop and at the end), ``best.pth`` (best validation mIoU) and TensorBoard events under ``tb/``.

Where the rest lives: one step and the validation pass in :mod:`ovenet.engine.step`; the training loader
(seeded augmentation, resumable order) in :mod:`ovenet.data.training`; RNG state and resume reading in
:mod:`ovenet.checkpoint`; run-folder/resume checks, disk space, stop signals and the NaN watch in
:mod:`ovenet.engine.guards`. Exact resume: a checkpoint holds the model, optimizer, scheduler, grad scaler,
iteration and per-rank RNG states, and the data order and augmentation are pure functions of the seed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import checkpoint
from ..config import Config, save_config
from ..data import Normalisation, build_dataset, build_loader, check_splits_apart
from ..data.factory import absolute_data_paths
from ..data.identity import data_identity as identify_data
from ..data.loader import SkipBadSamples, build_train_loader
from ..data.training import ResumableSampler, epoch_batches, loader_error
from ..device import resolve_device
from ..errors import ConfigError, DataError, OvenetError
from ..files import write_text
from ..losses import build_loss
from ..models import build_model
from ..models.hrnet import HighResolutionModule
from ..threads import take_note
from ..weights import load_initial_weights
from . import distributed as D
from .custom_model import check_data_classes, check_resume_network, custom_model_config
from .evaluate import json_safe, samples_digest
from .guards import (
    DeferredWorkerCheck,
    NonFiniteWatch,
    StopRequest,
    StopSignals,
    TrainingInterrupted,
    check_free_space,
    check_run_folder,
    check_same_data,
    on_main_rank,
    prepare_run_dir,
    resume_changes,
    resumes_own_run,
    run_checkpoints,
)
from .logging import (
    LOGGER_NAME,
    TensorBoard,
    TrainingProgressLines,
    close_logger,
    format_seconds,
    progress_bar,
    setup_logger,
    visualise_sample,
)
from .optim import build_optimizer, build_scheduler
from .step import train_step, validate

__all__ = ["Run", "setup", "train", "train_loop"]


def train(
    cfg: Config,
    resume: str | Path | None = None,
    run_dir: Path | None = None,
    overwrite: bool = False,
    stop: StopRequest | None = None,
    model: nn.Module | None = None,
) -> Path:
    """Train ``cfg`` (optionally resuming from a checkpoint, or ``"auto"`` = ``run_dir/last.pth`` if present).

    A run folder that already holds checkpoints is refused for a fresh start unless ``overwrite`` (which
    removes them before the first step). Returns the run folder (default ``output_dir/name``). Raises
    :class:`OvenetError` for user-caused failures and :class:`~ovenet.engine.guards.TrainingInterrupted` (exit code 130/143) after a
    SIGINT/SIGTERM stop. ``stop``: a :class:`~ovenet.engine.guards.StopRequest` the caller may fire (e.g. a time budget); the loop
    then saves ``last.pth`` and returns normally. ``model``: a network of the user's own to train instead of the
    one ``cfg.model`` builds (see :mod:`ovenet.engine.custom_model` and ``ovenet.train``).
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
    info = D.init_distributed(cfg.device, cfg.train.dist_timeout)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, resume, run_dir, info, overwrite, stop, model)
    except RuntimeError as exc:  # a peer died or hung: say so in one line, keep the checkpoint
        if not (info.distributed and lost_peers(exc)):
            raise
        message = lost_peers_message(exc, info, run_dir, cfg.train.dist_timeout)
        logging.getLogger(LOGGER_NAME).error(message)  # into train.log too (rank 0), beside what came before
        raise OvenetError(message) from None
    finally:
        close_logger()
        if torch.are_deterministic_algorithms_enabled() != deterministic_before:  # leave the process as found
            torch.use_deterministic_algorithms(deterministic_before)
        D.cleanup(info)


# What a collective raises when a peer is gone: DistError from the process group, a plain RuntimeError from gloo
# inside DDP's backward hooks.
LOST_PEER_MARKS = ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "Timed out waiting",
                   # gloo inside DDP's backward when the peer hangs past the timeout (seen on a loaded 2-core machine)
                   "Application timeout caused pair closure",
                   "NCCL communicator was aborted", "NCCL error")


def lost_peers(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.distributed.DistError) or any(mark in str(exc) for mark in LOST_PEER_MARKS)


def lost_peers_message(exc: Exception, info: D.DistInfo, run_dir: Path, timeout_s: float) -> str:
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason).split(". This is typically")[0]  # gloo's source path, advice
    last = run_dir / "last.pth"
    kept = f"{last} is kept" if last.is_file() else "no checkpoint had been written yet"
    return (f"rank {info.rank}: lost the other processes of the run (a rank died, was killed or waited over "
            f"train.dist_timeout={timeout_s:g} s: {reason[:200]}); {kept}; torchrun --max-restarts N restarts the "
            "group from it, or rerun the same command with --resume auto")


@dataclass
class Run:
    """Everything one training run works with, built by :func:`setup`; the loop changes ``iteration``,
    ``best_miou`` and ``skipped``."""

    cfg: Config
    info: D.DistInfo
    run_dir: Path
    device: torch.device
    log: Any
    tb: TensorBoard
    model: nn.Module  # what trains: maybe wrapped by DDP and torch.compile
    raw_model: nn.Module  # what checkpoints and validation use (no DDP hooks, no compile wrapper)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loader: DataLoader
    sampler: ResumableSampler
    val_loader: DataLoader | None
    palette: Any
    ignore_index: int
    precision: str  # autocast precision of the training step
    channels_last: bool
    iters_per_epoch: int
    total_iters: int
    iteration: int = 0
    best_miou: float | None = None
    skipped: list[str] = field(default_factory=list)
    saved_iteration: int | None = None  # the iteration last.pth holds
    network: dict[str, str] = field(default_factory=dict)  # what a user's own network's checkpoints record
    data_identity: dict | None = None  # what data this is, wherever it lies (ovenet.data.identity)

    def save(self, name: str, **extra: Any) -> None:
        if name == "last.pth" and self.info.is_main:
            checkpoint.keep_history(self.run_dir, self.saved_iteration, self.iteration, self.cfg.train.keep_checkpoints)
        write_checkpoint(self.run_dir / name, self.raw_model, self.cfg, self.info, self.device,
                         optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), epoch=self.iteration // self.iters_per_epoch,
                         iteration=self.iteration, best_miou=self.best_miou, skipped=list(self.skipped),
                         data_identity=self.data_identity, **self.network, **extra)
        if name == "last.pth":
            self.saved_iteration = self.iteration


class LogWindow:
    """Loss terms and training time since the last log line (validation time excluded), kept on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, Tensor]) -> None:
        for key, value in terms.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.start += seconds  # the next line's images/s and ETA are about training steps

    def report(self, run: Run, bar: Any) -> None:
        """One log line (and TensorBoard scalars) for the window, then start a new one. One host sync."""
        means = dict(zip(self.sums, (torch.stack(list(self.sums.values())) / self.steps).tolist()))
        elapsed = time.perf_counter() - self.start
        images_per_s = self.steps * run.cfg.train.batch_size * run.info.world_size / max(elapsed, 1e-9)
        lr = run.scheduler.get_last_lr()[0]
        eta = (run.total_iters - run.iteration) * elapsed / self.steps
        on_cuda = run.device.type == "cuda"
        memory = f" mem {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f}G" if on_cuda else ""
        run.log.info(
            f"iter {run.iteration}/{run.total_iters} epoch {run.iteration / run.iters_per_epoch:.2f} | "
            + " ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f" | lr {lr:.6f} | {images_per_s:.1f} img/s | eta {format_seconds(eta)}{memory}"
        )
        bar.set_postfix_str(f"loss {means['loss']:.4f} lr {lr:.2e} {images_per_s:.1f} img/s")
        run.tb.scalars({**means, "lr": lr, "images_per_s": images_per_s}, run.iteration, "train/")
        self.__init__()


def validation_due(run: Run) -> bool:
    t, it = run.cfg.train, run.iteration
    return run.val_loader is not None and (
        it == run.total_iters
        or (t.val_every > 0 and it % t.val_every == 0)
        or (t.val_every == 0 and t.iters is None and it % run.iters_per_epoch == 0)
    )


def validate_and_save_best(run: Run) -> float:
    """Validate (fp32 whatever train.amp: this mIoU picks best.pth), log, save ``best.pth`` on a new best.
    Returns the seconds it took."""
    start = time.perf_counter()
    metrics, first = validate(run.raw_model, run.val_loader, run.cfg.model.num_classes, run.device, "fp32",
                              run.cfg.model.align_corners, run.ignore_index, run.channels_last,
                              progress=run.info.is_main, write=run.log.info)
    if D.any_rank(run.info, metrics["problem"] is not None)[0]:  # every rank saves together, then stops
        run.save("last.pth")
        last = run.run_dir / "last.pth"
        if metrics["problem"] is None:
            raise DataError(f"another process hit an unreadable validation sample (see its error); progress is "
                            f"saved in {last}")
        raise DataError(f"validation: {metrics['problem']}; progress is saved in {last}; fix or remove the file and "
                        "resume with --resume auto, or set train.bad_sample=skip (it skips bad samples in validation "
                        "too)")
    for failure in metrics["skipped"]:
        run.log.warning(f"skipped unreadable validation sample: {failure}")
        run.skipped.append(failure)
    improved = run.best_miou is None or metrics["miou"] > run.best_miou
    if improved:
        run.best_miou = metrics["miou"]
    run.log.info(
        f"val iter {run.iteration} (fp32, whole image, one scale): mIoU {100 * metrics['miou']:.2f} "
        f"pixel acc {100 * metrics['pixel_acc']:.2f} (best {100 * run.best_miou:.2f})"
    )
    run.tb.scalars({k: metrics[k] for k in ("miou", "pixel_acc", "mean_acc")}, run.iteration, "val/")
    if first is not None and run.tb.writer is not None:
        images = visualise_sample(first["prediction"], first["label"], first["offsets"], first["confidence"],
                                  run.palette, run.ignore_index)
        for name, image in images.items():
            run.tb.image(f"val/{name}", image, run.iteration)
    if run.info.is_main:  # the figures behind `ovenet report`'s per-class bars and confusion matrix
        val_set = run.val_loader.dataset
        names = list(getattr(val_set, "class_names", None) or [])
        record = {"iteration": run.iteration, "dataset": run.cfg.data.name, "split": run.cfg.data.val_split,
                  "num_images": len(val_set) - len(metrics["skipped"]), "samples_digest": samples_digest(val_set),
                  "class_names": names,
                  **{k: metrics[k] for k in ("miou", "pixel_acc", "mean_acc", "iou", "confusion")}}
        write_text(run.run_dir / "val_last.json", json.dumps(json_safe(record)) + "\n")
    if improved:
        run.save("best.pth", val_metrics={k: metrics[k] for k in ("miou", "pixel_acc", "mean_acc")})
    return time.perf_counter() - start



@dataclass
class LoopEnd:
    """Why :func:`train_loop` returned: the plan ran out, or a signal, a data failure or a stop request."""

    signal_seen: bool = False
    data_failed: bool = False
    data_problem: OvenetError | None = None
    stop_seen: bool = False
    signum: int | None = None  # the signal this rank received (None when only another rank did)


def train_loop(run: Run, stop: StopRequest | None = None) -> LoopEnd:
    """Train ``run`` from ``run.iteration`` to ``run.total_iters``: step, log, validate, checkpoint."""
    t, info, last = run.cfg.train, run.info, run.run_dir / "last.pth"
    run.model.train()
    watch, window, end, workers = NonFiniteWatch(run.device), LogWindow(), LoopEnd(), DeferredWorkerCheck()
    batches = epoch_batches(run.loader, run.sampler, run.iteration, run.iters_per_epoch)
    lines = TrainingProgressLines(run.log.info, run.total_iters, run.iteration, info.is_main)
    with contextlib.closing(run.tb), StopSignals() as signals, \
            progress_bar(run.total_iters, run.iteration, info.is_main) as bar:
        while run.iteration < run.total_iters:
            batch, end.data_problem = _next_batch(batches, workers)
            # Ranks agree before each step, so that they all stop at the same one (else DDP would hang).
            end.signal_seen, end.data_failed, end.stop_seen = D.any_rank(
                info, signals.signum is not None, end.data_problem is not None, stop is not None and stop.requested)
            if end.signal_seen or end.data_failed or end.stop_seen:
                end.signum = signals.signum
                break

            with workers:  # a dying loader worker is reported at the next batch, not halfway through this step
                loss, terms = train_step(run.model, run.criterion, run.optimizer, batch, run.scaler, run.precision,
                                         t.grad_clip, run.channels_last)
            run.scheduler.step()
            run.iteration += 1
            watch.update(loss, run.iteration)
            window.add(terms)
            bar.update(1)
            lines.step(run.iteration)
            _log_skipped(run, batch)

            finished = run.iteration == run.total_iters
            if run.iteration % t.log_every == 0 or finished:
                watch.check(info, last)
                window.report(run, bar)
            if validation_due(run):
                watch.check(info, last)
                seconds = validate_and_save_best(run)
                window.exclude(seconds)
                lines.exclude(seconds)
                bar.unpause()
            if run.iteration % t.ckpt_every == 0 or finished:
                watch.check(info, last)
                run.save("last.pth")
    if end.signal_seen or end.data_failed or end.stop_seen:
        watch.check(info, last)  # never write NaN weights over a good checkpoint
        run.save("last.pth")
    D.barrier(info)
    return end


def _log_skipped(run: Run, batch: dict) -> None:
    for failure in filter(None, batch["skipped"]):
        for line in failure.splitlines():
            run.log.warning(f"skipped unreadable training sample: {line}")
            run.skipped.append(line)


def _finish(run: Run, end: LoopEnd, stop: StopRequest | None) -> Path:
    """Say how the run ended: an error for a data failure or a signal (after ``last.pth`` was saved)."""
    last = run.run_dir / "last.pth"
    if end.data_failed:
        if end.data_problem is None:
            raise DataError(f"another process hit an unreadable training sample (see its error); progress is "
                            f"saved in {last}")
        if isinstance(end.data_problem, LoaderDied):
            raise DataError(f"rank {run.info.rank}: a data-loader worker died ({end.data_problem}; out of memory? "
                            f"lower data.num_workers); progress is saved in {last}; resume with --resume auto")
        raise DataError(f"{end.data_problem}; progress is saved in {last}; fix or remove the file and resume with "
                        "--resume auto, or set train.bad_sample=skip")
    if end.signal_seen:
        signum = end.signum or signal.SIGTERM
        message = (f"stopped by {signal.Signals(signum).name} at iteration {run.iteration}/{run.total_iters}; "
                   f"saved {last}; continue with --resume auto")
        run.log.info(message)
        raise TrainingInterrupted(signum, message)
    if end.stop_seen:  # asked from inside the program (e.g. a time budget): a normal return, no signal message
        if stop is not None:
            stop.stopped_at = run.iteration
        reason = f" ({stop.reason})" if stop is not None and stop.reason else ""
        run.log.info(f"stopped at iteration {run.iteration}/{run.total_iters}{reason}; saved {last}")
        return run.run_dir
    best = f", best val mIoU {100 * run.best_miou:.2f}" if run.best_miou is not None else ""
    run.log.info(f"training finished: {run.total_iters} iterations{best}; checkpoints in {run.run_dir}")
    if run.cfg.train.report and run.info.is_main:
        from ..report import report_if_possible

        own = {"model": run.raw_model} if run.network else {}  # the config cannot build a user's network
        run.log.info(report_if_possible(run.run_dir, device=str(run.device), **own))
    return run.run_dir


def _train(cfg: Config, resume: str | Path | None, run_dir: Path, info: D.DistInfo, overwrite: bool = False,
           stop: StopRequest | None = None, model: nn.Module | None = None) -> Path:
    fresh_folder = not run_dir.exists()
    try:
        run = setup(cfg, resume, run_dir, info, overwrite, model)
    except BaseException:
        if fresh_folder and info.is_main:
            close_logger()
            _remove_failed_start(run_dir)
        raise
    if run is None:  # a resume with nothing left to train
        return run_dir
    return _finish(run, train_loop(run, stop), stop)


def _remove_failed_start(run_dir: Path) -> None:
    """A start that failed before training leaves no run folder behind, if it made the folder and the folder
    holds nothing but its own log (the error was printed; a folder with anything else is kept)."""
    if not run_dir.is_dir():
        return
    leftovers = [p for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


def setup(cfg: Config, resume: str | Path | None, run_dir: Path, info: D.DistInfo, overwrite: bool = False,
          model: nn.Module | None = None) -> Run | None:
    """Check the run folder and the resume, then build data, model, loss and optimiser (restored from the
    checkpoint when resuming). None when a resumed run has no iterations left (it says so). ``model``: a network
    of the user's own, trained instead of ``cfg.model``'s."""
    t = cfg.train
    device = resolve_device(cfg.device, info.local_rank)
    on_cuda = device.type == "cuda"
    cfg, precision = _recorded_config(cfg, on_cuda)
    cfg = custom_model_config(cfg, model, device) if model is not None else cfg
    t = cfg.train
    # On the CPU too: the CamVid pilot's step ran 1.15x faster at one thread, and only float rounding changes
    # (benchmarks/RESULTS.md, "CPU speed"; tests/test_cpu_defaults.py).
    channels_last = t.channels_last

    # What this start does to the run folder is settled before anything is written: a refused start (a folder
    # holding another run, a resume whose config changes the model or data) leaves the folder as it was.
    ckpt = checkpoint.read_resume(resume, run_dir)
    check_resume_network(ckpt, model)
    on_main_rank(info, lambda: check_run_folder(run_dir, resume, ckpt, overwrite))
    resume_diff = resume_changes(ckpt, cfg) if ckpt is not None else []
    data_identity, data_notes = _identify_data(cfg, ckpt, resume_diff)  # checkpoints record it: data may move

    # Output folder next: an unwritable one must fail before anything slow happens.
    on_main_rank(info, lambda: prepare_run_dir(run_dir))
    log_start = (run_dir / "train.log").stat().st_size if (run_dir / "train.log").is_file() else 0
    log = setup_logger(run_dir, info.is_main)
    _log_start(log, info, resume, ckpt, run_dir, resume_diff, data_notes)
    tb = TensorBoard(run_dir / "tb", t.tensorboard and info.is_main, log)

    configure_determinism(t.deterministic)
    _seed_everything(t.seed + info.rank)  # each rank its own stream (DDP broadcasts rank 0's initial weights)

    # Data.
    dataset = build_dataset(cfg.data, train=True, normalisation=Normalisation.of(cfg.model))
    check_data_classes(cfg, dataset.num_classes, own_model=model is not None)
    loader, sampler = build_train_loader(dataset, t.batch_size, t.seed, t.bad_sample, cfg.data.num_workers,
                                         info.rank, info.world_size, pin_memory=on_cuda)
    iters_per_epoch = sampler.per_rank // t.batch_size
    total_iters = t.iters if t.iters is not None else t.epochs * iters_per_epoch
    if ckpt is not None and ckpt["iteration"] >= total_iters:
        # Nothing to do: say so, and leave config.yaml and the checkpoints describing the weights they hold.
        log.info(
            f"run already finished: {ckpt['path']} is at iteration {ckpt['iteration']} of {total_iters} planned; "
            f"raise train.iters above {ckpt['iteration']} to train longer"
        )
        tb.close()
        return None
    val_loader = _val_loader(cfg, info, log, dataset)

    # Model, loss, optimiser.
    network = checkpoint.custom_network_marks(model) if model is not None else {}
    model = _initial_model(cfg, model, ckpt, log)
    on_main_rank(info, lambda: check_free_space(run_dir, model))
    model = _place_model(model, device, channels_last, info.distributed and t.sync_bn, log)
    criterion = build_loss(cfg.loss, cfg.model.num_classes, dataset.ignore_index, cfg.model.align_corners,
                           cfg.model.offset.sampling).to(device)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, total_iters, t.poly_power, t.warmup_iters)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # Will the step fit? A fake-tensor estimate (seconds on the CPU, no GPU memory) of the network cfg.model builds.
    if on_cuda and info.is_main and not network:
        from .memory import warn_if_over_memory

        warn_if_over_memory(model, cfg, device, log, ddp=info.distributed)

    run = Run(cfg, info, run_dir, device, log, tb, model, model, criterion, optimizer, scheduler, scaler, loader,
              sampler, val_loader, getattr(dataset, "palette", None), dataset.ignore_index, precision,
              channels_last, iters_per_epoch, total_iters, network=network, data_identity=data_identity)
    if ckpt is not None:
        _restore(run, ckpt)
    if t.compile == "regional":
        log.info(f"train.compile=regional: compiled {compile_regions(model)} HRNet modules")
    if info.distributed:
        run.model = DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    if t.compile == "full":
        run.model = torch.compile(run.model)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"run folder {run_dir} | {network.get('network_class') or f'{cfg.model.network} {cfg.model.head}'} "
        f"offset={cfg.model.offset.enabled} "
        f"{n_params / 1e6:.2f}M params | {len(dataset)} train samples, {iters_per_epoch} it/epoch, "
        f"{total_iters} iterations | device {device}, {info.world_size} process(es), precision {precision}"
    )
    threads_note = take_note()  # the CLI's CPU thread choice (ovenet.threads), here and in train.log
    if threads_note:
        log.info(threads_note)
    on_main_rank(info, lambda: _start_writing(run, ckpt, overwrite, log_start))
    return run


def _place_model(model: nn.Module, device: torch.device, channels_last: bool, sync_bn: bool, log: Any) -> nn.Module:
    """The network on its device, in its memory layout, with SyncBatchNorm where it applies (CUDA only)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if sync_bn:
        if device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("train.sync_bn: SyncBatchNorm needs CUDA; keeping per-process BatchNorm on the CPU")
    return model


def _initial_model(cfg: Config, own: nn.Module | None, ckpt: dict | None, log: Any) -> nn.Module:
    """The network to train: ``cfg.model``'s or the user's own, with the checkpoint's weights when resuming; a
    fresh one starts from model.pretrained (ovenet's networks only), then model.init_from."""
    model = build_model(cfg.model) if own is None else own
    if own is None or cfg.train.activation_checkpointing:
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if ckpt is not None:
        checkpoint.load_state(model, ckpt["model"], f"checkpoint {ckpt['path']}")
    else:
        load_initial_weights(model, cfg.model, log)
    return model


def _recorded_config(cfg: Config, on_cuda: bool) -> tuple[Config, str]:
    """The autocast precision of the step (the CPU trains in fp32), and the config that records it: config.yaml
    and the checkpoints say what ran, not what a GPU would have run, and name the data with absolute paths, so
    that they mean the same data from any working directory."""
    precision = cfg.train.amp if on_cuda else "fp32"
    cfg = copy.deepcopy(cfg)
    cfg.train.amp = precision
    cfg.data = absolute_data_paths(cfg.data)
    return cfg, precision


def _identify_data(cfg: Config, ckpt: dict | None, resume_diff: list) -> tuple[dict, list[tuple[int, str]]]:
    """The identity of the run's data (its checkpoints record it) and, on a resume, what the log should say
    about it; raises when moved data is not the data the checkpoint trained on (guards.check_same_data)."""
    identity, datasets = identify_data(cfg.data)
    return identity, check_same_data(ckpt, resume_diff, identity, datasets) if ckpt is not None else []


def _log_start(log: Any, info: D.DistInfo, resume: str | Path | None, ckpt: dict | None, run_dir: Path,
               resume_diff: list, data_notes: list[tuple[int, str]] = ()) -> None:
    if info.restart and info.is_main:
        log.warning(f"torchrun restarted the group (restart {info.restart} of at most {info.max_restarts}, the most "
                    "any node has counted) after a rank failed: every rank resumes from the last checkpoint")
        if resume is None:
            log.warning("this restart has no --resume auto: it cannot continue the run (add --resume auto)")
    if resume is not None and ckpt is None:
        log.info(f"--resume auto: no {run_dir / 'last.pth'} yet, starting from scratch")
    for key, old, new in resume_diff:
        log.info(f"resume changes {key}: {old} -> {new}")
    for level, note in data_notes:
        log.log(level, note)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _val_loader(cfg: Config, info: D.DistInfo, log: Any, train_set: Any) -> Any:
    """The validation loader, or None (said in the log) when the split cannot be loaded: training goes on.
    A validation split that shares images with ``train_set`` is refused (ConfigError, not swallowed here)."""
    try:
        val_set = build_dataset(cfg.data, train=False, label_resolution=cfg.eval.label_resolution,
                                normalisation=Normalisation.of(cfg.model))
        overlap = check_splits_apart(cfg.data, train_set, val_set)
        if overlap:
            log.warning(overlap)
        if not getattr(val_set, "has_labels", True):
            raise DataError(f"the {cfg.data.val_split} split has no labels")
        if cfg.train.bad_sample == "skip":
            val_set = SkipBadSamples(val_set)
        return build_loader(val_set, 1, train=False, num_workers=min(cfg.data.num_workers, 2),
                            distributed=info.distributed, seed=cfg.train.seed)
    except DataError as exc:
        log.warning(f"validation is off, the validation split cannot be loaded: {exc}")
        return None


def _restore(run: Run, ckpt: dict) -> None:
    """Optimizer, scheduler, scaler, counters and this rank's RNG streams from a training checkpoint."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.iteration, run.best_miou, run.skipped = ckpt["iteration"], ckpt.get("best_miou"), list(ckpt.get("skipped", []))
    rngs = ckpt["rng"]
    if len(rngs) == run.info.world_size:
        checkpoint.set_rng_state(rngs[run.info.rank], run.device)
    else:
        run.log.warning(f"checkpoint was written by {len(rngs)} processes, this run has {run.info.world_size}: "
                        "weights and schedule resume exactly, random streams do not")
    for problem in ckpt.get("fallback", []):
        run.log.warning(f"--resume auto skipped a damaged checkpoint: {problem}")
    if Path(ckpt["path"]).name == "last.pth":
        run.saved_iteration = run.iteration
    run.log.info(f"resumed from {ckpt['path']} at iteration {run.iteration}/{run.total_iters}")


# What else a run folder collects besides checkpoints: results of eval, exports, the report. --overwrite removes them
# too, so that nothing of the old run sits beside the new one's weights.
STALE_OUTPUTS = ("eval_*.json", "eval_*.md", "eval_*.log", "*.onnx", "*.pt2", "val_last.json", "report")


def _start_writing(run: Run, ckpt: dict | None, overwrite: bool, log_start: int = 0) -> None:
    """From here on the run writes: its config, after removing everything an overwritten run wrote (a stale
    best.pth or eval_val.json would otherwise outlive the new run) and the old run's lines of train.log."""
    if overwrite and not resumes_own_run(run.run_dir, ckpt):
        old = run_checkpoints(run.run_dir) + [p for pattern in STALE_OUTPUTS for p in run.run_dir.glob(pattern)]
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        log = run.run_dir / "train.log"
        if log_start and log.is_file():  # the handler appends: the file may shrink under it
            log.write_bytes(log.read_bytes()[log_start:])
        if old:
            run.log.info(f"--overwrite: removed the previous run's {', '.join(p.name for p in old)} and its "
                         f"log lines from {run.run_dir}")
    save_config(run.cfg, run.run_dir / "config.yaml")


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
    rngs = D.gather_objects(info, checkpoint.rng_state(device))
    if not info.is_main:
        return
    try:
        checkpoint.save(path, model, cfg, rng=rngs, world_size=info.world_size, **state)
    except OSError as exc:
        raise OvenetError(
            f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous file is kept; "
            "free disk space and resume with --resume auto"
        ) from None


class LoaderDied(DataError):
    """A DataLoader worker process died (killed, out of memory, crashed in native code)."""


def _next_batch(stream: Iterator[dict], workers: DeferredWorkerCheck) -> tuple[dict | None, OvenetError | None]:
    try:
        workers.raise_pending()
        return next(stream), None
    except Exception as exc:
        problem = loader_error(exc)
        if problem is None and isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
            # torch's message, e.g. "DataLoader worker (pid(s) 123) exited unexpectedly"
            problem = LoaderDied(str(exc).strip().splitlines()[0].rstrip("."))
        if problem is None:
            raise
        return None, problem
