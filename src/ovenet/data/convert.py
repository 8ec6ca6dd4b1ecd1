"""Colour-coded label masks to the id PNGs that ovenet reads (``ovenet convert-labels``).

Each output is a palette ('P') PNG: its pixel values are the class ids (255 = void) and its palette the class
colours, so it still looks like the colour mask in any viewer while :func:`ovenet.data.base.read_label_map`
reads the ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ovenet.data.base import IMAGE_EXTENSIONS, read_image
from ovenet.data.transforms import IGNORE_INDEX
from ovenet.errors import DataError, OvenetError
from ovenet.files import replaced

Colour = tuple[int, int, int]


def parse_colour(text: str) -> Colour:
    """``"R,G,B"`` -> (r, g, b), each 0-255."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise OvenetError(f"colour '{text}' is not R,G,B with values 0-255, e.g. 0,0,0")
    return values  # type: ignore[return-value]


def load_palette(spec: str) -> list[Colour]:
    """A dataset's palette by name (camvid, cityscapes, ade20k, ...), or a JSON/YAML file holding a list of
    [r, g, b] (class k's colour at index k), or a config whose ``data.palette`` is set."""
    from ovenet.data.factory import dataset_info

    path = Path(spec)
    if not path.is_file():
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            raise OvenetError(f"palette file {spec} does not exist")
        try:
            return [tuple(c) for c in dataset_info(spec)[2]]  # type: ignore[misc]
        except OvenetError:
            raise OvenetError(f"--palette {spec} is neither a file nor a dataset with a palette (camvid, cityscapes, "
                              "ade20k, acdc); give a JSON/YAML list of [r, g, b], one per class") from None
    try:
        data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OvenetError(f"palette file {path} cannot be read ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict):  # a config: its data.palette
        from ovenet.config import load_config

        data = load_config(path).data.palette
        if data is None:
            raise OvenetError(f"config {path} sets no data.palette; add one [r, g, b] per class")
    if not (isinstance(data, list) and data and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in data)):
        raise OvenetError(f"palette file {path} must hold a list of [r, g, b] colours (0-255), one per class")
    return [tuple(c) for c in data]  # type: ignore[misc]


def _codes(colours: Sequence[Sequence[int]]) -> np.ndarray:
    array = np.asarray(colours, dtype=np.int64).reshape(-1, 3)
    return (array[:, 0] << 16) | (array[:, 1] << 8) | array[:, 2]


def _check_palette(palette: Sequence[Colour], void: Sequence[Colour]) -> None:
    if not palette:
        raise OvenetError("the palette is empty; give one [r, g, b] per class")
    if len(palette) > IGNORE_INDEX:
        raise OvenetError(f"the palette has {len(palette)} colours; id PNGs hold at most {IGNORE_INDEX} classes")
    seen: dict[Colour, int] = {}
    for index, colour in enumerate(palette):
        if colour in seen:
            raise OvenetError(f"the palette gives colour {colour} to classes {seen[colour]} and {index}; "
                              "each class needs its own colour")
        seen[colour] = index
    both = [c for c in void if c in seen]
    if both:
        raise OvenetError(f"--void colour {both[0]} is class {seen[both[0]]} of the palette; a colour is a class or "
                          "void, not both")


def colours_to_ids(rgb: np.ndarray, palette: Sequence[Colour], void: Sequence[Colour], path: Path) -> np.ndarray:
    """HxWx3 colours -> HxW uint8 ids (void colours: 255); a colour in neither list raises DataError."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    known = np.concatenate([_codes(palette), _codes(void) if void else np.zeros(0, np.int64)])
    ids = np.concatenate([np.arange(len(palette)), np.full(len(void), IGNORE_INDEX)]).astype(np.uint8)
    order = np.argsort(known)
    position = np.clip(np.searchsorted(known[order], codes), 0, len(known) - 1)
    found = known[order][position] == codes
    if not found.all():
        unknown, counts = np.unique(codes[~found], return_counts=True)
        worst = int(unknown[np.argmax(counts)])
        colour = (worst >> 16, (worst >> 8) & 255, worst & 255)
        others = f" (and {len(unknown) - 1} more unknown colours)" if len(unknown) > 1 else ""
        raise DataError(
            f"colour mask {path} has colour {','.join(map(str, colour))} in {int(counts.max())} pixels, which is not "
            f"in the palette{others}; if it marks void pixels add --void {','.join(map(str, colour))}, otherwise "
            "give the palette the masks were drawn with (--palette)")
    return ids[order][position]


def id_png(ids: np.ndarray, palette: Sequence[Colour], void_colour: Colour = (0, 0, 0)) -> Image.Image:
    """A 'P' image whose values are ``ids`` and whose palette is the class colours (index 255: ``void_colour``)."""
    image = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))  # "L"; putpalette makes it "P"
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette
    table[IGNORE_INDEX] = void_colour
    image.putpalette(table.reshape(-1).tolist())
    return image


def _sources(inputs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(file, output path relative to OUT) per colour mask; folders are searched recursively."""
    found = []
    for source in inputs:
        if source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"no images in {source}; give the folder of colour masks")
            found += [(f, f.relative_to(source).with_suffix(".png")) for f in files]
        elif source.is_file():
            found.append((source, Path(source.stem + ".png")))
        else:
            raise DataError(f"colour mask input {source} does not exist")
    targets = [relative for _, relative in found]
    if len(set(targets)) < len(targets):
        twice = next(t for t in targets if targets.count(t) > 1)
        raise DataError(f"two inputs would both be written as {twice}; convert them into separate OUT folders")
    return found


def convert_labels(inputs: Sequence[str | Path], out_dir: str | Path, palette: Sequence[Colour],
                   void: Sequence[Colour] = (), overwrite: bool = False) -> list[Path]:
    """Convert colour masks (files, or folders searched recursively) into id PNGs under ``out_dir`` (a folder's
    files keep their relative paths) and return the files written.

    Every mask is checked before anything is written, so a refused colour leaves ``out_dir`` as it was; an
    existing output is refused unless ``overwrite``.
    """
    palette = [tuple(int(v) for v in c) for c in palette]
    void = [tuple(int(v) for v in c) for c in void]
    _check_palette(palette, void)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    plan = [(source, out_dir / relative) for source, relative in _sources([Path(p) for p in inputs])]
    existing = [out for _, out in plan if out.exists()]
    if existing and not overwrite:
        raise OvenetError(f"{existing[0]} exists ({len(existing)} of the {len(plan)} outputs do); choose another "
                          "OUT folder or pass --overwrite to replace them")
    for source, _ in plan:  # every mask first: a bad colour must not leave half a dataset converted
        colours_to_ids(read_image(source), palette, void, source)  # type: ignore[arg-type]
    written = []
    for source, out in plan:
        ids = colours_to_ids(read_image(source), palette, void, source)  # type: ignore[arg-type]
        with replaced(out) as tmp:  # whole or not at all, with the umask's mode like every output
            id_png(ids, palette, void[0] if void else (0, 0, 0)).save(tmp, format="PNG")  # type: ignore[arg-type]
        written.append(out)
    return written
