"""Evaluation over a dataset: mIoU and accuracies from one confusion matrix, boundary (trimap) mIoU, ACDC
per-condition results and the Cityscapes benchmark figures; ``evaluate`` writes them as JSON and Markdown.

Distributed evaluation: each rank takes the samples ``rank, rank + world, ...`` (no padding, so nothing is
counted twice, unlike a padded ``DistributedSampler``) and the metric states are summed with ``all_reduce``;
every rank returns the same result.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ovenet.config import Config, EvalConfig
from ovenet.device import resolve_device
from ovenet.engine.distributed import rank_and_world
from ovenet.engine.logging import Progress
from ovenet.errors import ConfigError, DataError, OvenetError
from ovenet.files import write_text
from ovenet.inference import infer_logits
from ovenet.metrics import BoundaryConfusion, CityscapesMetric, ConfusionMatrix
from ovenet.threads import take_note


def _all_conditions(local: set[str], world: int) -> list[str]:
    """The union of condition names over ranks, so every rank reduces the same matrices in the same order."""
    if world == 1:
        return sorted(local)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, sorted(local))
    return sorted({c for names in gathered for c in names})


def _class_names(dataset: Any, num_classes: int) -> list[str]:
    names = list(getattr(dataset, "class_names", None) or [])
    return names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]


class _Metrics:
    """Every metric state of one evaluation: the confusion matrix, the boundary band, one matrix per condition
    (ACDC) and the Cityscapes instance figures; summed over ranks by :meth:`all_reduce`."""

    def __init__(self, num_classes: int, ignore_index: int, boundary_width: int, cityscapes: bool,
                 device: torch.device):
        self.num_classes, self.ignore_index, self.device = num_classes, ignore_index, device
        self.confusion = ConfusionMatrix(num_classes, ignore_index, device=device)
        self.boundary = BoundaryConfusion(num_classes, boundary_width, ignore_index, device=device)
        self.per_condition: dict[str, ConfusionMatrix] = {}
        self.city = CityscapesMetric() if cityscapes else None

    def _condition(self, name: str) -> ConfusionMatrix:
        if name not in self.per_condition:
            self.per_condition[name] = ConfusionMatrix(self.num_classes, self.ignore_index, device=self.device)
        return self.per_condition[name]

    def update(self, pred: torch.Tensor, label: torch.Tensor, sample: dict, index: int) -> None:
        self.confusion.update(pred, label)
        self.boundary.update(pred, label)
        if sample.get("condition") is not None:
            self._condition(sample["condition"]).update(pred, label)
        if self.city is not None:
            if "label_ids" not in sample or "instance" not in sample:
                raise DataError(f"sample '{sample.get('name', index)}' lacks label_ids/instance maps; build the "
                                "Cityscapes dataset with with_instances=True for the iIoU figures")
            self.city.update(pred, sample["label_ids"], sample["instance"])

    def all_reduce(self, world: int) -> list[str]:
        """Sum the states over ranks (world > 1); returns the condition names, the same on every rank."""
        conditions = _all_conditions(set(self.per_condition), world)
        if world > 1:
            self.confusion.all_reduce()
            self.boundary.all_reduce()
            for name in conditions:
                self._condition(name).all_reduce()
            if self.city is not None:
                self.city.all_reduce()
        return conditions


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Any,
    eval_cfg: EvalConfig,
    device: str | torch.device,
    num_classes: int,
    ignore_index: int = 255,
    cityscapes: bool = False,
    distributed: bool = False,
    precision: str = "fp32",
    output: str = "final",
    progress: bool = False,
    base_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on every sample of ``dataset`` (batch 1; label maps at their own resolution).

    ``base_size`` (``eval.mode: official`` only): the long side at scale 1, as the official test scales every
    image from ``data.base_size`` (ADE20K: 520 on an image already resized to short side 520).

    ``progress`` (rank 0): a bar on a terminal, otherwise a line every few seconds with images/s and the ETA.

    Returns ``miou`` (over the classes present in the labels or predictions, as cityscapesScripts), ``miou_all``
    (over all classes, absent ones counting 0, as the official code and so the paper's tables), ``iou`` (per
    class), ``pixel_acc``, ``mean_acc``, ``per_class_acc``, the boundary band figures
    ``boundary_miou``/``boundary_iou``, ``per_condition`` (when samples carry a ``condition``) and
    ``cityscapes`` (iIoU/category figures; needs samples with ``label_ids`` and ``instance``).
    """
    device = torch.device(device)
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise ConfigError(f"the model predicts {model.num_classes} classes but the dataset has {num_classes}; "
                          "evaluate with a checkpoint trained for this dataset")
    rank, world = rank_and_world() if distributed else (0, 1)
    metrics = _Metrics(num_classes, ignore_index, eval_cfg.boundary_width, cityscapes, device)

    was_training = model.training
    model.eval()
    indices = range(rank, len(dataset), world)
    shown = progress and rank == 0
    meter = Progress(len(indices), "eval", enabled=shown, note=take_note() if shown else None)
    start = time.perf_counter()
    try:
        for index in indices:
            sample = dataset[index]
            if "label" not in sample:
                raise DataError(f"sample '{sample.get('name', index)}' has no label; evaluation needs a labelled split")
            label = sample["label"].to(device)
            image = sample["image"].unsqueeze(0).to(device)
            out = infer_logits(model, image, mode=eval_cfg.mode, crop_size=eval_cfg.crop_size,
                               stride=eval_cfg.stride, scales=eval_cfg.scales, flip=eval_cfg.flip, output=output,
                               size=label.shape[-2:], precision=precision,
                               base_size=base_size if eval_cfg.mode == "official" else None)
            metrics.update(out["logits"].argmax(dim=1)[0], label, sample, index)
            meter.update()
    finally:
        meter.close()
        model.train(was_training)
    seconds = time.perf_counter() - start

    num_images = torch.tensor([len(indices)], dtype=torch.int64)
    conditions = metrics.all_reduce(world)
    if world > 1:
        counts = num_images.to(metrics.confusion.device)
        dist.all_reduce(counts)
        num_images = counts.cpu()

    band = metrics.boundary.compute()
    out: dict[str, Any] = {
        "num_images": int(num_images.item()),
        "class_names": _class_names(dataset, num_classes),
        **metrics.confusion.compute(),
        "boundary_width": eval_cfg.boundary_width,
        "boundary_miou": band["miou"],
        "boundary_iou": band["iou"],
        "eval": {"mode": eval_cfg.mode, "scales": list(eval_cfg.scales), "flip": eval_cfg.flip,
                 "crop_size": list(eval_cfg.crop_size) if eval_cfg.mode in ("slide", "official") else None,
                 "stride": eval_cfg.stride, "output": output, "precision": precision},
        "seconds": seconds,
    }
    if conditions:
        out["per_condition"] = {}
        for name in conditions:
            figures = metrics.per_condition[name].compute()
            out["per_condition"][name] = {k: figures[k] for k in ("miou", "miou_all", "pixel_acc", "mean_acc",
                                                                   "iou")}
    if metrics.city is not None:
        out["cityscapes"] = metrics.city.compute()
    return out


# --- evaluate a checkpoint and write result files -----------------------------------------------------------------

def samples_digest(dataset: Any) -> str | None:
    """12 hex digits of the SHA-1 of a split's sample names (sorted): two results with the same digest were
    scored on the same images, whatever folder they were read from (``ovenet report --compare`` checks it)."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    names = "\n".join(sorted(str(s.name) for s in samples))
    return hashlib.sha1(names.encode("utf-8")).hexdigest()[:12]


def json_safe(value: Any) -> Any:
    """NaN/inf -> null (strict JSON); tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals, ``n/a`` for a missing or NaN figure."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}"


def results_markdown(result: dict[str, Any], title: str = "Evaluation") -> str:
    """A readable report: summary figures, then per-class IoU / boundary IoU / accuracy tables (in percent)."""
    lines = [f"# {title}", ""]
    for key in ("checkpoint", "dataset", "split"):
        if key in result:
            lines.append(f"- {key}: `{result[key]}`")
    setting = result.get("eval", {})
    lines.append(f"- images: {result['num_images']}; mode {setting.get('mode')}, scales {setting.get('scales')}, "
                 f"flip {setting.get('flip')}"
                 + (f", labels {setting['label_resolution']}" if "label_resolution" in setting else ""))
    lines += ["", "| metric | value (%) |", "|---|---:|"]
    summary = [("mIoU over the classes present in labels or predictions (cityscapesScripts)", "miou"),
               ("mIoU over all classes, absent ones 0 (the official code's, as in the paper's tables)", "miou_all"),
               ("pixel accuracy", "pixel_acc"),
               ("mean class accuracy", "mean_acc"), (f"boundary mIoU ({result['boundary_width']} px)", "boundary_miou")]
    lines += [f"| {label} | {percent(result.get(key))} |" for label, key in summary]
    city = result.get("cityscapes")
    if city:
        for label, key in (("Cityscapes mIoU (label ids)", "miou"), ("iIoU class", "iiou_class"),
                           ("IoU category", "iou_category"), ("iIoU category", "iiou_category")):
            lines.append(f"| {label} | {percent(city.get(key))} |")
    lines += ["", "| class | IoU | boundary IoU | accuracy |", "|---|---:|---:|---:|"]
    for i, name in enumerate(result["class_names"]):
        lines.append(f"| {name} | {percent(result['iou'][i])} | {percent(result['boundary_iou'][i])} | "
                     f"{percent(result['per_class_acc'][i])} |")
    if result.get("per_condition"):
        lines += ["", "| condition | mIoU | pixel accuracy | mean accuracy |", "|---|---:|---:|---:|"]
        for name, figures in result["per_condition"].items():
            lines.append(f"| {name} | {percent(figures['miou'])} | {percent(figures['pixel_acc'])} | "
                         f"{percent(figures['mean_acc'])} |")
    if city:
        lines += ["", "| Cityscapes category | IoU | iIoU |", "|---|---:|---:|"]
        for name, value in city["iou_per_category"].items():
            lines.append(f"| {name} | {percent(value)} | {percent(city['iiou_per_category'].get(name))} |")
    lines.append("")
    return "\n".join(lines)


def result_paths(out_dir: str | Path, split: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / f"eval_{split}.json", out_dir / f"eval_{split}.md"


def evaluate(
    cfg: Config | None,
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    split: str | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool = True,
    model_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``cfg.data``'s ``split`` (default ``val_split``) with ``cfg.eval`` settings.

    ``model_overrides`` (``model.*`` dotted keys) change the loaded network's inference options, e.g.
    ``model.offset.sampling=exact``.
    ``cfg`` None uses the checkpoint's own config. Writes ``eval_<split>.json`` and ``eval_<split>.md`` into
    ``out_dir`` (default: the checkpoint's folder) and refuses to replace existing ones unless ``overwrite``.
    """
    from ovenet import checkpoint as ckpt_io
    from ovenet.data import Normalisation, build_dataset

    checkpoint = Path(checkpoint)
    split_name = split or (cfg.data.val_split if cfg is not None else None)
    # Refuse before loading anything, so a forgotten --overwrite costs nothing.
    if split_name is not None:
        _check_free(out_dir or checkpoint.parent, split_name, overwrite)
    device = resolve_device(str(device) if device is not None else (cfg.device if cfg is not None else "auto"))
    model = ckpt_io.load(checkpoint, device, overrides=model_overrides)
    cfg = cfg if cfg is not None else model.config
    split_name = split or cfg.data.val_split
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent
    _check_free(out_dir, split_name, overwrite)

    cityscapes = cfg.data.name == "cityscapes"
    data = replace(cfg.data, with_instances=cityscapes)  # Cityscapes: instance maps for the iIoU figures
    # The checkpoint's normalisation, whatever config the data comes from: the one its weights were trained on.
    dataset = build_dataset(data, split_name, train=False, label_resolution=cfg.eval.label_resolution,
                            normalisation=Normalisation.of(model.config.model))
    if len(dataset) == 0:
        raise DataError(f"split '{split_name}' of dataset '{cfg.data.name}' at {cfg.data.root} has no samples")
    if model.num_classes != dataset.num_classes:
        raise ConfigError(
            f"checkpoint {checkpoint} predicts {model.num_classes} classes but dataset '{cfg.data.name}' "
            f"(data.root {cfg.data.root}) has {dataset.num_classes}; evaluate it with the config it was trained "
            "with (omit CONFIG to use the checkpoint's own), or pass the checkpoint trained for this dataset")
    distributed = dist.is_available() and dist.is_initialized()
    result = evaluate_model(model, dataset, cfg.eval, device, dataset.num_classes,
                            getattr(dataset, "ignore_index", 255), cityscapes=cityscapes,
                            distributed=distributed, precision=precision, progress=progress,
                            base_size=cfg.data.base_size)
    result = {"checkpoint": str(checkpoint), "dataset": cfg.data.name, "data_root": cfg.data.root,
              "split": split_name, "samples_digest": samples_digest(dataset), **result}
    result["eval"]["label_resolution"] = cfg.eval.label_resolution  # how the dataset above was built
    if not distributed or dist.get_rank() == 0:
        json_path, md_path = result_paths(out_dir, split_name)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(json_path, json.dumps(json_safe(result), indent=2) + "\n")
        write_text(md_path, results_markdown(result, f"{cfg.name}: {cfg.data.name} {split_name}"))
    return result


def _check_free(out_dir: str | Path, split: str, overwrite: bool) -> None:
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # else mkdir fails after the whole evaluation
        raise OvenetError(f"output folder {out_dir} is a file; results go to a folder: choose another --out")
    if overwrite:
        return
    for path in result_paths(out_dir, split):
        if path.exists():
            raise OvenetError(f"result file {path} already exists; pass --overwrite to replace it "
                              "or choose another output folder")
