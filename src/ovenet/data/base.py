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


# Modes whose RGB conversion in Pillow is what a viewer shows, alpha aside (dropped: the colours as stored, not
# composited over a background). Multi-byte ones are handled by ``image_to_rgb`` itself.
_CONVERTIBLE_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
# EXIF orientation -> the transposition that turns the stored pixels into what a viewer shows.
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # those turn the image by 90 degrees: height and width trade places


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation (1 = as stored; 2-8 as the EXIF standard), 1 when absent or unreadable."""
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except (OSError, ValueError, TypeError, SyntaxError):  # a broken EXIF block is not a broken image
        return 1
    return orientation if orientation in _ORIENTATIONS else 1


def image_to_rgb(img: Image.Image, source: str | Path | None = None) -> np.ndarray:
    """A PIL image -> HxWx3 uint8 RGB of what a viewer shows, or DataError naming ``source`` and the fix.

    The EXIF orientation is applied. 16-bit grey (``I;16*``, and ``I`` holding values 0-65535) becomes
    ``round(value / 257)`` (65535 -> 255, 257*k -> k); Pillow itself decodes 16-bit colour PNGs to the high
    byte (``value // 256``), which equals that for every 8-bit value scaled by 257 and is within 1 otherwise.
    1-bit, palette (its colours; a transparent entry keeps its colour), grey, CMYK (Pillow's conversion, no
    colour profile) and YCbCr convert as Pillow converts them; alpha is dropped. Modes with no known value range
    (float ``F``, ``I`` beyond 0-65535) are refused.
    """
    name = "image" if source is None else f"image {source}"
    orientation = exif_orientation(img)
    if orientation != 1:
        img = img.transpose(_ORIENTATIONS[orientation])
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{name} has 32-bit integer pixels ({values.min()}..{values.max()}), whose brightness "
                            "scale is unknown; save it as an 8-bit or 16-bit (0-65535) image")
        grey = ((values * 2 + 257) // 514).astype(np.uint8)  # round(v / 257); v / 257 is never exactly k + 0.5
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode not in _CONVERTIBLE_MODES:
        kind = "floating-point pixels, whose brightness scale is unknown" if img.mode == "F" else "an unusual mode"
        raise DataError(f"{name} has image mode {img.mode} ({kind}); save it as an 8-bit or 16-bit RGB or grey image")
    if img.mode in ("P", "PA") and "transparency" in img.info:  # via RGBA: Pillow warns on P -> RGB with alpha
        return np.ascontiguousarray(np.asarray(img.convert("RGBA"))[..., :3])
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def decode_image(path: str | Path) -> tuple[np.ndarray, int]:
    """An image file -> (HxWx3 uint8 RGB as a viewer shows it, its EXIF orientation), or DataError naming it.
    See :func:`image_to_rgb` for the modes read and refused."""
    try:
        with Image.open(path) as img:
            img.load()  # forces the full decode, so truncation surfaces here
            return image_to_rgb(img, path), exif_orientation(img)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist; check the dataset root") from None
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"cannot decode image {path} ({exc}); the file is corrupt or truncated, replace it"
        ) from None


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 RGB array as a viewer shows it (EXIF orientation applied; modes:
    :func:`image_to_rgb`), or raise DataError naming the file."""
    return decode_image(path)[0]


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
        image, orientation = decode_image(files.image)
        sample = {"image": image}
        if files.label is not None:
            raw_label = read_label_map(files.label)
            check_label_orientation(files.image, image, orientation, files.label, raw_label)
            check_same_size(files.image, image, files.label, raw_label)
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


def check_label_orientation(image_path: Path, image: np.ndarray, orientation: int, label_path: Path,
                            label: np.ndarray) -> None:
    """Refuse a label that may belong to the image's other orientation.

    Images are read as a viewer shows them (EXIF orientation applied) and labels as stored, so a label must
    have been drawn on the image as shown. A 90-degree orientation on a non-square image tells which it was
    from the label's size (the stored size is refused here, with the fix); a mirror, a 180-degree turn or a
    square image cannot tell, so those are refused rather than risk a label paired upside down.
    """
    if orientation == 1:
        return
    height, width = image.shape[:2]
    fix = ("apply the rotation to the image file (PIL.ImageOps.exif_transpose, then save) and make the label "
           "match the image as saved")
    if orientation in SWAPPING_ORIENTATIONS and height != width:
        if label.shape[:2] == (width, height):
            raise DataError(f"label {label_path} is {width}x{height} (HxW), the size of image {image_path} as "
                            f"stored, but its EXIF orientation {orientation} shows the image turned by 90 degrees "
                            f"({height}x{width}); {fix}")
        return
    raise DataError(f"image {image_path} carries EXIF orientation {orientation} (shown turned or mirrored), and "
                    f"whether label {label_path} was drawn on the image as shown or as stored cannot be told from "
                    f"its size; {fix}")


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
