"""A run you can look at: ``ovenet report RUN_DIR`` writes ``RUN_DIR/report/index.html`` and its PNGs.

The page shows the training curves (every loss term, the learning rate, val mIoU over iterations, read from
``train.log``), per-class IoU bars (beside a second run's when given), the row-normalised confusion matrix (from
``eval_val.json`` when ``ovenet eval`` wrote one into the run folder, else from the last validation during
training, ``val_last.json``) and a gallery of val images with ground truth, prediction, offset field and
confidence. ``data.json`` beside the page holds every number the figures plot. Plotting needs matplotlib
(the ``report`` extra); everything else is the run's own files.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, OvenetError, install_command
from .files import write_text

ITER_LINE = re.compile(r"\biter (\d+)/\d+ epoch [0-9.]+ \| (.*?) \| lr ([0-9.eE+-]+) \|")
VAL_LINE = re.compile(r"\bval iter (\d+) \([^)]*\): mIoU ([0-9.]+) pixel acc ([0-9.]+)")
METRIC_FILES = ("eval_val.json", "val_last.json")


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise OvenetError("the run report plots with matplotlib, which is not installed: "
                          + install_command("report")) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """Loss terms and learning rate per logged iteration, val mIoU / pixel accuracy (fractions) per validation.

    A resumed run logs some iterations twice (between the checkpoint and the stop); the later line wins, as its
    weights are the ones that went on.
    """
    train: dict[int, dict[str, float]] = {}
    val: dict[int, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := ITER_LINE.search(line):
            words = m.group(2).split()
            terms = {k: float(v) for k, v in zip(words[::2], words[1::2])}
            train[int(m.group(1))] = {**terms, "lr": float(m.group(3))}
        elif m := VAL_LINE.search(line):
            val[int(m.group(1))] = {"miou": float(m.group(2)) / 100, "pixel_acc": float(m.group(3)) / 100}
    return {"train": dict(sorted(train.items())), "val": dict(sorted(val.items()))}


def read_metrics(run_dir: Path) -> tuple[dict | None, Path | None]:
    """The per-class figures of a run: its ``eval_val.json``, else ``val_last.json``."""
    for name in METRIC_FILES:
        path = run_dir / name
        if path.is_file():
            return json.loads(path.read_text()), path
    return None, None


def normalised_confusion(counts: list[list[int]]) -> np.ndarray:
    """Rows divided by their sums (the share of each ground-truth class predicted as each class); NaN rows for
    classes without ground truth."""
    matrix = np.asarray(counts, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, matrix / totals, np.nan)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, compare: str | Path | None = None,
                 gallery: int = 4, data_root: str | None = None, device: str = "cpu",
                 metrics_path: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``run_dir/report``); returns index.html."""
    plt = require_matplotlib()
    run_dir = Path(run_dir)
    if not (run_dir / "train.log").is_file() and not any((run_dir / n).is_file() for n in METRIC_FILES):
        raise OvenetError(f"{run_dir} is not a run folder (no train.log, eval_val.json or val_last.json); give the "
                          "folder `ovenet train` wrote")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = read_log(run_dir / "train.log") if (run_dir / "train.log").is_file() else {"train": {}, "val": {}}
    if metrics_path is not None:
        metrics, source = json.loads(Path(metrics_path).read_text()), Path(metrics_path)
    else:
        metrics, source = read_metrics(run_dir)
    other, other_source = read_metrics(Path(compare)) if compare is not None else (None, None)
    if compare is not None and other is None:
        raise OvenetError(f"--compare {compare}: no eval_val.json or val_last.json there; evaluate that run first")
    data: dict[str, Any] = {"run_dir": str(run_dir), "curves": curves, "metrics_source": str(source) if source else None}
    sections = [_curves_section(plt, curves, out)]
    if metrics is not None:
        names = metrics.get("class_names") or [f"class_{i}" for i in range(len(metrics["iou"]))]
        data["per_class"] = {"class_names": names, "iou": metrics["iou"],
                             "compare": other["iou"] if other else None, "compare_source": str(other_source or "")}
        sections.append(_per_class_section(plt, names, metrics, other, Path(compare).name if compare else "", out))
        if metrics.get("confusion"):
            matrix = normalised_confusion(metrics["confusion"])
            data["confusion_normalised"] = [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]
            sections.append(_confusion_section(plt, names, matrix, out))
    if gallery > 0:
        shown, note = _gallery(plt, run_dir, gallery, data_root, device, out)
        data["gallery"] = shown
        sections.append(_gallery_section(shown, note))
    write_text(out / "data.json", json.dumps(data, indent=1) + "\n")
    page = write_text(out / "index.html", _page(run_dir, source, sections))
    return page


def _curves_section(plt: Any, curves: dict, out: Path) -> str:
    train, val = curves["train"], curves["val"]
    if not train and not val:
        return "<h2>Training curves</h2><p>train.log has no iteration or validation lines yet.</p>"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    iters = list(train)
    terms = sorted({k for row in train.values() for k in row if k != "lr"})
    for term in terms:
        axes[0].plot(iters, [train[i].get(term, math.nan) for i in iters], label=term, lw=2 if term == "loss" else 1)
    axes[0].set(title="loss terms (mean over each log window)", xlabel="iteration")
    axes[0].legend(fontsize=8)
    axes[1].plot(iters, [train[i]["lr"] for i in iters])
    axes[1].set(title="learning rate", xlabel="iteration")
    axes[2].plot(list(val), [100 * v["miou"] for v in val.values()], "o-")
    axes[2].set(title="val mIoU (%)", xlabel="iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    return '<h2>Training curves</h2><img src="curves.png" alt="training curves">'


def _per_class_section(plt: Any, names: list[str], metrics: dict, other: dict | None, other_name: str,
                       out: Path) -> str:
    iou = [math.nan if v is None else 100 * v for v in metrics["iou"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4))
    x = np.arange(len(names))
    width = 0.4 if other else 0.8
    ax.bar(x - (width / 2 if other else 0), iou, width, label="this run")
    if other:
        ax.bar(x + width / 2, [math.nan if v is None else 100 * v for v in other["iou"]], width, label=other_name)
        ax.legend()
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="IoU (%)", ylim=(0, 100), title="per-class IoU")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "per_class_iou.png", dpi=100)
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(a)}</td>" + (f"<td>{_fmt(b)}</td>" if other else "") + "</tr>"
        for n, a, b in zip(names, metrics["iou"], (other or {}).get("iou") or [None] * len(names)))
    head = "<tr><th>class</th><th>IoU</th>" + (f"<th>{html.escape(other_name)}</th>" if other else "") + "</tr>"
    return (f'<h2>Per-class IoU</h2><p>mIoU {_fmt(metrics.get("miou"))}</p><img src="per_class_iou.png" '
            f'alt="per-class IoU"><table>{head}{rows}</table>')


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _confusion_section(plt: Any, names: list[str], matrix: np.ndarray, out: Path) -> str:
    size = max(5.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="ground truth", title="confusion matrix (rows sum to 1)")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    return '<h2>Confusion matrix</h2><img src="confusion.png" alt="normalised confusion matrix">'


def _gallery(plt: Any, run_dir: Path, count: int, data_root: str | None, device: str, out: Path
             ) -> tuple[list[dict], str]:
    """Up to ``count`` val images through the run's best (else last) checkpoint; a note instead when the
    checkpoint or the data cannot be read (the rest of the report stands)."""
    from . import checkpoint
    from .data import build_dataset
    from .inference import predict
    from .vis import colorize, confidence_to_color, flow_to_color

    ckpt = next((run_dir / n for n in ("best.pth", "last.pth") if (run_dir / n).is_file()), None)
    if ckpt is None:
        return [], "no checkpoint in the run folder yet"
    try:
        model = checkpoint.load(ckpt, device)
        cfg = model.config
        if data_root is not None:
            cfg.data.root = data_root
        dataset = build_dataset(cfg.data, train=False)
    except OvenetError as exc:
        return [], f"gallery skipped: {exc}"
    palette = getattr(dataset, "palette", None)
    ignore = getattr(dataset, "ignore_index", 255)
    shown = []
    for index in range(min(count, len(dataset))):
        try:
            sample = dataset.load(index)
        except DataError as exc:
            shown.append({"index": index, "skipped": str(exc)})
            continue
        result = predict(model, sample["image"], scales=[1.0], flip=False)
        panels = [("image", sample["image"])]
        if "label" in sample and palette:
            panels.append(("ground truth", colorize(sample["label"], palette, ignore)))
        panels.append(("prediction", colorize(result.labels, palette, ignore) if palette else result.labels))
        if result.offsets is not None:
            panels.append(("offsets (hue: direction, saturation: length)", flow_to_color(result.offsets)))
            panels.append(("confidence F", confidence_to_color(result.confidence)))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
        for ax, (title, image) in zip(np.atleast_1d(axes), panels):
            ax.imshow(image)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        name = f"gallery_{index}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        shown.append({"index": index, "name": dataset.samples[index].name if hasattr(dataset, "samples") else str(index),
                      "file": name})
    return shown, f"{ckpt.name}, one scale, no flip"


def _gallery_section(shown: list[dict], note: str) -> str:
    images = "".join(f'<figure><img src="{html.escape(s["file"])}" alt="val image {s["index"]}">'
                     f'<figcaption>{html.escape(str(s["name"]))}</figcaption></figure>' for s in shown if "file" in s)
    return f"<h2>Val gallery</h2><p>{html.escape(note)}</p>{images}"


def _page(run_dir: Path, source: Path | None, sections: list[str]) -> str:
    where = f"per-class figures from {html.escape(source.name)}" if source else "no evaluation yet"
    return ("<!doctype html><html><head><meta charset='utf-8'><title>ovenet report: "
            f"{html.escape(run_dir.name)}</title><style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}"
            "img{max-width:100%}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
            "text-align:right}td:first-child{text-align:left}</style></head><body>"
            f"<h1>ovenet run {html.escape(run_dir.name)}</h1><p>{html.escape(str(run_dir))}; {where}; the numbers "
            "behind every figure are in data.json</p>" + "".join(sections) + "</body></html>\n")


def report_if_possible(run_dir: Path, **options: Any) -> str:
    """What the end of ``train``/``eval`` says about the report: where it is, or why there is none."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"no report page: {install_command('report')}, then ovenet report {run_dir}"
    try:
        return f"report: {build_report(run_dir, **options)}"
    except OvenetError as exc:
        return f"no report page: {exc}"
    except Exception as exc:  # noqa: BLE001  (a finished run must not fail on its pictures)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"no report page ({type(exc).__name__}: {first[:200]}); retry with ovenet report {run_dir} --debug"
