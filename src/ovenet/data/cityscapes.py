"""Cityscapes and ACDC, read from their published directory layouts.

Both ship Cityscapes *label ids* (0-33, with -1 stored as 255); the loader maps them to the 19 train ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ovenet.data.base import (
    LabelTable,
    SampleFiles,
    SegmentationDataset,
    Transform,
    check_same_size,
    describe_directory,
    raise_if_missing,
    read_label_map,
    to_numpy,
)
from ovenet.errors import DataError

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip

# (name, label id, train id, category, has instances, ignored in evaluation); 'license plate' (id -1) cannot
# occur in a label map and is left out.
LABELS: tuple[tuple[str, int, int, str, bool, bool], ...] = (
    ("unlabeled", 0, 255, "void", False, True),
    ("ego vehicle", 1, 255, "void", False, True),
    ("rectification border", 2, 255, "void", False, True),
    ("out of roi", 3, 255, "void", False, True),
    ("static", 4, 255, "void", False, True),
    ("dynamic", 5, 255, "void", False, True),
    ("ground", 6, 255, "void", False, True),
    ("road", 7, 0, "flat", False, False),
    ("sidewalk", 8, 1, "flat", False, False),
    ("parking", 9, 255, "flat", False, True),
    ("rail track", 10, 255, "flat", False, True),
    ("building", 11, 2, "construction", False, False),
    ("wall", 12, 3, "construction", False, False),
    ("fence", 13, 4, "construction", False, False),
    ("guard rail", 14, 255, "construction", False, True),
    ("bridge", 15, 255, "construction", False, True),
    ("tunnel", 16, 255, "construction", False, True),
    ("pole", 17, 5, "object", False, False),
    ("polegroup", 18, 255, "object", False, True),
    ("traffic light", 19, 6, "object", False, False),
    ("traffic sign", 20, 7, "object", False, False),
    ("vegetation", 21, 8, "nature", False, False),
    ("terrain", 22, 9, "nature", False, False),
    ("sky", 23, 10, "sky", False, False),
    ("person", 24, 11, "human", True, False),
    ("rider", 25, 12, "human", True, False),
    ("car", 26, 13, "vehicle", True, False),
    ("truck", 27, 14, "vehicle", True, False),
    ("bus", 28, 15, "vehicle", True, False),
    ("caravan", 29, 255, "vehicle", True, True),
    ("trailer", 30, 255, "vehicle", True, True),
    ("train", 31, 16, "vehicle", True, False),
    ("motorcycle", 32, 17, "vehicle", True, False),
    ("bicycle", 33, 18, "vehicle", True, False),
)
_TRAIN_ID_OF_LABEL_ID = {label_id: train_id for _, label_id, train_id, *_ in LABELS if train_id != 255}

# uint8 lookup of 256: label id -> train id, 255 for every id that is not trained on.
CITYSCAPES_ID_TO_TRAINID = np.full(256, 255, dtype=np.uint8)
for _label_id, _train_id in _TRAIN_ID_OF_LABEL_ID.items():
    CITYSCAPES_ID_TO_TRAINID[_label_id] = _train_id

_LABEL_ID_OF_TRAIN_ID = np.zeros(256, dtype=np.uint8)  # 255 (ignore) -> 0 "unlabeled"
for _label_id, _train_id in _TRAIN_ID_OF_LABEL_ID.items():
    _LABEL_ID_OF_TRAIN_ID[_train_id] = _label_id

# Valid raw ids: 0..33, plus 255, which is how the uint8 PNGs store id -1 (license plate).
_CITYSCAPES_TABLE = LabelTable(
    {label_id: int(CITYSCAPES_ID_TO_TRAINID[label_id]) for label_id in [*range(34), 255]},
    "the Cityscapes label ids (0-33, 255 for -1)",
)


def trainid_to_labelid(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """Map a train-id prediction (0-18; 255 -> 0 "unlabeled") back to Cityscapes label ids, for submissions."""
    train_ids = to_numpy(array)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() > 255):
        raise ValueError(f"train ids must be in 0..255, got range {train_ids.min()}..{train_ids.max()}")
    return _LABEL_ID_OF_TRAIN_ID[train_ids.astype(np.intp)]


class _CityscapesIds(SegmentationDataset):
    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE


class CityscapesDataset(_CityscapesIds):
    """Cityscapes fine annotations: ``leftImg8bit/{split}/CITY/*_leftImg8bit.png`` and
    ``gtFine/{split}/CITY/*_gtFine_labelIds.png``. Splits: train, val, trainval, test (test is unlabelled).

    ``with_instances=True`` adds ``instance`` (raw ``_instanceIds.png``) and ``label_ids`` (raw label ids) for
    the instance-level iIoU metric.
    """

    SPLITS = ("train", "val", "trainval", "test")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        with_instances: bool = False,
    ):
        if split not in self.SPLITS:
            raise DataError(f"Cityscapes split '{split}' is unknown; use one of {', '.join(self.SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.with_instances = with_instances and split != "test"
        samples: list[SampleFiles] = []
        missing: list[tuple[Path, Path]] = []
        for part in ("train", "val") if split == "trainval" else (split,):
            image_dir = self.root / "leftImg8bit" / part
            images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
            if not images:
                raise DataError(
                    f"no Cityscapes images matching {image_dir}/*/*_leftImg8bit.png "
                    f"({describe_directory(image_dir)}); "
                    "the root must be the folder holding leftImg8bit/ and gtFine/: set it with --data-root DIR or data.root=DIR"
                )
            for image in images:
                city, stem = image.parent.name, image.name[: -len("_leftImg8bit.png")]
                label = instance = None
                if split != "test":
                    label = self.root / "gtFine" / part / city / f"{stem}_gtFine_labelIds.png"
                    if not label.is_file():
                        missing.append((image, label))
                    if self.with_instances:
                        instance = label.with_name(f"{stem}_gtFine_instanceIds.png")
                        if not instance.is_file():
                            missing.append((image, instance))
                samples.append(SampleFiles(f"{city}/{stem}", image, label, instance))
        raise_if_missing(missing)
        super().__init__(samples, _CITYSCAPES_TABLE, transform)

    def _load_extras(self, files: SampleFiles, raw_label: np.ndarray, sample: dict) -> None:
        if not self.with_instances:
            return
        instance = read_label_map(files.instance, what="instance map")
        check_same_size(files.image, sample["image"], files.instance, instance)
        sample["instance"] = instance.astype(np.int32)
        sample["label_ids"] = raw_label


class ACDCDataset(_CityscapesIds):
    """ACDC (adverse conditions, Cityscapes classes): ``rgb_anon/{cond}/{split}/{seq}/*_rgb_anon.png`` and
    ``gt/{cond}/{split}/{seq}/*_gt_labelIds.png``. Each sample keeps its ``condition``.
    """

    CONDITIONS = ("fog", "night", "rain", "snow")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        conditions: Sequence[str] = CONDITIONS,
        transform: Transform | None = None,
    ):
        if isinstance(conditions, str):
            conditions = (conditions,)
        unknown = [c for c in conditions if c not in self.CONDITIONS]
        if unknown or not conditions:
            raise DataError(
                f"ACDC conditions {list(conditions)} invalid; choose from {', '.join(self.CONDITIONS)}"
            )
        self.root = Path(root)
        self.split = split
        self.conditions = tuple(conditions)
        labelled = split != "test"
        samples: list[SampleFiles] = []
        missing: list[tuple[Path, Path]] = []
        for condition in self.conditions:
            for part in ("train", "val") if split == "trainval" else (split,):
                image_dir = self.root / "rgb_anon" / condition / part
                images = sorted(image_dir.glob("*/*_rgb_anon.png"))
                if not images:
                    found = describe_directory(image_dir)
                    raise DataError(
                        f"no ACDC images matching {image_dir}/*/*_rgb_anon.png ({found}); "
                        "the root must be the folder holding rgb_anon/ and gt/: set it with --data-root DIR or data.root=DIR"
                    )
                for image in images:
                    sequence, stem = image.parent.name, image.name[: -len("_rgb_anon.png")]
                    label = None
                    if labelled:
                        label = self.root / "gt" / condition / part / sequence / f"{stem}_gt_labelIds.png"
                        if not label.is_file():
                            missing.append((image, label))
                    samples.append(
                        SampleFiles(f"{condition}/{sequence}/{stem}", image, label, condition=condition)
                    )
        raise_if_missing(missing)
        super().__init__(samples, _CITYSCAPES_TABLE, transform)
