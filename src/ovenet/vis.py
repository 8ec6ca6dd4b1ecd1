"""Visualisation helpers: label maps, offset fields, confidence maps and images as uint8 RGB arrays.

Everything returns ``uint8 HxWx3`` numpy arrays that :func:`save_png` writes; inputs may be numpy arrays or
torch tensors (on any device).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ovenet.data.base import to_numpy
from ovenet.files import replaced

# viridis (the CC0 matplotlib colormap: perceptually uniform, readable in greyscale and when colour-blind)
# sampled at 17 evenly spaced points; linear interpolation stays within ~5/255 of the full map.
_VIRIDIS_LUT = np.array(
    [
        (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
        (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115),
        (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37),
    ],
    dtype=np.float64,
)  # fmt: skip


def colorize(
    label_map: Any, palette: Sequence[Sequence[int]] | np.ndarray, ignore_index: int = 255
) -> np.ndarray:
    """Colours an ``[H, W]`` label map with ``palette[k] = (r, g, b)``; ignore/unknown labels are black."""
    labels = to_numpy(label_map)
    if labels.ndim != 2:
        raise ValueError(f"label_map must be [H, W], got shape {labels.shape}")
    colors = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    labels = labels.astype(np.int64)
    known = (labels >= 0) & (labels < len(colors)) & (labels != ignore_index)
    out = colors[np.where(known, labels, 0)] if len(colors) else np.zeros((*labels.shape, 3), np.uint8)
    out[~known] = 0
    return out


def overlay(image_uint8: Any, color: Any, alpha: float = 0.5) -> np.ndarray:
    """Blends ``color`` over ``image`` (both ``HxWx3`` uint8): ``(1 - alpha) * image + alpha * color``."""
    image, color = to_numpy(image_uint8), to_numpy(color)
    if image.shape != color.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image and color must both be HxWx3, got {image.shape} and {color.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * color.astype(np.float64)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _color_wheel() -> np.ndarray:
    """The Middlebury flow colour wheel (Baker et al., 2011): 55 hues, red -> yellow -> green -> cyan ->
    blue -> magenta -> red, with segment lengths chosen so that hue steps look even."""
    segments = [  # (length, channel that is constant 255, channel that ramps, ramp goes up)
        (15, 0, 1, True),  # red -> yellow
        (6, 1, 0, False),  # yellow -> green
        (4, 1, 2, True),  # green -> cyan
        (11, 2, 1, False),  # cyan -> blue
        (13, 2, 0, True),  # blue -> magenta
        (6, 0, 2, False),  # magenta -> red
    ]
    rows = []
    for length, full, ramp, up in segments:
        block = np.zeros((length, 3))
        block[:, full] = 255
        steps = np.floor(255 * np.arange(length) / length)
        block[:, ramp] = steps if up else 255 - steps
        rows.append(block)
    return np.concatenate(rows)


def flow_to_color(offsets: Any, max_norm: float | None = None) -> np.ndarray:
    """Colours a ``[2, H, W]`` vector field (channel 0 = x, 1 = y, image axes) with the optical-flow code.

    Hue gives the direction (+x red, -x cyan), saturation the length: zero is white and a vector of length
    ``max_norm`` (default: the longest in the field) is fully saturated; longer ones are darkened.
    """
    field = to_numpy(offsets).astype(np.float64)
    if field.ndim != 3 or field.shape[0] != 2:
        raise ValueError(f"offsets must be [2, H, W], got shape {field.shape}")
    u, v = np.nan_to_num(field[0]), np.nan_to_num(field[1])
    radius = np.sqrt(u**2 + v**2)
    scale = float(radius.max()) if max_norm is None else float(max_norm)
    if scale <= 0:
        scale = 1.0  # an all-zero field, or max_norm=0: everything is white
    u, v, radius = u / scale, v / scale, radius / scale

    wheel = _color_wheel() / 255.0
    num_hues = len(wheel)
    # atan2(-v, -u) runs over (-pi, pi] with +x at -pi, so +x lands on the wheel's first entry (red).
    angle = np.arctan2(-v, -u) / np.pi
    position = (angle + 1) / 2 * (num_hues - 1)
    lower = np.floor(position).astype(np.int64)
    upper = (lower + 1) % num_hues
    frac = (position - lower)[..., None]
    color = (1 - frac) * wheel[lower] + frac * wheel[upper]
    inside = (radius <= 1)[..., None]
    color = np.where(inside, 1 - radius[..., None] * (1 - color), color * 0.75)
    return np.floor(255 * color).astype(np.uint8)


def confidence_to_color(conf: Any, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Colours an ``[H, W]`` map with viridis (dark purple = ``vmin``, yellow = ``vmax``); NaN is black."""
    values = to_numpy(conf).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"conf must be [H, W], got shape {values.shape}")
    if vmax <= vmin:
        raise ValueError(f"vmax ({vmax}) must be greater than vmin ({vmin})")
    missing = np.isnan(values)
    t = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0)
    position = t * (len(_VIRIDIS_LUT) - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), len(_VIRIDIS_LUT) - 2)
    frac = (position - lower)[..., None]
    color = (1 - frac) * _VIRIDIS_LUT[lower] + frac * _VIRIDIS_LUT[lower + 1]
    out = np.rint(color).astype(np.uint8)
    out[missing] = 0
    return out


def with_key(image: np.ndarray, kind: str) -> np.ndarray:
    """A copy of a ``flow_to_color`` (``kind="offsets"``) or ``confidence_to_color`` (``"confidence"``) image with
    its key in the top-right corner, framed in white: the colour wheel (hue = direction, saturation = length
    relative to the image's longest offset) or a colour bar from 1 (top) to 0 with ticks at 1, 0.5 and 0
    (labelled when the bar is tall enough for the text)."""
    out = np.array(image, copy=True)
    h, w = out.shape[:2]
    side = max(8, min(h, w) // 5)
    if kind == "offsets":
        ys, xs = np.mgrid[-1:1:complex(0, side), -1:1:complex(0, side)]
        key = flow_to_color(np.stack([xs, ys]), max_norm=1.0)
        key[np.sqrt(xs**2 + ys**2) > 1] = 255
    elif kind == "confidence":
        key = _ticked_bar(confidence_to_color(np.repeat(np.linspace(1, 0, side)[:, None], max(3, side // 4), axis=1)))
    else:
        raise ValueError(f"kind must be 'offsets' or 'confidence', got {kind!r}")
    kh, kw = key.shape[:2]
    if kh + 2 > h or kw + 2 > w:
        return out  # too small an image to carry a key
    out[: kh + 2, w - kw - 2:] = 255
    out[1 : kh + 1, w - kw - 1 : w - 1] = key
    return out


CONFIDENCE_TICKS = (1.0, 0.5, 0.0)


def _ticked_bar(bar: np.ndarray) -> np.ndarray:
    """``bar`` (values 1 at the top row to 0 at the bottom) on white with black tick marks at 1, 0.5 and 0 to its
    left and, from 36 px up, their labels (PIL's built-in font, about 11 px high)."""
    from PIL import ImageDraw, ImageFont

    side = bar.shape[0]
    tick = max(2, side // 12)
    labels = side >= 36
    font = ImageFont.load_default() if labels else None
    label_width = 22 if labels else 0
    canvas = Image.new("RGB", (label_width + tick + bar.shape[1], side), (255, 255, 255))
    canvas.paste(Image.fromarray(bar), (label_width + tick, 0))
    draw = ImageDraw.Draw(canvas)
    for value in CONFIDENCE_TICKS:
        row = round((1 - value) * (side - 1))
        draw.line([(label_width, row), (label_width + tick - 1, row)], fill=(0, 0, 0))
        if font is not None:
            text = f"{value:g}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            y = min(max(row - (bottom + top) // 2, 0), side - bottom)
            draw.text((label_width - 2 - (right - left), y), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_png(path: str | Path, array: Any) -> Path:
    """Writes uint8 ``HxW``/``HxWx3``/``HxWx4`` or uint16 ``HxW`` arrays as PNG, creating parent folders."""
    data = to_numpy(array)
    valid = (data.dtype == np.uint8 and (data.ndim == 2 or (data.ndim == 3 and data.shape[2] in (3, 4)))) or (
        data.dtype == np.uint16 and data.ndim == 2
    )
    if not valid:
        raise ValueError(f"save_png needs uint8 HxW/HxWx3/HxWx4 or uint16 HxW, got {data.dtype} {data.shape}")
    path = Path(path)
    with replaced(path) as tmp:
        Image.fromarray(np.ascontiguousarray(data)).save(tmp, format="PNG")
    return path
