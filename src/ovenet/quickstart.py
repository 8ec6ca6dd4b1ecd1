"""``ovenet quickstart``: a first OVeNet run on a fresh machine, no dataset, a few minutes of CPU.

It trains the shipped ``quickstart`` config (a tiny OVeNet on procedural :class:`~ovenet.data.SyntheticScenes`),
evaluates the checkpoint (mIoU, boundary mIoU) and writes predictions with offset and confidence images for a
few validation scenes, through the same ``train``/``evaluate``/``predict_files`` functions as the real commands.
The number of training iterations is sized to the time budget by timing a few steps of the same model first,
at the CPU thread count every command uses (:mod:`ovenet.threads`); training is cut at the budget's end if the
machine gets slower than when the steps were timed, and the quickstart then says so.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ovenet.config import Config, load_config
from ovenet.errors import OvenetError
from ovenet.files import write_text
from ovenet.threads import ThreadChoice, configure_threads, faster_of_one_and, restore_threads, take_note

CONFIG_NAME = "quickstart"
MARKER = "quickstart.json"  # written first ("running") and last (the summary): marks a folder safe to replace
# Training's start-up, the end-of-training validation, evaluation and predictions: about 6 s measured on 2 CPU
# cores at one thread (benchmarks/THREADS.md), with room for a busier machine.
FIXED_SECONDS = 15.0
PLAN_SHARE = 0.9  # of the training time: the timed steps leave out data rendering, logging and checkpoints
MIN_ITERS, MAX_ITERS = 20, 20000
DEADLINE_SLACK = 1.25  # a minimal run that no budget pays for may take 1.25x its planned time


def quickstart_config(out_dir: Path, iters: int, device: str, overrides: Sequence[str] = ()) -> Config:
    return load_config(CONFIG_NAME, [*overrides, f"device={device}", f"train.iters={iters}",
                                     f"output_dir={out_dir}", "name=run"])


def seconds_per_iteration(cfg: Config, device: str, steps: int = 3, give_up_after: float = float("inf")) -> float:
    """Time ``steps`` training steps (forward, loss, backward, SGD) of the config's model on random data.

    Returns early with the time of the first (warm-up) step when that alone takes over ``give_up_after`` seconds.
    """
    import torch

    from ovenet.engine.optim import build_optimizer
    from ovenet.engine.step import train_step
    from ovenet.losses import build_loss
    from ovenet.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    criterion = build_loss(cfg.loss, cfg.model.num_classes, align_corners=cfg.model.align_corners,
                           sampling=cfg.model.offset.sampling).to(device)
    optimizer = build_optimizer(model, cfg.train)
    h, w = cfg.data.crop_size
    batch = {"image": torch.randn(cfg.train.batch_size, 3, h, w),
             "label": torch.randint(0, cfg.model.num_classes, (cfg.train.batch_size, h, w))}

    def step() -> None:  # the training loop's own step, so the timing is of what training will run
        train_step(model, criterion, optimizer, batch)

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


def fastest_thread_count(cfg: Config, device: str, choice: ThreadChoice) -> tuple[int, float]:
    """(threads, seconds per step) for ``choice`` (:func:`ovenet.threads.configure_threads`'s): its count, or one
    thread when the rule chose several and timing shows one clearly faster (:func:`faster_of_one_and`)."""
    import torch

    def seconds_at(threads: int, give_up_after: float) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return seconds_per_iteration(cfg, device, give_up_after=give_up_after)
        finally:
            torch.set_num_threads(before)  # the caller decides

    return faster_of_one_and(choice, seconds_at)


def plan_iterations(train_seconds: float, seconds_per_iter: float) -> int:
    """Training iterations that fit ``train_seconds``, with room for what the timed steps leave out."""
    return int(min(MAX_ITERS, max(MIN_ITERS, PLAN_SHARE * train_seconds / max(seconds_per_iter, 1e-6))))


class TrainingDeadline:
    """Asks training to stop once ``seconds`` have passed, so that a machine that got busier than when the steps
    were timed cannot stretch the quickstart far past its budget. Through the trainer's own
    :class:`~ovenet.engine.guards.StopRequest`: it finishes the step, saves ``last.pth`` and returns; no signal.
    ``cut`` tells whether it stopped training before its last iteration. ``seconds=None`` disables it.
    """

    def __init__(self, seconds: float | None, reason: str = "time budget reached"):
        from ovenet.engine.guards import StopRequest

        self.seconds = seconds
        self.reason = reason
        self.stop = StopRequest()
        self._timer: threading.Timer | None = None

    def __enter__(self) -> TrainingDeadline:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self.seconds is not None:
            self._timer = threading.Timer(max(0.0, self.seconds), self.stop.request, args=(self.reason,))
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    @property
    def cut(self) -> bool:
        return self.stop.stopped_at is not None


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
    write_text(out_dir / MARKER, json.dumps({"status": "running"}) + "\n")


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
                   overrides: Sequence[str] = (), log: Callable[[str], None] = print,
                   threads: int | None = None) -> dict:
    """Train, evaluate and predict; returns a summary with the metrics and the paths written.

    ``minutes`` is the budget for the whole run (training is sized to it, and cut at its end if the machine gets
    slower than when the steps were timed); ``iters`` instead sets the training length (no time limit).
    ``overrides`` change the quickstart config (e.g. ``data.num_samples=32`` for a smaller run); ``threads`` the
    CPU thread count (default: :func:`ovenet.threads.choose_cpu_threads`).
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
    choice = configure_threads(device, threads)
    note = take_note()  # said here, in the quickstart's own line, rather than by the trainer
    deadline = None
    try:
        if iters is None:
            used, per_iter = fastest_thread_count(quickstart_config(out_dir, 1, device, overrides), device, choice)
            torch.set_num_threads(used)
            budget = minutes * 60
            train_seconds = budget - (time.perf_counter() - start) - FIXED_SECONDS
            iters = plan_iterations(train_seconds, per_iter)
            # Stop where only the fixed costs' share of the budget is left, or, for a minimal run the budget
            # cannot pay for, at its planned time with some slack.
            deadline = max(train_seconds, DEADLINE_SLACK * iters * per_iter + FIXED_SECONDS)
            if note:
                log(f"quickstart: {note}")
            if used != choice.threads:
                log(f"quickstart: one thread timed faster than {choice.threads}: using one")
            log(f"quickstart: {per_iter:.2f} s per training step on {device}: {iters} iterations fit about "
                f"{minutes:g} min")
        elif note:
            log(f"quickstart: {note}")
        return _run(out_dir, iters, device, overrides, num_predictions, log, start, deadline, minutes)
    finally:
        torch.set_num_threads(threads_before)
        restore_threads()


def _run(out_dir: Path, iters: int, device: str, overrides: Sequence[str], num_predictions: int,
         log: Callable[[str], None], start: float, deadline: float | None, minutes: float) -> dict:
    from ovenet import checkpoint
    from ovenet.data import dataset_info
    from ovenet.engine.evaluate import evaluate, result_paths
    from ovenet.engine.predict import predict_files
    from ovenet.engine.train import train
    from ovenet.vis import colorize, save_png

    cfg = quickstart_config(out_dir, iters, device, overrides)
    log(f"quickstart: training {cfg.model.network} OVeNet on synthetic {cfg.data.image_size[0]}x"
        f"{cfg.data.image_size[1]} scenes for {iters} iterations")

    run_dir = out_dir / "run"
    with TrainingDeadline(deadline, f"the quickstart's time budget of {minutes * 60:.0f} s") as timer:
        train(cfg, run_dir=run_dir, stop=timer.stop)
    if timer.cut:
        log(f"quickstart: time budget of {minutes * 60:.0f} s reached at iteration {timer.stop.stopped_at}/{iters} "
            "(the machine got slower than when the steps were timed); evaluating the weights it reached")
    ckpt = run_dir / "best.pth" if (run_dir / "best.pth").is_file() else run_dir / "last.pth"

    result = evaluate(cfg, ckpt, out_dir=out_dir / "eval", overwrite=True, device=device, progress=False)
    eval_json, eval_md = result_paths(out_dir / "eval", result["split"])

    model = checkpoint.load(ckpt, device)
    _, _, palette = dataset_info("synthetic", cfg.model.num_classes)
    scenes = write_scenes(cfg, out_dir / "scenes", num_predictions)
    pred_dir = out_dir / "predictions"
    written = predict_files(model, [path for path, _ in scenes], pred_dir, palette, "synthetic",
                            save=("color", "overlay", "offsets", "confidence"), overwrite=True, device=device)
    for path, label in scenes:  # the ground truth beside each prediction, for a side-by-side look
        written.append(save_png(pred_dir / f"{path.stem}_truth.png", colorize(label, palette)))

    summary = {
        "status": "done",
        "iterations": iters,
        "iterations_done": timer.stop.stopped_at if timer.cut else iters,
        "stopped_at_time_budget": timer.cut,
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
    write_text(out_dir / MARKER, json.dumps(summary, indent=2) + "\n")
    log("")
    log(f"quickstart done in {summary['seconds']:.0f} s: mIoU {100 * result['miou']:.1f}, boundary mIoU "
        f"{100 * result['boundary_miou']:.1f} ({result['boundary_width']} px band), pixel accuracy "
        f"{100 * result['pixel_acc']:.1f} on {result['num_images']} validation scenes")
    log(f"  run folder (config, log, checkpoints): {run_dir}")
    log(f"  evaluation:  {eval_md} (per-class table), {eval_json}")
    log(f"  predictions: {pred_dir}/scene_XX_{{color,overlay,offsets,confidence,truth}}.png")
    log(f"  next: ovenet predict {ckpt} your_image.png --out preds/   |   ovenet info {ckpt}")
    return summary
