"""Paired statistics of the CamVid study: differences by seed, 95% t intervals, sign agreement, tables, the plot.

    python experiments/camvid/stats.py experiments/camvid/study_paired --plot experiments/camvid/study_paired.png

Reads the per-run JSON that study.py writes (<variant>_seed<seed>.json) and writes <results>/stats.json and
<results>/stats.md (the tables RESULTS.md quotes). Pure Python (no scipy); matplotlib only for the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

# Two-sided 95% Student-t critical values t_{0.975, df}, df = 1..30 (standard tables).
T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423]

MAIN = ["baseline", "baseline_sem2", "baseline_time", "zero_offset", "ovenet"]
LONG = ["baseline_long", "ovenet_long", "baseline_time_long", "zero_offset_long"]
CONTROLS = ["baseline", "baseline_sem2", "baseline_time", "zero_offset"]
METRICS = {"miou": "val mIoU", "boundary_miou": "boundary mIoU (3 px)"}


def t_critical(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least 2 paired values (df >= 1)")
    return T975[df - 1] if df <= len(T975) else 1.96  # df > 30: the normal quantile is within 2% of t


def paired_summary(diffs: list[float]) -> dict:
    """Mean, sample standard deviation, 95% t interval and sign counts of paired differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    sd = statistics.stdev(diffs) if n > 1 else math.nan
    half = t_critical(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "half_width": half,
            "positive": sum(d > 0 for d in diffs), "negative": sum(d < 0 for d in diffs), "values": diffs}


def load_runs(folder: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*_seed*.json")):
        r = json.loads(path.read_text())
        if "miou" in r:
            runs.setdefault(r["variant"], {})[r["seed"]] = r
    return runs


def head(run: dict, which: str, metric: str) -> float | None:
    """S_i / S_s / S_f metric of an OVeNet run (from analyze.py), None for runs without the analysis."""
    a = run.get("analysis")
    return a[which][metric] if a else None


def differences(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """Per comparison and metric: the paired summary over the seeds both arms finished (in mIoU points)."""
    out: dict[str, dict[str, dict]] = {}

    def pair(name: str, a: str, b: str) -> None:
        if a not in runs or b not in runs:
            return
        seeds = sorted(set(runs[a]) & set(runs[b]))
        out[name] = {m: {**paired_summary([100 * (runs[a][s][m] - runs[b][s][m]) for s in seeds]), "seeds": seeds}
                     for m in METRICS}

    for c in CONTROLS:
        pair(f"ovenet - {c}", "ovenet", c)
    pair("ovenet_long - baseline_long", "ovenet_long", "baseline_long")
    pair("ovenet_long - baseline_time_long", "ovenet_long", "baseline_time_long")
    pair("ovenet_long - zero_offset_long", "ovenet_long", "zero_offset_long")
    pair("zero_offset - baseline", "zero_offset", "baseline")
    pair("baseline_sem2 - baseline", "baseline_sem2", "baseline")
    pair("baseline_time - baseline", "baseline_time", "baseline")
    for v in ("ovenet", "ovenet_long"):
        if v in runs:
            seeds = sorted(s for s, r in runs[v].items() if r.get("analysis"))
            out[f"{v}: S_f - S_i"] = {
                m: {**paired_summary([100 * (head(runs[v][s], "final", m) - head(runs[v][s], "initial", m))
                                      for s in seeds]), "seeds": seeds} for m in METRICS}
    return out


def fmt_ci(s: dict) -> str:
    if s["n"] < 2:
        return f"{s['mean']:+.2f} (n={s['n']})" if s["n"] else ""
    return f"{s['mean']:+.2f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]"


def tables(runs: dict[str, dict[int, dict]], diffs: dict) -> str:
    lines = ["### Per run", "", "| variant | seed | iters | mIoU | boundary mIoU | S_i | S_f | train s | eval s | "
             "analyze s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = [v for v in [*MAIN, *LONG] if v in runs] + sorted(v for v in runs if v not in [*MAIN, *LONG])
    for v in order:
        for s, r in sorted(runs[v].items()):
            si, sf = head(r, "initial", "miou"), head(r, "final", "miou")
            lines.append(f"| {v} | {s} | {r['iters']} | {100 * r['miou']:.2f} | {100 * r['boundary_miou']:.2f} | "
                         f"{'' if si is None else f'{100 * si:.2f}'} | {'' if sf is None else f'{100 * sf:.2f}'} | "
                         f"{r['train_s']:.0f} | {r.get('eval_s', 0):.0f} | {r.get('analyze_s', '')} |")
    lines += ["", "### Means over seeds (± standard deviation)", "",
              "| variant | seeds | mIoU | boundary mIoU | mean train s |", "|---|---:|---:|---:|---:|"]
    for v in order:
        rs = list(runs[v].values())

        def ms(key: str) -> str:
            vals = [100 * r[key] for r in rs]
            return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.2f}"

        lines.append(f"| {v} | {len(rs)} | {ms('miou')} | {ms('boundary_miou')} | "
                     f"{statistics.fmean(r['train_s'] for r in rs):.0f} |")
    lines += ["", "### Paired differences (mIoU points; mean [95% t interval]; seeds with the sign > 0 / < 0)", "",
              "| comparison | seeds | val mIoU | + / − | boundary mIoU | + / − | per seed (val mIoU) |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, d in diffs.items():
        m, b = d["miou"], d["boundary_miou"]
        per = ", ".join(f"{x:+.2f}" for x in m["values"])
        lines.append(f"| {name} | {m['n']} | {fmt_ci(m)} | {m['positive']}/{m['negative']} | {fmt_ci(b)} | "
                     f"{b['positive']}/{b['negative']} | {per} |")
    lines += ["", *per_class(runs), "", *analysis_table(runs)]
    return "\n".join(lines) + "\n"


def per_class(runs: dict[str, dict[int, dict]]) -> list[str]:
    present = [v for v in [*MAIN, *LONG] if v in runs]
    if not present:
        return []
    names = next(iter(runs[present[0]].values()))["class_names"]
    pairs = [(a, b) for a, b in (("ovenet", "baseline"), ("ovenet_long", "baseline_long")) if a in runs and b in runs]
    lines = ["### Per-class val IoU (mean over seeds, %; paired differences with 95% t intervals)", "",
             "| class | " + " | ".join(present) + "".join(f" | {a} − {b}" for a, b in pairs) + " |",
             "|---|" + "---:|" * (len(present) + len(pairs))]
    for k, cname in enumerate(names):
        cells = [f"{statistics.fmean(100 * r['iou'][k] for r in runs[v].values()):.1f}" for v in present]
        for a, b in pairs:
            seeds = sorted(set(runs[a]) & set(runs[b]))
            cells.append(fmt_ci(paired_summary([100 * (runs[a][x]["iou"][k] - runs[b][x]["iou"][k]) for x in seeds])))
        lines.append(f"| {cname} | " + " | ".join(cells) + " |")
    return lines


def analysis_table(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Where the offsets act: per OVeNet seed, offset lengths, confidence near/away from boundaries, and where
    S_s beats S_i (band = within 3 px of a label boundary)."""
    lines = ["### Offset analysis per OVeNet seed (val, full-resolution pixels)", "",
             "| run | S_i | S_s | S_f | S_f−S_i bnd | offset median / p90 px | >1 px | F>0.9 band / interior | "
             "S_s right & S_i wrong : reverse, band | interior |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in ("ovenet", "ovenet_long", "zero_offset", "zero_offset_long"):
        for s, r in sorted(runs.get(v, {}).items()):
            a = r.get("analysis")
            if not a:
                continue
            o, px = a["offset_px"], a["pixels"]

            def ratio(where: str) -> str:
                win, loss = px["seed_right_initial_wrong"][where], px["initial_right_seed_wrong"][where]
                return f"{win}:{loss}" + (f" ({win / loss:.2f}x)" if loss else "")

            p90 = "" if o["p90"] is None else f"{o['p90']:.1f}"
            lines.append(f"| {v} {s} | {100 * a['initial']['miou']:.2f} | {100 * a['seed']['miou']:.2f} | "
                         f"{100 * a['final']['miou']:.2f} | "
                         f"{100 * (a['final']['boundary_miou'] - a['initial']['boundary_miou']):+.2f} | "
                         f"{o['median']:.1f} / {p90} | {100 * o['share_over_1px']:.0f}% | "
                         f"{100 * a['confidence_hist_band'][-1]:.0f}% / {100 * a['confidence_hist_interior'][-1]:.0f}% | "
                         f"{ratio('band')} | {ratio('interior')} |")
    return lines


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [v for v in MAIN if v in runs]
    seeds = sorted({s for v in present for s in runs[v]})
    fig, axes = plt.subplots(1, 3 if "ovenet_long" in runs else 2, figsize=(15, 4.5))
    for ax, (metric, label) in zip(axes, METRICS.items()):
        for s in seeds:
            xs = [i for i, v in enumerate(present) if s in runs[v]]
            ax.plot(xs, [100 * runs[present[i]][s][metric] for i in xs], marker="o", label=f"seed {s}")
        means = [statistics.fmean(100 * r[metric] for r in runs[v].values()) for v in present]
        ax.plot(range(len(present)), means, color="black", lw=3, alpha=0.5, label="mean")
        ax.set_xticks(range(len(present)), present, rotation=20)
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(f"{label}, paired by seed")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if "ovenet_long" in runs:
        ax = axes[2]
        arms = [v for v in ("baseline", "ovenet", "baseline_long", "ovenet_long") if v in runs]
        for s in sorted({s for v in ("baseline_long", "ovenet_long") for s in runs.get(v, {})}):
            for pair in (arms[:2], arms[2:]):
                xs = [arms.index(v) for v in pair if s in runs[v]]
                ax.plot(xs, [100 * runs[arms[i]][s]["miou"] for i in xs], marker="o",
                        color=f"C{seeds.index(s) if s in seeds else 9}")
        ax.set_xticks(range(len(arms)), [a.replace("_long", "\n(long)") for a in arms])
        ax.set_ylabel("val mIoU (%)")
        ax.set_title("schedule: main vs long, paired by seed")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="folder of per-run JSON from study.py")
    p.add_argument("--plot", type=Path, help="PNG to write")
    args = p.parse_args()
    runs = load_runs(args.results)
    diffs = differences(runs)
    md = tables(runs, diffs)
    (args.results / "stats.md").write_text(md)
    (args.results / "stats.json").write_text(json.dumps(diffs, indent=1) + "\n")
    if args.plot:
        plot(runs, args.plot)
    print(md)


if __name__ == "__main__":
    main()
