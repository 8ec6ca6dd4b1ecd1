"""What data a run trained on, independent of where it lies: checkpoints record it, so a resumed run can move.

A split's identity is its sample list in order: per sample a CRC-32 of its name (relative to the dataset root, so
it survives a move) and one of its image and label file sizes. Sizes, not contents, keep it fast for 100k files
(two ``stat`` calls per sample); modification times are left out because copying data changes them. Synthetic
scenes have no files: their identity is their generator settings.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ovenet.config import DataConfig
from ovenet.data.base import SegmentationDataset
from ovenet.data.factory import build_dataset
from ovenet.data.synthetic import SyntheticScenes
from ovenet.errors import DataError

__all__ = ["data_identity", "identity_difference", "split_identity"]


def _size(path: Path | None) -> int:
    if path is None:
        return -1
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # a missing file counts as a difference; loading it names the file


def _crc_tensor(values: list[int]) -> torch.Tensor:
    # uint32 CRCs stored as int32: 4 bytes a sample (400 kB for 100k samples) in a tensor, which weights-only
    # torch.load reads back.
    return torch.from_numpy(np.array(values, dtype=np.uint32).view(np.int32).copy())


def split_identity(dataset: SegmentationDataset) -> dict:
    """``{"samples": N, "names": int32[N], "files": int32[N]}`` for a dataset of files, or
    ``{"samples": N, "generator": {...}}`` for synthetic scenes."""
    if isinstance(dataset, SyntheticScenes):
        return {"samples": len(dataset),
                "generator": {"size": list(dataset.size), "num_classes": dataset.num_classes, "seed": dataset.seed}}
    names, files = [], []
    for sample in dataset.samples:
        names.append(zlib.crc32(sample.name.encode()))
        files.append(zlib.crc32(f"{_size(sample.image)} {_size(sample.label)}".encode()))
    return {"samples": len(dataset), "names": _crc_tensor(names), "files": _crc_tensor(files)}


def data_identity(cfg: DataConfig) -> tuple[dict, dict[str, SegmentationDataset | None]]:
    """``{"train": identity, "val": identity}`` (val None when that split cannot be loaded: training then runs
    without validation), and the datasets they describe (to name a differing sample)."""
    datasets = {"train": build_dataset(cfg, train=True), "val": None}
    try:
        datasets["val"] = build_dataset(cfg, train=False)
    except DataError:
        pass
    return {split: split_identity(d) if d is not None else None for split, d in datasets.items()}, datasets


def identity_difference(recorded: dict, current: dict, dataset: SegmentationDataset) -> str | None:
    """How ``current`` (the identity of ``dataset``) differs from ``recorded``, in a few words; None if equal."""
    counts = f"{recorded['samples']} vs {current['samples']} samples"
    if "generator" in recorded or "generator" in current:
        same_scenes = recorded.get("generator") == current.get("generator")
        if same_scenes and recorded["samples"] == current["samples"]:
            return None
        return counts + ("" if same_scenes else f"; scenes {recorded.get('generator')} vs {current.get('generator')}")
    shared = min(recorded["samples"], current["samples"])
    names_differ = recorded["names"][:shared] != current["names"][:shared]
    files_differ = recorded["files"][:shared] != current["files"][:shared]
    differing = torch.nonzero(names_differ | files_differ).flatten()
    if len(differing):
        index = int(differing[0])
        sample = dataset.samples[index]
        if names_differ[index]:
            return f"{counts}; sample {index + 1} is {sample.name} here but another sample there"
        sizes = f"image {_size(sample.image)} bytes" + (
            f", label {_size(sample.label)} bytes" if sample.label is not None else "")
        return f"{counts}; sample {sample.name} has other file sizes ({sizes} here)"
    if current["samples"] > shared:
        return f"{counts}; the extra samples start at {dataset.samples[shared].name}"
    if recorded["samples"] > shared:
        return f"{counts}; the last {recorded['samples'] - shared} recorded samples are missing here"
    return None
