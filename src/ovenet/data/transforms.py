"""Train and eval transforms on decoded samples, and the one image / label resize used everywhere.

A transform takes the dict from ``SegmentationDataset.load`` (uint8 ``image`` HxWx3 plus integer maps such as
``label``) and returns tensors: ``image`` float32 [3,H,W] normalised, maps as integer tensors [H,W].

Normalisation belongs to the weights (:class:`Normalisation`, the config's ``model.input_mean``/``input_std``, in
0-255 pixel units): ImageNet's mean/std by default (HRNet's weights, every checkpoint from before the keys), the
Inception-style (x - 127) / 128 for the EfficientNet-Lite0 recipes.

Resizing follows the official code, which used OpenCV: images with ``cv2.INTER_LINEAR`` (half-pixel centres, no
antialiasing even when shrinking, clamped at the borders) and label maps with ``cv2.INTER_NEAREST`` (source index
``floor(i * in / out)``). :func:`resize_image` and :func:`resize_label` reproduce both in torch/numpy; training
(here) and multi-scale testing (``ovenet.inference``) both use them, so a model sees the same resampling in both.

Speed: ``TrainTransform`` never resizes the whole image. It draws the scale and the crop window first, then
resamples only the output pixels inside the crop (``window=``), which gives the same pixels as "resize everything,
then crop" at a fraction of the cost (2x upscaled Cityscapes frames are 4096x8192).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # of 0-1 values
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # label value of pixels that count for no class (loss and metrics skip them)


@dataclass(frozen=True)
class Normalisation:
    """The network input ``(pixel - mean) / std`` per RGB channel, ``mean``/``std`` in 0-255 pixel units: what the
    network's weights were trained on (``model.input_mean``/``model.input_std``)."""

    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # IMAGENET_MEAN x 255 (the config's default)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @classmethod
    def of(cls, model_cfg: Any) -> Normalisation:
        """The normalisation a config's ``model`` section (or a checkpoint's) declares."""
        return cls(tuple(float(v) for v in model_cfg.input_mean), tuple(float(v) for v in model_cfg.input_std))

    def mean_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.mean, dtype=torch.float32, device=device).view(3, 1, 1)

    def inv_std_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return 1.0 / torch.tensor(self.std, dtype=torch.float32, device=device).view(3, 1, 1)

    def black(self) -> torch.Tensor:
        """A raw black pixel (0) after normalisation, [3, 1, 1]: what padding with black becomes."""
        return -self.mean_tensor() * self.inv_std_tensor()

    def record(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


IMAGENET = Normalisation()

# Integer maps a sample may carry, with their padding value and output dtype.
# label_ids pads with 0 (Cityscapes "unlabeled"), instance with 0 (no instance).
_MAP_DTYPES = {"label": torch.int64, "label_ids": torch.int64, "instance": torch.int32}


def normalize(image: np.ndarray, out: torch.Tensor | None = None, normalisation: Normalisation = IMAGENET
              ) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 [3,H,W], ``normalisation`` (default ImageNet's); written into ``out`` when
    given."""
    pixels = _tensor_view(image).permute(2, 0, 1)
    if out is None:
        out = torch.empty(pixels.shape, dtype=torch.float32)
    # In place on one buffer: the uint8->float copy is the only allocation (fresh pages are costly at 6 MB).
    return out.copy_(pixels).sub_(normalisation.mean_tensor()).mul_(normalisation.inv_std_tensor())


def normalize_pixels(pixels: torch.Tensor, normalisation: Normalisation = IMAGENET) -> torch.Tensor:
    """0-255 values ``[..., 3, H, W]`` (uint8 or float, any device) -> float32, ``normalisation``, by the same
    arithmetic as :func:`normalize` (and so bit for bit what the evaluation's transform feeds the network)."""
    mean, inv_std = normalisation.mean_tensor(pixels.device), normalisation.inv_std_tensor(pixels.device)
    return pixels.to(torch.float32).sub(mean).mul_(inv_std)


def normalize_image(image: torch.Tensor, normalisation: Normalisation = IMAGENET) -> torch.Tensor:
    """``normalisation`` of float ``[..., 3, H, W]`` values in [0, 1], on the image's device."""
    mean = image.new_tensor(normalisation.mean).view(3, 1, 1) / 255.0
    std = image.new_tensor(normalisation.std).view(3, 1, 1) / 255.0
    return (image - mean) / std


def denormalize(image: torch.Tensor, normalisation: Normalisation = IMAGENET) -> np.ndarray:
    """Inverse of :func:`normalize` for visualisation: [3,H,W] (or [1,3,H,W]) float -> uint8 HxWx3."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"denormalize needs a [3, H, W] image, got shape {tuple(image.shape)}")
    pixels = image.detach().cpu().float() / normalisation.inv_std_tensor() + normalisation.mean_tensor()
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _map_to_tensor(key: str, array: np.ndarray) -> torch.Tensor:
    dtype = _MAP_DTYPES.get(key, torch.int64)
    return torch.from_numpy(np.asarray(array).astype(np.int64 if dtype == torch.int64 else np.int32))


def _maps(sample: dict) -> list[str]:
    return [key for key in sample if key != "image" and isinstance(sample[key], np.ndarray)]


def _inverse_scale(in_len: int, out_len: int) -> float:
    # OpenCV derives the step as 1 / (out / in) in double precision; the same expression puts our source
    # coordinates on the same side of integer boundaries as its own.
    return 1.0 / (out_len / in_len)


def linear_taps(in_len: int, out_len: int, start: int = 0, count: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cv2.INTER_LINEAR`` along one axis of an ``in_len -> out_len`` resize, for outputs ``start`` to
    ``start + count - 1``.

    Returns the two source indices (int64) and the weight of the second (float32). Output pixel ``i`` samples
    ``(i + 0.5) * in / out - 0.5`` (OpenCV rounds it to float32), clamped to ``[0, in_len - 1]``.
    """
    count = out_len - start if count is None else count
    step = _inverse_scale(in_len, out_len)
    src = ((np.arange(start, start + count, dtype=np.float64) + 0.5) * step - 0.5).astype(np.float32)
    src = np.clip(src, 0, in_len - 1)
    first = np.floor(src).astype(np.int64)
    return first, np.minimum(first + 1, in_len - 1), (src - first).astype(np.float32)


def nearest_taps(in_len: int, out_len: int, start: int = 0, count: int | None = None) -> np.ndarray:
    """``cv2.INTER_NEAREST`` along one axis: output ``i`` reads source ``floor(i * in / out)`` (not the pixel
    centre, so shrinking by 2 keeps the even rows); for outputs ``start .. start+count-1``."""
    count = out_len - start if count is None else count
    index = np.floor(np.arange(start, start + count, dtype=np.float64) * _inverse_scale(in_len, out_len))
    return np.minimum(index.astype(np.int64), in_len - 1)


def _window(size: Sequence[int], window: Sequence[int] | None) -> tuple[int, int, int, int, int, int]:
    out_h, out_w = int(size[0]), int(size[1])
    top, left, height, width = (0, 0, out_h, out_w) if window is None else (int(v) for v in window)
    if out_h < 1 or out_w < 1 or top < 0 or left < 0 or height < 1 or width < 1 \
            or top + height > out_h or left + width > out_w:
        raise ValueError(f"resize to {out_h}x{out_w} with window (top, left, height, width) "
                         f"{(top, left, height, width)}: sizes must be positive and the window inside the output")
    return out_h, out_w, top, left, height, width


def resize_image(image: torch.Tensor | np.ndarray, size: Sequence[int], window: Sequence[int] | None = None,
                 flip: bool = False) -> torch.Tensor:
    """Resize an image to ``size`` (h, w) as ``cv2.INTER_LINEAR``: a tensor's last two dims ([..., H, W], any
    device), or a numpy HxWxC array (decoded images; HxW counts as one channel), returned as a [C, h, w] tensor.

    ``window`` (top, left, height, width) computes only that part of the resized image, reading only the source
    pixels it needs; ``flip`` mirrors the result horizontally. Returns float32 (float64 stays float64); integer
    images are rounded to whole values, as OpenCV does for uint8 (it uses 11-bit fixed-point weights, so uint8
    results may differ from it by 1 grey level; float inputs match it to float rounding).
    """
    if isinstance(image, np.ndarray):
        # Decoded images are channels-last: gathering whole rows of contiguous pixels is several times faster
        # than gathering through a channels-first view of the same memory.
        pixels = _tensor_view(image if image.ndim == 3 else image[..., None])
        return _resize_linear(pixels, size, window, flip, dims=(0, 1)).permute(2, 0, 1)
    return _resize_linear(image, size, window, flip, dims=(image.dim() - 2, image.dim() - 1))


def _resize_linear(image: torch.Tensor, size: Sequence[int], window: Sequence[int] | None, flip: bool,
                   dims: tuple[int, int]) -> torch.Tensor:
    row_dim, col_dim = dims
    out_h, out_w, top, left, height, width = _window(size, window)
    rows0, rows1, row_w = linear_taps(image.shape[row_dim], out_h, top, height)
    cols0, cols1, col_w = linear_taps(image.shape[col_dim], out_w, left, width)
    if flip:
        cols0, cols1, col_w = cols0[::-1], cols1[::-1], col_w[::-1]
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    device = image.device

    def index(array: np.ndarray, shift: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array - shift)).to(device)

    def weight(array: np.ndarray, dim: int) -> torch.Tensor:  # shaped to broadcast along ``dim``
        shape = [1] * (image.dim() - dim)
        shape[0] = -1
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype).view(shape)

    # The taps are monotone: slice the source box first, so the gathers below touch box-sized data only.
    r0, c0 = int(rows0[0]), int(min(cols0[0], cols0[-1]))
    box = image.narrow(row_dim, r0, int(rows1[-1]) + 1 - r0)
    box = box.narrow(col_dim, c0, int(max(cols1[0], cols1[-1])) + 1 - c0)
    # Gather before converting to float: integer copies are cheaper than float ones.
    upper = box.index_select(row_dim, index(rows0, r0)).to(dtype)
    rows = upper.lerp_(box.index_select(row_dim, index(rows1, r0)).to(dtype), weight(row_w, row_dim))
    out = rows.index_select(col_dim, index(cols0, c0))
    out = out.lerp_(rows.index_select(col_dim, index(cols1, c0)), weight(col_w, col_dim))
    return out if image.is_floating_point() else out.round_()


def resize_label(label: np.ndarray, size: Sequence[int], window: Sequence[int] | None = None,
                 flip: bool = False) -> np.ndarray:
    """Resize an integer map HxW to ``size`` (h, w) as ``cv2.INTER_NEAREST``; ``window`` and ``flip`` as in
    :func:`resize_image`. Any dtype; values are copied, never mixed."""
    out_h, out_w, top, left, height, width = _window(size, window)
    rows = nearest_taps(label.shape[0], out_h, top, height)
    cols = nearest_taps(label.shape[1], out_w, left, width)
    if flip:
        cols = cols[::-1]
    return np.take(label[rows], cols, axis=1)  # rows first: whole-row copies


def _tensor_view(image: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor on the same memory. Decoded PIL buffers are read-only; nothing here writes
    to them, so torch's warning about non-writable arrays does not apply (and a copy would cost a frame)."""
    if any(stride < 0 for stride in image.strides):  # torch cannot view mirrored numpy arrays
        image = np.ascontiguousarray(image)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(image)


@dataclass(frozen=True)
class CropParams:
    """One draw of the train augmentation: the scaled size, the crop window inside it, and the flip."""

    scaled_h: int
    scaled_w: int
    top: int
    left: int
    height: int  # crop window actually taken; smaller than the crop size when the scaled image is smaller
    width: int
    flip: bool


class TrainTransform:
    """Random scale, pad-to-crop, random crop, horizontal flip and normalisation (ImageNet's unless given).

    The scale ``s`` is uniform in ``scale_range``; the long side becomes ``base_size * s`` (or the image's own long
    side times ``s`` when ``base_size`` is None). Images are resampled with :func:`resize_image`, label maps with
    :func:`resize_label` (OpenCV's bilinear and nearest, as the official code). In the official order: when the
    scaled image is smaller than the crop it is padded at the bottom/right (black, raw 0, i.e. ``-mean/std`` once
    normalised, in the image, ``ignore_index`` in the label, 0 in other maps), then cropped, then the crop is
    flipped, so a flipped crop has its padding on the left. Randomness comes
    from Python's ``random`` module, which DataLoader seeds per worker.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        base_size: int | None = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
        normalisation: Normalisation = IMAGENET,
    ):
        crop_h, crop_w = (int(v) for v in crop_size)
        if crop_h <= 0 or crop_w <= 0:
            raise ValueError(f"crop_size must be two positive ints, got {list(crop_size)}")
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high, got {list(scale_range)}")
        self.crop_size = (crop_h, crop_w)
        self.base_size = None if base_size is None else int(base_size)
        self.scale_range = (low, high)
        self.flip = bool(flip)
        self.ignore_index = int(ignore_index)
        self.normalisation = normalisation
        self._mean, self._inv_std = normalisation.mean_tensor(), normalisation.inv_std_tensor()

    def sample_params(self, height: int, width: int, rng: random.Random | None = None) -> CropParams:
        rng = rng or random
        scale = rng.uniform(*self.scale_range)
        long_side = (self.base_size if self.base_size is not None else max(height, width)) * scale
        factor = long_side / max(height, width)
        scaled_h, scaled_w = max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))
        crop_h, crop_w = min(self.crop_size[0], scaled_h), min(self.crop_size[1], scaled_w)
        top = rng.randint(0, scaled_h - crop_h)
        left = rng.randint(0, scaled_w - crop_w)
        flip = self.flip and rng.random() < 0.5
        return CropParams(scaled_h, scaled_w, top, left, crop_h, crop_w, flip)

    def __call__(self, sample: dict) -> dict:
        height, width = sample["image"].shape[:2]
        return self.apply(sample, self.sample_params(height, width))

    def apply(self, sample: dict, params: CropParams) -> dict:
        """Apply one fixed draw (split from ``__call__`` so tests can compare against a reference)."""
        scaled = (params.scaled_h, params.scaled_w)
        window = (params.top, params.left, params.height, params.width)
        image = resize_image(sample["image"], scaled, window, flip=params.flip)
        crop_h, crop_w = self.crop_size
        padded = (params.height, params.width) != (crop_h, crop_w)
        if padded:
            # The official code pads the raw image with black (0) before normalising, i.e. -mean/std here.
            out_image = self.normalisation.black().expand(3, crop_h, crop_w).clone()
        else:
            out_image = torch.empty(3, crop_h, crop_w)
        # The official order pads bottom/right, crops, then flips the crop: a flipped crop has its padding on the
        # left, so the content sits in the right-most columns.
        cols = slice(crop_w - params.width, crop_w) if params.flip else slice(0, params.width)
        out_image[:, : params.height, cols].copy_(image).sub_(self._mean).mul_(self._inv_std)
        out = dict(sample)
        out["image"] = out_image

        for key in _maps(sample):
            cropped = torch.from_numpy(resize_label(sample[key], scaled, window, flip=params.flip))
            dtype = _MAP_DTYPES.get(key, torch.int64)
            if padded:
                pad_value = self.ignore_index if key == "label" else 0
                out[key] = torch.full((crop_h, crop_w), pad_value, dtype=dtype)
                out[key][: params.height, cols] = cropped
            else:
                out[key] = cropped.to(dtype)
        return out

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, base_size={self.base_size}, "
            f"scale_range={self.scale_range}, flip={self.flip}, normalisation={self.normalisation})"
        )


class EvalTransform:
    """Normalise, optionally resizing the image (short side to ``resize_short``; sides rounded to multiples of
    ``size_divisor``).

    Label maps are never resized: they keep the original resolution so metrics are computed on the real
    annotation. Whoever consumes the sample upsamples logits to ``label.shape`` (needed anyway at 1/4 output
    resolution).
    """

    def __init__(self, resize_short: int | None = None, size_divisor: int | None = None,
                 normalisation: Normalisation = IMAGENET):
        # 0 means "off" too, so a config can disable a dataset's default resize.
        self.resize_short = int(resize_short) if resize_short else None
        self.size_divisor = int(size_divisor) if size_divisor else None
        self.normalisation = normalisation

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_short:
            factor = self.resize_short / min(height, width)
            height, width = int(height * factor + 0.5), int(width * factor + 0.5)
        if self.size_divisor:
            div = self.size_divisor
            height, width = max(div, round(height / div) * div), max(div, round(width / div) * div)
        return height, width

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        size = self.output_size(*image.shape[:2])
        out = dict(sample)
        if size != image.shape[:2]:
            out["image"] = resize_image(image, size).contiguous().sub_(self.normalisation.mean_tensor()).mul_(
                self.normalisation.inv_std_tensor())
        else:
            out["image"] = normalize(image, normalisation=self.normalisation)
        for key in _maps(sample):
            out[key] = _map_to_tensor(key, sample[key])
        return out

    def __repr__(self) -> str:
        return (f"EvalTransform(resize_short={self.resize_short}, size_divisor={self.size_divisor}, "
                f"normalisation={self.normalisation})")
