"""CPU intra-op threads: 1 vs N for the work the commands do, on an idle machine and with one core kept busy.

    python benchmarks/threads.py                  # the tables behind src/ovenet/threads.py (2-5 minutes)
    python benchmarks/threads.py --repeats 5 --threads 1 2 4 --json benchmarks/results/threads.json

Workloads (what ``train``, ``eval``/``predict`` spend their time on):

- ``quickstart train``: one optimisation step of the quickstart model (HRNetV2-W18-small-v1 FCN OVeNet) on a
  batch of 8 96x160 crops with its loss;
- ``quickstart infer``: one 96x160 image through the model (``eval``/``predict``, whole image, one scale);
- ``camvid train``: one step of the CamVid CPU-pilot model (same net, 11 classes, OHEM) at batch 8, 180x240;
- ``camvid infer``: one 180x240 image, logits upsampled to the 360x480 label size.

Each condition (``idle``; ``busy``: a child process spinning one core, started and stopped here) runs the
repeats in turn, interleaving the thread counts within every repeat so that a change in the machine's load
touches all of them alike; the table gives the median seconds per unit and the ratio to one thread. The load
average seen before each condition is printed (other jobs may share the machine: it is part of the result).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ovenet.config import LossConfig, ModelConfig, OffsetConfig
from ovenet.losses import build_loss
from ovenet.models import build_model


def _spin() -> None:  # the busy condition: another program keeping one core at 100%
    while True:
        pass


def _model(num_classes: int) -> torch.nn.Module:
    cfg = ModelConfig(arch="hrnetv2_w18_small_v1", head="fcn", num_classes=num_classes, pretrained=None,
                      offset=OffsetConfig(enabled=True, branch_stage=4, tau=0.5, sampling="exact"))
    return build_model(cfg)


def train_step_fn(num_classes: int, loss: LossConfig, batch: int, size: tuple[int, int]) -> Callable[[], None]:
    torch.manual_seed(0)
    model = _model(num_classes).train()
    criterion = build_loss(loss, num_classes, align_corners=True, sampling="exact")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(batch, 3, *size)
    labels = torch.randint(0, num_classes, (batch, *size))

    def step() -> None:
        value, _ = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def infer_fn(num_classes: int, size: tuple[int, int], label_size: tuple[int, int]) -> Callable[[], None]:
    torch.manual_seed(0)
    model = _model(num_classes).eval()
    image = torch.randn(1, 3, *size)

    @torch.no_grad()
    def infer() -> None:
        logits = model(image).logits_final
        F.interpolate(logits, size=label_size, mode="bilinear", align_corners=False).argmax(1)

    return infer


WORKLOADS: dict[str, Callable[[], Callable[[], None]]] = {
    "quickstart train": lambda: train_step_fn(8, LossConfig(type="ce"), 8, (96, 160)),
    "quickstart infer": lambda: infer_fn(8, (96, 160), (96, 160)),
    "camvid train": lambda: train_step_fn(11, LossConfig(type="ohem", ohem_thresh=0.9, ohem_min_kept=131072),
                                          8, (180, 240)),
    "camvid infer": lambda: infer_fn(11, (180, 240), (360, 480)),
}
UNITS = {"train": 1, "infer": 4}  # units timed together: a train step, or 4 images


def timed(fn: Callable[[], None], threads: int, units: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(units):
        fn()
    return (time.perf_counter() - start) / units


def measure(names: list[str], thread_counts: list[int], repeats: int,
            max_seconds: float) -> dict[str, dict[int, list[float]]]:
    """Median-ready timings; a workload stops repeating after ``max_seconds`` (stalled thread counts can make
    one repeat take a minute), keeping at least one repeat of every thread count."""
    times: dict[str, dict[int, list[float]]] = {}
    for name in names:
        fn = WORKLOADS[name]()
        units = UNITS[name.split()[-1]]
        for threads in thread_counts:  # warm-up: allocator, kernel selection, the OpenMP pool
            timed(fn, threads, 1)
        times[name] = {t: [] for t in thread_counts}
        start = time.perf_counter()
        for _ in range(repeats):
            for threads in thread_counts:
                times[name][threads].append(timed(fn, threads, units))
            if time.perf_counter() - start > max_seconds:
                break
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="per workload and condition: stop repeating after this long")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--conditions", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    p.add_argument("--json", type=Path, help="also write the raw timings here")
    args = p.parse_args()
    thread_counts = sorted(set(args.threads))

    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "torch_default_threads": torch.get_num_threads(), "conditions": {}}
    print(f"{report['machine']} | torch {report['torch']} (default {report['torch_default_threads']} threads)")
    for condition in args.conditions:
        spinner = None
        if condition == "busy":
            spinner = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
            spinner.start()
            time.sleep(1.0)
        load_before = os.getloadavg()
        start = time.perf_counter()
        try:
            times = measure(args.workloads, thread_counts, args.repeats, args.max_seconds)
        finally:
            if spinner is not None:
                spinner.terminate()
                spinner.join()
        load_after = os.getloadavg()
        report["conditions"][condition] = {"load_before": load_before, "load_after": load_after,
                                           "seconds": time.perf_counter() - start, "times": times}
        print(f"\n{condition}: load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
              f"({time.perf_counter() - start:.0f} s)")
        header = "| workload | " + " | ".join(f"{t} thread(s), s" for t in thread_counts) + " | "
        header += " | ".join(f"{t} vs 1" for t in thread_counts[1:]) + " |"
        print(header)
        print("|---|" + "---:|" * (2 * len(thread_counts) - 1))
        for name, per_threads in times.items():
            medians = {t: statistics.median(v) for t, v in per_threads.items()}
            cells = [f"{medians[t]:.3f}" for t in thread_counts]
            ratios = [f"{medians[t] / medians[thread_counts[0]]:.2f}x" for t in thread_counts[1:]]
            print(f"| {name} | " + " | ".join(cells + ratios) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
