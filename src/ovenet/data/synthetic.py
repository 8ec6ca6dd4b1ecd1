"""Procedural driving-like scenes, generated on the fly: no files, deterministic per (seed, index).

Layout: sky on top, a skyline of building blocks down to a horizon, a road trapezoid towards a vanishing point
with sidewalk beside it, then a few objects (trees, poles, cars, people, and generic extra classes) whose size
grows towards the bottom. Each class has its own colour, stripe texture and brightness jitter, plus pixel noise:
colour alone nearly separates the classes, texture and context do the rest, and boundaries are sharp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ovenet.data.base import SampleFiles, SegmentationDataset, Transform, generic_palette
from ovenet.errors import ConfigError

SYNTHETIC_CLASSES = ["sky", "building", "road", "sidewalk", "vegetation", "pole", "car", "person"]
_SKY, _BUILDING, _ROAD, _SIDEWALK = 0, 1, 2, 3
_FIRST_OBJECT = 4
_BASE_PALETTE = [
    (70, 130, 180), (70, 70, 70), (128, 64, 128), (244, 35, 232), (107, 142, 35), (153, 153, 153), (0, 0, 142),
    (220, 20, 60),
]  # fmt: skip


def synthetic_class_info(num_classes: int = 8) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and palette; classes past the 8 named ones are generic objects ``object_k``."""
    if num_classes < _FIRST_OBJECT + 1:
        raise ConfigError(f"synthetic data needs num_classes >= {_FIRST_OBJECT + 1}, got {num_classes}")
    names = SYNTHETIC_CLASSES[:num_classes] + [
        f"object_{k}" for k in range(len(SYNTHETIC_CLASSES), num_classes)
    ]
    extra = generic_palette(num_classes, skip_black=True)[len(_BASE_PALETTE) :]
    return names, (_BASE_PALETTE + extra)[:num_classes]


def _class_appearance(num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed per-class mean colour, stripe frequency (fy, fx in rad/px) and texture amplitude."""
    rng = np.random.default_rng(12345)  # fixed: appearance is part of the task definition, not of the seed
    colors = np.array(
        [(150, 185, 215), (110, 100, 95), (85, 85, 90), (125, 118, 112), (60, 100, 45), (120, 120, 115),
         (40, 50, 120), (150, 60, 60)],
        dtype=np.float32,
    )  # fmt: skip
    if num_classes > len(colors):
        colors = np.concatenate(
            [colors, rng.uniform(40, 210, (num_classes - len(colors), 3)).astype(np.float32)]
        )
    angle = rng.uniform(0, np.pi, num_classes)
    period = rng.uniform(3.0, 14.0, num_classes)
    freq = np.stack([np.sin(angle), np.cos(angle)], 1) * (2 * np.pi / period)[:, None]
    amplitude = rng.uniform(6.0, 22.0, num_classes)
    amplitude[_SKY] = 3.0  # a near-flat sky, like the real thing
    return colors[:num_classes], freq.astype(np.float32), amplitude.astype(np.float32)


def render_scene(
    index: int, size: Sequence[int], num_classes: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 HxWx3 RGB image, uint8 HxW label)."""
    height, width = int(size[0]), int(size[1])
    rng = np.random.default_rng([seed, index])
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    label = np.full((height, width), _SKY, dtype=np.uint8)

    horizon = int(height * rng.uniform(0.35, 0.55))
    # Skyline: blocks of random width, each with its own roof height.
    roof = np.empty(width, dtype=np.int64)
    x = 0
    while x < width:
        block = int(rng.integers(max(2, width // 12), max(3, width // 4)))
        roof[x : x + block] = horizon - int(rng.uniform(0.15, 0.9) * horizon)
        x += block
    label[rows >= roof[None, :]] = _BUILDING

    ground = rows >= horizon
    vanish_x = width * rng.uniform(0.3, 0.7)
    spread = (rows - horizon) / max(1, height - horizon)
    half_width = spread * width * rng.uniform(0.35, 0.7) + 1
    label[ground & (np.abs(cols - vanish_x) <= half_width)] = _ROAD
    label[ground & (np.abs(cols - vanish_x) > half_width)] = _SIDEWALK

    for _ in range(int(rng.integers(2, 7))):
        cls = int(rng.integers(_FIRST_OBJECT, num_classes))
        _draw_object(label, cls, horizon, rng)

    colors, freq, amplitude = _class_appearance(num_classes)
    # Per-image jitter of each class colour and of global brightness keeps colour from being a perfect cue.
    jitter = np.clip(rng.normal(0, 8, (num_classes, 3)), -16, 16).astype(np.float32)
    brightness = np.float32(rng.uniform(0.75, 1.2))
    phase = rng.uniform(0, 2 * np.pi, num_classes).astype(np.float32)
    texture = amplitude[label] * np.sin(freq[label, 0] * rows + freq[label, 1] * cols + phase[label])
    image = (colors + jitter)[label] + texture[..., None]
    image *= brightness
    image += rng.standard_normal((height, width, 3), dtype=np.float32) * 8.0
    return np.clip(image, 0, 255).astype(np.uint8), label


def _draw_object(label: np.ndarray, cls: int, horizon: int, rng: np.random.Generator) -> None:
    """Stamp one object; its shape follows its class, its size grows with distance below the horizon."""
    height, width = label.shape
    bottom = int(rng.uniform(horizon + 1, height + 0.3 * (height - horizon)))
    bottom = min(bottom, height)
    depth = max(0.15, (bottom - horizon) / max(1, height - horizon))  # 0 at the horizon, 1 at the bottom
    center_x = int(rng.integers(0, width))
    kind = (cls - _FIRST_OBJECT) % 4  # vegetation: blob, pole: thin bar, car: wide box, person: tall ellipse
    box_h, box_w = {
        0: (0.45 * height * depth, 0.25 * width * depth),
        1: (0.6 * height * depth, max(2.0, 0.012 * width * depth)),
        2: (0.2 * height * depth, 0.3 * width * depth),
        3: (0.35 * height * depth, 0.06 * width * depth),
    }[kind]
    box_h, box_w = max(2, int(box_h * rng.uniform(0.7, 1.3))), max(2, int(box_w * rng.uniform(0.7, 1.3)))
    top, left = max(0, bottom - box_h), max(0, center_x - box_w // 2)
    region = label[top:bottom, left : left + box_w]
    if region.size == 0:
        return
    if kind in (1, 2):
        region[...] = cls
    else:
        ys = (np.arange(region.shape[0])[:, None] + top - (bottom - box_h / 2)) / (box_h / 2)
        xs = (np.arange(region.shape[1])[None, :] + left - center_x) / (box_w / 2)
        region[ys**2 + xs**2 <= 1.0] = cls


class SyntheticScenes(SegmentationDataset):
    """``num_samples`` procedural scenes of ``size`` (H, W); sample ``i`` is identical on every call."""

    DEFAULT_SAMPLES = 64  # what data.num_samples: null means
    DEFAULT_SIZE = (256, 512)  # what data.image_size: null means

    def __init__(
        self,
        num_samples: int = DEFAULT_SAMPLES,
        size: Sequence[int] = DEFAULT_SIZE,
        num_classes: int = 8,
        seed: int = 0,
        transform: Transform | None = None,
    ):
        if num_samples < 1:
            raise ConfigError(f"synthetic num_samples must be >= 1, got {num_samples}")
        self.class_names, self.palette = synthetic_class_info(num_classes)
        self.num_classes = int(num_classes)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        samples = [SampleFiles(f"synthetic/{seed}_{i:06d}", image=None) for i in range(num_samples)]
        super().__init__(samples, label_table=None, transform=transform)

    def load(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} synthetic samples")
        image, label = render_scene(index, self.size, self.num_classes, self.seed)
        return {"image": image, "label": label}

    @property
    def has_labels(self) -> bool:
        return True
