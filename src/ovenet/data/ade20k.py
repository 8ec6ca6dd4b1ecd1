"""ADE20K (SceneParsing / ADEChallengeData2016): 150 classes, annotation 0 = "other", ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovenet.data.base import (
    IGNORE_INDEX,
    LabelTable,
    SampleFiles,
    SegmentationDataset,
    Transform,
    describe_directory,
    generic_palette,
    raise_if_missing,
)
from ovenet.data.transforms import EvalTransform, resize_label
from ovenet.errors import DataError

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip
ADE20K_PALETTE = generic_palette(150, skip_black=True)

# reduce-zero-label: 0 ("other") -> ignore, k -> k-1.
_ADE20K_TABLE = LabelTable({0: 255, **{k: k - 1 for k in range(1, 151)}}, "the ADE20K class range 0-150")

_SPLIT_ALIASES = {
    "train": "training",
    "val": "validation",
    "training": "training",
    "validation": "validation",
}


class ADE20KDataset(SegmentationDataset):
    """``root`` is the ``ADEChallengeData2016`` folder: ``images/{split}/*.jpg`` + ``annotations/{split}/*.png``.

    Splits: training, validation (aliases train, val).
    """

    num_classes = 150
    class_names = ADE20K_CLASSES
    palette = ADE20K_PALETTE

    def __init__(self, root: str | Path, split: str = "training", transform: Transform | None = None):
        if split not in _SPLIT_ALIASES:
            raise DataError(f"ADE20K split '{split}' is unknown; use training or validation (or train/val)")
        self.root = Path(root)
        self.split = _SPLIT_ALIASES[split]
        image_dir = self.root / "images" / self.split
        images = sorted(image_dir.glob("*.jpg"))
        if not images:
            raise DataError(
                f"no ADE20K images matching {image_dir}/*.jpg ({describe_directory(image_dir)}); "
                "the root must be the ADEChallengeData2016 folder holding images/ and annotations/: set it with "
                "--data-root DIR or data.root=DIR"
            )
        samples, missing = [], []
        for image in images:
            label = self.root / "annotations" / self.split / f"{image.stem}.png"
            if not label.is_file():
                missing.append((image, label))
            samples.append(SampleFiles(image.stem, image, label))
        raise_if_missing(missing)
        super().__init__(samples, _ADE20K_TABLE, transform)


class OfficialEvalTransform:
    """The official ADE20K validation protocol (``lib/datasets/ade20k.py``, 'val' lists): the label is resized
    with the image (short side ``resize_short``, nearest as ``cv2.INTER_NEAREST``) and both are padded at the
    bottom/right to a multiple of ``pad_multiple``, the image with the mean colour (0 once normalised), the label
    with ``ignore_index``. mIoU is then counted at that resolution, not on the full-size annotation.

    Wraps ``base`` (an :class:`EvalTransform` with ``resize_short`` set), which resizes and normalises the image,
    so image and label always get the same size. Other integer maps follow the label and pad with 0.
    """

    def __init__(self, base: EvalTransform, pad_multiple: int = 8, ignore_index: int = IGNORE_INDEX):
        if not base.resize_short:
            raise ValueError("OfficialEvalTransform needs an EvalTransform that resizes (resize_short)")
        self.base = base
        self.pad_multiple = int(pad_multiple)
        self.ignore_index = int(ignore_index)

    def __call__(self, sample: dict) -> dict:
        size = self.base.output_size(*sample["image"].shape[:2])
        resized = dict(sample)
        for key, value in sample.items():
            if key != "image" and isinstance(value, np.ndarray):
                resized[key] = resize_label(value, size)
        out = self.base(resized)
        height, width = out["image"].shape[-2:]
        pad_h, pad_w = -height % self.pad_multiple, -width % self.pad_multiple
        if pad_h or pad_w:
            out["image"] = F.pad(out["image"], (0, pad_w, 0, pad_h), value=0.0)
            for key, value in out.items():
                if key != "image" and isinstance(value, torch.Tensor) and value.shape[-2:] == (height, width):
                    fill = self.ignore_index if key == "label" else 0
                    out[key] = F.pad(value, (0, pad_w, 0, pad_h), value=fill)
        return out

    def __repr__(self) -> str:
        return f"OfficialEvalTransform({self.base!r}, pad_multiple={self.pad_multiple})"
