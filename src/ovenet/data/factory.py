"""Build datasets and their transforms from the ``data`` section of a config (a dict or an attribute object)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ovenet.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, ADE20KDataset, OfficialEvalTransform
from ovenet.data.base import SegmentationDataset, generic_palette
from ovenet.data.camvid import CAMVID_CLASSES, CAMVID_PALETTE, CamVidDataset
from ovenet.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, ACDCDataset, CityscapesDataset
from ovenet.data.folder import FolderDataset, ListDataset
from ovenet.data.synthetic import SyntheticScenes, synthetic_class_info
from ovenet.data.transforms import EvalTransform, TrainTransform
from ovenet.errors import ConfigError

DATASET_NAMES = ("cityscapes", "acdc", "ade20k", "camvid", "folder", "list", "synthetic")
LABEL_RESOLUTIONS = ("original", "official")

# Per-dataset defaults for keys the config leaves out (crop/base sizes follow the OVeNet training recipes).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "cityscapes": {"train_split": "train", "val_split": "val", "crop_size": (512, 1024), "base_size": 2048},
    "acdc": {"train_split": "train", "val_split": "val", "crop_size": (540, 960), "base_size": 1920},
    "ade20k": {
        "train_split": "training",
        "val_split": "validation",
        "crop_size": (520, 520),
        "base_size": 520,
        "eval_resize_short": 520,
    },
    "camvid": {"train_split": "train", "val_split": "val", "crop_size": (360, 480), "base_size": 480},
    "synthetic": {"train_split": "train", "val_split": "val", "num_samples": 64, "image_size": (256, 512)},
    "folder": {"train_split": "train", "val_split": "val"},
    "list": {"train_split": "train", "val_split": "val"},
}
_COMMON_DEFAULTS: dict[str, Any] = {"scale_range": (0.5, 2.0), "flip": True, "base_size": None, "seed": 0}


def _getter(cfg_data: Any, name: str):
    def get(key: str) -> Any:
        value = cfg_data.get(key) if isinstance(cfg_data, Mapping) else getattr(cfg_data, key, None)
        if value is None:
            value = _DEFAULTS[name].get(key, _COMMON_DEFAULTS.get(key))
        return value

    return get


def _require(get, key: str, name: str) -> Any:
    value = get(key)
    if value is None:
        raise ConfigError(f"data.{key} is required for dataset '{name}'")
    return value


def _dataset_name(cfg_data: Any) -> str:
    raw = cfg_data.get("name") if isinstance(cfg_data, Mapping) else getattr(cfg_data, "name", None)
    name = str(raw).lower() if raw is not None else None
    if name not in DATASET_NAMES:
        raise ConfigError(f"data.name '{raw}' is unknown; use one of {', '.join(DATASET_NAMES)}")
    return name


def build_transform(
    cfg_data: Any, train: bool, label_resolution: str = "original"
) -> TrainTransform | EvalTransform | OfficialEvalTransform:
    """TrainTransform from crop_size/base_size/scale_range/flip, or EvalTransform (ADE20K: short side 520).

    ``label_resolution`` (eval only, the config's ``eval.label_resolution``): "original" keeps label maps at their
    own size; "official" resizes them with the image and pads both to a multiple of 8 when the image is resized
    (``eval_resize_short``), as the official ADE20K val loader (:class:`OfficialEvalTransform`).
    """
    if label_resolution not in LABEL_RESOLUTIONS:
        raise ConfigError(f"eval.label_resolution '{label_resolution}' is unknown; use one of "
                          f"{', '.join(LABEL_RESOLUTIONS)}")
    name = _dataset_name(cfg_data)
    get = _getter(cfg_data, name)
    if not train:
        transform = EvalTransform(resize_short=get("eval_resize_short"))
        if label_resolution == "official" and transform.resize_short:
            return OfficialEvalTransform(transform)
        return transform
    crop_size = get("crop_size") or (get("image_size") if name == "synthetic" else None)
    if crop_size is None:
        raise ConfigError(f"data.crop_size [h, w] is required to train on dataset '{name}'")
    try:
        return TrainTransform(crop_size, get("base_size"), get("scale_range"), bool(get("flip")))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad data augmentation settings: {exc}") from None


def build_dataset(
    cfg_data: Any, split: str | None = None, train: bool = True, label_resolution: str = "original"
) -> SegmentationDataset:
    """The dataset named by ``cfg_data.name`` for ``split`` (default: ``train_split`` when training, else
    ``val_split``), with a TrainTransform when ``train`` and an eval transform otherwise (``label_resolution``:
    see :func:`build_transform`).
    """
    name = _dataset_name(cfg_data)
    get = _getter(cfg_data, name)
    split = split or get("train_split" if train else "val_split")
    transform = build_transform(cfg_data, train, label_resolution)

    if name == "synthetic":
        # The eval split gets its own seed so it never repeats a training scene.
        is_train_split = split == get("train_split")
        num_samples = (
            int(get("num_samples"))
            if is_train_split
            else int(get("val_samples") or max(1, get("num_samples") // 4))
        )
        return SyntheticScenes(
            num_samples,
            size=tuple(get("image_size")),
            num_classes=int(get("num_classes") or 8),
            seed=int(get("seed")) + (0 if is_train_split else 1),
            transform=transform,
        )
    if name in ("folder", "list"):
        return _build_user_dataset(name, get, split, transform)

    root = _require(get, "root", name)
    if name == "cityscapes":
        dataset = CityscapesDataset(root, split, transform, with_instances=bool(get("with_instances")))
    elif name == "acdc":
        dataset = ACDCDataset(root, split, tuple(get("conditions") or ACDCDataset.CONDITIONS), transform)
    elif name == "ade20k":
        dataset = ADE20KDataset(root, split, transform)
    else:
        dataset = CamVidDataset(root, split, transform)
    expected = get("num_classes")
    if expected is not None and int(expected) != dataset.num_classes:
        raise ConfigError(
            f"data.num_classes is {expected} but {name} has {dataset.num_classes} classes; fix or drop it"
        )
    return dataset


def _build_user_dataset(name: str, get, split: str, transform) -> SegmentationDataset:
    """folder/list datasets; a ``{split}`` placeholder in image_dir/label_dir/list_file picks the split."""
    root = Path(get("root")) if get("root") is not None else None

    def path(key: str, required: bool) -> Path | None:
        value = _require(get, key, name) if required else get(key)
        if value is None:
            return None
        resolved = Path(str(value).format(split=split))
        return root / resolved if root is not None and not resolved.is_absolute() else resolved

    common = {
        "num_classes": int(_require(get, "num_classes", name)),
        "class_names": get("class_names"),
        "label_map": get("label_map"),
    }
    if name == "folder":
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
