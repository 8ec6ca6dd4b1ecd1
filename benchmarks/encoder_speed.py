"""The offset head's cost on EfficientNet-Lite0 beside HRNetV2-W18, on the CPU: parameters, training step time,
inference time and the estimated training memory.

    OMP_NUM_THREADS=1 python benchmarks/encoder_speed.py            # ~5 minutes on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/encoder_speed.py --rounds 1 --steps 1   # a smoke run

Variants (CamVid, 11 classes, untrained weights: speed does not depend on them): HRNetV2-W18 baseline and OVeNet
(branch at stage 4), EfficientNet-Lite0 baseline, OVeNet (copy of the stride-32 stage), OVeNet with the shared
encoder, and OVeNet with coarse (stride-32) logits. Training: ``train_step`` (the recipe's loss: OHEM on S_i, S_s,
S_f + confidence loss; SGD) at batch 8, 180x240, fp32, one thread, interleaved by round (every variant once per
round) so that a change in load touches all alike; the median over rounds. Inference: one 360x480 image, eval
mode, no grad, median of ``--steps`` passes per round. Memory: ``estimate_training_memory`` of a step at batch 16,
360x480 (the GPU recipe), fp32 and bf16, CUDA rules. Writes encoder_speed.json and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ovenet.config import load_config
from ovenet.engine.memory import estimate_training_memory
from ovenet.engine.optim import build_optimizer
from ovenet.engine.step import train_step
from ovenet.losses import build_loss
from ovenet.models import build_model

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "HRNetV2-W18 baseline": ("camvid_hrnetv2_w18", []),
    "HRNetV2-W18 OVeNet": ("camvid_hrnetv2_w18_ovenet", []),
    "Lite0 baseline": ("camvid_efficientnet_lite0", []),
    "Lite0 OVeNet": ("camvid_efficientnet_lite0_ovenet", []),
    "Lite0 OVeNet, shared encoder": ("camvid_efficientnet_lite0_ovenet", ["model.offset.shared_encoder=true"]),
    "Lite0 OVeNet, coarse logits": ("camvid_efficientnet_lite0_ovenet", ["model.head=coarse"]),
}
H, W, BATCH = 180, 240, 8


def build(name: str):
    config, overrides = VARIANTS[name]
    cfg = load_config(config, ["model.pretrained=null", f"loss.ohem_min_kept={round(0.05 * BATCH * H * W)}",
                               *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = build_loss(cfg.loss, cfg.model.num_classes, 255, cfg.model.align_corners, cfg.model.offset.sampling)
    return cfg, model, criterion, build_optimizer(model, cfg.train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "encoder_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    built = {name: build(name) for name in VARIANTS}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(BATCH, 3, H, W, generator=g), "label": torch.randint(0, 11, (BATCH, H, W), generator=g)}
    image = torch.randn(1, 3, 360, 480, generator=g)
    train_s: dict[str, list[float]] = {n: [] for n in VARIANTS}
    infer_s: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for name, (_, model, criterion, optimizer) in built.items():  # warm-up
        train_step(model.train(), criterion, optimizer, batch)
    for round_index in range(args.rounds):
        for name, (_, model, criterion, optimizer) in built.items():
            model.train()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, criterion, optimizer, batch)
            train_s[name].append((time.perf_counter() - t0) / args.steps)
            model.eval()
            with torch.no_grad():
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    model(image)
                    times.append(time.perf_counter() - t0)
            infer_s[name].append(statistics.median(times))
            print(f"round {round_index} {name:30s} train {train_s[name][-1]:.3f} s/step, "
                  f"inference {1000 * infer_s[name][-1]:.0f} ms", flush=True)
    rows = {}
    for name, (cfg, model, _, _) in built.items():
        memory = {amp: estimate_training_memory(cfg, batch_size=16, crop=(360, 480), amp=amp).peak / 2**30
                  for amp in ("fp32", "bf16")}
        rows[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                      "train_s_per_step": statistics.median(train_s[name]),
                      "inference_ms": 1000 * statistics.median(infer_s[name]),
                      "memory_gib_b16_360x480": memory, "train_rounds": train_s[name], "infer_rounds": infer_s[name]}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": 1, "train": {"batch": BATCH, "crop": [H, W]}, "inference": [360, 480], "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    base = {"HRNetV2": rows["HRNetV2-W18 baseline"], "Lite0": rows["Lite0 baseline"]}
    print("\n| variant | params (M) | train s/step (b8, 180x240) | x own baseline | inference ms (360x480) | "
          "est. memory GiB, b16 360x480 fp32 / bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ref = base["HRNetV2" if name.startswith("HRNetV2") else "Lite0"]
        print(f"| {name} | {r['params_m']:.2f} | {r['train_s_per_step']:.2f} | "
              f"{r['train_s_per_step'] / ref['train_s_per_step']:.2f} | {r['inference_ms']:.0f} | "
              f"{r['memory_gib_b16_360x480']['fp32']:.1f} / {r['memory_gib_b16_360x480']['bf16']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
