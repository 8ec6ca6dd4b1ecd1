"""Training memory of the shipped recipes, and what the memory levers save: estimates, no GPU needed.

    python benchmarks/memory.py                      # the tables of benchmarks/RESULTS.md (a few minutes, 1 core)
    python benchmarks/memory.py cityscapes_hrnetv2_w48_ocr_ovenet --batch 8 --crop 512 1024
    python benchmarks/memory.py camvid_hrnetv2_w18s_ovenet --time --batch 2 --crop 128 256   # CPU step time

Each figure is :func:`ovenet.engine.memory.estimate_training_memory`: the peak tensor memory of one real training
step (model, loss, backward, SGD with momentum) run on fake tensors, with CUDA autocast's casting rules under
bf16. Not counted: the CUDA context, cuDNN workspaces and allocator fragmentation (see the module docstring).
Levers: ``loss.chunked`` ("chunked"), ``train.activation_checkpointing`` ("ckpt"), both ("both").

``--time``: seconds per real training step on the CPU for each lever setting, interleaved (plain, chunked, ckpt,
both, plain, ...) so that load from other jobs hits all settings alike; the median of the rounds. A GPU's
relative cost differs (there, recomputation competes with fast convolutions, not slow ones).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ovenet.config import load_config
from ovenet.engine.memory import GiB, MemoryEstimate, estimate_training_memory

RECIPES = ["cityscapes_hrnetv2_w48", "cityscapes_hrnetv2_w48_ovenet", "cityscapes_hrnetv2_w48_ocr",
           "cityscapes_hrnetv2_w48_ocr_ovenet", "ade20k_hrnetv2_w48_ocr", "ade20k_hrnetv2_w48_ocr_ovenet",
           "camvid_hrnetv2_w18s", "camvid_hrnetv2_w18s_ovenet"]
LEVERS = {"plain": (False, False), "chunked": (False, True), "ckpt": (True, False), "both": (True, True)}
PRECISIONS = {"fp32": "none", "bf16": "bf16"}


def row(name: str, batch: int | None, crop: list[int] | None, precision: str) -> tuple[list[MemoryEstimate], str]:
    cfg = load_config(name)
    estimates = [estimate_training_memory(cfg, batch, crop, PRECISIONS[precision], ckpt, chunked)
                 for ckpt, chunked in LEVERS.values()]
    e = estimates[0]
    cells = " | ".join(f"{x.peak_gib:.1f}" for x in estimates)
    return estimates, f"| {name} | {e.batch_size} | {e.crop[0]}x{e.crop[1]} | {precision} | {cells} |"


def table(rows: list[tuple[str, int | None, list[int] | None]]) -> list[MemoryEstimate]:
    print("| config | batch | crop | precision | plain | chunked loss | act. ckpt | both |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    out = []
    for name, batch, crop in rows:
        for precision in PRECISIONS:
            estimates, line = row(name, batch, crop, precision)
            print(line, flush=True)
            out += estimates
    return out


def precision(e: MemoryEstimate) -> str:
    return e.amp


def breakdown(estimates: dict[str, MemoryEstimate]) -> None:
    """Saved activations by model part when backward starts, and the peak's parts, GiB."""
    parts = sorted({p for e in estimates.values() for p in e.saved}, key=lambda p: -max(
        e.saved.get(p, 0) for e in estimates.values()))
    print("\n| saved for backward (GiB) | " + " | ".join(estimates) + " |")
    print("|---|" + "---:|" * len(estimates))
    for part in parts:
        if max(e.saved.get(part, 0) for e in estimates.values()) >= 0.01 * GiB:
            print(f"| {part} | " + " | ".join(f"{e.saved.get(part, 0) / GiB:.2f}" for e in estimates.values())
                  + " |")
    print("| **all saved activations** | " + " | ".join(f"{e.saved_total / GiB:.2f}" for e in estimates.values())
          + " |")
    print("| **peak** | " + " | ".join(f"{e.peak_gib:.2f}" for e in estimates.values()) + " |")


def step_times(name: str, batch: int, crop: list[int], rounds: int) -> None:
    from ovenet.engine.optim import build_optimizer
    from ovenet.engine.step import train_step
    from ovenet.losses import build_loss
    from ovenet.models import build_model

    cfg = load_config(name)
    cfg.model.pretrained = None
    torch.manual_seed(0)
    batch_data = {"image": torch.randn(batch, 3, *crop),
                  "label": torch.randint(0, cfg.model.num_classes, (batch, *crop))}
    setups = {}
    for lever, (ckpt, chunked) in LEVERS.items():
        cfg.loss.chunked = chunked
        model = build_model(cfg.model).train().set_activation_checkpointing(ckpt)
        criterion = build_loss(cfg.loss, cfg.model.num_classes, 255, cfg.model.align_corners,
                               cfg.model.offset.sampling)
        setups[lever] = (model, criterion, build_optimizer(model, cfg.train))
    times: dict[str, list[float]] = {lever: [] for lever in LEVERS}
    for r in range(rounds + 1):  # round 0 warms up
        for lever, (model, criterion, optimizer) in setups.items():
            start = time.perf_counter()
            train_step(model, criterion, optimizer, batch_data)
            if r:
                times[lever].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(f"CPU step time, {name}, batch {batch}, {crop[0]}x{crop[1]}, fp32, {torch.get_num_threads()} thread(s), "
          f"median of {rounds} interleaved rounds:")
    for lever, t in times.items():
        m = statistics.median(t)
        print(f"  {lever:8s} {m * 1000:8.1f} ms  x{m / base:.2f}  (min {min(t) * 1000:.1f}, max {max(t) * 1000:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="a config (default: every shipped recipe)")
    parser.add_argument("--batch", type=int, help="batch per GPU (default: the config's)")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="default: the config's crop")
    parser.add_argument("--time", action="store_true", help="CPU step time of each lever setting instead")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.time:
        step_times(args.config or "camvid_hrnetv2_w18s_ovenet", args.batch or 2, args.crop or [128, 256],
                   args.rounds)
        return
    start = time.perf_counter()
    if args.config:
        estimates = table([(args.config, args.batch, args.crop)])
        breakdown({f"{precision(e)} {lever}": e for e, lever in zip(estimates, list(LEVERS) * 2)})
    else:
        print("Recipes at their own batch (per GPU) and crop; peak GiB.\n")
        table([(name, None, None) for name in RECIPES])
        print("\nHRNetV2-W48+OCR OVeNet at batch 8, 512x1024 (the official figures: 59 GiB fp32 at batch 8).\n")
        estimates = table([("cityscapes_hrnetv2_w48_ocr_ovenet", 8, [512, 1024])])
        breakdown({f"{precision(e)} {lever}": e
                   for e, lever in zip(estimates, list(LEVERS) * 2) if lever in ("plain", "both")})
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
