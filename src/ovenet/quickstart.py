"""``ovenet quickstart``: a first OVeNet run on a fresh machine, no dataset, a few minutes of CPU.

It trains the shipped ``quickstart`` config (a tiny OVeNet on procedural :class:`~ovenet.data.SyntheticScenes`),
evaluates the checkpoint (mIoU, boundary mIoU) and writes predictions with offset and confidence images for a
few validation scenes, through the same ``train``/``evaluate``/``predict_files`` functions as the real commands.
The number of training iterations is sized to the time budget by timing a few steps of the same model first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ovenet.config import Config, load_config
from ovenet.errors import OvenetError

CONFIG_NAME = "quickstart"
MARKER = "quickstart.json"  # written first ("running") and last (the summary): marks a folder safe to replace
TRAIN_SHARE = 0.9  # of the budget; the rest pays for start-up, validation, evaluation and predictions
FIXED_SECONDS = 15.0  # start-up, end-of-training validation, evaluation and predictions on 2 CPU cores
MIN_ITERS, MAX_ITERS = 20, 20000
DEADLINE_SLACK = 1.25  # training is stopped (and evaluated as it is) at 1.25x its planned time


def quickstart_config(out_dir: Path, iters: int, device: str, overrides: Sequence[str] = ()) -> Config:
    return load_config(CONFIG_NAME, [*overrides, f"device={device}", f"train.iters={iters}",
                                     f"output_dir={out_dir}", "name=run"])


def seconds_per_iteration(cfg: Config, device: str, steps: int = 3, give_up_after: float = float("inf")) -> float:
    """Time ``steps`` training steps (forward, loss, backward, SGD) of the config's model on random data.

    Returns early with the time of the first (warm-up) step when that alone takes over ``give_up_after`` seconds.
    """
    import torch

    from ovenet.losses import build_loss
    from ovenet.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    criterion = build_loss(cfg.loss, cfg.model.num_classes, align_corners=cfg.model.align_corners,
                           sampling=cfg.model.offset.sampling)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    h, w = cfg.data.crop_size
    images = torch.randn(cfg.train.batch_size, 3, h, w, device=device)
    labels = torch.randint(0, cfg.model.num_classes, (cfg.train.batch_size, h, w), device=device)

    def step() -> None:
        loss, _ = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()  # warm-up: allocator, kernel selection
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if time.perf_counter() - start > give_up_after:
        return time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def fastest_thread_count(cfg: Config, device: str) -> tuple[int, float]:
    """(threads, seconds per step): PyTorch's default thread count, or one thread when that is faster.

    On a machine whose cores are busy with other work, OpenMP threads that wait for each other can make a step
    ten times slower than a single thread; timing both costs a few steps and protects the time budget.
    """
    import torch

    default = torch.get_num_threads()
    if device != "cpu" or default == 1:
        return default, seconds_per_iteration(cfg, device)
    torch.set_num_threads(1)  # first: one thread is never pathologically slow, so it bounds the second timing
    try:
        single = seconds_per_iteration(cfg, device)
    finally:
        torch.set_num_threads(default)
    multi = seconds_per_iteration(cfg, device, give_up_after=3 * single)
    return (1, single) if single < 0.8 * multi else (default, multi)


def plan_iterations(minutes: float, seconds_per_iter: float) -> int:
    """Training iterations that fit ``minutes`` in total, leaving time for everything else."""
    if minutes <= 0:
        raise OvenetError(f"--minutes must be > 0, got {minutes}")
    budget = minutes * 60 * TRAIN_SHARE - FIXED_SECONDS
    return int(min(MAX_ITERS, max(MIN_ITERS, budget / max(seconds_per_iter, 1e-6))))


class TrainingDeadline:
    """Stops training after ``seconds`` through the trainer's own graceful stop (SIGTERM: finish the step, save
    ``last.pth``, raise ``TrainingInterrupted``), so a machine that gets busier than when the steps were timed
    cannot stretch the quickstart far past its budget. ``fired`` tells a deadline stop from a user's signal.

    Only active in the main thread (signal handlers live there); ``seconds=None`` disables it.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.fired = False
        self._closed = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._previous: Any = None

    def __enter__(self) -> TrainingDeadline:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self.seconds is None or threading.current_thread() is not threading.main_thread():
            return self
        # Outside the training loop a deadline signal is ignored; a real SIGTERM still ends the program.
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _fire(self) -> None:
        with self._lock:  # never signal after __exit__ has put the previous handler back
            if not self._closed:
                self.fired = True
                os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.fired:
            raise SystemExit(128 + signum)

    def __exit__(self, *exc: object) -> None:
        if self._timer is None:
            return
        with self._lock:
            self._closed = True
            self._timer.cancel()
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OvenetError(f"--out {out_dir} is a file; choose a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OvenetError(f"{out_dir} already exists and is not empty; pass --overwrite to replace an earlier "
                              "quickstart or choose another --out")
        if not (out_dir / MARKER).is_file():
            raise OvenetError(f"{out_dir} is not empty and holds no earlier quickstart ({MARKER} missing); "
                              "refusing to delete it, choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text(json.dumps({"status": "running"}) + "\n")


def write_scenes(cfg: Config, folder: Path, count: int) -> list[tuple[Path, object]]:
    """The first ``count`` validation scenes as PNG files (the predictor reads files) with their labels."""
    from ovenet.data import build_dataset
    from ovenet.vis import save_png

    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    scenes = []
    for index in range(min(count, len(dataset))):
        raw = dataset.load(index)  # uint8 image and label, before normalisation
        path = save_png(folder / f"scene_{index:02d}.png", raw["image"])
        scenes.append((path, raw["label"]))
    return scenes


def run_quickstart(out_dir: str | Path = "runs/quickstart", minutes: float = 3.0, iters: int | None = None,
                   device: str = "cpu", overwrite: bool = False, num_predictions: int = 4,
                   overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and predict; returns a summary with the metrics and the paths written.

    ``overrides`` change the quickstart config (e.g. ``data.num_samples=32`` for a smaller run).
    """
    import torch

    start = time.perf_counter()
    out_dir = Path(out_dir)
    # Bad arguments fail before anything is touched.
    if iters is not None and iters < 1:
        raise OvenetError(f"--iters must be >= 1, got {iters}")
    if iters is None and minutes <= 0:
        raise OvenetError(f"--minutes must be > 0, got {minutes}")
    quickstart_config(out_dir, 1, device, overrides)
    _prepare_out_dir(out_dir, overwrite)
    threads_before = torch.get_num_threads()
    deadline = None
    try:
        if iters is None:
            threads, per_iter = fastest_thread_count(quickstart_config(out_dir, 1, device, overrides), device)
            torch.set_num_threads(threads)
            iters = plan_iterations(minutes, per_iter)
            deadline = DEADLINE_SLACK * iters * per_iter + FIXED_SECONDS
            log(f"quickstart: {per_iter:.2f} s per training step on {device} ({threads} thread(s)): "
                f"{iters} iterations fit about {minutes:g} min")
        return _run(out_dir, iters, device, overrides, num_predictions, log, start, deadline)
    finally:
        torch.set_num_threads(threads_before)


def _run(out_dir: Path, iters: int, device: str, overrides: Sequence[str], num_predictions: int,
         log: Callable[[str], None], start: float, deadline: float | None) -> dict:
    from ovenet import checkpoint
    from ovenet.data import dataset_info
    from ovenet.engine.evaluate import evaluate, result_paths
    from ovenet.engine.predict import predict_files
    from ovenet.engine.train import TrainingInterrupted, train
    from ovenet.vis import colorize, save_png

    cfg = quickstart_config(out_dir, iters, device, overrides)
    log(f"quickstart: training {cfg.model.arch} OVeNet on synthetic {cfg.data.image_size[0]}x"
        f"{cfg.data.image_size[1]} scenes for {iters} iterations")

    run_dir = out_dir / "run"
    with TrainingDeadline(deadline) as timer:
        try:
            train(cfg, run_dir=run_dir)
        except TrainingInterrupted:
            if not timer.fired:
                raise
            log(f"quickstart: the machine is slower than when the steps were timed; training stopped at the time "
                f"budget ({deadline:.0f} s), evaluating the weights it reached")
    ckpt = run_dir / "best.pth" if (run_dir / "best.pth").is_file() else run_dir / "last.pth"

    result = evaluate(cfg, ckpt, out_dir=out_dir / "eval", overwrite=True, device=device, progress=False)
    eval_json, eval_md = result_paths(out_dir / "eval", result["split"])

    model = checkpoint.load(ckpt, device)
    _, class_names, palette = dataset_info("synthetic", cfg.model.num_classes)
    scenes = write_scenes(cfg, out_dir / "scenes", num_predictions)
    pred_dir = out_dir / "predictions"
    written = predict_files(model, [path for path, _ in scenes], pred_dir, palette, class_names, "synthetic",
                            save=("color", "overlay", "offsets", "confidence"), overwrite=True, device=device)
    for path, label in scenes:  # the ground truth beside each prediction, for a side-by-side look
        written.append(save_png(pred_dir / f"{path.stem}_truth.png", colorize(label, palette)))

    summary = {
        "status": "done",
        "iterations": iters,
        "stopped_at_time_budget": timer.fired,
        "device": device,
        "seconds": round(time.perf_counter() - start, 1),
        "miou": result["miou"],
        "boundary_miou": result["boundary_miou"],
        "pixel_acc": result["pixel_acc"],
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "eval_json": str(eval_json),
        "eval_table": str(eval_md),
        "predictions": sorted(str(p) for p in written),
    }
    (out_dir / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    log("")
    log(f"quickstart done in {summary['seconds']:.0f} s: mIoU {100 * result['miou']:.1f}, boundary mIoU "
        f"{100 * result['boundary_miou']:.1f} ({result['boundary_width']} px band), pixel accuracy "
        f"{100 * result['pixel_acc']:.1f} on {result['num_images']} validation scenes")
    log(f"  run folder (config, log, checkpoints): {run_dir}")
    log(f"  evaluation:  {eval_md} (per-class table), {eval_json}")
    log(f"  predictions: {pred_dir}/scene_XX_{{color,overlay,offsets,confidence,truth}}.png")
    log(f"  next: ovenet predict {ckpt} your_image.png --out preds/   |   ovenet info {ckpt}")
    return summary
