"""Throughput of the training input pipeline alone: PNG decode + label mapping + TrainTransform + DataLoader.

Writes Cityscapes-sized (1024x2048) synthetic frames in the real Cityscapes layout to a temp dir, then measures
images/s for each worker count with the Cityscapes recipe (base 2048, scale 0.5-2, crop 512x1024, flip).
Also times each stage in one process, and the resize strategy we chose (the OpenCV-matching resize computing only
the crop's window) against the obvious alternatives (resize the whole frame with PIL or torch, then crop).

    python benchmarks/data_pipeline.py --workers 0 2 --json benchmarks/data_pipeline.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ovenet.data import CityscapesDataset, TrainTransform, build_loader
from ovenet.data.base import read_image, read_label_map
from ovenet.data.cityscapes import _CITYSCAPES_TABLE
from ovenet.data.synthetic import render_scene
from ovenet.data.transforms import normalize

# synthetic class -> a Cityscapes label id of the same meaning
_LABEL_ID = np.array([23, 11, 7, 8, 21, 17, 26, 24], dtype=np.uint8)


def write_frames(root: Path, count: int, size: tuple[int, int]) -> None:
    for index in range(count):
        image, label = render_scene(index, size, num_classes=8, seed=123)
        stem = f"bench_{index:06d}_000019"
        image_dir, label_dir = root / "leftImg8bit/train/bench", root / "gtFine/train/bench"
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(_LABEL_ID[label]).save(label_dir / f"{stem}_gtFine_labelIds.png")


def _timed(fn, repeats: int) -> float:
    """Median CPU milliseconds per call on this thread: unlike wall time, not inflated by other jobs."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1000 * float(np.median(times))


def stage_timings(dataset: CityscapesDataset, transform: TrainTransform, repeats: int) -> dict[str, float]:
    files = dataset.samples[0]
    sample = dataset.load(0)
    height, width = sample["image"].shape[:2]
    rng = random.Random(0)
    params = [transform.sample_params(height, width, rng) for _ in range(repeats)]
    cycle = iter(params * 4)

    def pil_full_resize_then_crop():
        p = next(cycle)
        full = np.asarray(Image.fromarray(sample["image"]).resize((p.scaled_w, p.scaled_h), Image.BILINEAR))
        normalize(np.ascontiguousarray(full[p.top : p.top + p.height, p.left : p.left + p.width]))
        label = np.asarray(Image.fromarray(sample["label"]).resize((p.scaled_w, p.scaled_h), Image.NEAREST))
        torch.from_numpy(label[p.top : p.top + p.height, p.left : p.left + p.width].astype(np.int64))

    def torch_full_resize_then_crop():
        p = next(cycle)
        image = torch.from_numpy(sample["image"].copy()).permute(2, 0, 1)[None].float()
        scaled = F.interpolate(image, size=(p.scaled_h, p.scaled_w), mode="bilinear", align_corners=False)
        crop = scaled[0, :, p.top : p.top + p.height, p.left : p.left + p.width]
        crop.sub_(0.45 * 255).div_(0.225 * 255)
        label = torch.from_numpy(sample["label"].copy())[None, None].float()
        F.interpolate(label, size=(p.scaled_h, p.scaled_w), mode="nearest")[
            0, 0, p.top : p.top + p.height
        ].long()

    return {
        "decode_image_ms": _timed(lambda: read_image(files.image), repeats),
        "decode_and_map_label_ms": _timed(
            lambda: _CITYSCAPES_TABLE(read_label_map(files.label), files.label), repeats
        ),
        "train_transform_box_resize_ms (used)": _timed(lambda: transform.apply(sample, next(cycle)), repeats),
        "pil_full_resize_then_crop_ms": _timed(pil_full_resize_then_crop, repeats),
        "torch_full_resize_then_crop_ms": _timed(torch_full_resize_then_crop, repeats),
    }


def _cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (finished DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loader_throughput(dataset, batch_size: int, workers: int, epochs: int) -> dict[str, float]:
    cpu_start = _cpu_seconds()
    loader = build_loader(dataset, batch_size, train=True, num_workers=workers, seed=0, pin_memory=False)
    iterator = iter(loader)
    start = time.perf_counter()
    total_images = next(iterator)["image"].shape[0]  # worker start-up and first batch, reported apart
    startup = time.perf_counter() - start
    for batch in iterator:
        total_images += batch["image"].shape[0]
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += batch["image"].shape[0]
    elapsed = time.perf_counter() - start
    del iterator, loader  # shuts the persistent workers down, so their CPU time is counted
    gc.collect()
    # CPU time per image does not depend on how busy the machine is, unlike images/s.
    cpu_ms = 1000 * (_cpu_seconds() - cpu_start) / (total_images + images)
    return {"workers": workers, "images": images, "seconds": elapsed, "images_per_s": images / elapsed,
            "first_batch_s": startup, "cpu_ms_per_image": cpu_ms}  # fmt: skip


def machine_info() -> dict[str, str | int]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "pillow": Image.__version__, "load_average_1min_at_end": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048))
    parser.add_argument("--crop", type=int, nargs=2, default=(512, 1024))
    parser.add_argument("--base-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 2))
    parser.add_argument(
        "--epochs", type=int, default=3, help="timed passes over the images, after one warm-up"
    )
    parser.add_argument("--repeats", type=int, default=10, help="calls per single-process stage timing")
    parser.add_argument("--trials", type=int, default=3, help="loader measurements per worker count")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other jobs on the box skew the numbers; record how busy it was
    with tempfile.TemporaryDirectory(prefix="ovenet_bench_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_frames(root, args.num_images, tuple(args.size))
        pngs = sorted(root.glob("leftImg8bit/train/*/*.png"))
        mean_png_mb = sum(p.stat().st_size for p in pngs) / len(pngs) / 1e6
        print(f"wrote {args.num_images} frames {args.size[0]}x{args.size[1]} "
              f"(mean image PNG {mean_png_mb:.2f} MB) in {time.perf_counter() - start:.1f} s")  # fmt: skip

        transform = TrainTransform(args.crop, base_size=args.base_size, scale_range=(0.5, 2.0), flip=True)
        dataset = CityscapesDataset(root, "train", transform=transform)
        # Stages run single-threaded, as inside a DataLoader worker (which sets torch threads to 1), so thread
        # CPU time is their whole cost.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        stages = stage_timings(dataset, transform, args.repeats)
        torch.set_num_threads(threads)
        for name, value in stages.items():
            print(f"  {name:<40s} {value:8.1f} CPU-ms")
        runs = []
        for workers in args.workers:
            # The box is shared with other jobs: repeat and keep the median and the best run.
            trials = [
                loader_throughput(dataset, args.batch_size, workers, args.epochs) for _ in range(args.trials)
            ]
            rates = sorted(t["images_per_s"] for t in trials)
            result = {"workers": workers, "images_per_s_median": float(np.median(rates)),
                      "images_per_s_best": rates[-1],
                      "cpu_ms_per_image_median": float(np.median([t["cpu_ms_per_image"] for t in trials])),
                      "trials": trials}  # fmt: skip
            runs.append(result)
            print(
                f"workers={workers}: median {result['images_per_s_median']:.2f} images/s, "
                f"best {result['images_per_s_best']:.2f}, {result['cpu_ms_per_image_median']:.0f} CPU-ms/image "
                f"({len(trials)} trials x {trials[0]['images']} images)"
            )

    report = {"machine": {**machine_info(), "load_average_1min_at_start": load_before}, "config": {k: (list(v) if isinstance(v, tuple) else v)
              for k, v in vars(args).items() if k != "json"}, "mean_image_png_mb": mean_png_mb,
              "stages_ms": stages, "loader": runs}  # fmt: skip
    print(json.dumps(report["machine"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
