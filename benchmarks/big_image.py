"""Peak memory and time of `ovenet predict` on one 6000x4500 photo with the EfficientNet-Lite0 OVeNet recipe.

    nice python benchmarks/big_image.py                       # default settings, then --runtime torch
    nice python benchmarks/big_image.py --runtimes auto       # default settings only

Each run is a fresh `ovenet predict CKPT photo.jpg --out DIR --threads 1 [--runtime R]` process (start,
checkpoint load, any ONNX export, the image, every PNG), timed from outside; its peak memory is the child's
maximum resident set size (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, one child per measuring process).
The checkpoint is an untrained `camvid_efficientnet_lite0_ovenet` (`model.pretrained=null`: random weights, the
same network and memory as the pretrained one); the photo is a smooth random 6000x4500 JPEG. Writes
big_image.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def make_checkpoint(path: Path) -> Path:
    import torch

    from ovenet import checkpoint
    from ovenet.config import load_config
    from ovenet.models import build_model

    cfg = load_config("camvid_efficientnet_lite0_ovenet", ["model.pretrained=null"])
    torch.manual_seed(0)
    return checkpoint.save(path, build_model(cfg.model), cfg)


def make_photo(path: Path, height: int, width: int) -> Path:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 100 + 1, width // 100 + 1, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(path, quality=90)
    return path


def measure(checkpoint: Path, photo: Path, out: Path, runtime: str) -> dict:
    """One fresh `ovenet predict` process, measured from a fresh Python process (so that RUSAGE_CHILDREN holds
    this run alone)."""
    command = [sys.executable, "-m", "ovenet.cli", "predict", str(checkpoint), str(photo), "--out", str(out),
               "--threads", "1"] + ([] if runtime == "auto" else ["--runtime", runtime])
    probe = ("import json, resource, subprocess, sys, time; start = time.perf_counter(); "
             "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps({'rc': done.returncode, 'seconds': time.perf_counter() - start, "
             "'max_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "'stderr': done.stderr[-2000:], 'stdout': done.stdout[-2000:]}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = json.loads(subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True,
                                       env=env, check=True).stdout)
    result["max_rss_gib"] = round(result.pop("max_rss_kib") / 2**20, 2)
    result["seconds"] = round(result["seconds"], 1)
    result["command"] = " ".join(["ovenet", *command[3:]])
    result["runtime"] = runtime
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", nargs="+", default=["auto", "torch"], choices=["auto", "torch", "onnxruntime"])
    parser.add_argument("--size", nargs=2, type=int, default=[4500, 6000], metavar=("H", "W"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ovenet_big_image_") as tmp:
        folder = Path(tmp)
        os.environ["OVENET_CACHE_DIR"] = str(folder / "cache")  # a cold ONNX export cache, as a first run has
        checkpoint = make_checkpoint(folder / "lite0.pth")
        photo = make_photo(folder / "photo.jpg", *args.size)
        for runtime in args.runtimes:
            result = measure(checkpoint, photo, folder / f"out_{runtime}", runtime)
            print(json.dumps(result, indent=1), flush=True)
            results.append(result)
    path = HERE / "big_image.json"
    # Runs of other runtimes already recorded (e.g. from a run with --runtimes torch) are kept.
    earlier = json.loads(path.read_text())["runs"] if path.is_file() else []
    kept = [run for run in earlier if run["runtime"] not in args.runtimes]
    record = {"image": f"{args.size[0]}x{args.size[1]} (HxW) JPEG", "model": "camvid_efficientnet_lite0_ovenet, "
              "random weights", "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
              "shared with other jobs, nice, one thread", "torch_threads": 1, "runs": kept + results,
              "before": "issue 25 (main before the pixel budget): 11.1 GB, 3 minutes, default settings"}
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
