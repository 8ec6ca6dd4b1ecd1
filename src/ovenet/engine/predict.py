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
per frame, and the overlay (or colour) frames as a video again, ``clip/clip_overlay.mp4``. An input is never replaced, and ``out_dir`` may not be an input's own folder.

Reruns continue: every PNG is written to a temporary name and renamed, so a file that exists is complete, and
without ``overwrite`` an image (or video frame) whose outputs all exist is kept and not predicted again. The
settings that made an output (a fingerprint of the weights, the same whichever runtime ran them, and the model
config, precision, scales, flip, mode, ...) are recorded in the PNG itself (text chunk ``ovenet``); a rerun whose
settings differ from those of the outputs it would keep is refused rather than mixing results, unless
``overwrite``. With ``skip_bad`` an unreadable input is passed over and reported instead of stopping the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ovenet import vis
from ovenet.checkpoint import weights_digest
from ovenet.data.base import IMAGE_EXTENSIONS, read_image
from ovenet.engine.logging import Progress
from ovenet.errors import DataError, OvenetError, install_command
from ovenet.export import ONNX_FILE_DIGEST
from ovenet.files import replaced
from ovenet.inference import InferenceSettings, predict
from ovenet.threads import take_note

SAVE_KINDS = ("color", "overlay", "labels", "labelids", "offsets", "confidence")  # the file suffixes too
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
CITYSCAPES_LIKE = ("cityscapes", "acdc")
SETTINGS_KEY = "ovenet"  # PNG text chunk holding the settings that made the file


class PredictionResult(list):
    """The files written (a ``list`` of paths, as before) and what was not predicted.

    ``already_done``: images and video frames whose outputs were all present and were kept;
    ``skipped``: ``(input, reason)`` for each unreadable input passed over with ``skip_bad``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.already_done = 0
        self.skipped: list[tuple[Path, str]] = []
        self.inputs_done = 0  # inputs (images, videos) finished or skipped so far


class PredictionInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`predict_files`: its message says how far it got and that a rerun continues (every file
    written is whole: PNGs and videos are renamed into place only once complete)."""

    def __init__(self, done: int, total: int, out_dir: Path):
        super().__init__(f"interrupted after {done} of {total} input(s); the outputs written to {out_dir} are "
                         "complete; rerun the same command to continue")


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


def _kinds(save: Iterable[str] | None, dataset_name: str, is_ovenet: bool, num_classes: int) -> list[str]:
    """The kinds to write: those asked for (each must apply to this model), or by default all that apply."""
    cityscapes_ids = dataset_name in CITYSCAPES_LIKE and num_classes == 19
    applies = {"labelids": cityscapes_ids, "offsets": is_ovenet, "confidence": is_ovenet}
    if save is None:
        return [k for k in SAVE_KINDS if applies.get(k, True)]
    save = list(save)
    unknown = [s for s in save if s not in SAVE_KINDS]
    if unknown:
        raise OvenetError(f"unknown output kind(s) {', '.join(unknown)}; choose from {', '.join(SAVE_KINDS)}")
    if "labelids" in save and not cityscapes_ids:
        raise OvenetError(f"--save labelids needs a Cityscapes/ACDC model (19 train ids mapped to label ids); this "
                          f"model is '{dataset_name}' with {num_classes} classes: save labels instead")
    if not is_ovenet and {"offsets", "confidence"} & set(save):
        raise OvenetError("--save offsets/confidence need an OVeNet model; this checkpoint is a baseline "
                          "(no offset head)")
    return [k for k in SAVE_KINDS if k in save]


def _suffix(kind: str) -> str:
    return {"labelids": "labelIds"}.get(kind, kind)


def _require_av(path: Path):
    try:
        import av  # optional dependency
    except ImportError:
        raise OvenetError(f"reading video {path} needs PyAV: {install_command('video')} (or extract the frames as "
                          "images)") from None
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
    dataset_name: str = "cityscapes",
    save: Iterable[str] | None = None,
    overwrite: bool = False,
    scales: Sequence[float] | None = None,
    flip: bool | None = None,
    mode: str | None = None,
    precision: str = "fp32",
    device: str | None = None,
    crop_size: Sequence[int] | None = None,
    alpha: float = 0.5,
    progress: bool = False,
    skip_bad: bool = False,
    native_size: bool = False,
    max_size: int | None = None,
) -> PredictionResult:
    """Predict every input (image files, folders of images, videos) and write the chosen PNGs.

    Returns the files written, with ``already_done`` (kept from an earlier run; ``overwrite`` redoes them) and
    ``skipped`` (unreadable inputs, with ``skip_bad``; without it the first one raises :class:`DataError`).
    ``palette`` defaults to the model's config's ``data.palette`` when it sets one, else to the palette of
    ``dataset_name`` (Cityscapes by default). ``save``: the kinds to write (default: every kind that applies to
    the model); asking for one that does not apply is an error. ``progress``:
    a bar on a terminal, otherwise a line every few seconds with images/s and the ETA. ``scales``, ``flip``,
    ``mode``, ``crop_size`` default to the checkpoint's eval settings, and images are resized as eval resizes
    them unless ``native_size``; ``max_size`` shrinks longer images to that long side first, and images beyond
    the pixel budget run in windows (see :func:`ovenet.inference.predict`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OvenetError(f"output folder {out_dir} is a file; predictions go to a folder: choose another --out")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    is_ovenet = bool(getattr(model, "is_ovenet", False))
    kinds = _kinds(save, dataset_name, is_ovenet, num_classes)
    if not kinds:
        raise OvenetError("nothing to write: choose at least one of " + ", ".join(SAVE_KINDS))
    palette = _palette(model, palette, dataset_name, num_classes)

    plan = plan_inputs(inputs, out_dir)
    _check_outputs(plan, kinds)
    test = InferenceSettings.for_model(model, native_size, mode=mode, scales=scales, flip=flip, crop_size=crop_size,
                                       max_size=max_size)
    settings = _settings(model, palette[:num_classes], dataset_name, test, precision, alpha)
    if not overwrite:
        _check_same_settings(out_dir, plan, kinds, settings)
    tag = json.dumps(settings)

    result = PredictionResult()
    frames_known = not any(is_video for _, _, is_video in plan)  # a video's frame count is known only at its end
    meter = Progress(len(plan) if frames_known else None, "predict", enabled=progress,
                     note=take_note() if progress else None)
    try:
        for source, prefix, is_video in plan:
            try:
                frames = _video_frames(source) if is_video else iter([None])
                for index, image in enumerate(frames):
                    stem = f"{prefix}_{index:06d}" if is_video else str(prefix)
                    paths = {kind: Path(f"{stem}_{_suffix(kind)}.png") for kind in kinds}
                    todo = [k for k in kinds if overwrite or not paths[k].exists()]
                    if not todo:
                        result.already_done += 1
                        meter.update()
                        continue
                    if image is None:
                        image = read_image(source)
                    prediction = predict(model, image, device=device, precision=precision, scales=test.scales,
                                         flip=test.flip, mode=test.mode, crop_size=test.crop_size,
                                         native_size=native_size, max_size=test.max_size)
                    color = vis.colorize(prediction.labels, palette) if {"color", "overlay"} & set(todo) else None
                    for kind in todo:
                        array = _rendered(kind, image, prediction, color, num_classes, alpha)
                        result.append(_save_png_atomic(paths[kind], array, tag))
                    meter.update()
                if is_video and {"overlay", "color"} & set(kinds):
                    video_out = _write_video(source, prefix, "overlay" if "overlay" in kinds else "color", overwrite)
                    if video_out is not None:
                        result.append(video_out)
            except DataError as e:
                if not skip_bad:
                    raise DataError(f"{e}; or pass --skip-bad to skip unreadable inputs") from None
                result.skipped.append((source, str(e)))
            result.inputs_done += 1
    except KeyboardInterrupt:
        meter.close()
        raise PredictionInterrupted(result.inputs_done, len(plan), out_dir) from None
    meter.close()
    return result


def _palette(model: nn.Module, palette: Sequence[Sequence[int]] | None, dataset_name: str, num_classes: int
             ) -> Sequence[Sequence[int]]:
    """The colours asked for, else the checkpoint config's ``data.palette``, else the dataset's; a generic palette
    when those have fewer colours than the model has classes."""
    from ovenet.data import class_info, dataset_info
    from ovenet.data.base import generic_palette

    if palette is None:
        data = getattr(getattr(model, "config", None), "data", None)  # a checkpoint's config: its data.palette
        try:
            palette = (class_info(data, num_classes)[2] if getattr(data, "palette", None) is not None
                       else dataset_info(dataset_name, num_classes)[2])
        except OvenetError:
            palette = []
    return palette if len(palette) >= num_classes else generic_palette(num_classes)


def _rendered(kind: str, image: np.ndarray, prediction: Any, color: np.ndarray | None, num_classes: int,
              alpha: float) -> np.ndarray:
    """The picture or label map of one output kind (see :data:`SAVE_KINDS`)."""
    if kind == "color":
        return color
    if kind == "overlay":
        return _in_bands(lambda rows: vis.overlay(image[rows], color[rows], alpha), len(image))
    if kind == "labels":
        return prediction.labels.astype(np.uint8 if num_classes <= 256 else np.uint16)
    if kind == "labelids":
        from ovenet.data.cityscapes import trainid_to_labelid

        return trainid_to_labelid(prediction.labels).astype(np.uint8)
    if kind == "offsets":
        offsets = prediction.offsets
        # flow_to_color's own saturation scale (the longest offset), by its arithmetic, over the whole image.
        longest = max(float(np.sqrt(np.nan_to_num(band[0].astype(np.float64)) ** 2
                                    + np.nan_to_num(band[1].astype(np.float64)) ** 2).max())
                      for band in (offsets[:, top:top + RENDER_ROWS] for top in range(0, offsets.shape[1], RENDER_ROWS)))
        return vis.with_key(_in_bands(lambda rows: vis.flow_to_color(offsets[:, rows], longest), offsets.shape[1]),
                            "offsets")
    confidence = prediction.confidence
    return vis.with_key(_in_bands(lambda rows: vis.confidence_to_color(confidence[rows]), len(confidence)),
                        "confidence")


# Rows rendered at a time: the float64 temporaries of a 6000-pixel-wide picture stay near 100 MB each, where a
# whole 6000x4500 picture's took gigabytes. Every rendering is per pixel, so the bands join seamlessly.
RENDER_ROWS = 512


def _in_bands(render: Callable[[slice], np.ndarray], height: int) -> np.ndarray:
    return np.concatenate([render(slice(top, top + RENDER_ROWS)) for top in range(0, height, RENDER_ROWS)], axis=0)


def _write_video(source: Path, prefix: Path, kind: str, overwrite: bool) -> Path | None:
    """``<prefix>_<kind>.mp4``: the video's frames as written (overlay, else colour), at the input's frame rate,
    H.264 when this FFmpeg has it (MPEG-4 otherwise); None when it exists already (and not ``overwrite``)."""
    import av

    out = Path(f"{prefix}_{kind}.mp4")
    frames = sorted(prefix.parent.glob(f"{prefix.name}_[0-9][0-9][0-9][0-9][0-9][0-9]_{kind}.png"))
    if not frames or (out.exists() and not overwrite):
        return None
    with av.open(str(source)) as container:
        rate = container.streams.video[0].average_rate or 25
    from PIL import Image

    first = np.asarray(Image.open(frames[0]).convert("RGB"))
    height, width = first.shape[0] // 2 * 2, first.shape[1] // 2 * 2  # yuv420p needs even sizes
    with replaced(out) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for path in frames:
            rgb = np.asarray(Image.open(path).convert("RGB"))[:height, :width]
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def _save_png_atomic(path: Path, array: Any, tag: str) -> Path:
    """Write the PNG (with ``tag`` as its settings record) to a temporary name beside ``path``, then rename it:
    a file at ``path`` is always a complete PNG."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, tag)
    with replaced(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", pnginfo=info)
    return path


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _settings(model: nn.Module, palette: Sequence[Sequence[int]], dataset_name: str, test: InferenceSettings,
              precision: str, alpha: float) -> dict:
    """Everything that decides the pixels of the outputs, as JSON values (long ones as short hashes)."""
    # The weights, not the runtime that runs them: an ONNX Runtime model reports its source's fingerprint (an
    # export from an older ovenet, without one, reports its file hash). Precision stays below: bf16 changes pixels.
    weights = getattr(model, "weights_digest", None) or weights_digest(model)
    config = getattr(model, "config", None)
    settings = {
        "weights": weights,
        "model": _short_hash(asdict(config.model)) if config is not None else None,  # e.g. sampling overrides
        **test.record(),
        "precision": precision,
        "alpha": float(alpha),
        "palette": _short_hash([[int(c) for c in colour] for colour in palette]),
        "dataset": dataset_name,
    }
    return json.loads(json.dumps(settings))  # the form it has when read back


def _recorded_settings(path: Path) -> dict | None:
    """The settings recorded in an output PNG, or None (not ours, or from an ovenet that did not record them)."""
    from PIL import Image

    try:
        with Image.open(path) as image:  # text chunks precede the pixels: nothing is decoded
            recorded = json.loads(image.info.get(SETTINGS_KEY, "null"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _check_same_settings(out_dir: Path, plan: list[tuple[Path, Path, bool]], kinds: list[str],
                         settings: dict) -> None:
    """Refuse, before anything is written, to keep outputs that were made with other settings (the folder would
    mix results). Every existing output of an image is read (only its header); a video's first frame speaks for
    the video."""
    for _, prefix, is_video in plan:
        if is_video:
            frames = sorted(prefix.parent.glob(f"{prefix.name}_000000_*.png")) if prefix.parent.is_dir() else []
            existing = frames
        else:
            existing = [p for p in (Path(f"{prefix}_{_suffix(kind)}.png") for kind in kinds) if p.exists()]
        for path in existing:
            recorded = _recorded_settings(path)
            differ = [key for key in settings if recorded is not None and recorded.get(key) != settings[key]]
            if differ:
                why = _file_hash_note(str(recorded.get("weights")), settings["weights"])
                raise OvenetError(
                    f"outputs in {out_dir} were made with other settings ({', '.join(differ)} differ), e.g. "
                    f"{path}{why}; pass --overwrite to redo them, or choose another --out"
                )


def _file_hash_note(recorded: str, current: str) -> str:
    """Why the weights of one checkpoint can differ: one side ran an .onnx file exported by an older ovenet,
    which is known by its file's hash, not by the checkpoint's fingerprint."""
    if recorded == current or (recorded.startswith(ONNX_FILE_DIGEST) == current.startswith(ONNX_FILE_DIGEST)):
        return ""
    if current.startswith(ONNX_FILE_DIGEST):
        return (" (this .onnx file, from an older `ovenet export`, is known by its file hash, not its weights: "
                "predict with its checkpoint, whose --runtime torch and --runtime onnxruntime match, or export it "
                "again)")
    return (" (they were made by ONNX Runtime from an .onnx file of an older `ovenet export`, known by its file "
            "hash, not its weights: predict with that .onnx file; --runtime torch or onnxruntime on its checkpoint "
            "cannot match it)")


def _check_outputs(plan: list[tuple[Path, Path, bool]], kinds: list[str]) -> None:
    """Refuse clashes between inputs' outputs and outputs that would replace an input, before anything is written."""
    inputs = {source.resolve() for source, _, _ in plan}
    owner: dict[Path, Path] = {}
    for source, prefix, is_video in plan:
        if is_video:
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
