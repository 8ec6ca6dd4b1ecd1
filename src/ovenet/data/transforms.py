"""Train and eval transforms on decoded samples.

A transform takes the dict from ``SegmentationDataset.load`` (uint8 ``image`` HxWx3 plus integer maps such as
``label``) and returns tensors: ``image`` float32 [3,H,W] ImageNet-normalised, maps as integer tensors [H,W].

Speed: ``TrainTransform`` never resizes the whole image. It draws the scale and the crop window first, then asks
PIL to resample only the source box that lands in the crop (``Image.resize(box=...)``), which gives the same pixels
as "resize everything, then crop" at a fraction of the cost (2x upscaled Cityscapes frames are 4096x8192).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ovenet.data.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
_STD_255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
_INV_STD_255 = 1.0 / _STD_255

# Integer maps a sample may carry, with their padding value and output dtype.
# label_ids pads with 0 (Cityscapes "unlabeled"), instance with 0 (no instance).
_MAP_DTYPES = {"label": torch.int64, "label_ids": torch.int64, "instance": torch.int32}


def normalize(image: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 [3,H,W], ImageNet mean/std; written into ``out`` when given."""
    if not image.flags.writeable:  # PIL-backed arrays are read-only; torch wants writable memory
        image = image.copy()
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    if out is None:
        out = torch.empty(pixels.shape, dtype=torch.float32)
    # In place on one buffer: the uint8->float copy is the only allocation (fresh pages are costly at 6 MB).
    return out.copy_(pixels).sub_(_MEAN_255).mul_(_INV_STD_255)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize` for visualisation: [3,H,W] float -> uint8 HxWx3."""
    pixels = image.detach().cpu().float() * _STD_255 + _MEAN_255
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _map_to_tensor(key: str, array: np.ndarray) -> torch.Tensor:
    dtype = _MAP_DTYPES.get(key, torch.int64)
    return torch.from_numpy(np.asarray(array).astype(np.int64 if dtype == torch.int64 else np.int32))


def _maps(sample: dict) -> list[str]:
    return [key for key in sample if key != "image" and isinstance(sample[key], np.ndarray)]


def _resize_image(image: np.ndarray, size_hw: tuple[int, int], box=None) -> np.ndarray:
    height, width = size_hw
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR, box=box))


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
    """Random scale, pad-to-crop, random crop, horizontal flip and ImageNet normalisation.

    The scale ``s`` is uniform in ``scale_range``; the long side becomes ``base_size * s`` (or the image's own long
    side times ``s`` when ``base_size`` is None). Images are resampled bilinearly, label maps with nearest.
    When the scaled image is smaller than the crop, it sits top-left and the rest is padded: 0 in the normalised
    image (the mean colour), ``ignore_index`` in the label. Randomness comes from Python's ``random`` module, which
    DataLoader seeds per worker.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        base_size: int | None = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
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
        height, width = sample["image"].shape[:2]
        step_y, step_x = height / params.scaled_h, width / params.scaled_w  # source pixels per scaled pixel
        box = (
            params.left * step_x,
            params.top * step_y,
            (params.left + params.width) * step_x,
            (params.top + params.height) * step_y,
        )
        image = _resize_image(sample["image"], (params.height, params.width), box=box)
        if params.flip:
            image = image[:, ::-1]
        crop_h, crop_w = self.crop_size
        padded = (params.height, params.width) != (crop_h, crop_w)
        out_image = torch.zeros(3, crop_h, crop_w) if padded else torch.empty(3, crop_h, crop_w)
        normalize(np.ascontiguousarray(image), out=out_image[:, : params.height, : params.width])
        out = dict(sample)
        out["image"] = out_image

        # Nearest neighbour by index arithmetic: same pixel centres as PIL's box resize, any integer dtype.
        rows = np.minimum(
            ((params.top + np.arange(params.height) + 0.5) * step_y).astype(np.int64), height - 1
        )
        cols = np.minimum(
            ((params.left + np.arange(params.width) + 0.5) * step_x).astype(np.int64), width - 1
        )
        if params.flip:
            cols = cols[::-1]
        for key in _maps(sample):
            cropped = torch.from_numpy(
                np.take(sample[key][rows], cols, axis=1)
            )  # rows first: whole-row copies
            dtype = _MAP_DTYPES.get(key, torch.int64)
            if padded:
                pad_value = self.ignore_index if key == "label" else 0
                out[key] = torch.full((crop_h, crop_w), pad_value, dtype=dtype)
                out[key][: params.height, : params.width] = cropped
            else:
                out[key] = cropped.to(dtype)
        return out

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, base_size={self.base_size}, "
            f"scale_range={self.scale_range}, flip={self.flip})"
        )


class EvalTransform:
    """Normalise, optionally resizing the image (short side to ``resize_short``; sides rounded to multiples of
    ``size_divisor``).

    Label maps are never resized: they keep the original resolution so metrics are computed on the real
    annotation. Whoever consumes the sample upsamples logits to ``label.shape`` (needed anyway at 1/4 output
    resolution).
    """

    def __init__(self, resize_short: int | None = None, size_divisor: int | None = None):
        # 0 means "off" too, so a config can disable a dataset's default resize.
        self.resize_short = int(resize_short) if resize_short else None
        self.size_divisor = int(size_divisor) if size_divisor else None

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
        if size != image.shape[:2]:
            image = _resize_image(image, size)
        out = dict(sample)
        out["image"] = normalize(image)
        for key in _maps(sample):
            out[key] = _map_to_tensor(key, sample[key])
        return out

    def __repr__(self) -> str:
        return f"EvalTransform(resize_short={self.resize_short}, size_divisor={self.size_divisor})"
