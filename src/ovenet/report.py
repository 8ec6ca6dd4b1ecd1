"""A run you can look at: ``ovenet report RUN_DIR`` writes ``RUN_DIR/report/index.html`` and its PNGs.

The page opens with what the run is (model, data and the val set's size, iterations done of planned, best and
last val mIoU, which evaluation the per-class figures come from, the date written), then shows the training
curves (every loss term and val mIoU from ``train.log``; the learning rate of every iteration from the run's
scheduler, rebuilt from its config), per-class IoU bars, the row-normalised confusion matrix (from
``eval_val.json`` when ``ovenet eval`` wrote one into the run folder, else from the last validation during
training, ``val_last.json``) and a gallery of val images spread over the val set with ground truth, prediction,
offset field and confidence. ``--compare`` overlays a second run's curves, sets its IoUs beside, and says whether
both were scored on the same val images. ``data.json`` beside the page holds every number the figures plot.
Plotting needs matplotlib (the ``report`` extra); everything else is the run's own files.
"""

from __future__ import annotations

import copy
import html
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, TrainConfig, load_config
from .errors import DataError, OvenetError, install_command
from .files import replaced, write_text

ITER_LINE = re.compile(r"\biter (\d+)/(\d+) epoch [0-9.]+ \| (.*?) \| lr ([0-9.eE+-]+) \|")
VAL_LINE = re.compile(r"\bval iter (\d+) \([^)]*\): mIoU ([0-9.]+) pixel acc ([0-9.]+)")
# train's start line: "run folder ... | hrnetv2_w18 ocr offset=True 9.64M params | 367 train samples, ..."
MODEL_LINE = re.compile(r"\| (\S+) (\S+) offset=(\w+) ([0-9.]+)M params \| (\d+) train samples")
METRIC_FILES = ("eval_val.json", "val_last.json")

# Figures are saved at DPI and at most WIDTH_IN wide, so the page (max 1400 px) shows them at their own size:
# 11-12 pt text is then 15-17 px on screen.
DPI = 100
WIDTH_IN = 13.0
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 12}
CONFIDENCE_TICKS = (0.0, 0.5, 1.0)


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise OvenetError("the run report plots with matplotlib, which is not installed: "
                          + install_command("report")) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: Path) -> dict[str, Any]:
    """Loss terms and learning rate per logged iteration, val mIoU / pixel accuracy (fractions) per validation,
    and the iterations planned (``total_iters``, from the latest line).

    A resumed run logs some iterations twice (between the checkpoint and the stop); the later line wins, as its
    weights are the ones that went on.
    """
    train: dict[int, dict[str, float]] = {}
    val: dict[int, dict[str, float]] = {}
    total = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := ITER_LINE.search(line):
            words = m.group(3).split()
            terms = {k: float(v) for k, v in zip(words[::2], words[1::2])}
            train[int(m.group(1))] = {**terms, "lr": float(m.group(4))}
            total = int(m.group(2))
        elif m := VAL_LINE.search(line):
            val[int(m.group(1))] = {"miou": float(m.group(2)) / 100, "pixel_acc": float(m.group(3)) / 100}
    return {"train": dict(sorted(train.items())), "val": dict(sorted(val.items())), "total_iters": total}


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


def lr_schedule(train_cfg: TrainConfig, total_iters: int) -> list[float]:
    """The learning rate of iterations 1..``total_iters`` (index i: iteration i + 1): the run's scheduler rebuilt
    from its config and stepped as training steps it (the log's lr is the one *after* each step, so its last
    point is the schedule's end, 0, which no iteration trained with)."""
    import torch

    from .engine.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train_cfg.lr)
    scheduler = build_scheduler(optimizer, total_iters, train_cfg.poly_power, train_cfg.warmup_iters)
    rates = []
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no optimizer steps here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(total_iters):
            rates.append(scheduler.get_last_lr()[0])
            scheduler.step()
    return rates


def spread_indices(count: int, total: int) -> list[int]:
    """``count`` indices evenly spaced over ``range(total)``, first and last included (consecutive frames of a
    video look alike: the first N would show one scene N times)."""
    count = min(count, total)
    if count <= 0:
        return []
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


@dataclass
class RunFacts:
    """What a run folder says about itself: config, log, the per-class figures and where they come from."""

    run_dir: Path
    cfg: Config | None
    curves: dict[str, Any]
    metrics: dict | None
    source: Path | None
    model_line: dict[str, str] | None

    def val_set(self) -> dict[str, Any]:
        """The val set the per-class figures were scored on: dataset, split, root, images, sample digest."""
        m, data = self.metrics or {}, self.cfg.data if self.cfg is not None else None
        return {"dataset": m.get("dataset") or (data.name if data else None),
                "split": m.get("split") or (data.val_split if data else None),
                "root": m.get("data_root") or (data.root if data else None), "num_images": m.get("num_images"),
                "samples_digest": m.get("samples_digest")}


def read_run(run_dir: Path, metrics_path: str | Path | None = None) -> RunFacts:
    cfg = None
    if (run_dir / "config.yaml").is_file():
        try:
            cfg = load_config(run_dir / "config.yaml")
        except OvenetError:
            cfg = None  # e.g. a config of a newer ovenet: the header says "not recorded" where it needs it
    log = run_dir / "train.log"
    curves = read_log(log) if log.is_file() else {"train": {}, "val": {}, "total_iters": None}
    if metrics_path is not None:
        metrics, source = json.loads(Path(metrics_path).read_text()), Path(metrics_path)
    else:
        metrics, source = read_metrics(run_dir)
    model_line = None
    if log.is_file():
        for m in MODEL_LINE.finditer(log.read_text(encoding="utf-8", errors="replace")):
            model_line = {"network": m.group(1), "head": m.group(2), "offset": m.group(3), "params_m": m.group(4),
                          "train_samples": m.group(5)}
    return RunFacts(run_dir, cfg, curves, metrics, source, model_line)


def compare_val_sets(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """("same" | "different" | "unknown", why): were two runs' per-class figures scored on the same images?"""
    if a["samples_digest"] and b["samples_digest"]:
        if a["samples_digest"] == b["samples_digest"] and a["num_images"] == b["num_images"]:
            return "same", f"the same {a['num_images']} val images (sample names digest {a['samples_digest']})"
        return "different", (f"different val images: {a['num_images']} (digest {a['samples_digest']}) vs "
                             f"{b['num_images']} (digest {b['samples_digest']})")
    if a["num_images"] is not None and b["num_images"] is not None and a["num_images"] != b["num_images"]:
        return "different", f"different val sets: {a['num_images']} vs {b['num_images']} images"
    if None not in (a["dataset"], b["dataset"]) and (a["dataset"], a["split"]) != (b["dataset"], b["split"]):
        return "different", (f"different val sets: {a['dataset']} {a['split']} vs {b['dataset']} {b['split']}")
    return "unknown", ("cannot tell whether both were scored on the same val images (one result was written "
                       "before ovenet recorded them): run `ovenet eval` on both")


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, compare: str | Path | None = None,
                 gallery: int = 4, data_root: str | None = None, device: str = "cpu",
                 metrics_path: str | Path | None = None, warn: Callable[[str], None] | None = None,
                 model: Any = None) -> Path:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``run_dir/report``); returns index.html.

    ``warn`` receives what the reader must not miss (a ``compare`` run scored on other val images); the page
    shows it too. ``model``: a module to load the gallery's checkpoint into (a copy of it), for a network of the
    user's own."""
    plt = require_matplotlib()
    run_dir = Path(run_dir)
    if not (run_dir / "train.log").is_file() and not any((run_dir / n).is_file() for n in METRIC_FILES):
        raise OvenetError(f"{run_dir} is not a run folder (no train.log, eval_val.json or val_last.json); give the "
                          "folder `ovenet train` wrote")
    run = read_run(run_dir, metrics_path)
    other = read_run(Path(compare)) if compare is not None else None
    if other is not None and other.metrics is None:
        raise OvenetError(f"--compare {compare}: no eval_val.json or val_last.json there; evaluate that run first")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"run_dir": str(run_dir), "header": header_facts(run),
                            "curves": {k: run.curves[k] for k in ("train", "val")},
                            "metrics_source": str(run.source) if run.source else None}
    sections, warnings_shown = [], []
    if other is not None:
        verdict, why = compare_val_sets(run.val_set(), other.val_set())
        data["compare"] = {"run_dir": str(other.run_dir), "val_sets": [run.val_set(), other.val_set()],
                           "same_val_set": verdict, "why": why,
                           "curves": {k: other.curves[k] for k in ("train", "val")}}
        if verdict != "same":
            warnings_shown.append(f"--compare {other.run_dir}: {why}; its per-class IoUs are not comparable "
                                  "number for number" if verdict == "different" else f"--compare: {why}")
        ours, theirs = (run.metrics or {}).get("class_names"), other.metrics.get("class_names")
        if ours and theirs and ours != theirs:
            warnings_shown.append(f"--compare {other.run_dir}: its classes are not this run's ({len(theirs)} vs "
                                  f"{len(ours)}, first {theirs[0]!r} vs {ours[0]!r}); the bars pair them by index")
        sections.append(_compare_section(run, other, verdict, why))
    with plt.rc_context(STYLE):
        sections.append(_curves_section(plt, run, other, out, data))
        if run.metrics is not None:
            sections += _metric_sections(plt, run, other, out, data)
        if gallery > 0:
            shown, note, data["classes"] = _gallery(plt, run_dir, gallery, data_root, device, out, model)
            data["gallery"] = shown
            sections.append(_gallery_section(shown, note))
    data["warnings"] = warnings_shown
    write_text(out / "data.json", json.dumps(data, indent=1) + "\n")
    page = write_text(out / "index.html", _page(run, data.get("classes"), data["header"], warnings_shown, sections))
    for message in warnings_shown:
        if warn is not None:
            warn(message)
    return page


def header_facts(run: RunFacts) -> dict[str, Any]:
    """The page's header, as data: model, data, iterations, best vs last val mIoU, the figures' source, date."""
    cfg, model_line, val = run.cfg, run.model_line or {}, run.curves["val"]
    facts: dict[str, Any] = {"run": run.run_dir.name, "folder": str(run.run_dir.resolve())}
    if cfg is not None:
        facts["model"] = {"network": cfg.model.network, "head": cfg.model.head,
                          "method": "OVeNet (offset head)" if cfg.model.offset.enabled else "baseline (no offset head)",
                          "params_m": float(model_line["params_m"]) if "params_m" in model_line else None}
        facts["data"] = {"dataset": cfg.data.name, "root": cfg.data.root, "train_split": cfg.data.train_split,
                         "val_split": cfg.data.val_split}
    facts["val_images"] = run.val_set()["num_images"]
    done = max(run.curves["train"], default=None)
    facts["iterations"] = {"done": done, "planned": run.curves["total_iters"]}
    if val:
        best = max(val, key=lambda i: (val[i]["miou"], -i))  # the first of equal bests, as best.pth keeps it
        last = max(val)
        facts["best_val"] = {"iteration": best, "miou": val[best]["miou"]}
        facts["last_val"] = {"iteration": last, "miou": val[last]["miou"]}
    facts["figures_from"] = _figures_source(run)
    facts["written"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return facts


def _figures_source(run: RunFacts) -> str | None:
    m = run.metrics
    if m is None or run.source is None:
        return None
    images = f"{m['num_images']} images" if m.get("num_images") is not None else "number of images not recorded"
    if "eval" in m:
        e = m["eval"]
        return (f"{run.source.name}: `ovenet eval` of {Path(m.get('checkpoint', '?')).name} on {m.get('split')}, "
                f"{images}, mode {e.get('mode')}, scales {e.get('scales')}, flip {e.get('flip')}")
    return f"{run.source.name}: the validation at iteration {m.get('iteration')}, {images}, whole image, one scale"


def _header_html(header: dict[str, Any], warnings_shown: list[str]) -> str:
    def row(name: str, value: str) -> str:
        return f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"

    rows = [row("run", f"{header['run']} ({header['folder']})")]
    if "model" in header:
        m = header["model"]
        params = f", {m['params_m']:.2f}M parameters" if m["params_m"] is not None else ""
        rows.append(row("model", f"{m['network']}, {m['head']} head, {m['method']}{params}"))
        d = header["data"]
        where = "" if d["dataset"] == "synthetic" else f" at {d['root']}"  # synthetic scenes have no files
        rows.append(row("data", f"{d['dataset']}{where}; train split {d['train_split']}, val split "
                                f"{d['val_split']}"))
    images = header["val_images"]
    rows.append(row("val set", f"{images} images" if images is not None else "size not recorded"))
    it = header["iterations"]
    rows.append(row("iterations", f"{it['done'] if it['done'] is not None else 'none logged'} of "
                                  f"{it['planned'] if it['planned'] is not None else '?'} planned"))
    if "best_val" in header:
        best, last = header["best_val"], header["last_val"]
        rows.append(row("val mIoU", f"best {100 * best['miou']:.2f} at iteration {best['iteration']} (best.pth); "
                                    f"last {100 * last['miou']:.2f} at iteration {last['iteration']} (last.pth, "
                                    "the curve's last point)"))
    rows.append(row("per-class figures", header["figures_from"] or "no evaluation yet"))
    rows.append(row("written", header["written"]))
    alerts = "".join(f'<p class="warning">Warning: {html.escape(w)}</p>' for w in warnings_shown)
    return f'<table class="header">{"".join(rows)}</table>{alerts}'


def _compare_section(run: RunFacts, other: RunFacts, verdict: str, why: str) -> str:
    fields = ("dataset", "split", "root", "num_images", "samples_digest")
    sets = [run.val_set(), other.val_set()]
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(r.run_dir.name)}</th>" for r in (run, other)) + "</tr>"
    rows = "".join(f"<tr><td>{f.replace('_', ' ')}</td>"
                   + "".join(f"<td>{html.escape(str(s[f]) if s[f] is not None else 'not recorded')}</td>"
                             for s in sets) + "</tr>" for f in fields)
    cls = "ok" if verdict == "same" else "warning"
    return (f"<h2>Compared with {html.escape(other.run_dir.name)}</h2><p>Val sets of the per-class figures:</p>"
            f'<table>{head}{rows}</table><p class="{cls}">{html.escape(why[0].upper() + why[1:])}.</p>')


def _curves_section(plt: Any, run: RunFacts, other: RunFacts | None, out: Path, data: dict) -> str:
    train, val = run.curves["train"], run.curves["val"]
    total = run.curves["total_iters"]
    rates = lr_schedule(run.cfg.train, total) if run.cfg is not None and total else []
    data["lr_schedule"] = {"first_iteration": 1, "lr": rates}  # one rate per iteration: a list, not pairs
    if not train and not val:
        return "<h2>Training curves</h2><p>train.log has no iteration or validation lines yet.</p>"
    fig, axes = plt.subplots(1, 3, figsize=(WIDTH_IN, 4.2))
    iters = list(train)
    terms = sorted({k for row in train.values() for k in row if k != "lr"})
    for term in terms:
        axes[0].plot(iters, [train[i].get(term, math.nan) for i in iters], label=term, lw=2 if term == "loss" else 1)
    if other is not None and other.curves["train"]:
        theirs = other.curves["train"]
        axes[0].plot(list(theirs), [r.get("loss", math.nan) for r in theirs.values()], "k--", lw=2,
                     label=f"{other.run_dir.name}: loss")
    axes[0].set(title="loss (mean per log window)", xlabel="iteration")
    axes[0].legend(fontsize=9)
    axes[1].plot(range(1, len(rates) + 1), rates)
    axes[1].set(title="learning rate (schedule)", xlabel="iteration", ylim=(0, None))
    axes[2].plot(list(val), [100 * v["miou"] for v in val.values()], "o-", label=run.run_dir.name)
    if other is not None and other.curves["val"]:
        theirs = other.curves["val"]
        axes[2].plot(list(theirs), [100 * v["miou"] for v in theirs.values()], "s--", label=other.run_dir.name)
    if "best_val" in data["header"]:
        best = data["header"]["best_val"]
        axes[2].plot([best["iteration"]], [100 * best["miou"]], "*", ms=14, color="C3", label="best")
    axes[2].set(title="val mIoU (%)", xlabel="iteration")
    if val:
        axes[2].legend(fontsize=9)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with replaced(out / "curves.png") as tmp:  # whole or not at all, like every output
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    note = ("Learning rate: the scheduler rebuilt from config.yaml, the rate each iteration trained with."
            if rates else "Learning rate: no config.yaml or planned iterations to rebuild the schedule from.")
    if other is not None and not other.curves["train"] and not other.curves["val"]:
        note += f" {other.run_dir.name} has no train.log: no curves of it to overlay."
    return f'<h2>Training curves</h2><p>{note}</p><img src="curves.png" alt="training curves">'


def _metric_sections(plt: Any, run: RunFacts, other: RunFacts | None, out: Path, data: dict) -> list[str]:
    metrics = run.metrics
    names = metrics.get("class_names") or [f"class_{i}" for i in range(len(metrics["iou"]))]
    data["per_class"] = {"class_names": names, "iou": metrics["iou"],
                         "compare": other.metrics["iou"] if other else None,
                         "compare_source": str(other.source) if other else ""}
    sections = [_per_class_section(plt, names, metrics, other.metrics if other else None,
                                   (run.run_dir.name, other.run_dir.name if other else ""), out,
                                   data["header"]["figures_from"])]
    if metrics.get("confusion"):
        matrix = normalised_confusion(metrics["confusion"])
        data["confusion_normalised"] = [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]
        sections.append(_confusion_section(plt, names, matrix, out))
    return sections


def _per_class_section(plt: Any, names: list[str], metrics: dict, other: dict | None, run_names: tuple[str, str],
                       out: Path, source: str | None) -> str:
    # Horizontal bars: the class names stay readable for 11 classes and for 150.
    iou = [math.nan if v is None else 100 * v for v in metrics["iou"]]
    per_class = 0.5 if other else 0.3
    fig, ax = plt.subplots(figsize=(10, max(3.0, per_class * len(names) + 1.3)))
    y = np.arange(len(names))
    height = 0.4 if other else 0.8
    this_name, other_name = run_names
    ax.barh(y - (height / 2 if other else 0), iou, height, label=this_name)
    if other:
        theirs = [math.nan if v is None else 100 * v for v in other["iou"]][: len(names)]
        ax.barh(y[: len(theirs)] + height / 2, theirs, height, label=other_name)
        ax.legend(loc="lower right")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(xlabel="IoU (%)", xlim=(0, 100), title="per-class IoU")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with replaced(out / "per_class_iou.png") as tmp:  # whole or not at all, like every output
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(a)}</td>" + (f"<td>{_fmt(b)}</td>" if other else "") + "</tr>"
        for n, a, b in zip(names, metrics["iou"], (other or {}).get("iou") or [None] * len(names)))
    head = ("<tr><th>class</th>" + (f"<th>{html.escape(this_name)}</th><th>{html.escape(other_name)}</th>"
                                     if other else "<th>IoU</th>") + "</tr>")
    return (f'<h2>Per-class IoU</h2><p>mIoU {_fmt(metrics.get("miou"))}; from {html.escape(source or "?")}</p>'
            f'<img src="per_class_iou.png" alt="per-class IoU"><table>{head}{rows}</table>')


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _confusion_section(plt: Any, names: list[str], matrix: np.ndarray, out: Path) -> str:
    size = min(WIDTH_IN - 1, max(6.0, 0.4 * len(names) + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    labels = 10 if len(names) <= 30 else 6
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=labels)
    ax.set_yticks(range(len(names)), names, fontsize=labels)
    ax.set(xlabel="predicted", ylabel="ground truth", title="confusion matrix (rows sum to 1)")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    with replaced(out / "confusion.png") as tmp:  # whole or not at all, like every output
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return '<h2>Confusion matrix</h2><img src="confusion.png" alt="normalised confusion matrix">'


def _gallery(plt: Any, run_dir: Path, count: int, data_root: str | None, device: str, out: Path,
             own_model: Any = None) -> tuple[list[dict], str, dict | None]:
    """Up to ``count`` val images spread over the val set, through the run's best (else last) checkpoint; a
    note instead when the checkpoint or the data cannot be read (the rest of the report stands). Also returns
    the val set's class names and palette (the page's class legend), None without a dataset. ``own_model``: a
    module of the user's own that the checkpoint's weights belong to."""
    from . import checkpoint
    from .data import build_dataset
    from .inference import predict

    ckpt = next((run_dir / n for n in ("best.pth", "last.pth") if (run_dir / n).is_file()), None)
    if ckpt is None:
        return [], "no checkpoint in the run folder yet", None
    try:
        model = checkpoint.load(ckpt, device, model=None if own_model is None else copy.deepcopy(own_model))
        cfg = model.config
        if data_root is not None:
            cfg.data.root = data_root
        dataset = build_dataset(cfg.data, train=False)
    except OvenetError as exc:
        return [], f"gallery skipped: {exc}", None
    classes = {"palette": getattr(dataset, "palette", None), "ignore": getattr(dataset, "ignore_index", 255),
               "names": list(getattr(dataset, "class_names", None) or [])}
    indices = spread_indices(count, len(dataset))
    shown = []
    for index in indices:
        try:
            sample = dataset.load(index)
        except DataError as exc:
            shown.append({"index": index, "skipped": str(exc)})
            continue
        result = predict(model, sample["image"], scales=[1.0], flip=False)
        name = f"gallery_{index}.png"
        ticks = _gallery_figure(plt, sample, result, classes, out / name)
        shown.append({"index": index, "name": dataset.samples[index].name if hasattr(dataset, "samples") else str(index),
                      "file": name, "confidence_ticks": ticks})
    note = (f"{len(indices)} of {len(dataset)} val images, evenly spaced (indices {indices}); {ckpt.name}, one "
            "scale, no flip")
    return shown, note, {"names": classes["names"], "palette": [list(map(int, c)) for c in classes["palette"] or []]}


def _gallery_figure(plt: Any, sample: dict, result: Any, classes: dict, path: Path) -> list[float] | None:
    """One val image in a row: image, ground truth, prediction, offsets (with their colour wheel), confidence
    (with its colour bar), and a legend of the classes in the ground truth or the prediction. Returns the
    ticks drawn on the confidence colour bar (None without one)."""
    from matplotlib.patches import Patch

    from .vis import colorize, flow_to_color, with_key

    palette, ignore, names = classes["palette"], classes["ignore"], classes["names"]
    panels: list[tuple[str, Any]] = [("image", sample["image"])]
    if "label" in sample and palette:
        panels.append(("ground truth", colorize(sample["label"], palette, ignore)))
    panels.append(("prediction", colorize(result.labels, palette, ignore) if palette else result.labels))
    if result.offsets is not None:
        panels.append(("offsets\n(hue: direction, saturation: length)",
                       with_key(flow_to_color(result.offsets), "offsets")))
        panels.append(("confidence F", None))
    present = set(np.unique(np.asarray(result.labels)).tolist())
    if "label" in sample:
        present |= set(np.unique(np.asarray(sample["label"])).tolist())
    handles = [Patch(facecolor=np.asarray(palette[c]) / 255, edgecolor="0.5",
                     label=names[c] if c < len(names) else f"class_{c}")
               for c in sorted(present) if palette and 0 <= c < len(palette) and c != ignore]
    rows = math.ceil(len(handles) / 8)
    columns = math.ceil(len(handles) / rows) if handles else 1
    # matplotlib fills a legend column by column: reorder so that it reads row by row, in class order
    handles = [handles[r * columns + c] for c in range(columns) for r in range(rows) if r * columns + c < len(handles)]
    legend_in = 0.3 * rows + 0.2 if handles else 0.01
    image_in = sample["image"].shape[0] / sample["image"].shape[1] * WIDTH_IN / len(panels) + 0.7  # + titles
    fig = plt.figure(figsize=(WIDTH_IN, image_in + legend_in))
    ticks = None
    grid = fig.add_gridspec(2, len(panels), height_ratios=[image_in, legend_in])
    for column, (title, image) in enumerate(panels):
        ax = fig.add_subplot(grid[0, column])
        if image is None:
            conf = ax.imshow(np.asarray(result.confidence, dtype=np.float64), cmap="viridis", vmin=0, vmax=1)
            bar = fig.colorbar(conf, ax=ax, ticks=list(CONFIDENCE_TICKS), fraction=0.046, pad=0.03)
            ticks = [float(t) for t in bar.get_ticks()]
        else:
            ax.imshow(image)
        ax.set_title(title)
        ax.axis("off")
    key = fig.add_subplot(grid[1, :])
    key.axis("off")
    if handles:
        key.legend(handles=handles, loc="center", ncol=min(len(handles), columns), frameon=False)
    fig.tight_layout()
    with replaced(path) as tmp:  # whole or not at all, like every output
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return ticks


def _gallery_section(shown: list[dict], note: str) -> str:
    images = "".join(f'<figure><figcaption>{html.escape(str(s["name"]))} (val index {s["index"]})</figcaption>'
                     f'<img src="{html.escape(s["file"])}" alt="val image {s["index"]}"></figure>'
                     for s in shown if "file" in s)
    skipped = "".join(f"<p>val index {s['index']} skipped: {html.escape(s['skipped'])}</p>"
                      for s in shown if "skipped" in s)
    return f"<h2>Val gallery</h2><p>{html.escape(note)}</p>{skipped}{images}"


def _class_legend(names: list[str], palette: Any) -> str:
    swatches = "".join(
        f'<span class="swatch"><i style="background:rgb({int(c[0])},{int(c[1])},{int(c[2])})"></i>'
        f"{html.escape(n)}</span>" for n, c in zip(names, palette))
    return f'<div class="legend">{swatches}</div>'


STYLE_SHEET = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}img{max-width:100%}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
    "text-align:right}td:first-child{text-align:left}table.header th{text-align:left;vertical-align:top}"
    "table.header td{text-align:left}.warning{background:#fde2e1;border-left:6px solid #c0392b;padding:0.6em 1em;"
    "font-weight:bold}.ok{background:#e3f4e1;border-left:6px solid #2e8b57;padding:0.6em 1em}"
    "figure{margin:1em 0}figcaption{color:#444}.legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin:0.5em 0}"
    ".swatch i{display:inline-block;width:1.1em;height:1.1em;margin-right:0.35em;vertical-align:middle;"
    "border:1px solid #888}"
)


def _page(run: RunFacts, classes: dict | None, header: dict[str, Any], warnings_shown: list[str],
          sections: list[str]) -> str:
    legend = ""
    cfg = run.cfg
    if classes and classes["palette"]:  # the val set's own, as the gallery drew them
        names = classes["names"] or [f"class_{i}" for i in range(len(classes["palette"]))]
        legend = f"<h2>Classes</h2>{_class_legend(names, classes['palette'])}"
    elif cfg is not None:
        try:
            from .data.factory import dataset_info

            _, names, palette = dataset_info(cfg.data.name, cfg.model.num_classes)
            names = (run.metrics or {}).get("class_names") or cfg.data.class_names or names
            legend = f"<h2>Classes</h2>{_class_legend(names, palette)}"
        except (OvenetError, ValueError, KeyError):
            legend = ""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>ovenet report: "
            f"{html.escape(run.run_dir.name)}</title><style>{STYLE_SHEET}</style></head><body>"
            f"<h1>ovenet run {html.escape(run.run_dir.name)}</h1>{_header_html(header, warnings_shown)}"
            "<p>The numbers behind every figure are in <a href=\"data.json\">data.json</a>.</p>"
            + legend + "".join(sections) + "</body></html>\n")


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
