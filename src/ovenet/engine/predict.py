"""Predict image files, folders and videos and write the results as PNG files.

For an input ``<stem>.<ext>`` the files written into ``out_dir`` are:

- ``<stem>_color.png``: the label map in the dataset palette (``color``);
- ``<stem>_overlay.png``: that colour blended 50/50 over the image (``overlay``);
- ``<stem>_labels.png``: class indices, 8 bit (16 bit past 256 classes) (``raw``);
- ``<stem>_labelIds.png``: Cityscapes label ids, ready for the benchmark server, for cityscapes/acdc
  (``labelids``);
- OVeNet only: ``<stem>_offsets.png`` (offset field in the optical-flow colour code, saturation = the image's
  longest offset) and ``<stem>_confidence.png`` (viridis, 0 = dark purple, 1 = yellow).

Files of a folder keep their sub-folder inside ``out_dir``; a video ``clip.mp4`` gives ``clip/clip_000000_*.png``
per frame. Nothing is replaced without ``overwrite``, an input is never replaced, and ``out_dir`` may not be an
input's own folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from ovenet import vis
from ovenet.data.base import IMAGE_EXTENSIONS, read_image
from ovenet.engine.inference import predict
from ovenet.errors import DataError, OvenetError

SAVE_KINDS = ("color", "overlay", "raw", "labelids", "offsets", "confidence")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
CITYSCAPES_LIKE = ("cityscapes", "acdc")


def _image_files(folder: Path, exclude: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and exclude not in path.parents:
            files.append(path)
    return files


def plan_inputs(inputs: Sequence[str | Path], out_dir: Path) -> list[tuple[Path, Path, bool]]:
    """``(input file, output prefix, is_video)`` per input: folders are expanded recursively (skipping
    ``out_dir`` inside them) and keep their relative sub-folders."""
    out_resolved = out_dir.resolve()
    plan = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        folder = path if path.is_dir() else path.parent
        if folder.resolve() == out_resolved:
            raise OvenetError(f"output folder {out_dir} is the folder of input {path}; choose a separate output "
                              "folder so that inputs and results do not mix")
        if path.is_dir():
            files = _image_files(path, out_resolved)
            if not files:
                raise DataError(f"input folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            for file in files:
                rel = file.relative_to(path)
                plan.append((file, out_dir / rel.parent / rel.stem, False))
        elif path.suffix.lower() in VIDEO_EXTENSIONS:
            _require_av(path)  # fail before anything is written
            plan.append((path, out_dir / path.stem / path.stem, True))
        else:
            plan.append((path, out_dir / path.stem, False))
    return plan


def _kinds(save: Iterable[str], dataset_name: str, is_ovenet: bool, num_classes: int) -> list[str]:
    save = list(save)
    unknown = [s for s in save if s not in SAVE_KINDS]
    if unknown:
        raise OvenetError(f"unknown output kind(s) {', '.join(unknown)}; choose from {', '.join(SAVE_KINDS)}")
    kinds = [s for s in SAVE_KINDS if s in save]
    if not (dataset_name in CITYSCAPES_LIKE and num_classes == 19):
        kinds = [k for k in kinds if k != "labelids"]
    if not is_ovenet:
        kinds = [k for k in kinds if k not in ("offsets", "confidence")]
    return kinds


def _suffix(kind: str) -> str:
    return {"raw": "labels", "labelids": "labelIds"}.get(kind, kind)


def _require_av(path: Path):
    try:
        import av  # optional dependency
    except ImportError:
        raise OvenetError(f"reading video {path} needs PyAV: pip install av (or extract the frames as images)") from None
    return av


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    av = _require_av(path)
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise DataError(f"cannot decode video {path} ({e}); the file is corrupt or not a video") from None


def predict_files(
    model: nn.Module,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    palette: Sequence[Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    dataset_name: str = "cityscapes",
    save: Iterable[str] = SAVE_KINDS,
    overwrite: bool = False,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    precision: str = "fp32",
    device: str | None = None,
    crop_size: Sequence[int] | None = None,
    alpha: float = 0.5,
    progress: bool = False,
) -> list[Path]:
    """Predict every input (image files, folders of images, videos) and write the chosen PNGs; returns them.

    ``palette`` defaults to the palette of ``dataset_name`` (Cityscapes by default); ``class_names`` is accepted
    for callers that report classes and is not written anywhere.
    """
    from ovenet.data import dataset_info
    from ovenet.data.base import generic_palette
    from ovenet.data.cityscapes import trainid_to_labelid

    del class_names  # the PNGs carry no names; kept in the signature for the CLI's symmetry
    out_dir = Path(out_dir)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    is_ovenet = bool(getattr(model, "is_ovenet", False))
    kinds = _kinds(save, dataset_name, is_ovenet, num_classes)
    if not kinds:
        raise OvenetError("nothing to write: choose at least one of " + ", ".join(SAVE_KINDS))
    if palette is None:
        try:
            palette = dataset_info(dataset_name, num_classes)[2]
        except OvenetError:
            palette = []
    if len(palette) < num_classes:
        palette = generic_palette(num_classes)

    plan = plan_inputs(inputs, out_dir)
    _check_outputs(plan, kinds, overwrite)

    written: list[Path] = []
    items: Iterable = plan
    if progress:
        from tqdm import tqdm

        items = tqdm(plan, desc="predict", unit="file")
    for source, prefix, is_video in items:
        frames = _video_frames(source) if is_video else iter([read_image(source)])
        for index, image in enumerate(frames):
            stem = f"{prefix}_{index:06d}" if is_video else str(prefix)
            result = predict(model, image, device=device, precision=precision, scales=scales, flip=flip,
                             mode=mode, crop_size=crop_size)
            color = vis.colorize(result.labels, palette) if {"color", "overlay"} & set(kinds) else None
            for kind in kinds:
                path = Path(f"{stem}_{_suffix(kind)}.png")
                if kind == "color":
                    array = color
                elif kind == "overlay":
                    array = vis.overlay(image, color, alpha)
                elif kind == "raw":
                    array = result.labels.astype(np.uint8 if num_classes <= 256 else np.uint16)
                elif kind == "labelids":
                    array = trainid_to_labelid(result.labels).astype(np.uint8)
                elif kind == "offsets":
                    array = vis.flow_to_color(result.offsets)
                else:
                    array = vis.confidence_to_color(result.confidence)
                written.append(vis.save_png(path, array))
    return written


def _check_outputs(plan: list[tuple[Path, Path, bool]], kinds: list[str], overwrite: bool) -> None:
    """Refuse clashes between inputs' outputs, outputs that would replace an input, and (without ``overwrite``)
    existing files; all before anything is written."""
    inputs = {source.resolve() for source, _, _ in plan}
    owner: dict[Path, Path] = {}
    existing: list[Path] = []
    for source, prefix, is_video in plan:
        if is_video:
            folder = prefix.parent
            if not overwrite and folder.is_dir() and any(folder.glob(f"{prefix.name}_*.png")):
                existing.append(folder)
            continue
        for kind in kinds:
            path = Path(f"{prefix}_{_suffix(kind)}.png")
            resolved = path.resolve()
            if resolved in inputs:
                raise OvenetError(f"output {path} would replace the input image {path}; choose another output folder")
            if resolved in owner:
                raise OvenetError(f"inputs {owner[resolved]} and {source} would both write {path}; rename one or "
                                  "predict them into different output folders")
            owner[resolved] = source
            if not overwrite and path.exists():
                existing.append(path)
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OvenetError(f"output {existing[0]} already exists{more}; pass --overwrite (overwrite=True) to replace "
                          "earlier results or choose another output folder")
