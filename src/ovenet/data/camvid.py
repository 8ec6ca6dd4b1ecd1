"""CamVid in the SegNet layout: 11 classes, label 11 ("unlabelled") ignored."""

from __future__ import annotations

from pathlib import Path

from ovenet.data.base import (
    IMAGE_EXTENSIONS,
    LabelTable,
    SampleFiles,
    SegmentationDataset,
    Transform,
    describe_directory,
    missing_label_error,
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


def read_pair_list(list_file: Path, root: Path) -> list[tuple[Path, Path | None]]:
    """Parse "image [label]" lines (paths relative to ``root``; blank lines and # comments skipped)."""
    pairs: list[tuple[Path, Path | None]] = []
    try:
        lines = list_file.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read list file {list_file} ({exc})") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(
                f"{list_file}:{number} has {len(fields)} fields; expected 'image_path [label_path]' "
                "(paths with spaces are not supported)"
            )
        pairs.append((root / fields[0], root / fields[1] if len(fields) == 2 else None))
    if not pairs:
        raise DataError(f"list file {list_file} has no entries; expected lines 'image_path [label_path]'")
    if len({label is None for _, label in pairs}) > 1:
        raise DataError(
            f"list file {list_file} mixes lines with and without labels; give every image a label or none"
        )
    return pairs


def pairs_to_samples(pairs: list[tuple[Path, Path | None]], name_root: Path) -> list[SampleFiles]:
    """Check every file exists and name samples by their image path relative to ``name_root``."""
    samples, missing = [], []
    for image, label in pairs:
        if not image.is_file():
            raise DataError(f"image {image} listed but not found; fix the list file or the root")
        if label is not None and not label.is_file():
            missing.append((image, label))
        try:
            name = image.relative_to(name_root).with_suffix("").as_posix()
        except ValueError:
            name = image.stem
        samples.append(SampleFiles(name, image, label))
    if missing:
        raise missing_label_error(missing)
    return samples


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
                    f"({describe_directory(image_dir)}); root must be the SegNet CamVid folder"
                )
            pairs = [(image, label_dir / f"{image.stem}.png") for image in images]
        super().__init__(pairs_to_samples(pairs, name_root=self.root / split), _CAMVID_TABLE, transform)
