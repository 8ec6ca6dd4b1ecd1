"""CPU training and inference speed of the CamVid pilot recipe, every mode side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/cpu_speed.py                 # ~8-12 minutes on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/cpu_speed.py --rounds 2 --steps 1 --skip-full   # a smoke run

Training: one step of ``ovenet.engine.step.train_step`` (forward, the recipe's OVeNet loss with OHEM, backward,
fused SGD) of the pilot recipe (``camvid_hrnetv2_w18s_ovenet`` with W18-small-v1, 180x240 crops, batch 8) on a
fixed random batch, in these modes:

- ``eager``: today's CPU path (fp32, contiguous tensors, eager PyTorch);
- ``channels_last``: the model and images in channels_last (the CUDA default, off on the CPU until now);
- ``regional``: ``compile_regions`` (each HRNet module through inductor, which generates C++ on the CPU);
- ``regional_cl``: both of the above;
- ``full``: ``torch.compile`` of the whole model (abandoned if its warm-up passes ``--full-limit`` seconds);
- ``full_cl``: whole-model compile of the channels_last model;
- ``bf16_cl``: bf16 autocast + channels_last (for information: it changes results beyond float noise, and the
  engine trains the CPU in fp32). The last two are not in the default set: ask with ``--train-modes``.

Inference: one 360x480 image (batch 1, logits_final upsampled to 360x480, argmax), as ``predict`` does after
decoding and normalising: ``eager``, ``compiled`` (``torch.compile`` of the whole model) and ``onnxruntime``
(``ovenet.export.export_onnx``, one intra-op thread).

The machine is shared, so the modes are interleaved (A B C D, A B C D, ...): a change in load touches all of them
alike. Reported per mode: the median time per step, images/s, the ratio to ``eager`` (median over rounds of the
paired per-round ratio, and of the pooled medians), the warm-up (compile) seconds, the break-even iteration count
(compile overhead / time saved per step), and the largest relative difference of the first step's loss and
gradients (or the inference logits) from eager, all from the same weights and batch. The inductor cache is a
fresh temporary folder, so compile times are cold-cache (the cost of a first run). Threads: the process's
intra-op count (the CLI uses 1 on a 2-core machine: benchmarks/THREADS.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # cold-cache compile times unless the caller picks a cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ovenet_cpu_speed_inductor_")

import torch  # after the cache folder is chosen
import torch.nn.functional as F

from ovenet.config import load_config
from ovenet.engine.optim import build_optimizer
from ovenet.engine.step import train_step
from ovenet.engine.train import compile_regions
from ovenet.losses import build_loss
from ovenet.models import build_model

TRAIN_MODES = ("eager", "channels_last", "regional", "regional_cl", "full", "full_cl", "bf16_cl")
INFER_MODES = ("eager", "compiled", "onnxruntime")


BATCH = 8


class CompileTimeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise CompileTimeout


def time_limit(seconds: float, fn: Callable[[], object]) -> tuple[object | None, float, bool]:
    """Run ``fn`` with a wall-clock limit (SIGALRM); returns (result, seconds, timed_out)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t0, False
    except CompileTimeout:
        return None, time.perf_counter() - t0, True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| relative to b's scale (at least 1)."""
    return float((a.float() - b.float()).abs().max() / max(1.0, float(b.float().abs().max())))


def pilot_config(batch: int = BATCH):
    # The CPU pilot (experiments/camvid/RESULTS.md) overrides the GPU recipe's batch 16 with 8.
    return load_config("camvid_hrnetv2_w18s_ovenet", ["model.arch=hrnetv2_w18_small_v1", "data.crop_size=[180,240]",
                                                      f"train.batch_size={batch}"])


class TrainMode:
    """One mode's own copy of the model, loss and optimiser, from the shared initial weights."""

    def __init__(self, name: str, cfg, base: torch.nn.Module, batch: dict):
        self.name = name
        self.cl = name in ("channels_last", "regional_cl", "full_cl", "bf16_cl")
        self.precision = "bf16" if name == "bf16_cl" else "fp32"
        model = copy.deepcopy(base).train()
        if self.cl:
            model.to(memory_format=torch.channels_last)
        self.criterion = build_loss(cfg.loss, cfg.model.num_classes, 255, cfg.model.align_corners,
                                    cfg.model.offset.sampling)
        self.optimizer = build_optimizer(model, cfg.train)
        self.raw = model
        if name in ("regional", "regional_cl"):
            compile_regions(model)
        self.model = torch.compile(model) if name in ("full", "full_cl") else model
        self.batch = batch
        self.times: list[float] = []
        self.rounds: list[float] = []  # per-round median step time

    def step(self) -> torch.Tensor:
        loss, _ = train_step(self.model, self.criterion, self.optimizer, self.batch, precision=self.precision,
                             channels_last=self.cl)
        return loss


def bench_train(cfg, args, log) -> dict:
    torch.manual_seed(0)
    base = build_model(cfg.model)
    b = cfg.train.batch_size
    h, w = cfg.data.crop_size
    images = torch.randn(b, 3, h, w)
    labels = torch.randint(0, cfg.model.num_classes, (b, h, w))
    labels[:, :8] = 255  # an ignored band, as padding leaves
    batch = {"image": images, "label": labels}
    modes = [m for m in args.train_modes if not (m.startswith("full") and args.skip_full)]

    results: dict[str, dict] = {}
    ref = None
    live: list[TrainMode] = []
    for name in modes:
        mode = TrainMode(name, cfg, base, batch)

        def first_steps(mode=mode):
            t0 = time.perf_counter()
            loss = mode.step()
            first = time.perf_counter() - t0
            grads = [p.grad.detach().clone() for p in mode.raw.parameters() if p.grad is not None]
            t1 = time.perf_counter()
            for _ in range(args.warmup - 1):
                mode.step()
            return first, time.perf_counter() - t1, loss, grads

        limit = args.full_limit if name.startswith("full") else 10 * args.full_limit
        out, seconds, timed_out = time_limit(limit, first_steps)
        if timed_out:
            log(f"train {name}: warm-up stopped after {seconds:.0f} s (limit {limit:.0f} s)")
            results[name] = {"timed_out": True, "warmup_s": seconds}
            continue
        first, rest, loss, grads = out
        info = {"first_step_s": first, "warmup_rest_s": rest, "warmup_steps": args.warmup}
        if ref is None:
            ref = (loss, grads)
        info["loss"] = float(loss)
        info["loss_rel_diff"] = max_rel(loss, ref[0])
        info["grad_rel_diff"] = max(max_rel(g, r) for g, r in zip(grads, ref[1]))
        log(f"train {name}: first step {first:.1f} s, loss {float(loss):.6f}, "
            f"loss diff {info['loss_rel_diff']:.1e}, grad diff {info['grad_rel_diff']:.1e}")
        results[name] = info
        live.append(mode)

    interleaved_rounds(live, args.rounds, args.steps, "round", log)
    summarise(results, live, b, "eager")
    return results


def interleaved_rounds(live: list, rounds: int, steps: int, label: str, log) -> None:
    """Each round times ``steps`` calls of every mode in turn, so load changes hit all modes alike; each mode
    keeps every time and the median of each round."""
    for r in range(rounds):
        for mode in live:
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                mode.step()
                times.append(time.perf_counter() - t0)
            mode.times += times
            mode.rounds.append(statistics.median(times))
        log(f"{label} {r + 1}/{rounds} (load {os.getloadavg()[0]:.2f}): "
            + ", ".join(f"{m.name} {m.rounds[-1] * 1000:.0f}" for m in live) + " ms")


def summarise(results: dict, live: list, images_per_step: int, baseline: str) -> None:
    base = next(m for m in live if m.name == baseline)
    base_median = statistics.median(base.times)
    for mode in live:
        info = results[mode.name]
        median = statistics.median(mode.times)
        info["median_ms"] = median * 1000
        info["images_per_s"] = images_per_step / median
        info["ratio_pooled"] = median / base_median  # time / eager time: < 1 is faster
        info["ratio_paired"] = statistics.median(a / b for a, b in zip(mode.rounds, base.rounds))
        info["round_ms"] = [t * 1000 for t in mode.rounds]
        if "first_step_s" in info:
            # What compiling costs over eager: the warm-up beyond what those steps take once warm.
            overhead = info["first_step_s"] + info["warmup_rest_s"] - info["warmup_steps"] * median
            base_overhead = results[baseline]["first_step_s"] + results[baseline]["warmup_rest_s"] \
                - results[baseline]["warmup_steps"] * base_median
            info["compile_s"] = max(0.0, overhead - base_overhead)
            saved = base_median - median
            info["break_even_iters"] = (info["compile_s"] / saved) if saved > 0 and info["compile_s"] > 0 else None


class InferMode:
    def __init__(self, name: str, fn: Callable[[], torch.Tensor]):
        self.name, self.fn = name, fn
        self.times: list[float] = []
        self.rounds: list[float] = []

    def step(self) -> torch.Tensor:
        return self.fn()


def bench_infer(cfg, args, log) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    size = tuple(args.infer_size)
    image = torch.randn(1, 3, *size)

    def run(net) -> Callable[[], torch.Tensor]:
        @torch.no_grad()
        def fn() -> torch.Tensor:
            logits = net(image).logits_final
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=cfg.model.align_corners)
        return fn

    builders: dict[str, Callable[[], Callable[[], torch.Tensor]]] = {
        "eager": lambda: run(model),
        "compiled": lambda: run(torch.compile(model)),
    }

    def onnx_fn() -> Callable[[], torch.Tensor]:
        import onnxruntime as ort

        from ovenet.export import export_onnx

        path = Path(tempfile.mkdtemp(prefix="ovenet_cpu_speed_onnx_")) / "model.onnx"
        export_onnx(model, path, height=size[0], width=size[1], outputs=["logits"], overwrite=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: image.numpy()}

        def fn() -> torch.Tensor:
            (logits,) = session.run(None, feed)
            return F.interpolate(torch.from_numpy(logits), size=size, mode="bilinear",
                                 align_corners=cfg.model.align_corners)
        return fn

    builders["onnxruntime"] = onnx_fn

    results: dict[str, dict] = {}
    live: list[InferMode] = []
    ref = None
    for name in args.infer_modes:
        def warm(name=name):
            t0 = time.perf_counter()
            fn = builders[name]()
            out = fn()
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(args.warmup - 1):
                fn()
            return fn, out, first, time.perf_counter() - t1

        out, seconds, timed_out = time_limit(args.full_limit, warm)
        if timed_out:
            log(f"infer {name}: warm-up stopped after {seconds:.0f} s")
            results[name] = {"timed_out": True, "warmup_s": seconds}
            continue
        fn, logits, first, rest = out
        if ref is None:
            ref = logits
        info = {"first_step_s": first, "warmup_rest_s": rest, "warmup_steps": args.warmup,
                "logits_rel_diff": max_rel(logits, ref),
                "label_agreement": float((logits.argmax(1) == ref.argmax(1)).float().mean())}
        log(f"infer {name}: first call {first:.1f} s, logits diff {info['logits_rel_diff']:.1e}, "
            f"label agreement {info['label_agreement']:.6f}")
        results[name] = info
        live.append(InferMode(name, fn))

    interleaved_rounds(live, args.rounds, args.infer_steps, "infer round", log)
    summarise(results, live, 1, "eager")
    return results


def table(results: dict, unit: str) -> str:
    rows = [(f"| mode | median ms/{unit} | img/s | time vs eager (paired) | time vs eager (pooled) | "
             "warm-up/compile s | break-even iters | max rel. diff vs eager |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if r.get("timed_out"):
            rows.append(f"| {name} | stopped | | | | > {r['warmup_s']:.0f} | | |")
            continue
        diff = max(r.get("loss_rel_diff", 0.0), r.get("grad_rel_diff", 0.0), r.get("logits_rel_diff", 0.0))
        be = r.get("break_even_iters")
        rows.append(f"| {name} | {r['median_ms']:.0f} | {r['images_per_s']:.2f} | {r['ratio_paired']:.2f} | "
                    f"{r['ratio_pooled']:.2f} | {r.get('compile_s', 0.0):.1f} | "
                    f"{'-' if be is None else f'{be:.0f}'} | {diff:.1e} |")
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="training steps per mode per round")
    parser.add_argument("--infer-steps", type=int, default=5, help="images per mode per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-modes", nargs="+", default=list(TRAIN_MODES[:-2]), choices=TRAIN_MODES)
    parser.add_argument("--infer-modes", nargs="+", default=list(INFER_MODES), choices=INFER_MODES)
    parser.add_argument("--skip-full", action="store_true", help="leave out whole-model compile for training")
    parser.add_argument("--skip-infer", action="store_true")
    parser.add_argument("--full-limit", type=float, default=240.0, help="seconds allowed for a compile warm-up")
    parser.add_argument("--batch", type=int, default=BATCH, help="training batch (the pilot's 8)")
    parser.add_argument("--infer-size", type=int, nargs=2, default=[360, 480])
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("cpu_speed.json"))
    args = parser.parse_args()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    cfg = pilot_config(args.batch)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_before": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()},
        "recipe": f"{cfg.model.arch} OVeNet, batch {cfg.train.batch_size}, crop {list(cfg.data.crop_size)}, "
                  f"loss {cfg.loss.name if hasattr(cfg.loss, 'name') else 'recipe'}",
        "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"],
    }
    log(f"{meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}, load {meta['load_before']}")
    out = {"meta": meta}
    t0 = time.perf_counter()
    out["train"] = bench_train(cfg, args, log)
    print(table(out["train"], "step"), flush=True)
    if not args.skip_infer:
        out["infer"] = bench_infer(cfg, args, log)
        print(table(out["infer"], "image"), flush=True)
    meta["load_after"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t0
    args.json.write_text(json.dumps(out, indent=1))
    log(f"wrote {args.json} ({meta['wall_s']:.0f} s, load after {meta['load_after']})")


if __name__ == "__main__":
    main()
