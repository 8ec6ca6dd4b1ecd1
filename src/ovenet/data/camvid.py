"""CamVid in the SegNet layout: 11 classes, label 11 ("unlabelled") ignored."""

from __future__ import annotations

from pathlib import Path

from ovenet.data.base import (
    IMAGE_EXTENSIONS,
    LabelTable,
    SegmentationDataset,
    Transform,
    describe_directory,
    pairs_to_samples,
    read_pair_list,
)
from ovenet.errors import DataError

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip
# The colours of the SegNet tutorial's CamVid visualisation.
CAMVID_PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]  # fmt: skip

_CAMVID_TABLE = LabelTable({**{k: k for k in range(11)}, 11: 255}, "the CamVid class range 0-11")


class CamVidDataset(SegmentationDataset):
    """CamVid (SegNet split). Uses ``{split}.txt`` in ``root`` ("image label" per line, relative to root) when it
    exists, else the folders ``{split}/`` and ``{split}annot/`` (labels are ``{image stem}.png``).
    """

    num_classes = 11
    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None):
        if split not in ("train", "val", "test"):
            raise DataError(f"CamVid split '{split}' is unknown; use train, val or test")
        self.root = Path(root)
        self.split = split
        list_file = self.root / f"{split}.txt"
        if list_file.is_file():
            pairs = read_pair_list(list_file, self.root)
        else:
            image_dir, label_dir = self.root / split, self.root / f"{split}annot"
            images = sorted(p for p in image_dir.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise DataError(
                    f"no CamVid list {list_file} and no images matching {image_dir}/*.(png|jpg) "
                    f"({describe_directory(image_dir)}); the root must be the SegNet CamVid folder (with train/, "
                    "trainannot/, val/, valannot/): set it with --data-root DIR or data.root=DIR"
                )
            pairs = [(image, label_dir / f"{image.stem}.png") for image in images]
        super().__init__(pairs_to_samples(pairs, name_root=self.root / split), _CAMVID_TABLE, transform)
