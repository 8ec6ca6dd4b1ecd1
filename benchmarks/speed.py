"""Training and inference speed of HRNetV2-W48+OCR, baseline vs OVeNet, fp32 eager vs the fast path.

    python benchmarks/speed.py                     # on a CUDA GPU: the full table, JSON to benchmarks/results/
    python benchmarks/speed.py --quick --device cpu --arch hrnetv2_w18_small_v1 --crop 128 256 --batch 2

Training: images/s of one optimisation step (forward, the full OVeNet loss with OHEM and the confidence loss,
backward, SGD) on random 512x1024 crops at batch 8, and peak memory. Inference: ms per 1024x2048 image (batch 1,
logits_final at 1/4, upsampled to full size). Timing by CUDA events after warm-up; the median of repeats.
Compile time (if any) is measured separately and kept out of the throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ovenet.config import LossConfig, ModelConfig, OffsetConfig, TrainConfig
from ovenet.device import autocast
from ovenet.engine.optim import build_optimizer
from ovenet.engine.step import train_step
from ovenet.engine.train import compile_regions
from ovenet.losses import build_loss
from ovenet.models import build_model
from ovenet.models.heads import upsample_logits

MODES = {
    "fp32_eager": dict(amp="fp32", channels_last=False, compile=None),
    "bf16": dict(amp="bf16", channels_last=False, compile=None),
    "bf16_cl": dict(amp="bf16", channels_last=True, compile=None),
    "bf16_cl_compile_regional": dict(amp="bf16", channels_last=True, compile="regional"),
}


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
        return times


def build(arch: str, ovenet: bool, mode: dict, device: torch.device):
    cfg = ModelConfig(arch=arch, head="ocr", num_classes=19, offset=OffsetConfig(enabled=ovenet, tau=0.5))
    model = build_model(cfg).to(device)
    if mode["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if mode["compile"] == "regional":
        compile_regions(model)
    criterion = build_loss(LossConfig(type="ohem", ohem_min_kept=131072), 19, align_corners=cfg.align_corners,
                           sampling=cfg.offset.sampling)
    return model, criterion.to(device)


def bench_train(arch, ovenet, mode, device, batch, crop, warmup, repeats, timer):
    model, criterion = build(arch, ovenet, mode, device)
    model.train()
    opt = build_optimizer(model, TrainConfig(lr=0.01, momentum=0.9, weight_decay=5e-4))
    batch_data = {"image": torch.randn(batch, 3, *crop, device=device),
                  "label": torch.randint(0, 19, (batch, *crop), device=device)}

    def step():  # the training loop's own step: forward, full loss, backward, fused SGD
        train_step(model, criterion, opt, batch_data, precision=mode["amp"], channels_last=mode["channels_last"])

    t0 = time.perf_counter()
    step()  # first step: cudnn autotuning / compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = time.perf_counter() - t0
    times = timer(step, warmup, repeats)
    ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"train_ms_per_step": ms, "train_images_per_s": batch * 1000 / ms, "peak_memory_gib": peak,
            "first_step_s": first}


def bench_infer(arch, ovenet, mode, device, size, warmup, repeats, timer):
    model, _ = build(arch, ovenet, mode, device)
    model.eval()
    fmt = torch.channels_last if mode["channels_last"] else torch.contiguous_format
    x = torch.randn(1, 3, *size, device=device).contiguous(memory_format=fmt)

    @torch.inference_mode()
    def infer():
        with autocast(device, mode["amp"]):
            upsample_logits(model(x).logits_final, size).argmax(1)

    infer()
    return {"infer_ms_per_image": statistics.median(timer(infer, warmup, repeats))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="hrnetv2_w48")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, nargs=2, default=[512, 1024])
    p.add_argument("--infer-size", type=int, nargs=2, default=[1024, 2048])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up (smoke runs)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup = 3, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    timer = Timer(device)
    rows = []
    for mode_name in args.modes:
        for ovenet in (False, True):
            row = {"model": f"{'OVeNet' if ovenet else 'baseline'} {args.arch}+OCR", "mode": mode_name}
            try:
                row |= bench_train(args.arch, ovenet, MODES[mode_name], device, args.batch, tuple(args.crop),
                                   args.warmup, args.repeats, timer)
                row |= bench_infer(args.arch, ovenet, MODES[mode_name], device, tuple(args.infer_size),
                                   args.warmup, args.repeats, timer)
            except Exception as e:  # record and go on: one failing mode must not lose the others' numbers
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": device_name, "torch": torch.__version__, "batch": args.batch, "crop": args.crop,
              "infer_size": args.infer_size, "rows": rows}
    print(f"\n{device_name}, torch {torch.__version__}, batch {args.batch}, crop {args.crop}")
    print(f"{'model':34} {'mode':26} {'train img/s':>11} {'peak GiB':>9} {'infer ms':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:34} {r['mode']:26} {r['error']}")
        else:
            print(f"{r['model']:34} {r['mode']:26} {r['train_images_per_s']:11.1f} {r['peak_memory_gib']:9.1f} "
                  f"{r['infer_ms_per_image']:9.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"speed_{device_name.replace(' ', '_')}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
