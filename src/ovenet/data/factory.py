"""Build datasets and their transforms from the ``data`` section of a config (:class:`ovenet.config.DataConfig`).

Per-dataset values (splits, crop and base sizes) come from the config, which the shipped ``_base_<dataset>.yaml``
files fill in: there is no second table of defaults here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from ovenet.config import DATASET_NAMES, DataConfig
from ovenet.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, ADE20KDataset, OfficialEvalTransform
from ovenet.data.base import SegmentationDataset, generic_palette
from ovenet.data.camvid import CAMVID_CLASSES, CAMVID_PALETTE, CamVidDataset
from ovenet.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, ACDCDataset, CityscapesDataset
from ovenet.data.folder import FolderDataset, ListDataset
from ovenet.data.synthetic import SyntheticScenes, synthetic_class_info
from ovenet.data.transforms import EvalTransform, TrainTransform
from ovenet.errors import ConfigError

__all__ = ["DATASET_NAMES", "absolute_data_paths", "build_dataset", "build_transform", "dataset_info"]


def build_transform(cfg: DataConfig, train: bool, label_resolution: Literal["original", "official"] = "original"
                    ) -> TrainTransform | EvalTransform | OfficialEvalTransform:
    """TrainTransform from crop_size/base_size/scale_range/flip, or EvalTransform (``eval_resize_short``).

    ``label_resolution`` (eval only, the config's ``eval.label_resolution``): "original" keeps label maps at their
    own size; "official" resizes them with the image and pads both to a multiple of 8 when the image is resized
    (``eval_resize_short``), as the official ADE20K val loader (:class:`OfficialEvalTransform`).
    """
    if not train:
        transform = EvalTransform(resize_short=cfg.eval_resize_short)
        if label_resolution == "official" and transform.resize_short:
            return OfficialEvalTransform(transform)
        return transform
    crop_size = cfg.crop_size or (cfg.image_size if cfg.name == "synthetic" else None)
    if crop_size is None:
        raise ConfigError(f"data.crop_size [h, w] is required to train on dataset '{cfg.name}'")
    try:
        return TrainTransform(crop_size, cfg.base_size, cfg.scale_range, cfg.flip)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad data augmentation settings: {exc}") from None


def build_dataset(cfg: DataConfig, split: str | None = None, train: bool = True,
                  label_resolution: Literal["original", "official"] = "original") -> SegmentationDataset:
    """The dataset named by ``cfg.name`` for ``split`` (default: ``train_split`` when training, else
    ``val_split``), with a TrainTransform when ``train`` and an eval transform otherwise (``label_resolution``:
    see :func:`build_transform`).
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"build_dataset takes the config's DataConfig (cfg.data), got {type(cfg).__name__}")
    split = split or (cfg.train_split if train else cfg.val_split)
    transform = build_transform(cfg, train, label_resolution)
    name = cfg.name
    if name == "synthetic":
        # The eval split gets its own seed so it never repeats a training scene.
        is_train_split = split == cfg.train_split
        num_samples = cfg.num_samples or SyntheticScenes.DEFAULT_SAMPLES
        if not is_train_split:
            num_samples = cfg.val_samples or max(1, num_samples // 4)
        return SyntheticScenes(num_samples, size=tuple(cfg.image_size or SyntheticScenes.DEFAULT_SIZE),
                               num_classes=cfg.num_classes or 8, seed=cfg.seed + (0 if is_train_split else 1),
                               transform=transform)
    if name in ("folder", "list"):
        return _build_user_dataset(cfg, split, transform)

    if cfg.root is None:
        raise ConfigError(f"data.root is required for dataset '{name}'")
    if name == "cityscapes":
        dataset = CityscapesDataset(cfg.root, split, transform, with_instances=cfg.with_instances)
    elif name == "acdc":
        dataset = ACDCDataset(cfg.root, split, tuple(cfg.conditions or ACDCDataset.CONDITIONS), transform)
    elif name == "ade20k":
        dataset = ADE20KDataset(cfg.root, split, transform)
    else:
        dataset = CamVidDataset(cfg.root, split, transform)
    if cfg.num_classes is not None and cfg.num_classes != dataset.num_classes:
        raise ConfigError(
            f"data.num_classes is {cfg.num_classes} but {name} has {dataset.num_classes} classes; fix or drop it"
        )
    return dataset


def absolute_data_paths(cfg: DataConfig) -> DataConfig:
    """``cfg`` with the paths that resolve against the working directory made absolute: ``root``, and
    ``image_dir``/``label_dir``/``list_file`` when no root holds them (below a root they stay relative, so they move
    with it). A run's config then means the same data from any folder. Synthetic scenes read no files."""
    if cfg.name == "synthetic":
        return cfg

    def absolute(value: str | None) -> str | None:
        return None if value is None else os.path.abspath(value)

    if cfg.root is not None:
        return dataclasses.replace(cfg, root=absolute(cfg.root))
    return dataclasses.replace(cfg, **{key: absolute(getattr(cfg, key))
                                       for key in ("image_dir", "label_dir", "list_file")})


def _build_user_dataset(cfg: DataConfig, split: str, transform) -> SegmentationDataset:
    """folder/list datasets; a ``{split}`` placeholder in image_dir/label_dir/list_file picks the split."""
    root = Path(cfg.root) if cfg.root is not None else None

    def path(key: str, required: bool) -> Path | None:
        value = getattr(cfg, key)
        if value is None:
            if required:
                raise ConfigError(f"data.{key} is required for dataset '{cfg.name}'")
            return None
        resolved = Path(str(value).format(split=split))
        return root / resolved if root is not None and not resolved.is_absolute() else resolved

    if cfg.num_classes is None:
        raise ConfigError(f"data.num_classes is required for dataset '{cfg.name}'")
    common = {"num_classes": cfg.num_classes, "class_names": cfg.class_names, "label_map": cfg.label_map}
    if cfg.name == "folder":
        return FolderDataset(path("image_dir", True), path("label_dir", False), transform, **common)
    return ListDataset(path("list_file", True), root, transform, **common)


def dataset_info(
    name: str, num_classes: int | None = None
) -> tuple[int, list[str], list[tuple[int, int, int]]]:
    """(num_classes, class_names, palette) without touching any data; folder/list need ``num_classes``."""
    name = str(name).lower()
    if name in ("cityscapes", "acdc"):
        return 19, list(CITYSCAPES_CLASSES), list(CITYSCAPES_PALETTE)
    if name == "ade20k":
        return 150, list(ADE20K_CLASSES), list(ADE20K_PALETTE)
    if name == "camvid":
        return 11, list(CAMVID_CLASSES), list(CAMVID_PALETTE)
    if name == "synthetic":
        names, palette = synthetic_class_info(num_classes or 8)
        return len(names), names, palette
    if name in ("folder", "list"):
        if not num_classes:
            raise ConfigError(f"data.num_classes is required for dataset '{name}'")
        return num_classes, [f"class_{i}" for i in range(num_classes)], generic_palette(num_classes)
    raise ConfigError(f"data.name '{name}' is unknown; use one of {', '.join(DATASET_NAMES)}")
