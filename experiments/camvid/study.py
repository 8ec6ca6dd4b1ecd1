"""The CamVid study: HRNet baseline vs OVeNet (and the Table-5 ablations), several seeds, one command.

    python experiments/camvid/study.py --data-root ../shared/data/camvid --jobs 4            # GPU: the study
    python experiments/camvid/study.py --data-root ../shared/data/camvid --smoke --device cpu  # plumbing check

Every run is `ovenet train <config> ...` then `ovenet eval ...` in its own process (several share one GPU), then
`analyze.py` on each OVeNet checkpoint (S_i vs S_s vs S_f, offset and confidence statistics). The summary
(mean and spread over seeds) goes to <out>/summary.json and <out>/summary.md; copy the table into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDIES = {
    "main": ["camvid_hrnetv2_w18s", "camvid_hrnetv2_w18s_ovenet"],
    "ablations": ["camvid_ablation_tau0.2", "camvid_ablation_tau1.0", "camvid_ablation_branch3",
                  "camvid_ablation_ce", "camvid_ablation_no_confidence"],
    "w18": ["camvid_hrnetv2_w18", "camvid_hrnetv2_w18_ovenet"],
}
SMOKE = ["train.iters=2", "train.epochs=null", "data.crop_size=[64,96]", "data.base_size=120", "train.batch_size=2",
         "data.num_workers=0", "train.ckpt_every=2", "train.val_every=2", "eval.crop_size=[64,96]"]


def run(cmd: list[str], log: Path) -> int:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)


def one_run(config: str, seed: int, args: argparse.Namespace) -> dict:
    run_dir = args.out / f"{config}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "study.log"
    overrides = [f"data.root={args.data_root}", f"train.seed={seed}", f"name={config}_seed{seed}",
                 *(SMOKE if args.smoke else []), *args.override]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    cli = [sys.executable, "-m", "ovenet.cli"]
    t0 = time.time()
    rc = run([*cli, "train", config, *overrides, "--run-dir", str(run_dir), "--device", args.device], log)
    train_s = time.time() - t0
    ckpt = run_dir / "best.pth" if (run_dir / "best.pth").exists() else run_dir / "last.pth"
    result = {"config": config, "seed": seed, "run_dir": str(run_dir), "train_rc": rc, "train_s": round(train_s)}
    if rc != 0 or not ckpt.exists():
        return result
    rc = run([*cli, "eval", config, str(ckpt), *overrides, "--out", str(run_dir), "--overwrite",
              "--device", args.device], log)
    if rc == 0:
        metrics = json.loads((run_dir / "eval_val.json").read_text())
        result |= {k: metrics[k] for k in ("miou", "boundary_miou", "pixel_acc", "mean_acc", "iou")}
    rc = run([sys.executable, str(HERE / "analyze.py"), str(ckpt), "--data-root", str(args.data_root),
              "--out", str(run_dir / "analysis.json"), "--device", args.device], log)
    if rc == 0 and (run_dir / "analysis.json").exists():  # baselines have no offset head to analyse
        result["analysis"] = json.loads((run_dir / "analysis.json").read_text())
    return result


def summarise(results: list[dict]) -> tuple[dict, str]:
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["config"], []).append(r)
    summary, lines = {}, ["| config | seeds | mIoU | boundary mIoU | S_i mIoU | S_s mIoU | S_f mIoU | train min |",
                          "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def stat(values: list[float]) -> str:
        if not values:
            return "n/a"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"

    for config, runs in by_config.items():
        ok = [r for r in runs if "miou" in r]
        heads = {h: [r["analysis"][h]["miou"] for r in ok if "analysis" in r and h in r["analysis"]]
                 for h in ("initial", "seed", "final")}
        summary[config] = {"runs": len(runs), "ok": len(ok), "miou": [r["miou"] for r in ok],
                           "boundary_miou": [r["boundary_miou"] for r in ok], **{f"miou_{h}": v for h, v in heads.items()}}
        minutes = statistics.mean(r["train_s"] for r in runs) / 60
        lines.append(f"| {config} | {len(ok)}/{len(runs)} | {stat(summary[config]['miou'])} | "
                     f"{stat(summary[config]['boundary_miou'])} | {stat(heads['initial'])} | {stat(heads['seed'])} | "
                     f"{stat(heads['final'])} | {minutes:.1f} |")
    return summary, "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--studies", nargs="+", default=["main", "ablations"], choices=list(STUDIES))
    p.add_argument("--configs", nargs="+", help="run these configs instead of --studies")
    p.add_argument("--seeds", type=int, nargs="+", default=[304, 305])
    p.add_argument("--jobs", type=int, default=4, help="runs in parallel (they share the GPU)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs of every config")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=HERE / "runs")
    p.add_argument("--smoke", action="store_true", help="2 iterations on tiny crops: checks the plumbing only")
    p.add_argument("override", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args()
    args.data_root = args.data_root.resolve()
    configs = args.configs or [c for s in args.studies for c in STUDIES[s]]
    jobs = [(c, s) for c in configs for s in args.seeds]
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: one_run(*job, args), jobs))
    summary, table = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"results": results, "summary": summary,
                                                        "wall_s": round(time.time() - t0)}, indent=2))
    (args.out / "summary.md").write_text(table)
    print(table)
    print(f"{len(jobs)} runs in {(time.time() - t0) / 60:.1f} min; details in {args.out}/summary.json")
    failed = [r for r in results if r.get("train_rc") != 0 or "miou" not in r]
    if failed:
        print(f"{len(failed)} runs failed: see their study.log", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
