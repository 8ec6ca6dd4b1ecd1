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
from ovenet.data.transforms import IMAGENET, EvalTransform, Normalisation, TrainTransform
from ovenet.errors import ConfigError

__all__ = ["DATASET_NAMES", "absolute_data_paths", "build_dataset", "build_transform", "check_splits_apart",
           "class_info", "dataset_info"]


def build_transform(cfg: DataConfig, train: bool, label_resolution: Literal["original", "official"] = "original",
                    normalisation: Normalisation = IMAGENET) -> TrainTransform | EvalTransform | OfficialEvalTransform:
    """TrainTransform from crop_size/base_size/scale_range/flip, or EvalTransform (``eval_resize_short``).

    ``label_resolution`` (eval only, the config's ``eval.label_resolution``): "original" keeps label maps at their
    own size; "official" resizes them with the image and pads both to a multiple of 8 when the image is resized
    (``eval_resize_short``), as the official ADE20K val loader (:class:`OfficialEvalTransform`).
    ``normalisation``: the one the network's weights expect (``Normalisation.of(cfg.model)``).
    """
    if not train:
        transform = EvalTransform(resize_short=cfg.eval_resize_short, normalisation=normalisation)
        if label_resolution == "official" and transform.resize_short:
            return OfficialEvalTransform(transform)
        return transform
    crop_size = cfg.crop_size or (cfg.image_size if cfg.name == "synthetic" else None)
    if crop_size is None:
        raise ConfigError(f"data.crop_size [h, w] is required to train on dataset '{cfg.name}'")
    try:
        return TrainTransform(crop_size, cfg.base_size, cfg.scale_range, cfg.flip, normalisation=normalisation)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad data augmentation settings: {exc}") from None


def build_dataset(cfg: DataConfig, split: str | None = None, train: bool = True,
                  label_resolution: Literal["original", "official"] = "original",
                  normalisation: Normalisation = IMAGENET) -> SegmentationDataset:
    """The dataset named by ``cfg.name`` for ``split`` (default: ``train_split`` when training, else
    ``val_split``), with a TrainTransform when ``train`` and an eval transform otherwise (``label_resolution``,
    ``normalisation``: see :func:`build_transform`).
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"build_dataset takes the config's DataConfig (cfg.data), got {type(cfg).__name__}")
    split = split or (cfg.train_split if train else cfg.val_split)
    transform = build_transform(cfg, train, label_resolution, normalisation)
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
    if cfg.palette is not None:  # the user's colours over the dataset's own
        dataset.palette = class_info(cfg, dataset.num_classes)[2]
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
    common = {"num_classes": cfg.num_classes, "class_names": cfg.class_names, "label_map": cfg.label_map,
              "ignore_ids": cfg.ignore_ids, "palette": cfg.palette}
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


def class_info(cfg: DataConfig, num_classes: int | None = None) -> tuple[int, list[str], list[tuple[int, int, int]]]:
    """:func:`dataset_info` with the config's own ``data.class_names`` and ``data.palette`` where it sets them:
    what predict, export, info and the report show for this config's data."""
    count, names, palette = dataset_info(cfg.name, cfg.num_classes or num_classes)
    if cfg.class_names is not None and len(cfg.class_names) == count:
        names = list(cfg.class_names)
    if cfg.palette is not None:
        if len(cfg.palette) < count:
            raise ConfigError(f"data.palette has {len(cfg.palette)} colours for {count} classes; give one "
                              "[r, g, b] per class")
        palette = [(int(r), int(g), int(b)) for r, g, b in cfg.palette[:count]]
    return count, names, palette


def _where(dataset: SegmentationDataset) -> str:
    """The folder or list file a dataset's images come from, as the user set it."""
    for attribute in ("image_dir", "list_file", "root"):
        if getattr(dataset, attribute, None) is not None:
            return str(getattr(dataset, attribute))
    return repr(dataset)


def check_splits_apart(cfg: DataConfig, train_set: SegmentationDataset, val_set: SegmentationDataset) -> str | None:
    """Refuse (ConfigError) a validation set that is, or shares images with, the training set: its mIoU would
    measure memory, not generalisation. With ``data.allow_val_overlap`` the overlap is allowed and described
    (the returned line, for a warning); None when the splits are apart or have no files (synthetic scenes)."""
    train_files = {files.image.resolve() for files in getattr(train_set, "samples", ()) if files.image is not None}
    val_files = [files.image.resolve() for files in getattr(val_set, "samples", ()) if files.image is not None]
    shared = [path for path in val_files if path in train_files]
    if not shared:
        return None
    key = "data.list_file" if cfg.name == "list" else "data.image_dir" if cfg.name == "folder" else "data.val_split"
    train_at, val_at = _where(train_set), _where(val_set)
    if len(shared) == len(val_files):
        what = (f"the validation set ({cfg.val_split}: {val_at}) is the training set ({cfg.train_split}: {train_at})"
                if len(val_files) == len(train_files) else
                f"every validation image ({cfg.val_split}: {val_at}) is also a training image ({cfg.train_split}: "
                f"{train_at})")
    else:
        what = (f"{len(shared)} of the {len(val_files)} validation images ({cfg.val_split}: {val_at}) are also "
                f"training images ({cfg.train_split}: {train_at}), e.g. {shared[0]}")
    if cfg.allow_val_overlap:
        return f"{what}: validation scores training images (data.allow_val_overlap=true)"
    fix = ("put {split} in " + key + " (e.g. images/{split}, labels/{split}) so that each split has its own folder"
           if cfg.name in ("folder", "list") and "{split}" not in str(getattr(cfg, key.split(".")[1]) or "")
           else f"give the validation split its own images ({key})")
    raise ConfigError(f"{what}, so validation would score images the model trained on; {fix}, or set "
                      "data.allow_val_overlap=true to validate on training images knowingly")
