"""Shared dataset machinery: file decoding, label-table validation, the base class and ``check_dataset``.

Every dataset returns the same sample dict (see ``ovenet.data``). Decoding and validation live here so that all
datasets report broken files with the same one-line :class:`~ovenet.errors.DataError` messages.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ovenet.data.transforms import IGNORE_INDEX, EvalTransform
from ovenet.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# PIL raises a zoo of exception types for unreadable files; all of them mean "this file is broken".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Transform = Callable[[dict], dict]


@dataclass(frozen=True)
class SampleFiles:
    """Where one sample lives on disk. ``label`` is None for unlabelled splits."""

    name: str
    image: Path
    label: Path | None = None
    instance: Path | None = None
    condition: str | None = None


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 RGB array, or raise DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()  # forces the full decode, so truncation surfaces here
            rgb = img if img.mode == "RGB" else img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist; check the dataset root") from None
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"cannot decode image {path} ({exc}); the file is corrupt or truncated, replace it"
        ) from None
    return np.asarray(rgb)


# JPEG's lossy compression blurs region edges into values between the ids (a 3 next to a 7 becomes 4, 5, 6).
_LOSSY_FORMATS = ("JPEG", "MPO")
_NOT_JPEG_FIX = ("JPEG compression changes the ids at region edges, so label maps must be lossless: save the "
                 "original ids as PNG (or convert colour masks with `ovenet convert-labels`)")


def label_elsewhere(expected: Path) -> Path | None:
    """A file with the stem of the missing label ``expected`` but another image suffix (``a.jpg`` for ``a.png``)."""
    for suffix in IMAGE_EXTENSIONS:
        for candidate in (expected.with_suffix(suffix), expected.with_suffix(suffix.upper())):
            if candidate != expected and candidate.is_file():
                return candidate
    return None


def missing_label_message(expected: Path, what: str = "label") -> str:
    """Why ``expected`` is not there: a label saved under another suffix is named (JPEG is refused, not missed)."""
    found = label_elsewhere(Path(expected))
    if found is None:
        return f"{what} file {expected} does not exist; check the dataset root"
    if found.suffix.lower() in (".jpg", ".jpeg"):
        return f"{what} {expected} is missing but {found} exists, a JPEG; {_NOT_JPEG_FIX}"
    return (f"{what} {expected} is missing but {found} exists; labels are read as {expected.suffix} files: save it "
            f"as {expected.name}")


def read_label_map(path: str | Path, what: str = "label") -> np.ndarray:
    """Decode a single-channel PNG of integer ids (8 or 16 bit) to an HxW array, or raise DataError."""
    try:
        with Image.open(path) as img:
            if img.format in _LOSSY_FORMATS:
                raise DataError(f"{what} file {path} is a JPEG; {_NOT_JPEG_FIX}")
            if img.mode not in ("L", "P", "I;16", "I;16L", "I;16B", "I", "1"):
                raise DataError(
                    f"{what} file {path} has image mode {img.mode}; expected a single-channel PNG of integer ids "
                    "(a colour-coded mask: convert it with `ovenet convert-labels MASKS OUT --palette NAME|FILE`)"
                )
            img.load()
            # P images hold palette indices, which are the ids; asarray returns them directly.
            array = np.asarray(img)
    except FileNotFoundError:
        raise DataError(missing_label_message(Path(path), what)) from None
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"cannot decode {what} {path} ({exc}); the file is corrupt or truncated, replace it"
        ) from None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def _format_values(values: Iterable[int], limit: int = 10) -> str:
    values = [int(v) for v in values]
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > limit else "")


class LabelTable:
    """Maps raw label values to train ids (uint8) and rejects values that are not in the table.

    ``mapping[raw] = train_id`` for every valid raw value; raw values absent from ``mapping`` are invalid.
    """

    _INVALID = 0xFFFF  # a uint16 lookup leaves room for an "invalid" marker above every uint8 train id

    def __init__(self, mapping: Mapping[int, int], description: str,
                 fix: Callable[[list[int]], str] | None = None):
        size = max(max(mapping, default=0) + 1, 256)
        self.lookup = np.full(size, self._INVALID, dtype=np.uint16)
        for raw, train_id in mapping.items():
            if not 0 <= train_id <= 255:
                raise ValueError(f"train id {train_id} for raw value {raw} does not fit in uint8")
            self.lookup[raw] = train_id
        self.description = description
        self.fix = fix or (lambda bad_values: "fix or regenerate the file")

    def __call__(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        if raw.size == 0:
            return raw.astype(np.uint8)
        if (raw.dtype.kind == "i" and raw.min() < 0) or raw.max() >= len(self.lookup):
            self._raise(raw, (raw < 0) | (raw >= len(self.lookup)), path)
        mapped = np.take(self.lookup, raw)  # one gather maps and marks invalid values at once
        if mapped.max() == self._INVALID:
            self._raise(raw, mapped == self._INVALID, path)
        return mapped.astype(np.uint8)

    def _raise(self, raw: np.ndarray, bad_mask: np.ndarray, path: str | Path) -> None:
        bad = np.unique(raw[bad_mask])
        raise DataError(
            f"label {path} contains values {_format_values(bad)} outside {self.description}; "
            f"{self.fix([int(v) for v in bad])}"
        )


def generic_palette(num_colors: int, skip_black: bool = False) -> list[tuple[int, int, int]]:
    """The Pascal VOC bit-interleaved palette: fixed, distinct colours for any number of classes."""
    palette = []
    for index in range(int(skip_black), num_colors + int(skip_black)):
        r = g = b = 0
        code = index
        for bit in range(7, -1, -1):
            r |= (code & 1) << bit
            g |= ((code >> 1) & 1) << bit
            b |= ((code >> 2) & 1) << bit
            code >>= 3
        palette.append((r, g, b))
    return palette


def describe_directory(path: Path, limit: int = 6) -> str:
    """What a user actually has at ``path``, for "expected X, found Y" messages."""
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        return f"{path} does not exist; " + describe_directory(parent, limit)
    if not path.is_dir():
        return f"{path} is a file, not a directory"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return f"{path} is empty"
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return f"{path} contains " + ", ".join(entries[:limit]) + more


# check-data lists every problem of a split: there a missing label is one problem among others (its sample fails
# to load later, named), not the end of the listing.
_LIST_EVERY_PROBLEM: contextvars.ContextVar[bool] = contextvars.ContextVar("ovenet_list_every_problem", default=False)


@contextlib.contextmanager
def listing_every_problem() -> Iterator[None]:
    token = _LIST_EVERY_PROBLEM.set(True)
    try:
        yield
    finally:
        _LIST_EVERY_PROBLEM.reset(token)


def raise_if_missing(missing: Sequence[tuple[Path, Path]]) -> None:
    if missing and not _LIST_EVERY_PROBLEM.get():
        raise missing_label_error(missing)


def missing_label_error(missing: Sequence[tuple[Path, Path]]) -> DataError:
    """One-line error for images without a label: the first one in full, the rest counted."""
    image, label = missing[0]
    others = f" (and {len(missing) - 1} more images without labels)" if len(missing) > 1 else ""
    if label_elsewhere(label) is not None:
        return DataError(f"no label for image {image}: {missing_label_message(label)}{others}")
    return DataError(f"no label for image {image}: expected {label}{others}")


class SegmentationDataset(Dataset):
    """Base class: a list of :class:`SampleFiles`, a :class:`LabelTable` and a transform.

    Subclasses fill ``self.samples`` in ``__init__`` and set the class metadata below.
    """

    # Set by every subclass (as class attributes, or per instance for users' own data).
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = IGNORE_INDEX

    def __init__(
        self, samples: list[SampleFiles], label_table: LabelTable | None, transform: Transform | None
    ):
        self.samples = samples
        self.label_table = label_table
        self.transform = transform if transform is not None else EvalTransform()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_labels(self) -> bool:
        return bool(self.samples) and self.samples[0].label is not None

    def load(self, index: int) -> dict[str, np.ndarray]:
        """Decode and validate one sample, before any transform: uint8 image HxWx3, uint8 train-id label HxW."""
        files = self.samples[index]
        sample = {"image": read_image(files.image)}
        if files.label is not None:
            raw_label = read_label_map(files.label)
            check_same_size(files.image, sample["image"], files.label, raw_label)
            sample["label"] = self.label_table(raw_label, files.label)
            self._load_extras(files, raw_label, sample)
        return sample

    def _load_extras(self, files: SampleFiles, raw_label: np.ndarray, sample: dict) -> None:
        """Hook for dataset-specific extra maps (Cityscapes instance ids)."""

    def __getitem__(self, index: int) -> dict:
        files = self.samples[index]
        out = self.transform(self.load(index))
        out["name"] = files.name
        if files.condition is not None:
            out["condition"] = files.condition
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"


def check_same_size(image_path: Path, image: np.ndarray, other_path: Path, other: np.ndarray) -> None:
    if image.shape[:2] != other.shape[:2]:
        (ih, iw), (oh, ow) = image.shape[:2], other.shape[:2]
        raise DataError(
            f"image {image_path} is {ih}x{iw} (HxW) but {other_path} is {oh}x{ow}; image and label must match"
        )


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
    raise_if_missing(missing)
    return samples


def check_dataset(dataset: Dataset, progress: bool = False) -> list[str]:
    """Load every sample and return one line per problem found (empty list: the dataset is clean).

    Unlike iterating the dataset, this does not stop at the first broken file. The same problem in many files
    (every CamVid label holding the void id 11) is one line: the first file, and how many more.
    """
    return [line for line, _ in collect_problems(dataset, progress)]


def collect_problems(dataset: Dataset, progress: bool = False) -> list[tuple[str, int]]:
    """``(line, files)`` per distinct problem of :func:`check_dataset`: the first file's message, naming how many
    more files have the same one (the same message once the file names are taken out)."""
    if len(dataset) == 0:
        return [(f"{dataset!r} has no samples", 1)]
    indices: Iterable[int] = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="checking", unit="sample")
    # load() skips the transform: validation is about the files, and it is faster.
    load = dataset.load if isinstance(dataset, SegmentationDataset) else dataset.__getitem__
    samples = getattr(dataset, "samples", None)
    groups: dict[str, list[str]] = {}
    for index in indices:
        try:
            load(index)
        except DataError as exc:
            message = template = str(exc)
            if samples is not None:
                files = samples[index]
                for path in (files.label, files.instance, files.image):
                    if path is not None:
                        template = template.replace(str(path), "<file>")
            groups.setdefault(template, []).append(message)
    def more(count: int) -> str:
        return f" (the same in {count} more file{'s' if count > 1 else ''})" if count else ""

    return [(messages[0] + more(len(messages) - 1), len(messages)) for messages in groups.values()]


def to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array)
