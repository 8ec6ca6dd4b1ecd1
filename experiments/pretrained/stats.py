"""Paired statistics of the pretrained-encoder study (EfficientNet-Lite0 on CamVid): OVeNet vs the baseline and vs
the zero-offset control, ImageNet-pretrained and from scratch, with 95% t intervals over seeds, the offset
analysis near and away from boundaries, the R^2 of a fixed per-position offset field, the val curves, the cost per
iteration and the parameters.

    python experiments/pretrained/stats.py experiments/pretrained/study_pretrained experiments/pretrained/study_scratch \
        --out experiments/pretrained/stats --plot experiments/pretrained/study.png
    # the registered study (issue 26): every control at both heads, and the new numbers beside the old study's
    python experiments/pretrained/stats.py experiments/pretrained/study_registered --registered \
        --old experiments/pretrained/study_design experiments/pretrained/study_pretrained \
        --out experiments/pretrained/stats_registered

Reads the per-run JSON that experiments/camvid/study.py writes; writes <out>.json and <out>.md. Variants of one seed
are paired (same main-body initialisation, same batches in the same order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "camvid"))
from stats import load_runs, paired_summary  # noqa: E402  (the CamVid study's t intervals)

ARMS = {  # regime -> (baseline, OVeNet, zero-offset control)
    "pretrained": ("lite0_baseline", "lite0_ovenet", "lite0_zero_offset"),
    "scratch": ("lite0_scratch_baseline", "lite0_scratch_ovenet", "lite0_scratch_zero_offset"),
    # the design question: logits from the stride-32 features only, the offset head reading strides 4-32
    "pretrained, coarse logits": ("lite0_coarse_baseline", "lite0_coarse_ovenet", "lite0_coarse_zero_offset"),
}
# the cheap alternative to the branch: the offset head on the encoder's own features, against the paper's design
SHARED = ("lite0_shared", (("shared encoder - OVeNet (branch)", "lite0_ovenet"),
                           ("shared encoder - zero-offset control", "lite0_zero_offset"),
                           ("shared encoder - baseline", "lite0_baseline")))
# The registered study: head -> (baseline, OVeNet, {control: variant}, seeds planned)
REGISTERED = {
    "coarse head": ("lite0_coarse_baseline", "lite0_coarse_ovenet",
                    {"zero-offset": "lite0_coarse_zero_offset", "step-size": "lite0_coarse_sem2",
                     "content-free": "lite0_coarse_content_free"}, 5),
    "concat head": ("lite0_baseline", "lite0_ovenet", {"zero-offset": "lite0_zero_offset", "step-size": "lite0_sem2"},
                    3),
}
CONFIGS = {"lite0_baseline": ("camvid_efficientnet_lite0", []), "lite0_ovenet": ("camvid_efficientnet_lite0_ovenet", [])}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def ci(s: dict) -> str:
    if s["n"] < 2:
        return f"{100 * s['mean']:+.2f} (n={s['n']})"
    lo, hi = s["ci95"]
    return f"{100 * s['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] ({s['positive']}/{s['n']} > 0)"


def paired(runs: dict, a: str, b: str, value) -> dict:
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    diffs = [value(runs[a][s]) - value(runs[b][s]) for s in seeds]
    return paired_summary([d for d in diffs if d is not None])


def parameters() -> dict[str, float]:
    from ovenet.config import load_config
    from ovenet.models import build_model

    out = {}
    for name, overrides in (("baseline", ["model.offset.enabled=false"]), ("ovenet", []),
                            ("ovenet, shared encoder", ["model.offset.shared_encoder=true"])):
        cfg = load_config("camvid_efficientnet_lite0_ovenet", ["model.pretrained=null", *overrides])
        out[name] = sum(p.numel() for p in build_model(cfg.model).parameters()) / 1e6
    return out


def region(run: dict, where: str, key: str) -> float | None:
    a = run.get("analysis") or {}
    return (a.get("by_region") or {}).get(where, {}).get(key)


def field_r2(run: dict) -> float | None:
    """The share of the offsets' variance that one fixed per-position field explains (analyze.py's offset_field)."""
    return ((run.get("analysis") or {}).get("offset_field") or {}).get("r2")


def r2_cell(rs: list[dict]) -> str:
    values = [v for v in map(field_r2, rs) if v is not None]
    if not values:
        return ""
    return f"{statistics.fmean(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def field_rms_cell(rs: list[dict]) -> str:
    """The fixed field's size (rms over positions, offset-map pixels): R^2 is scale-free, so a head that barely
    moves its seeds can still have a high R^2 (its tiny offsets follow the padding at the borders)."""
    values = [((r.get("analysis") or {}).get("offset_field") or {}).get("field_rms_px") for r in rs]
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.2f}" if values else ""


def mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    return f"{pct(statistics.fmean(values))} ± {pct(statistics.stdev(values)) if len(values) > 1 else '-'}"


def registered_tables(runs: dict, old: dict) -> tuple[str, dict]:
    """The registered study: per head, the arms (seeds so far, mIoU, S_f - S_i, the offsets' fixed-field R^2), the
    paired differences OVeNet - each control, each control - baseline and OVeNet - baseline, and the same variants
    in the old study (``old``) beside the new, paired by seed. Works on whatever runs exist."""
    lines, summary = [], {}
    commits: dict[str, int] = {}
    for r in (r for by_seed in runs.values() for r in by_seed.values()):
        commits[r.get("commit") or "unrecorded"] = commits.get(r.get("commit") or "unrecorded", 0) + 1
    if commits:  # a study over several sittings: one code version, or say which runs differ
        lines += ["Runs by code version (commit): " + ", ".join(f"{c} ({n})" for c, n in sorted(commits.items())), ""]
    for head, (base, ove, controls, planned) in REGISTERED.items():
        arms = {"baseline": base, "OVeNet": ove, **controls}
        if not any(v in runs for v in arms.values()):
            continue
        summary[head] = {"seeds": {role: sorted(runs.get(v, {})) for role, v in arms.items()}}
        lines += [f"### {head}", "", "| arm | variant | seeds | val mIoU | boundary mIoU | S_f - S_i | "
                  "offset R^2 of a fixed field | its rms (offset-map px) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for role, v in arms.items():
            rs = list(runs.get(v, {}).values())
            fused = [r["analysis"]["final"]["miou"] - r["analysis"]["initial"]["miou"] for r in rs
                     if r.get("analysis")]
            lines.append(f"| {role} | {v} | {len(rs)}/{planned} | {mean_sd([r['miou'] for r in rs])} | "
                         f"{mean_sd([r['boundary_miou'] for r in rs])} | {mean_sd(fused)} | {r2_cell(rs)} | "
                         f"{field_rms_cell(rs)} |")
        pairs = [(f"OVeNet - {c}", ove, v) for c, v in controls.items()]
        pairs += [(f"{c} - baseline", v, base) for c, v in controls.items()] + [("OVeNet - baseline", ove, base)]
        lines += ["", "| paired difference | val mIoU (points) | boundary mIoU (points) |", "|---|---:|---:|"]
        for label, a, b in pairs:
            m, bm = paired(runs, a, b, lambda r: r["miou"]), paired(runs, a, b, lambda r: r["boundary_miou"])
            summary[head][label] = {"miou": m, "boundary_miou": bm}
            if m["n"]:
                lines.append(f"| {label} | {ci(m)} | {ci(bm)} |")
        lines += ["", "Beside the old study (same variant and seed; new - old is paired by seed):", "",
                  "| arm | old val mIoU | new val mIoU | new - old (points) | old boundary | new boundary |",
                  "|---|---:|---:|---:|---:|---:|"]
        for role, v in arms.items():
            if v not in old or v not in runs:
                continue
            change = paired({"new": runs[v], "old": old[v]}, "new", "old", lambda r: r["miou"])
            summary[head][f"{role}: new - old"] = change
            o, n = list(old[v].values()), list(runs[v].values())
            lines.append(f"| {role} | {mean_sd([r['miou'] for r in o])} (n={len(o)}) | "
                         f"{mean_sd([r['miou'] for r in n])} (n={len(n)}) | {ci(change) if change['n'] else ''} | "
                         f"{mean_sd([r['boundary_miou'] for r in o])} | {mean_sd([r['boundary_miou'] for r in n])} |")
        lines.append("")
    return "\n".join(lines), summary


def tables(runs: dict) -> tuple[str, dict]:
    lines, summary = [], {}
    for regime, (base, ove, zero) in ARMS.items():
        if not all(v in runs for v in (base, ove)):
            continue
        summary[regime] = {}
        lines += [f"### {regime}", "", "| comparison | val mIoU (points) | boundary mIoU (points) |", "|---|---:|---:|"]
        for label, a, b in ((f"OVeNet - baseline", ove, base), (f"OVeNet - zero-offset control", ove, zero),
                            (f"zero-offset control - baseline", zero, base)):
            if a not in runs or b not in runs:
                continue
            m = paired(runs, a, b, lambda r: r["miou"])
            bm = paired(runs, a, b, lambda r: r["boundary_miou"])
            summary[regime][label] = {"miou": m, "boundary_miou": bm}
            lines.append(f"| {label} | {ci(m)} | {ci(bm)} |")
        sf_si = paired_summary([r["analysis"]["final"]["miou"] - r["analysis"]["initial"]["miou"]
                                for r in runs[ove].values() if r.get("analysis")])
        summary[regime]["S_f - S_i (OVeNet)"] = sf_si
        lines += [f"| S_f - S_i within OVeNet | {ci(sf_si)} | |", ""]
        lines += ["| variant | seeds | val mIoU | boundary mIoU | s / iteration | offset px band / interior | "
                  "confidence band / interior | offset R^2 of a fixed field |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v in (base, ove, zero):
            rs = list(runs.get(v, {}).values())
            if not rs:
                continue
            mean = statistics.fmean
            sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
            mi, bi = [r["miou"] for r in rs], [r["boundary_miou"] for r in rs]
            per_iter = mean(r["train_s"] / r["iters"] for r in rs)
            off = [(region(r, "band", "offset_px_mean"), region(r, "interior", "offset_px_mean")) for r in rs]
            con = [(region(r, "band", "confidence_mean"), region(r, "interior", "confidence_mean")) for r in rs]
            off_s = (f"{mean(o[0] for o in off):.1f} / {mean(o[1] for o in off):.1f}"
                     if off and all(o[0] is not None for o in off) else "")
            con_s = (f"{mean(c[0] for c in con):.3f} / {mean(c[1] for c in con):.3f}"
                     if con and all(c[0] is not None for c in con) else "")
            lines.append(f"| {v} | {len(rs)} | {pct(mean(mi))} ± {pct(sd(mi))} | {pct(mean(bi))} ± {pct(sd(bi))} | "
                         f"{per_iter:.2f} | {off_s} | {con_s} | {r2_cell(rs)} |")
        lines += ["", "Val mIoU over iterations (mean over seeds; the last point is the scored checkpoint):", "",
                  "| variant | " + " | ".join(str(p[0]) for p in _curve(runs, base)) + " |",
                  "|---|" + "---:|" * len(_curve(runs, base))]
        for v in (base, ove, zero):
            if v in runs:
                lines.append(f"| {v} | " + " | ".join(pct(p[1]) for p in _curve(runs, v)) + " |")
        lines.append("")
    shared, comparisons = SHARED
    if shared in runs:
        summary["shared encoder"] = {}
        lines += ["### pretrained, shared encoder (no branch)", "",
                  "| comparison | val mIoU (points) | boundary mIoU (points) |", "|---|---:|---:|"]
        for label, other in comparisons:
            m = paired(runs, shared, other, lambda r: r["miou"])
            bm = paired(runs, shared, other, lambda r: r["boundary_miou"])
            summary["shared encoder"][label] = {"miou": m, "boundary_miou": bm}
            lines.append(f"| {label} | {ci(m)} | {ci(bm)} |")
        sf_si = paired_summary([r["analysis"]["final"]["miou"] - r["analysis"]["initial"]["miou"]
                                for r in runs[shared].values() if r.get("analysis")])
        summary["shared encoder"]["S_f - S_i"] = sf_si
        lines += [f"| S_f - S_i within the shared-encoder OVeNet | {ci(sf_si)} | |", ""]
    return "\n".join(lines), summary


def _curve(runs: dict, variant: str) -> list[tuple[int, float]]:
    curves = [r.get("val_curve") or [] for r in runs.get(variant, {}).values()]
    if not curves or not curves[0]:
        return []
    iters = [p[0] for p in curves[0]]
    return [(it, statistics.fmean(c[i][1] for c in curves if len(c) > i)) for i, it in enumerate(iters)]


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ARMS), figsize=(6 * len(ARMS), 4.5))
    for ax, (regime, arms) in zip(axes, ARMS.items()):
        for v, style in zip(arms, ("-", "-", "--")):
            for s, r in sorted(runs.get(v, {}).items()):
                curve = r.get("val_curve") or []
                ax.plot([p[0] for p in curve], [100 * p[1] for p in curve], style, alpha=0.35,
                        color={arms[0]: "C0", arms[1]: "C3", arms[2]: "C2"}[v])
            mean = _curve(runs, v)
            ax.plot([p[0] for p in mean], [100 * p[1] for p in mean], style, lw=2.5, label=v,
                    color={arms[0]: "C0", arms[1]: "C3", arms[2]: "C2"}[v])
        ax.set_title(f"EfficientNet-Lite0, {regime}: val mIoU (thin: seeds)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("val mIoU (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merged(folders: list[Path]) -> dict:
    runs: dict = {}
    for folder in folders:
        for variant, by_seed in load_runs(folder).items():
            runs.setdefault(variant, {}).update(by_seed)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    p.add_argument("--plot", type=Path)
    p.add_argument("--registered", action="store_true",
                   help="the registered study's tables (every control at both heads) instead of the old study's")
    p.add_argument("--old", type=Path, nargs="+", default=[], help="with --registered: the old study's folders")
    args = p.parse_args()
    runs, old = merged(args.folders), merged(args.old)
    if args.registered:
        text, summary = registered_tables(runs, old)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"summary": summary}, indent=1) + "\n")
        print(text)
        return
    text, summary = tables(runs)
    params = parameters()
    text += "\nParameters (11 classes): " + ", ".join(f"{k} {v:.2f} M" for k, v in params.items()) + "\n"
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"summary": summary, "parameters_m": params}, indent=1) + "\n")
    if args.plot:
        plot(runs, args.plot)
    print(text)


if __name__ == "__main__":
    main()
