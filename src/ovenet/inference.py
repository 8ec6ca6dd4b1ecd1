"""Test-time inference: whole image, sliding window or the official protocol, multi-scale and flip, and the
Python ``predict`` API.

Modes of :func:`infer_logits`:

- ``whole``: every scaled image goes through the network at once.
- ``slide``: every scaled image is cut into windows of ``crop_size`` (stride 2/3 of the crop by default); an image
  smaller than the crop is padded up to it (with 0, the mean colour), so the network always sees a full crop.
  Overlapping windows average their *logits* through a count map, as mmsegmentation does.
- ``official``: the authors' multi-scale test (``cityscapes.py:125-178`` of the official code). Scales <= 1 run
  on the whole scaled image; scales > 1 as windows of ``crop_size`` with stride = the crop (the last one shifted
  to the border) and never padded. Each window averages the logits of the plain and the mirrored pass, takes
  ``exp``; windows average those ``exp`` values through a count map, and the scales' ``exp`` maps are summed at
  the input size. Nothing is padded, so OCR's global context and the offsets' normalisation always cover the
  real (scaled) image only.

How passes are combined in ``whole`` and ``slide``: passes (scales x flips) average their *softmax
probabilities* at the output size. The returned ``logits`` are the raw logits for a single pass and
``log(mean probability)`` otherwise, so ``softmax(logits)`` is always the averaged probability and ``argmax`` the
prediction. The official protocol instead averages ``exp(logits)``, which is not a probability (its scale differs
per pixel and pass); ``official`` returns ``log(sum of exp maps / number of scales)``, whose argmax is the
official prediction. The two mixtures are monotone in the same passes and rarely disagree on the argmax.

Scaled images are resized with :func:`ovenet.data.transforms.resize_image` (OpenCV's bilinear, as the official
code and our training augmentation); the long side becomes ``round(long * scale)`` and the short side keeps the
aspect ratio, rounded, as the official ``multi_scale_aug`` does.

Offsets are normalised image coordinates (x, y), so they survive resizing unchanged; a flipped pass negates the
x component, and a sliding window's offsets (normalised to the window) are rescaled to the whole image. The
returned offsets/confidence are the plain means over passes, meant for visualisation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ovenet.data.transforms import IMAGENET, EvalTransform, Normalisation, normalize_pixels, resize_image
from ovenet.device import autocast, resolve_device
from ovenet.errors import OvenetError
from ovenet.geometry import PIXELS, CellGrid, resize_to_pixels

# The six test scales of the paper's Cityscapes/ADE20K results (used with flip).
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
OUTPUTS = ("final", "initial", "seed")
MODES = ("whole", "slide", "official")
# Whole-mode images beyond this many pixels (after the test-time resizes) run in windows: above every standard
# evaluation image (Cityscapes 1024x2048, ACDC 1080x1920), so predict still writes the labels eval scores there,
# and a 6000x4500 photo stays below 4 GiB with the EfficientNet-Lite0 recipes (benchmarks/big_image.py).
PIXEL_BUDGET = 2048 * 2048
# Windows hold a quarter of the budget (1024x1024 by default): ONNX Runtime needs ~0.8 GiB for a 1024x1024
# EfficientNet-Lite0 OVeNet pass, over 4 GiB at 2048x2048.
WINDOW_SHARE = 4
# An image whose long side is this many times beyond the training scale's range draws a warning.
FAR_FROM_TRAINING = 3.0
_warned: set[str] = set()  # each distinct warning once per process


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if len(value) != 2 or any(int(v) < 1 for v in value):
        raise OvenetError(f"{name} must be [height, width] with positive sides, got {value}")
    return int(value[0]), int(value[1])


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of sliding windows along one axis; the last window is shifted to end at the border."""
    if size <= crop:
        return [0]
    return list(range(0, size - crop, stride)) + [size - crop]


def budget_window(height: int, width: int, budget: int) -> tuple[int, int]:
    """The sliding window for an image beyond the pixel budget: as square as the image allows, at most
    ``budget`` pixels (a side as long as the image's when the other side is short)."""
    window_h = min(height, max(1, math.isqrt(budget)))
    return window_h, min(width, max(1, budget // window_h))


def _forward(model: nn.Module, x: Tensor, output: str, precision: str
             ) -> tuple[Tensor, Tensor | None, Tensor | None, CellGrid | None]:
    """Logits of the chosen output, offsets and confidence at 1/4 resolution, all float32, and where their cells
    sit on ``x`` (``SegOutput.grid``; None: resized by size with ``align_corners``)."""
    with autocast(x.device, precision):
        out = model(x)
    logits = getattr(out, f"logits_{output}")
    if logits is None:
        raise OvenetError(f"output '{output}' does not exist for this model (no offset head); use output='final'")
    offsets = None if out.offsets is None else out.offsets.float()
    confidence = None if out.confidence is None else out.confidence.float()
    return logits.float(), offsets, confidence, getattr(out, "grid", None)


def _upsample(x: Tensor, size: tuple[int, int], align_corners: bool, grid: CellGrid | None = None,
              input_size: Sequence[int] | None = None) -> Tensor:
    """``x`` (cells on ``grid`` over an image of ``input_size``, default ``size``) to the pixels of that image
    resized to ``size``: :func:`ovenet.geometry.resize_to_pixels`; a map already at its image's pixels and size
    is returned as is."""
    if tuple(x.shape[-2:]) == tuple(size) and (grid is None or grid is PIXELS) and \
            (input_size is None or tuple(input_size) == tuple(size)):
        return x
    return resize_to_pixels(x, size, grid, align_corners, input_size)


def _pixel_grid(model: nn.Module, height: int, width: int) -> CellGrid | None:
    """The grid of maps brought to the input's pixels (:data:`~ovenet.geometry.PIXELS`) for a model that
    declares its outputs' geometry (``output_grid``), so that later pixel-to-pixel resizes are half-pixel, as the
    test-time image resize; None for one resized by size with its ``align_corners`` (HRNetV2)."""
    declared = getattr(model, "output_grid", None)
    return PIXELS if declared is not None and declared(height, width) is not None else None


def _mirror(offsets: Tensor) -> Tensor:
    """The offset field of the mirrored image, mirrored back: flip the map and negate its x component."""
    return offsets.flip(-1) * offsets.new_tensor([-1.0, 1.0]).view(1, 2, 1, 1)


def scaled_size(height: int, width: int, scale: float, base_size: int | None = None) -> tuple[int, int]:
    """Size of an image scaled by ``scale`` as the official ``multi_scale_aug``: the long side becomes
    ``base_size * scale`` (``base_size`` defaults to the image's own long side), rounded; the short side keeps the
    aspect ratio of the rounded long side."""
    long_side, short_side = max(height, width), min(height, width)
    new_long = max(1, int((long_side if base_size is None else base_size) * scale + 0.5))
    new_short = max(1, int(short_side * new_long / long_side + 0.5))
    return (new_long, new_short) if height > width else (new_short, new_long)


# One window's outputs at the window's own size: (scores, offsets, confidence).
WindowFn = Callable[[Tensor], tuple[Tensor, Tensor | None, Tensor | None]]


def _plain_window(model: nn.Module, output: str, precision: str, align_corners: bool) -> WindowFn:
    def run(window: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        size = tuple(window.shape[-2:])
        logits, offsets, confidence, grid = _forward(model, window, output, precision)
        if offsets is not None:
            offsets = _upsample(offsets, size, align_corners, grid)
            confidence = _upsample(confidence, size, align_corners, grid)
        return _upsample(logits, size, align_corners, grid), offsets, confidence

    return run


def _official_window(model: nn.Module, output: str, precision: str, align_corners: bool, flip: bool) -> WindowFn:
    """The official ``inference()``: logits at the window size, averaged with the mirrored pass in logit space,
    then ``exp``. The ``exp`` is taken in float64: float32 overflows for logits above 88."""
    plain = _plain_window(model, output, precision, align_corners)

    def run(window: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        logits, offsets, confidence = plain(window)
        if flip:
            logits_m, offsets_m, confidence_m = plain(window.flip(-1))
            logits = (logits + logits_m.flip(-1)) * 0.5
            if offsets is not None:
                offsets = (offsets + _mirror(offsets_m)) * 0.5
                confidence = (confidence + confidence_m.flip(-1)) * 0.5
        return logits.double().exp(), offsets, confidence

    return run


def _slide(image: Tensor, crop: tuple[int, int], stride: tuple[int, int], run: WindowFn, pad: bool
           ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sliding windows over ``image``, averaged through a count map; outputs at the image's own size.

    With ``pad`` an image smaller than the crop is padded (bottom/right, with 0 = the mean colour after
    normalisation) so that every window is a full crop; without it such windows are just smaller.
    """
    batch, _, height, width = image.shape
    pad_h, pad_w = (max(crop[0] - height, 0), max(crop[1] - width, 0)) if pad else (0, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = image.shape[-2:]
    scores_sum = offsets_sum = confidence_sum = None
    count = image.new_zeros((1, 1, full_h, full_w))
    for top in window_starts(full_h, crop[0], stride[0]):
        for left in window_starts(full_w, crop[1], stride[1]):
            window = image[:, :, top:top + crop[0], left:left + crop[1]]
            win_h, win_w = window.shape[-2:]
            scores, offsets, confidence = run(window)
            region = (slice(None), slice(None), slice(top, top + win_h), slice(left, left + win_w))
            if scores_sum is None:
                scores_sum = scores.new_zeros((batch, scores.shape[1], full_h, full_w))
                if offsets is not None:
                    offsets_sum = image.new_zeros((batch, 2, full_h, full_w))
                    confidence_sum = image.new_zeros((batch, 1, full_h, full_w))
            scores_sum[region] += scores
            if offsets is not None:
                # Normalised to the window -> normalised to the (padded) image: lengths scale by the size ratio.
                ratio = offsets.new_tensor([(win_w - 1) / max(full_w - 1, 1), (win_h - 1) / max(full_h - 1, 1)])
                offsets_sum[region] += offsets * ratio.view(1, 2, 1, 1)
                confidence_sum[region] += confidence
            count[region] += 1
    crop_back = (slice(None), slice(None), slice(0, height), slice(0, width))
    # In place: at a big image's full size, a second copy of the class scores would double the peak memory.
    scores = scores_sum.div_(count)[crop_back]
    if offsets_sum is None:
        return scores, None, None
    offsets = offsets_sum.div_(count)[crop_back]
    if pad_h or pad_w:  # back from the padded image's normalisation to the real image's
        offsets = offsets * offsets.new_tensor([(full_w - 1) / max(width - 1, 1),
                                                (full_h - 1) / max(height - 1, 1)]).view(1, 2, 1, 1)
    return scores, offsets, confidence_sum.div_(count)[crop_back]


@torch.no_grad()
def infer_logits(
    model: nn.Module,
    image: Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    output: str = "final",
    size: Sequence[int] | None = None,
    precision: str = "fp32",
    base_size: int | None = None,
) -> dict[str, Tensor | None]:
    """Segment a normalised batch ``[B, 3, H, W]``; see the module docstring for the modes and how passes combine.

    ``mode`` "whole" feeds each scaled image at once; "slide" runs windows of ``crop_size`` (h, w) with
    ``stride`` (default 2/3 of the crop); "official" is the authors' multi-scale protocol (windows of
    ``crop_size`` with stride = crop for scales > 1; ``stride`` is not used). ``output`` picks S_f ("final"),
    S_i ("initial") or S_s ("seed"). ``base_size`` (official mode only) is the long side at scale 1, as the
    official ``TEST.BASE_SIZE``; the default, the input's long side, is what it amounts to on Cityscapes and ACDC
    (on ADE20K the official 520 shrinks the short-side-520 test image even at scale 1).
    Returns ``{"logits": [B, C, h, w], "offsets": [B, 2, h, w] | None, "confidence": [B, 1, h, w] | None}`` at
    ``size`` (default the input's ``H, W``). The caller sets eval mode.
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise OvenetError(f"image must be a normalised [B, 3, H, W] tensor, got shape {tuple(image.shape)}")
    if mode not in MODES:
        raise OvenetError(f"inference mode '{mode}' is unknown; use one of {', '.join(MODES)}")
    if output not in OUTPUTS:
        raise OvenetError(f"output '{output}' is unknown; use one of {', '.join(OUTPUTS)}")
    scales = [float(s) for s in scales]
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise OvenetError(f"scales must be a non-empty list of positive numbers, got {scales}")
    height, width = image.shape[-2:]
    out_size = (height, width) if size is None else _pair(size, "size")
    crop = strides = None
    if mode == "slide" or (mode == "official" and max(scales) > 1.0):
        if crop_size is None:
            raise OvenetError(f"{mode} inference needs crop_size [height, width] for its windows (eval.crop_size)")
        crop = _pair(crop_size, "crop_size")
        strides = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3)) if stride is None else _pair(stride, "stride")
    align = bool(getattr(model, "align_corners", True))
    if base_size is not None and int(base_size) < 1:
        raise OvenetError(f"base_size must be a positive number of pixels, got {base_size}")
    if mode == "official":
        return _infer_official(model, image, crop, scales, flip, output, precision, out_size, align, base_size)
    if base_size is not None:
        raise OvenetError(f"base_size applies to the official mode only, not to '{mode}'")

    run = _plain_window(model, output, precision, align)
    pixel_grid = _pixel_grid(model, height, width)
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    prob_sum = logits_single = offsets_sum = confidence_sum = None
    for scale, flipped in passes:
        x = image if scale == 1.0 else resize_image(image, scaled_size(height, width, scale))
        if flipped:
            x = x.flip(-1)
        if mode == "slide":
            logits, offsets, confidence = _slide(x, crop, strides, run, pad=True)
            grid = pixel_grid
        else:
            logits, offsets, confidence, grid = _forward(model, x, output, precision)
        # Registered models: straight from the network's cells on the scaled image to the output's pixels.
        logits = _upsample(logits, out_size, align, grid, x.shape[-2:])
        if flipped:
            logits = logits.flip(-1)
        if offsets is not None:
            offsets = _upsample(offsets, out_size, align, grid, x.shape[-2:])
            confidence = _upsample(confidence, out_size, align, grid, x.shape[-2:])
            if flipped:
                offsets, confidence = _mirror(offsets), confidence.flip(-1)
            offsets_sum = offsets if offsets_sum is None else offsets_sum + offsets
            confidence_sum = confidence if confidence_sum is None else confidence_sum + confidence
        if len(passes) == 1:
            logits_single = logits
        else:
            probs = torch.softmax(logits, dim=1)
            prob_sum = probs if prob_sum is None else prob_sum + probs

    if logits_single is not None:
        logits = logits_single
    else:
        logits = torch.log((prob_sum / len(passes)).clamp_min(1e-12))
    n = len(passes)
    return {
        "logits": logits,
        "offsets": None if offsets_sum is None else offsets_sum / n,
        "confidence": None if confidence_sum is None else confidence_sum / n,
    }


def _infer_official(model: nn.Module, image: Tensor, crop: tuple[int, int] | None, scales: list[float],
                    flip: bool, output: str, precision: str, out_size: tuple[int, int], align: bool,
                    base_size: int | None) -> dict[str, Tensor | None]:
    """The official ``multi_scale_inference`` (see the module docstring)."""
    height, width = image.shape[-2:]
    run = _official_window(model, output, precision, align, flip)
    pixel_grid = _pixel_grid(model, height, width)  # windows' outputs are at their pixels already
    exp_sum = offsets_sum = confidence_sum = None
    for scale in scales:
        new_size = scaled_size(height, width, scale, base_size)
        x = image if new_size == (height, width) else resize_image(image, new_size)
        if scale <= 1.0:
            scores, offsets, confidence = run(x)
        else:
            scores, offsets, confidence = _slide(x, crop, crop, run, pad=False)
        # The official code brings each scale back to the input image's size and sums there; the sum is
        # resized to the label's size only at the end.
        scores = _upsample(scores, (height, width), align, pixel_grid, new_size)
        exp_sum = scores if exp_sum is None else exp_sum + scores
        if offsets is not None:
            offsets = _upsample(offsets, out_size, align, pixel_grid, new_size)
            confidence = _upsample(confidence, out_size, align, pixel_grid, new_size)
            offsets_sum = offsets if offsets_sum is None else offsets_sum + offsets
            confidence_sum = confidence if confidence_sum is None else confidence_sum + confidence
    exp_sum = _upsample(exp_sum, out_size, align, pixel_grid, (height, width))
    n = len(scales)
    return {
        # Dividing by the number of scales does not move the argmax; it keeps one scale's logits unchanged.
        "logits": torch.log(exp_sum / n).float(),
        "offsets": None if offsets_sum is None else offsets_sum / n,
        "confidence": None if confidence_sum is None else confidence_sum / n,
    }


# --- the Python predict API ---------------------------------------------------------------------------------------

@dataclass
class Prediction:
    """One image's result, at the input image's size.

    ``labels``: HxW class indices (uint8 when the model has <= 256 classes, else int64).
    ``probs`` / ``logits``: CxHxW float32, only when requested. ``offsets``: 2xHxW float32 in normalised image
    coordinates (x, y; [-1, 1] spans the image) and ``confidence``: HxW float32 in [0, 1], for OVeNet only.
    numpy arrays, or tensors on the model's device with ``predict(..., as_tensors=True)``.
    """

    labels: np.ndarray | Tensor
    probs: np.ndarray | Tensor | None = None
    logits: np.ndarray | Tensor | None = None
    offsets: np.ndarray | Tensor | None = None
    confidence: np.ndarray | Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])


ImageInput = str | Path | Image.Image | np.ndarray | Tensor


def _describe(obj: Any) -> str:
    shape = getattr(obj, "shape", None)
    return f"{type(obj).__name__}" + (f" of shape {tuple(shape)} and dtype {obj.dtype}" if shape is not None else "")


def to_pixels(image: ImageInput) -> Tensor:
    """Any supported single image -> ``[3, H, W]`` RGB pixel values 0-255 (not yet normalised).

    Files and PIL images are read as :func:`ovenet.data.base.image_to_rgb` reads them (EXIF orientation applied,
    16-bit grey scaled by 1/257 and rounded, modes without a known range refused). Arrays and tensors are scaled
    by their type's full range, like files: uint8 as is; uint16 (numpy, or torch.uint16) to ``round(v / 257)``,
    uint8 values, exactly as a 16-bit file; float in [0, 1] times 255 (float32, not rounded); any other type
    (signed integers, bool) is refused, since its range is unknown.
    """
    from ovenet.data.base import image_to_rgb, read_image  # DataError naming the file when missing or corrupt

    if isinstance(image, (str, Path)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        image = image_to_rgb(image)
    if isinstance(image, Tensor) and image.dtype == getattr(torch, "uint16", None) and image.dim() == 3:
        image = image.detach().cpu().to(torch.int32).numpy().astype(np.uint16).transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise OvenetError(f"numpy images must be HxWx3 (RGB) or HxW, got {_describe(image)}")
        array = np.ascontiguousarray(array[..., :3])
        if array.dtype == np.uint16:  # the 16-bit files' scale: round(v / 257), never exactly k + 0.5
            array = ((array.astype(np.int32) * 2 + 257) // 514).astype(np.uint8)
        if not array.flags.writeable:  # PIL-backed arrays are read-only; torch.from_numpy wants writable memory
            array = array.copy()
        if array.dtype == np.uint8:
            return torch.from_numpy(array).permute(2, 0, 1)
        if array.dtype.kind == "f":
            return _checked_unit_range(torch.from_numpy(array).permute(2, 0, 1).float(), image).mul_(255.0)
        raise OvenetError(f"numpy images must be uint8 (0-255), uint16 (0-65535) or float (0-1), got "
                          f"{_describe(image)}")
    if isinstance(image, Tensor):
        tensor = image.detach()
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise OvenetError(f"tensor images must be [3, H, W] RGB, got {_describe(image)}")
        if tensor.dtype == torch.uint8:
            return tensor
        if tensor.is_floating_point():
            return _checked_unit_range(tensor.float(), image).mul(255.0)
        raise OvenetError(f"tensor images must be uint8 (0-255), uint16 (0-65535) or float (0-1), got "
                          f"{_describe(image)}")
    raise OvenetError(f"cannot read an image from {_describe(image)}; pass a path, PIL image, HxWx3 uint8 array "
                      "or a [3, H, W] tensor")


def _checked_unit_range(tensor: Tensor, original: Any) -> Tensor:
    if tensor.numel() and (float(tensor.min()) < -1e-3 or float(tensor.max()) > 1 + 1e-3):
        raise OvenetError(f"float images must hold values in [0, 1] (got {float(tensor.min()):.3g}.."
                          f"{float(tensor.max()):.3g} in a {_describe(original)}); pass uint8 for 0-255 data and do "
                          "not normalise it yourself")
    return tensor


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass(frozen=True)
class InferenceSettings:
    """How a checkpoint is run at test time: what ``ovenet eval`` does with it, and so what ``predict`` does by
    default (:meth:`for_model`).

    ``resize_short`` (``data.eval_resize_short``, ADE20K's 520) resizes the image before inference; with
    ``pad_multiple`` (``eval.label_resolution: official`` with such a resize) the resized image is padded at the
    bottom/right to a multiple of it, as the official ADE20K val loader; ``base_size`` (``data.base_size``,
    official mode only) is the long side at scale 1. ``max_size`` shrinks an image whose long side exceeds it to
    that long side (after ``resize_short``), by the same arithmetic. ``pixel_budget``: in the whole mode, an image
    (after those resizes) of more pixels runs in sliding windows of a quarter of that many pixels
    (:func:`budget_window`), so that memory stays bounded; None runs every image whole.
    """

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    base_size: int | None = None
    resize_short: int | None = None
    pad_multiple: int | None = None
    max_size: int | None = None
    pixel_budget: int | None = PIXEL_BUDGET
    normalisation: Normalisation = IMAGENET  # the checkpoint's model.input_mean/input_std

    @classmethod
    def for_model(cls, model: nn.Module, native_size: bool = False, **chosen: Any) -> InferenceSettings:
        """The settings ``ovenet eval`` uses for ``model``'s checkpoint (its config's ``eval`` and ``data``
        sections; plain whole-image inference for a model without a config), with ``chosen`` values (not None)
        in place of the config's. ``native_size`` runs the image at its own size: no ``resize_short``/padding,
        and official-mode scales relative to the image's own long side instead of ``base_size``."""
        cfg = getattr(model, "config", None)
        if cfg is None:
            settings = cls()
        else:
            ev, data = cfg.eval, cfg.data
            resize = data.eval_resize_short or None
            settings = cls(mode=ev.mode, crop_size=tuple(ev.crop_size), stride=None if ev.stride is None else
                           tuple(ev.stride), scales=tuple(ev.scales), flip=bool(ev.flip), base_size=data.base_size,
                           resize_short=resize, normalisation=Normalisation.of(cfg.model),
                           pad_multiple=8 if resize and ev.label_resolution == "official" else None)
        values = {k: v for k, v in chosen.items() if v is not None}
        if values.get("max_size") is not None and int(values["max_size"]) < 1:
            raise OvenetError(f"max_size must be a positive number of pixels, got {values['max_size']}")
        for key in ("crop_size", "stride", "scales"):
            if key in values:
                values[key] = tuple(values[key])
        settings = replace(settings, **values)
        if native_size:
            settings = replace(settings, base_size=None, resize_short=None, pad_multiple=None)
        return settings

    def infer_options(self, size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The keyword arguments of :func:`infer_logits` these settings amount to for a network input of ``size``
        (after the test-time resizes): beyond the pixel budget, the whole mode becomes windows."""
        if self.mode == "whole" and self.pixel_budget and size is not None and size[0] * size[1] > self.pixel_budget:
            window = budget_window(*size, max(1, self.pixel_budget // WINDOW_SHARE))
            return {"mode": "slide", "crop_size": window, "stride": None,
                    "scales": self.scales, "flip": self.flip, "base_size": None}
        return {"mode": self.mode, "crop_size": self.crop_size, "stride": self.stride, "scales": self.scales,
                "flip": self.flip, "base_size": self.base_size if self.mode == "official" else None}

    def record(self) -> dict[str, Any]:
        """JSON values of everything that changes the pixels (``predict`` records them in its PNGs)."""
        return {"scales": [float(s) for s in self.scales], "flip": self.flip, "mode": self.mode,
                "crop_size": list(self.crop_size) if self.crop_size and self.mode != "whole" else None,
                "stride": list(self.stride) if self.stride and self.mode == "slide" else None,
                "base_size": self.base_size if self.mode == "official" else None,
                "resize_short": self.resize_short, "pad_multiple": self.pad_multiple, "max_size": self.max_size,
                # Recorded when not the default: outputs written before the budget existed stay comparable.
                **({} if self.pixel_budget == PIXEL_BUDGET else {"pixel_budget": self.pixel_budget}),
                **({} if self.normalisation == IMAGENET else {"normalisation": self.normalisation.record()})}

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """An image's size after the test-time resizes (``resize_short``, then ``max_size``), before any padding:
        sides ``int(side * factor + 0.5)``, the arithmetic of :class:`ovenet.data.transforms.EvalTransform`."""
        height, width = EvalTransform(self.resize_short).output_size(height, width)
        if self.max_size and max(height, width) > self.max_size:
            factor = self.max_size / max(height, width)
            height, width = max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))
        return height, width


def predict(
    model: nn.Module,
    image: ImageInput | Sequence[ImageInput],
    device: str | torch.device | None = None,
    precision: str = "fp32",
    scales: Sequence[float] | None = None,
    flip: bool | None = None,
    mode: str | None = None,
    batch_size: int = 4,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    output: str = "final",
    return_probs: bool = False,
    return_logits: bool = False,
    as_tensors: bool = False,
    native_size: bool = False,
    max_size: int | None = None,
    pixel_budget: int | None = PIXEL_BUDGET,
) -> Prediction | list[Prediction]:
    """Segment one image (-> :class:`Prediction`) or a list of images / a ``[B, 3, H, W]`` tensor (-> list).

    By default an image is run as ``ovenet eval`` runs the checkpoint's validation images (its config's
    ``eval.mode``, ``eval.scales``, ``eval.flip``, crop and stride, the resize to ``data.eval_resize_short`` and,
    in the official mode, the scales relative to ``data.base_size``: :class:`InferenceSettings`), so the labels are
    the ones eval scores; the arguments given replace the config's values. ``native_size=True`` runs the image at
    its own size instead (no test-time resize; official-mode scales relative to the image's long side).
    ``max_size`` shrinks an image whose long side is longer to that long side first (the arithmetic and the
    bilinear resize of eval's ``data.eval_resize_short``). Results are always at the input image's size: the
    network's output is resized once, bilinearly, to it, as eval resizes it to a label's size.

    Big images: in the whole mode an image of more than ``pixel_budget`` pixels (after the resizes; default
    :data:`PIXEL_BUDGET`, None: no limit) runs alone, in overlapping windows of a quarter of the budget (1024x1024
    by default: :func:`budget_window`, stride 2/3 of the window), so that the network's memory stays bounded.
    Without ``return_probs``/``return_logits``, sliding windows of one pass keep the class scores of one band of
    rows only (:func:`_labels_in_bands`); the outputs at the input's size remain (labels, float32 offsets and
    confidence). An image whose long side is more than :data:`FAR_FROM_TRAINING` times beyond the sizes the model
    was trained at (``data.base_size`` times ``data.scale_range``) draws a one-line warning (logger
    ``ovenet.inference``, once per size) suggesting ``max_size``.

    Images may be paths, PIL images, HxWx3 uint8 (or uint16) arrays or ``[3, H, W]`` tensors (uint8, or float in
    [0, 1]); modes and scales as :func:`to_pixels`; the model's normalisation (its config's
    ``model.input_mean``/``input_std``) is done here. Same-size images run
    ``batch_size`` at a time. ``device`` moves the model there (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default:
    where the model is). The model's train/eval mode is restored afterwards. ``as_tensors`` keeps the results as
    tensors on the device (no copy to the host, for GPU pipelines); by default they are numpy arrays.
    """
    batched = isinstance(image, (list, tuple)) or (isinstance(image, Tensor) and image.dim() == 4)
    items = list(image) if batched else [image]
    if batch_size < 1:
        raise OvenetError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        model.to(resolve_device(device))
    device = _model_device(model)
    settings = InferenceSettings.for_model(model, native_size, mode=mode, scales=scales, flip=flip,
                                           crop_size=crop_size, stride=stride, max_size=max_size)
    settings = replace(settings, pixel_budget=pixel_budget)

    was_training = model.training
    model.eval()
    results: list[Prediction] = []
    try:
        with torch.inference_mode():
            images = [to_pixels(item) for item in items]
            start = 0
            while start < len(images):
                # Group consecutive same-size images into one batch; images beyond the budget run one at a time.
                size = settings.resized_size(*images[start].shape[-2:])
                group = 1 if settings.pixel_budget and size[0] * size[1] > settings.pixel_budget else batch_size
                end = start + 1
                while end < len(images) and end - start < group and images[end].shape == images[start].shape \
                        and images[end].dtype == images[start].dtype:
                    end += 1
                warn_if_far_from_training(model, images[start].shape[-2:], settings)
                out = segment(model, torch.stack(images[start:end]).to(device), settings, return_probs,
                              return_logits, output=output, precision=precision)
                results += _predictions(out, end - start, as_tensors)
                start = end
    finally:
        model.train(was_training)
    return results if batched else results[0]


def warn_if_far_from_training(model: nn.Module, size: Sequence[int], settings: InferenceSettings) -> None:
    """One line (once per image size and model config) when an image of ``size`` (H, W) runs at a long side
    more than :data:`FAR_FROM_TRAINING` times outside the range the model was trained at: ``data.base_size``
    (or, without it, the crop's long side) times ``data.scale_range``."""
    cfg = getattr(model, "config", None)
    if cfg is None or settings.mode == "official" and settings.base_size:  # official scales are of base_size
        return
    reference = cfg.data.base_size or max(cfg.data.crop_size or [0])
    if not reference:
        return
    low, high = (float(v) for v in cfg.data.scale_range)
    height, width = (int(v) for v in size)
    long_side = max(settings.resized_size(height, width))
    trained = f"data.base_size {reference}" if cfg.data.base_size else f"crops of long side {reference}"
    trained += f" x data.scale_range {low:g}-{high:g}"
    if long_side > FAR_FROM_TRAINING * reference * high:
        factor = long_side / (reference * high)
        message = (f"a {height}x{width} (HxW) image runs at long side {long_side}, {factor:.1f}x "
                   f"the largest the model was trained at ({trained}); objects far larger than in training are often "
                   f"segmented poorly: --max-size {reference} (max_size= in Python) runs it at the training scale")
    elif long_side * FAR_FROM_TRAINING < reference * low:
        message = (f"a {height}x{width} (HxW) image runs at long side {long_side}, {reference * low / long_side:.1f}x "
                   f"below the smallest the model was trained at ({trained}); objects far smaller than in training "
                   "are often segmented poorly: upscale the image")
    else:
        return
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("ovenet.inference").warning(message)


def preprocess(pixels: Tensor, settings: InferenceSettings) -> Tensor:
    """A ``[B, 3, H, W]`` batch of 0-255 pixels -> the network's input, exactly as the evaluation's transform
    makes it (:class:`ovenet.data.transforms.EvalTransform`, and the official ADE20K padding)."""
    size = _resized_size(pixels, settings)
    if size != tuple(pixels.shape[-2:]):
        pixels = resize_image(pixels, size)  # uint8 in, values rounded as the evaluation's resize does
    image = normalize_pixels(pixels, settings.normalisation)
    if settings.pad_multiple:
        pad_h, pad_w = -size[0] % settings.pad_multiple, -size[1] % settings.pad_multiple
        image = F.pad(image, (0, pad_w, 0, pad_h))  # 0 = the mean colour once normalised
    return image


def segment(model: nn.Module, pixels: Tensor, settings: InferenceSettings | None = None, return_probs: bool = False,
            return_logits: bool = False, output: str = "final", precision: str = "fp32") -> dict[str, Tensor | None]:
    """The device side of :func:`predict` for a ``[B, 3, H, W]`` batch of 0-255 pixels on the model's device:
    labels at the batch's size, and when asked probabilities/logits, plus offsets and confidence, all still on
    the device (no host sync). ``settings`` default: :meth:`InferenceSettings.for_model`."""
    settings = settings or InferenceSettings.for_model(model)
    height, width = pixels.shape[-2:]
    image = preprocess(pixels, settings)
    options = settings.infer_options(tuple(image.shape[-2:]))
    align = bool(getattr(model, "align_corners", True))
    if _bands_suffice(options, tuple(image.shape[-2:]), (height, width), return_probs or return_logits):
        # Windows of one pass, labels only: no need for the class scores of the whole image at once.
        window = _pair(options["crop_size"], "crop_size")
        stride = (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3)) if options["stride"] is None \
            else _pair(options["stride"], "stride")
        return _labels_in_bands(model, image, window, stride, output, precision, align)
    if not settings.pad_multiple:
        # One resize from the network's output to the image's size, as eval does to the label's size.
        out = infer_logits(model, image, output=output, precision=precision, size=(height, width), **options)
    else:
        # The official ADE20K padding: drop the padded part, then resize to the image's size.
        out = _unpad(infer_logits(model, image, output=output, precision=precision, **options),
                     _resized_size(pixels, settings), (height, width), align,
                     _pixel_grid(model, *image.shape[-2:]))
    logits = out["logits"]
    labels = logits.argmax(dim=1).to(torch.uint8 if logits.shape[1] <= 256 else torch.int64)
    return {"labels": labels, "probs": torch.softmax(logits, dim=1) if return_probs else None,
            "logits": logits if return_logits else None, "offsets": out["offsets"],
            "confidence": None if out["confidence"] is None else out["confidence"][:, 0]}


def _bands_suffice(options: dict[str, Any], network_size: tuple[int, int], size: tuple[int, int],
                   scores_asked: bool) -> bool:
    """Whether :func:`_labels_in_bands` gives what :func:`infer_logits` would: sliding windows that fit the image
    (no padding) in one pass, with no resize after the network and only labels wanted."""
    if options["mode"] != "slide" or scores_asked or network_size != size:
        return False
    window = _pair(options["crop_size"], "crop_size") if options["crop_size"] is not None else None
    return (window is not None and window[0] <= size[0] and window[1] <= size[1]
            and tuple(options["scales"]) == (1.0,) and not options["flip"])


def _labels_in_bands(model: nn.Module, image: Tensor, window: tuple[int, int], stride: tuple[int, int],
                     output: str, precision: str, align: bool) -> dict[str, Tensor | None]:
    """:func:`_slide`'s windows over an image at least a window large, with the class scores kept only
    for the rows that windows still to come overlap: the rows above the next row of windows are final and become
    labels, offsets and confidence at once. The same sums in the same order as :func:`_slide`, so the same labels,
    with scores for a band of the window's height instead of the whole image."""
    batch, _, height, width = image.shape
    run = _plain_window(model, output, precision, align)
    tops = window_starts(height, window[0], stride[0])
    band: list[Tensor] | None = None  # scores, count[, offsets, confidence] of rows top .. top + window height
    outputs: list[Tensor] = []  # labels[, offsets, confidence] of the whole image
    for index, top in enumerate(tops):
        for left in window_starts(width, window[1], stride[1]):
            scores, offsets, confidence = run(image[:, :, top:top + window[0], left:left + window[1]])
            if band is None:
                extra = [] if offsets is None else [image.new_zeros((batch, 2, window[0], width)),
                                                     image.new_zeros((batch, 1, window[0], width))]
                band = [scores.new_zeros((batch, scores.shape[1], window[0], width)),
                        image.new_zeros((1, 1, window[0], width)), *extra]
                outputs = [torch.empty((batch, height, width), dtype=torch.int64, device=image.device)] + \
                    [image.new_empty((batch, t.shape[1], height, width)) for t in extra]
            columns = slice(left, left + window[1])
            band[0][..., columns] += scores
            band[1][..., columns] += 1
            if offsets is not None:
                ratio = offsets.new_tensor([(window[1] - 1) / max(width - 1, 1), (window[0] - 1) / max(height - 1, 1)])
                band[2][..., columns] += offsets * ratio.view(1, 2, 1, 1)
                band[3][..., columns] += confidence
        done = (tops[index + 1] if index + 1 < len(tops) else height) - top  # rows no later window covers
        count = band[1][:, :, :done]
        outputs[0][:, top:top + done] = band[0][:, :, :done].div_(count).argmax(dim=1)
        for out, summed in zip(outputs[1:], band[2:]):
            out[:, :, top:top + done] = summed[:, :, :done].div_(count)
        for tensor in band:  # the open rows move up to the band's top; the rows below start empty
            tensor[:, :, :window[0] - done] = tensor[:, :, done:].clone()
            tensor[:, :, window[0] - done:] = 0
    labels = outputs[0].to(torch.uint8 if band[0].shape[1] <= 256 else torch.int64)
    return {"labels": labels, "probs": None, "logits": None, "offsets": outputs[1] if len(outputs) > 1 else None,
            "confidence": outputs[2][:, 0] if len(outputs) > 1 else None}


def _resized_size(pixels: Tensor, settings: InferenceSettings) -> tuple[int, int]:
    """The image's size after the test-time resizes (before any padding)."""
    return settings.resized_size(*pixels.shape[-2:])


def _unpad(out: dict[str, Tensor | None], real: tuple[int, int], size: tuple[int, int], align: bool,
           pixel_grid: CellGrid | None) -> dict[str, Tensor | None]:
    """Outputs on a padded image -> the real image's part, resized to ``size``; offsets renormalised to it."""
    full_h, full_w = out["logits"].shape[-2:]
    region = (slice(None), slice(None), slice(0, real[0]), slice(0, real[1]))
    result = {k: None if v is None else _upsample(v[region], size, align, pixel_grid, real) for k, v in out.items()}
    if result["offsets"] is not None:
        ratio = result["offsets"].new_tensor([(full_w - 1) / max(real[1] - 1, 1), (full_h - 1) / max(real[0] - 1, 1)])
        result["offsets"] = result["offsets"] * ratio.view(1, 2, 1, 1)
    return result


def _predictions(out: dict[str, Tensor | None], count: int, as_tensors: bool) -> list[Prediction]:
    """Split a batch's outputs into one :class:`Prediction` per image, copied to the host unless ``as_tensors``."""
    host = {k: v if v is None or as_tensors else v.cpu().numpy() for k, v in out.items()}
    return [Prediction(**{k: None if v is None else v[i] for k, v in host.items()}) for i in range(count)]
