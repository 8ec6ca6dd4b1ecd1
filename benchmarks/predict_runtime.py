"""Whole-process time of `ovenet predict` on the CPU by runtime and number of images: is the default runtime
ever slower than `--runtime torch`?

    python benchmarks/predict_runtime.py                  # ~6 minutes on 2 busy cores
    python benchmarks/predict_runtime.py --counts 1 2 --rounds 1   # a smoke run

Each run is a fresh `ovenet predict CKPT FOLDER --out DIR --save labels --threads 1` process (what a user
waits for: start, checkpoint load, any export, every image, the PNGs), timed from outside. The checkpoint is an
untrained `camvid_hrnetv2_w18_ovenet` (HRNetV2-W18 OVeNet, 11 classes); the images are CamVid val frames
(360x480 JPEGs, stored as PNG) from ../shared/data/camvid when present, else random 360x480 images. Runtimes:

- ``torch``: `--runtime torch`;
- ``onnxruntime_cold``: `--runtime onnxruntime` with an empty export cache (it exports first);
- ``auto_cold``: the default, empty cache (it picks PyTorch below ORT_PAYOFF_IMAGES images, else exports);
- ``auto_warm``: the default with this checkpoint's export already cached (ONNX Runtime, no export).

Runs are interleaved by round (every runtime once per image count, then again), and each figure is the median
over rounds. Writes predict_runtime.json and prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CAMVID = HERE.parents[1] / "shared" / "data" / "camvid" / "val"
RUNTIMES = ("torch", "onnxruntime_cold", "auto_cold", "auto_warm")


def make_checkpoint(path: Path) -> Path:
    import torch

    from ovenet import checkpoint
    from ovenet.config import load_config
    from ovenet.models import build_model

    cfg = load_config("camvid_hrnetv2_w18_ovenet", ["model.pretrained=null", "eval.mode=whole"])
    torch.manual_seed(0)
    return checkpoint.save(path, build_model(cfg.model), cfg)


def make_images(folder: Path, count: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    frames = sorted(CAMVID.glob("*.jpg"))[:count] if CAMVID.is_dir() else []
    for i in range(count):
        target = folder / f"img{i:03d}.png"
        if i < len(frames):
            Image.open(frames[i]).convert("RGB").save(target)
        else:
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)).save(target)
    return "camvid val" if len(frames) >= count else "random"


def run_predict(ckpt: Path, images: Path, out: Path, runtime: str, cache: Path) -> tuple[float, str]:
    env = dict(os.environ, OVENET_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    flag = {"torch": "torch", "onnxruntime_cold": "onnxruntime"}.get(runtime, "auto")
    command = [sys.executable, "-m", "ovenet.cli", "predict", str(ckpt), str(images), "--out", str(out),
               "--save", "labels", "--threads", "1", "--runtime", flag, "--device", "cpu"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("runtime:")), "")
    return seconds, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 20, 40])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "predict_runtime.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ovenet_predict_runtime_"))
    try:
        ckpt = make_checkpoint(work / "w18_ovenet.pth")
        warm_cache = work / "warm_cache"
        source = make_images(work / "images" / "prime", 1)
        run_predict(ckpt, work / "images" / "prime", work / "prime_out", "onnxruntime_cold", warm_cache)
        times: dict[str, dict[int, list[float]]] = {r: {n: [] for n in args.counts} for r in RUNTIMES}
        lines: dict[str, dict[int, str]] = {r: {} for r in RUNTIMES}
        for count in args.counts:
            source = make_images(work / "images" / str(count), count)
        for round_index in range(args.rounds):
            for count in args.counts:
                for runtime in RUNTIMES:
                    cache = warm_cache if runtime == "auto_warm" else work / f"cold_{round_index}_{count}_{runtime}"
                    out = work / "out" / f"{round_index}_{count}_{runtime}"
                    seconds, line = run_predict(ckpt, work / "images" / str(count), out, runtime, cache)
                    times[runtime][count].append(seconds)
                    lines[runtime][count] = line
                    print(f"round {round_index} {count:3d} images {runtime:17s} {seconds:6.1f} s  {line}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    medians = {r: {n: statistics.median(v) for n, v in by_count.items()} for r, by_count in times.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "images": source, "counts": args.counts, "rounds": args.rounds,
              "seconds": times, "median_seconds": medians, "runtime_lines": lines}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| images | torch (s) | onnxruntime, cold cache (s) | auto, cold (s) | auto, warm (s) | "
          "auto cold / torch | auto warm / torch |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.counts:
        m = {r: medians[r][n] for r in RUNTIMES}
        print(f"| {n} | {m['torch']:.1f} | {m['onnxruntime_cold']:.1f} | {m['auto_cold']:.1f} | "
              f"{m['auto_warm']:.1f} | {m['auto_cold'] / m['torch']:.2f} | {m['auto_warm'] / m['torch']:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
