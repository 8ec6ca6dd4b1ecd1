"""The CamVid study: does OVeNet's offset head help, beyond the extra branch and the extra loss? One command.

    # the CPU study in RESULTS.md (2 cores, 1 thread per run, a second run only while the machine is quiet)
    OMP_NUM_THREADS=1 python experiments/camvid/study.py --data-root ../shared/data/camvid --device cpu \
        --study paired long --seeds 304 305 306 307 308 --long-seeds 304 305 306 307 308 --iters 300 \
        --long-factor 4 --resolution 90 120 --batch 8 --time-ratio 1.5 --jobs 2 --max-load 3 --threads 1 \
        --out experiments/camvid/runs/study --results experiments/camvid/study_paired model.bn_momentum=0.1
    # the same study on a GPU, longer and at full resolution
    python experiments/camvid/study.py --data-root ../shared/data/camvid --device cuda --study paired long \
        --iters 4600 --resolution full --batch 16 --time-ratio R --jobs 4 --results experiments/camvid/study_gpu \
        --out experiments/camvid/runs/study_gpu train.amp=bf16
    # the older form: shipped configs by name (the pilot and the Table-5 ablations)
    python experiments/camvid/study.py --data-root ../shared/data/camvid --configs camvid_ablation_ce ...

A run is a named *variant* (a shipped config plus overrides) at one seed: `ovenet train`, then `ovenet eval`, then
`analyze.py` on OVeNet checkpoints (S_i vs S_s vs S_f, offsets, confidence), each in its own process. Variants of
one seed start from the same main-body initialisation and see the same batches in the same order (the engine
derives both from train.seed), so the differences between variants of one seed are paired.

Each finished run writes <results>/<variant>_seed<seed>.json at once (config, overrides, the resolved config and
the commit it ran with, wall times of train, eval and analysis, val mIoU, boundary mIoU, per-class IoU, S_i/S_s/S_f
and the offset analysis); a rerun skips runs whose JSON exists, so an interrupted study continues where it stopped. Run folders with checkpoints go to --out
(git-ignored); `stats.py <results>` makes the paired tables and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE, OVENET = "camvid_hrnetv2_w18s", "camvid_hrnetv2_w18s_ovenet"
LITE0_BASELINE, LITE0_OVENET = "camvid_efficientnet_lite0", "camvid_efficientnet_lite0_ovenet"
BASELINES = {BASELINE, LITE0_BASELINE, "camvid_hrnetv2_w18"}  # no offset head: nothing for analyze.py
CURVE = ("train.val_every=100",)  # validation every 100 iterations: the curve that says whether it flattened


@dataclass(frozen=True)
class Variant:
    """One arm of the study: a shipped config plus overrides; iters_factor scales --iters (schedule/compute)."""

    config: str
    overrides: tuple[str, ...] = ()
    iters_factor: float = 1.0
    time_matched: bool = False  # iters_factor is --time-ratio (the baseline given OVeNet's wall time)
    note: str = field(default="", compare=False)


def variants(time_ratio: float, long_factor: float) -> dict[str, Variant]:
    return {
        "baseline": Variant(BASELINE, note="HRNet + FCN head, one semantic loss"),
        "baseline_sem2": Variant(BASELINE, ("loss.weight_semantic=2.0",),
                                 note="step-size control: semantic loss x2, the total weight OVeNet's body sees"),
        "baseline_time": Variant(BASELINE, (), time_ratio, time_matched=True,
                                 note="compute control: iterations x the OVeNet/baseline time-per-iteration ratio"),
        "ovenet": Variant(OVENET, note="paper: tau 0.5, OHEM, confidence loss (Eq. 6)"),
        "zero_offset": Variant(OVENET, ("model.offset.zero_offsets=true",),
                               note="OVeNet's branch, losses and compute; offsets fixed at 0 (S_s = S_i)"),
        "baseline_long": Variant(BASELINE, (), long_factor, note="baseline, long schedule"),
        "ovenet_long": Variant(OVENET, (), long_factor, note="OVeNet, long schedule"),
        "baseline_time_long": Variant(BASELINE, (), long_factor * time_ratio, time_matched=True,
                                      note="compute control on the long schedule"),
        "zero_offset_long": Variant(OVENET, ("model.offset.zero_offsets=true",), long_factor,
                                    note="zero-offset control on the long schedule"),
        # The offset head on an ImageNet-pretrained EfficientNet-Lite0 encoder (the paper's regime: pretrained,
        # fine-tuned), validated every 100 iterations for the curve, and the same from scratch as the contrast.
        "lite0_baseline": Variant(LITE0_BASELINE, CURVE, note="EfficientNet-Lite0 (ImageNet) + concat head"),
        "lite0_ovenet": Variant(LITE0_OVENET, CURVE, note="+ offset branch (copy of stride-32 stage) and head"),
        "lite0_zero_offset": Variant(LITE0_OVENET, (*CURVE, "model.offset.zero_offsets=true"),
                                     note="OVeNet's branch, losses and compute; offsets fixed at 0"),
        "lite0_shared": Variant(LITE0_OVENET, (*CURVE, "model.offset.shared_encoder=true"),
                                note="offset head on the encoder's own features (no branch)"),
        "lite0_coarse_baseline": Variant(LITE0_BASELINE, (*CURVE, "model.head=coarse"),
                                         note="logits from the stride-32 features only"),
        "lite0_coarse_ovenet": Variant(LITE0_OVENET, (*CURVE, "model.head=coarse"),
                                       note="stride-32 logits, offsets read at stride 4"),
        "lite0_coarse_zero_offset": Variant(LITE0_OVENET, (*CURVE, "model.head=coarse",
                                                           "model.offset.zero_offsets=true"),
                                            note="stride-32 logits, offset branch and losses, offsets fixed at 0"),
        # The controls of the registered study (issue 26): the step-size control (semantic loss x2: the
        # 1 + kappa + lambda the zero-offset control's body sees, S_f = S_s = S_i) and the content-free control
        # (seeds moved by one learned field of pixel coordinates, the same for every image).
        "lite0_sem2": Variant(LITE0_BASELINE, (*CURVE, "loss.weight_semantic=2.0"),
                              note="step-size control: baseline with the semantic loss x2"),
        "lite0_coarse_sem2": Variant(LITE0_BASELINE, (*CURVE, "model.head=coarse", "loss.weight_semantic=2.0"),
                                     note="stride-32 logits, step-size control: semantic loss x2"),
        "lite0_coarse_content_free": Variant(
            LITE0_OVENET, (*CURVE, "model.head=coarse", "model.offset.content_free=true"),
            note="stride-32 logits, seeds moved by a field of pixel coordinates only"),
        "lite0_scratch_baseline": Variant(LITE0_BASELINE, (*CURVE, "model.pretrained=null"),
                                          note="same network, random initialisation"),
        "lite0_scratch_ovenet": Variant(LITE0_OVENET, (*CURVE, "model.pretrained=null"),
                                        note="same network, random initialisation"),
        "lite0_scratch_zero_offset": Variant(LITE0_OVENET, (*CURVE, "model.pretrained=null",
                                                            "model.offset.zero_offsets=true"),
                                             note="from scratch, offsets fixed at 0"),
    }


# Shipped configs that run as plain variants under their own names (Table-5 ablations; the issue-3 W18 pair).
PLAIN = {
    "ablations": ["camvid_ablation_tau0.2", "camvid_ablation_tau1.0", "camvid_ablation_branch3",
                  "camvid_ablation_ce", "camvid_ablation_no_confidence"],
    "w18": ["camvid_hrnetv2_w18", "camvid_hrnetv2_w18_ovenet"],
}
STUDIES = {
    "paired": ["baseline", "baseline_sem2", "baseline_time", "ovenet", "zero_offset"],
    "long": ["baseline_long", "ovenet_long"],
    "long_controls": ["baseline_time_long", "zero_offset_long"],
    "pretrained": ["lite0_baseline", "lite0_ovenet", "lite0_zero_offset"],
    "pretrained_scratch": ["lite0_scratch_baseline", "lite0_scratch_ovenet", "lite0_scratch_zero_offset"],
    "pretrained_design": ["lite0_shared", "lite0_coarse_baseline", "lite0_coarse_ovenet", "lite0_coarse_zero_offset"],
    # issue 26: the Lite0 study again with registered resizes and the weights' normalisation (the recipes' own
    # defaults, nothing pinned here), with the step-size and content-free controls; experiments/pretrained/
    # run_registered.sh runs the coarse arms at 5 seeds, the concat arms at 3
    "registered": ["lite0_coarse_baseline", "lite0_coarse_ovenet", "lite0_coarse_zero_offset", "lite0_coarse_sem2",
                   "lite0_coarse_content_free"],
    "registered_concat": ["lite0_baseline", "lite0_ovenet", "lite0_zero_offset", "lite0_sem2"],
    **PLAIN,
}
SMOKE = ["data.crop_size=[64,96]", "data.base_size=120", "train.batch_size=2", "eval.crop_size=[64,96]",
         "data.eval_resize_short=64"]


def recipe(args: argparse.Namespace, iters: int) -> list[str]:
    """Overrides every run shares: the small-CPU recipe of the pilot, at --resolution and --batch."""
    out = [f"data.root={args.data_root}", f"model.arch={args.arch}", f"train.batch_size={args.batch}",
           f"train.iters={iters}", "train.epochs=null", f"data.num_workers={args.num_workers}",
           "train.val_every=0", f"train.ckpt_every={iters}", f"train.log_every={max(1, iters // 10)}"]
    if args.device == "cpu":
        out += ["train.amp=none", "train.channels_last=false"]
    if args.resolution != ["full"]:
        h, w = (int(v) for v in args.resolution)
        # eval on the image resized to the training scale (logits upsampled to the full 360x480 labels), and
        # OHEM keeps at least the config's ~5% of the batch's pixels, not a fixed count meant for 16 x 360x480
        out += [f"data.crop_size=[{h},{w}]", f"data.base_size={w}", f"data.eval_resize_short={h}",
                f"eval.crop_size=[{h},{w}]", f"loss.ohem_min_kept={round(0.05 * args.batch * h * w)}"]
    return out


def run_cmd(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.time()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def load1() -> float:
    return os.getloadavg()[0]


class Gate:
    """Starts a run only when the machine has room: the first run always; a further one only once the running
    one has been going a minute (so the 1-minute load sees it) and the load is at most max_load."""

    def __init__(self, max_load: float | None):
        self.max_load, self.active, self.last_start, self.lock = max_load, 0, 0.0, threading.Lock()

    def enter(self) -> None:
        while True:
            with self.lock:
                settled = time.time() - self.last_start >= 60
                if self.active == 0 or self.max_load is None or (settled and load1() <= self.max_load):
                    self.active += 1
                    self.last_start = time.time()
                    return
            time.sleep(15)

    def leave(self) -> None:
        with self.lock:
            self.active -= 1


def one_run(name: str, variant: Variant, seed: int, args: argparse.Namespace, gate: Gate) -> dict:
    out_json = args.results / f"{name}_seed{seed}.json"
    if out_json.exists():
        return json.loads(out_json.read_text())
    iters = max(1, round(args.iters * variant.iters_factor))
    run_dir = args.out / f"{name}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "study.log"
    overrides = [*recipe(args, iters), f"train.seed={seed}", f"name={name}_seed{seed}", *variant.overrides,
                 *(SMOKE if args.smoke else []), *args.override]
    cli = [sys.executable, "-m", "ovenet.cli"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    gate.enter()
    try:
        started, load_start = time.strftime("%Y-%m-%d %H:%M:%S"), load1()
        print(f"[{started}] start {name} seed {seed} ({iters} iters, load {load_start:.1f})", flush=True)
        rc, train_s = run_cmd([*cli, "train", variant.config, *overrides, "--run-dir", str(run_dir), "--overwrite",
                               "--device", args.device, *threads], log)
        result = {"variant": name, "config": variant.config, "seed": seed, "iters": iters,
                  "overrides": overrides, "variant_overrides": list(variant.overrides), "note": variant.note,
                  "started": started, "load1_start": round(load_start, 2), "train_rc": rc,
                  "train_s": round(train_s, 1), "threads": args.threads, "device": args.device,
                  "host": platform.node(), "time_ratio": args.time_ratio if variant.time_matched else None}
        result |= ran_with(run_dir)
        ckpt = run_dir / "last.pth"  # the end of the schedule: no checkpoint chosen on the val set it is scored on
        if rc != 0 or not ckpt.exists():
            print(f"  {name} seed {seed}: training failed (rc {rc}); see {log}", flush=True)
            return result
        rc, eval_s = run_cmd([*cli, "eval", variant.config, str(ckpt), *overrides, "--out", str(run_dir),
                              "--overwrite", "--device", args.device, *threads], log)
        result |= {"eval_rc": rc, "eval_s": round(eval_s, 1)}
        if rc != 0:
            return result
        metrics = json.loads((run_dir / "eval_val.json").read_text())
        result |= {k: metrics[k] for k in ("miou", "boundary_miou", "pixel_acc", "mean_acc", "iou",
                                           "boundary_iou", "class_names", "eval")}
        result["val_curve"] = val_curve(run_dir / "train.log")
        if variant.config not in BASELINES:  # analyze.py writes nothing for a checkpoint without an offset head
            env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
            cmd = [sys.executable, str(HERE / "analyze.py"), str(ckpt), "--data-root", str(args.data_root),
                   "--out", str(run_dir / "analysis.json"), "--device", args.device]
            t0 = time.time()
            with log.open("a") as f:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            result["analyze_s"] = round(time.time() - t0, 1)
            if rc == 0 and (run_dir / "analysis.json").exists():
                result["analysis"] = json.loads((run_dir / "analysis.json").read_text())
        result["load1_end"] = round(load1(), 2)
        args.results.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] done  {name} seed {seed}: mIoU {100 * result['miou']:.2f} "
              f"boundary {100 * result['boundary_miou']:.2f} train {train_s / 60:.1f} min", flush=True)
        return result
    finally:
        gate.leave()


def ran_with(run_dir: Path) -> dict:
    """The config the run resolved (the recipe's defaults of this code version, e.g. the encoder's padding and
    normalisation, not only the overrides) and the commit of the code that ran it."""
    import yaml

    config = run_dir / "config.yaml"
    git = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"resolved_config": yaml.safe_load(config.read_text()) if config.exists() else None,
            "commit": git.stdout.strip() or None}


def val_curve(log: Path) -> list[list[float]]:
    """[iteration, val mIoU] for every validation the training log recorded."""
    import re

    pattern = re.compile(r"val iter (\d+) .*?mIoU ([0-9.]+)")
    points = []
    for line in log.read_text().splitlines() if log.exists() else []:
        match = pattern.search(line)
        if match:
            points.append([int(match[1]), float(match[2]) / 100])
    return points


def job_order(names: list[str], seeds: list[int], long_seeds: list[int]) -> list[tuple[str, int]]:
    """Main variants seed by seed; the first long seed's runs after the second main seed (the long runs are the
    slowest, so one pair starts early), the other long seeds after all main seeds: what is cut when time runs
    out is a long seed, never a main one."""
    is_long = set(STUDIES["long"]) | set(STUDIES["long_controls"])
    main = [n for n in names if n not in is_long]
    longs = [(n, s) for s in long_seeds for n in names if n in is_long]
    first = [job for job in longs if job[1] == long_seeds[0]] if long_seeds else []
    order: list[tuple[str, int]] = []
    for i, s in enumerate(seeds):
        order += [(n, s) for n in main]
        if i == min(1, len(seeds) - 1):
            order += first
    return order + [job for job in longs if job not in first]


def summarise(results: list[dict]) -> str:
    lines = ["| variant | runs | mIoU | boundary mIoU | S_i | S_f | train min |", "|---|---:|---:|---:|---:|---:|---:|"]

    def stat(values: list[float]) -> str:
        if not values:
            return ""
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"

    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r.get("variant", r.get("config")), []).append(r)
    for name, runs in by.items():
        ok = [r for r in runs if "miou" in r]
        heads = {h: [r["analysis"][h]["miou"] for r in ok if "analysis" in r] for h in ("initial", "final")}
        minutes = statistics.mean(r["train_s"] for r in runs) / 60
        lines.append(f"| {name} | {len(ok)}/{len(runs)} | {stat([r['miou'] for r in ok])} | "
                     f"{stat([r['boundary_miou'] for r in ok])} | {stat(heads['initial'])} | "
                     f"{stat(heads['final'])} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--study", nargs="+", default=["paired", "long"], choices=list(STUDIES))
    p.add_argument("--variants", nargs="+", help="run these named variants instead of --study")
    p.add_argument("--configs", nargs="+", help="shipped configs by name, as plain variants (pilot, ablations)")
    p.add_argument("--seeds", type=int, nargs="+", default=[304, 305, 306, 307, 308])
    p.add_argument("--long-seeds", type=int, nargs="+", default=[304, 305], help="seeds of the long schedule")
    p.add_argument("--iters", type=int, default=400, help="iterations of the main schedule")
    p.add_argument("--long-factor", type=float, default=4.0, help="long schedule = this x --iters")
    p.add_argument("--time-ratio", type=float, default=1.6,
                   help="measured OVeNet/baseline time per iteration: baseline_time trains iters x this")
    p.add_argument("--resolution", nargs="+", default=["120", "160"],
                   help="training crop H W (eval resized to H), or 'full' for the configs' 360x480")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--arch", default="hrnetv2_w18_small_v1")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--max-load", type=float, default=None,
                   help="start a further parallel run only while the 1-minute load is at most this")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (--threads of the CLI)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "study", help="run folders (checkpoints)")
    p.add_argument("--results", type=Path, default=HERE / "study_paired", help="per-run JSON (committed); a new schedule needs a new folder, runs with a JSON are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny crops: checks the plumbing only (use --iters 2)")
    p.add_argument("override", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args()
    if args.resolution != ["full"] and len(args.resolution) != 2:
        p.error("--resolution takes H W (e.g. 120 160) or 'full'")
    args.data_root = args.data_root.resolve()
    table = variants(args.time_ratio, args.long_factor) | {c: Variant(c) for cs in PLAIN.values() for c in cs}
    if args.configs:
        table |= {c: Variant(c) for c in args.configs}
        names = list(args.configs)
    else:
        names = args.variants or [n for s in args.study for n in STUDIES[s]]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {sorted(table)}")
    jobs = job_order(names, args.seeds, args.long_seeds)
    args.results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    gate = Gate(args.max_load)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: one_run(job[0], table[job[0]], job[1], args, gate), jobs))
    summary = summarise(results)
    (args.results / "summary.md").write_text(summary)
    print(summary)
    print(f"{len(jobs)} runs in {(time.time() - t0) / 60:.1f} min; per-run JSON in {args.results}")
    failed = [r for r in results if "miou" not in r]
    if failed:
        print(f"{len(failed)} runs failed: see their study.log under {args.out}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
