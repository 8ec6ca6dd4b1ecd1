"""Training output: console lines (written around the tqdm bar), a plain-text ``train.log`` in the run folder,
and TensorBoard scalars/images when the optional ``tensorboard`` package is installed.

Only rank 0 writes anything; the other ranks get loggers that drop everything but warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ovenet.errors import install_command
from ovenet.files import is_disk_full

LOGGER_NAME = "ovenet.train"
_tensorboard_notice_shown = False


class _TqdmHandler(logging.Handler):
    """Console output that does not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never kill training)
            self.handleError(record)


class _RunLog(logging.Handler):
    """Appends each record to ``train.log`` as one whole line. On a full disk the part written is cut back off and
    the error raised, not printed and passed over as logging does by default: training on would lose its log and
    then fail at the next checkpoint anyway. Other write errors are logging's usual notice."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115  (unbuffered: nothing is left to flush at close)

    def emit(self, record: logging.LogRecord) -> None:
        line = (self.format(record) + "\n").encode("utf-8")
        end = self.file.seek(0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[self.file.write(view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.file.truncate(end)
            if not is_disk_full(exc):
                self.handleError(record)
                return
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def close(self) -> None:
        self.file.close()
        super().close()


def setup_logger(run_dir: Path | None, is_main: bool = True) -> logging.Logger:
    """The ``ovenet.train`` logger, writing to the console and (rank 0) appending to ``run_dir/train.log``.

    Calling it again replaces the handlers: successive runs in one process never share a log file.
    """
    logger = logging.getLogger(LOGGER_NAME)
    close_logger(logger)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s" if is_main else "[rank warning] %(message)s"))
    logger.addHandler(console)
    if is_main and run_dir is not None:
        file = _RunLog(Path(run_dir) / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file)
    return logger


def close_logger(logger: logging.Logger | None = None) -> None:
    logger = logger or logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def progress_bar(total: int | None, initial: int, enabled: bool, desc: str = "train", unit: str = "it",
                 leave: bool = True) -> tqdm:
    """Bar with tqdm's own rate and ETA; the training loop adds loss, lr and images/s as postfix.

    Only on a terminal: redirected to a file or a CI log, a bar is thousands of carriage-return lines, and the
    periodic log lines (training's, or :class:`Progress`'s) carry the rate and ETA there.
    """
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled or not sys.stderr.isatty(),
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.05,
        leave=leave,
    )


PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


class TrainingProgressLines:
    """Off a terminal (a log file, a CI job): a line every :data:`PROGRESS_EVERY` seconds of training between the
    ``log_every`` lines, with the rate and the ETA, such as ``progress: iteration 12/4400, 0.41 it/s, eta 2:58:30``.
    Counts and the clock only: no host sync."""

    def __init__(self, write: Callable[[str], None], total: int, initial: int, enabled: bool):
        self.write, self.total, self.initial = write, total, initial
        self.enabled = enabled and not sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def step(self, iteration: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        rate = (iteration - self.initial) / max(now - self.start, 1e-9)
        eta = format_seconds((self.total - iteration) / max(rate, 1e-9))
        self.write(f"progress: iteration {iteration}/{self.total}, {rate:.2f} it/s, eta {eta}")

    def exclude(self, seconds: float) -> None:
        self.start += seconds  # validation time is not training speed
        self.last = time.perf_counter()


def _stderr_line(text: str) -> None:
    tqdm.write(text, file=sys.stderr)  # around any bar on the screen


class Progress:
    """Progress of a loop over ``total`` items (None: not known ahead, e.g. video frames): a tqdm bar on a
    terminal; elsewhere (a file, a CI log) a line every :data:`PROGRESS_EVERY` seconds through ``write`` such as
    ``eval 40/101 images, 3.1 img/s, eta 0:00:20``, and a closing one when any was written. ``note`` (e.g. the
    CPU thread choice) is written first, so a long loop says at once that it started and how it runs.
    """

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "images",
                 write: Callable[[str], None] | None = None, note: str | None = None, leave: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.short = "img" if unit == "images" else unit.rstrip("s")
        self.write = write or _stderr_line
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and note:
            self.write(note)
        self.bar = progress_bar(total, 0, enabled, desc=desc, unit=self.short, leave=leave)
        self.done, self.reported = 0, None  # items done, and at the last line written
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if self.lines and now - self.last >= PROGRESS_EVERY:
            self.last, self.reported = now, self.done
            self.write(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        text = f"{self.desc} {count} {self.unit}, {rate:.1f} {self.short}/s"
        if self.total is not None and self.done < self.total:
            text += f", eta {format_seconds((self.total - self.done) / max(rate, 1e-9))}"
        elif self.total is not None:
            text += f", {format_seconds(elapsed)} in all"
        return text

    def close(self) -> None:
        self.bar.close()
        if self.reported is not None and self.reported != self.done:  # the end, unless the last line said it
            self.reported = self.done
            self.write(self.line(time.perf_counter()))

    def __enter__(self) -> Progress:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class TensorBoard:
    """A SummaryWriter when enabled (rank 0) and the package is installed; otherwise every call is a no-op."""

    def __init__(self, log_dir: Path, enabled: bool, logger: logging.Logger | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            global _tensorboard_notice_shown
            if not _tensorboard_notice_shown and logger is not None:
                logger.info(
                    f"tensorboard is not installed: TensorBoard logging is off ({install_command('tensorboard')}, "
                    "or set train.tensorboard=false to silence this)"
                )
            _tensorboard_notice_shown = True
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def visualise_sample(
    prediction: Any, label: Any, offsets: Any, confidence: Any, palette: Any, ignore_index: int = 255
) -> dict[str, np.ndarray]:
    """HWC uint8 images of one validation sample: prediction and ground truth in the dataset palette, offsets
    in optical-flow colours and confidence in viridis (each only if ``ovenet.vis`` provides the function)."""
    try:
        from .. import vis
    except ImportError:
        return {}
    images: dict[str, np.ndarray] = {}
    colorize = getattr(vis, "colorize", None)
    if colorize is not None and palette:
        images["prediction"] = colorize(prediction, palette, ignore_index)
        images["ground_truth"] = colorize(label, palette, ignore_index)
    if offsets is not None and hasattr(vis, "flow_to_color"):
        images["offsets"] = vis.flow_to_color(offsets)
    if confidence is not None and hasattr(vis, "confidence_to_color"):
        images["confidence"] = vis.confidence_to_color(confidence)
    return images
