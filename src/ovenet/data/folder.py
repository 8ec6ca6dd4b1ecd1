"""Users' own data: a folder of images (+ a parallel folder of label PNGs), or a list file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ovenet.data.base import (
    IMAGE_EXTENSIONS,
    LabelTable,
    SampleFiles,
    SegmentationDataset,
    Transform,
    describe_directory,
    generic_palette,
    raise_if_missing,
    pairs_to_samples,
    read_pair_list,
)
from ovenet.errors import DataError


def make_label_table(num_classes: int, label_map: Mapping[int, int] | None,
                     ignore_ids: Sequence[int] | None = None) -> LabelTable:
    """Labels are train ids 0..C-1 (255 = ignore) unless ``label_map`` says how raw values map to train ids;
    ``ignore_ids`` are raw values that mean void (read as 255), with or without a map.

    A map must list every raw value that occurs: a value it misses is an error, not itself, since an identity
    fallback would silently accept ids the user forgot or mistyped.
    """
    ignored = {int(raw): 255 for raw in ignore_ids or ()}
    if label_map is None:
        mapping = {**{k: k for k in range(num_classes)}, 255: 255}
        clashes = sorted(raw for raw in ignored if raw < num_classes)
        if clashes:
            raise DataError(f"data.ignore_ids {clashes} are class ids 0-{num_classes - 1}: a class cannot also be "
                            "void; remove them from data.ignore_ids, or map raw values with data.label_map")
        return LabelTable({**mapping, **ignored}, f"the class range 0-{num_classes - 1} (255 = ignore)",
                          _range_fix)
    mapping = {int(raw): int(train_id) for raw, train_id in label_map.items()}
    bad = {raw: t for raw, t in mapping.items() if not (0 <= t < num_classes or t == 255)}
    if bad:
        raise DataError(
            f"label_map sends {bad} outside 0..{num_classes - 1} / 255; fix label_map or num_classes"
        )
    clashes = {raw: mapping[raw] for raw in ignored if mapping.get(raw, 255) != 255}
    if clashes:
        raise DataError(f"data.label_map sends {clashes} to classes but data.ignore_ids lists them as void; "
                        "keep each raw value in one of the two")
    keys = sorted({**mapping, **ignored})
    shown = f"{keys[:10]}{'...' if len(keys) > 10 else ''}"
    return LabelTable({**mapping, **ignored}, f"the data.label_map keys {shown}", _map_fix)


def _values_hint(bad_values: list[int]) -> str:
    return ", ".join(str(v) for v in bad_values[:4]) + (", ..." if len(bad_values) > 4 else "")


def _range_fix(bad_values: list[int]) -> str:
    shown = _values_hint(bad_values)
    verb = "marks" if len(bad_values) == 1 else "mark"
    return (f"if {shown} {verb} void pixels set data.ignore_ids=[{shown}], or map raw values to class ids with "
            "data.label_map")


def _map_fix(bad_values: list[int]) -> str:
    shown = _values_hint(bad_values)
    return (f"data.label_map must list every raw value (add {bad_values[0]}: <class id>), or set "
            f"data.ignore_ids=[{shown}] if they mark void pixels")


class _UserDataset(SegmentationDataset):
    """Per-instance metadata instead of class attributes, since the user decides the classes."""

    def _set_classes(self, num_classes: int, class_names: Sequence[str] | None,
                     palette: Sequence[Sequence[int]] | None = None) -> None:
        if num_classes is None or int(num_classes) < 1:
            raise DataError(f"num_classes must be a positive int for your own dataset, got {num_classes}")
        self.num_classes = int(num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise DataError(f"class_names has {len(class_names)} names but num_classes is {self.num_classes}")
        self.class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        )
        if palette is not None and len(palette) < self.num_classes:
            raise DataError(f"data.palette has {len(palette)} colours but num_classes is {self.num_classes}; "
                            "give one [r, g, b] per class")
        self.palette = ([tuple(int(v) for v in colour) for colour in palette[: self.num_classes]]
                        if palette is not None else generic_palette(self.num_classes))


class FolderDataset(_UserDataset):
    """Images under ``image_dir`` (searched recursively); the label of ``image_dir/a/b.jpg`` is
    ``label_dir/a/b.png``. ``image_suffix`` is stripped from image stems and ``label_suffix`` appended for labels
    (e.g. ``"_leftImg8bit"`` and ``"_gtFine_labelTrainIds.png"``). Without ``label_dir`` the set is unlabelled.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path | None = None,
        transform: Transform | None = None,
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        label_map: Mapping[int, int] | None = None,
        ignore_ids: Sequence[int] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        image_suffix: str = "",
        label_suffix: str = ".png",
    ):
        self._set_classes(num_classes, class_names, palette)
        self.image_dir = Path(image_dir)
        self.label_dir = None if label_dir is None else Path(label_dir)
        images = sorted(
            p for p in self.image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not images:
            raise DataError(
                f"no images matching {self.image_dir}/**/*.({'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
                f"({describe_directory(self.image_dir)})"
            )
        samples, missing = [], []
        for image in images:
            relative = image.relative_to(self.image_dir).with_suffix("").as_posix()
            if image_suffix and relative.endswith(image_suffix):
                relative = relative[: -len(image_suffix)]
            label = None
            if self.label_dir is not None:
                label = self.label_dir / f"{relative}{label_suffix}"
                if not label.is_file():
                    missing.append((image, label))
            samples.append(SampleFiles(relative, image, label))
        raise_if_missing(missing)
        super().__init__(samples, make_label_table(self.num_classes, label_map, ignore_ids), transform)


class ListDataset(_UserDataset):
    """Samples from a list file of lines ``image_path [label_path]``, relative to ``root`` (default: the list
    file's folder). Names are image paths relative to ``root`` without extension.
    """

    def __init__(
        self,
        list_file: str | Path,
        root: str | Path | None = None,
        transform: Transform | None = None,
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        label_map: Mapping[int, int] | None = None,
        ignore_ids: Sequence[int] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
    ):
        self._set_classes(num_classes, class_names, palette)
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise DataError(
                f"list file {self.list_file} does not exist ({describe_directory(self.list_file)})"
            )
        self.root = Path(root) if root is not None else self.list_file.parent
        samples = pairs_to_samples(read_pair_list(self.list_file, self.root), name_root=self.root)
        super().__init__(samples, make_label_table(self.num_classes, label_map, ignore_ids), transform)
