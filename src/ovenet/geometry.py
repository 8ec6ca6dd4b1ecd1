"""Where the cells of a feature or logit map sit on the input image, and resizes that respect it.

A convolution that pads k // 2 on both sides keeps cell k of a stride-s map centred on input pixel s * k (pixel
centres at integer coordinates), at every input size. ``F.interpolate(align_corners=False)`` assumes instead
that cell k covers pixels s * k .. s * k + s - 1, centred on s * k + (s - 1) / 2: 14 px off for stride-32 logits
brought to stride 4. :class:`CellGrid` says where a map's cells really are; :func:`regrid` resamples a map from
one grid to another, each cell placed at its centre.

The resampling is bilinear. When one grid subdivides the other (an integer stride ratio, the source's first centre
on a destination cell: every resize of the EfficientNet-Lite0 path, either padding) it is
``F.interpolate(align_corners=True)`` onto exactly the cells between the first and the last centre, plus a
replicated border. Otherwise, and while tracing or exporting, it is two
gathers (rows, then columns) with weights computed from ``torch.arange`` of the output size, so an ONNX export
stays dynamic in height and width and needs no ``grid_sample`` (opset 16), as the seed sampler of
:mod:`ovenet.method`. Beyond the first and the last cell centre the map is held constant (border clamp), as
``F.interpolate`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Number = float | Tensor  # a grid's offsets may depend on the input size (e.g. TensorFlow "SAME" padding)


@dataclass(frozen=True)
class CellGrid:
    """Cell (k, l) of the map is centred on input pixel (``stride * k + offset_y``, ``stride_x * l + offset_x``).

    ``stride_x`` defaults to ``stride``; it differs only after a resize whose height and width ratios differ
    (:meth:`resized`). Offsets and strides are pixels (floats, or 0-dim tensors computed from the input's size).
    """

    stride: Number
    offset_y: Number = 0.0
    offset_x: Number = 0.0
    stride_x: Number | None = None

    def centre(self, k: int, l: int) -> tuple[Number, Number]:
        """The input pixel (y, x) that cell (k, l) is centred on."""
        return self.stride * k + self.offset_y, self.column_stride * l + self.offset_x

    @property
    def column_stride(self) -> Number:
        return self.stride if self.stride_x is None else self.stride_x

    def resized(self, size_from: Sequence[int], size_to: Sequence[int]) -> CellGrid:
        """The same cells on the image resized from ``size_from`` to ``size_to`` (H, W) by a half-pixel resize
        (``F.interpolate(align_corners=False)``, OpenCV's INTER_LINEAR, :func:`ovenet.data.transforms.resize_image`):
        pixel p of the first image is pixel (p + 0.5) * size_to / size_from - 0.5 of the second."""
        ry, rx = size_to[0] / size_from[0], size_to[1] / size_from[1]
        return CellGrid(self.stride * ry, (self.offset_y + 0.5) * ry - 0.5, (self.offset_x + 0.5) * rx - 0.5,
                        self.column_stride * rx)


PIXELS = CellGrid(1)  # a map at the input's own resolution: cell k is pixel k


def _taps(n_out: int, n_in: int, src_stride: Number, src_offset: Number, dst_stride: Number, dst_offset: Number,
          device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """For each of ``n_out`` destination cells along one axis: the two source cells around its centre and the
    weight of the second (positions clamped to the first/last source centre)."""
    position = torch.arange(n_out, device=device, dtype=dtype) * dst_stride + dst_offset  # input pixels
    cell = ((position - src_offset) / src_stride).clamp(min=0).clamp(max=n_in - 1)
    low = cell.floor()
    weight = cell - low
    low = low.long()
    return low, (low + 1).clamp(max=n_in - 1), weight


def _subdivision(src: CellGrid, dst: CellGrid) -> tuple[int, int, int] | None:
    """``(r, q_y, q_x)`` when every number of both grids is a Python number, src's strides are r times dst's (an
    integer, both axes) and src's first centre is dst's cell (q_y, q_x) (integers >= 0): source cell k then sits on
    destination cell r k + q."""
    numbers = (src.stride, src.column_stride, src.offset_y, src.offset_x, dst.stride, dst.column_stride,
               dst.offset_y, dst.offset_x)
    if any(isinstance(v, Tensor) for v in numbers):
        return None
    ratio = src.stride / dst.stride
    first_y, first_x = (src.offset_y - dst.offset_y) / dst.stride, (src.offset_x - dst.offset_x) / dst.column_stride
    if ratio != src.column_stride / dst.column_stride or ratio < 1 or ratio != int(ratio):
        return None
    if first_y < 0 or first_x < 0 or first_y != int(first_y) or first_x != int(first_x):
        return None
    return int(ratio), int(first_y), int(first_x)


def regrid(x: Tensor, size: Sequence[int], src: CellGrid, dst: CellGrid = PIXELS) -> Tensor:
    """Bilinear resampling of ``x`` (``[..., h, w]``, cells on ``src``) onto ``size`` (H, W) cells on ``dst``:
    each output cell reads ``x`` at its own centre, each source cell sitting at its centre. Gradients flow to
    ``x``. With ``dst`` the default :data:`PIXELS`, the result covers the input image pixel for pixel."""
    height, width = size
    # Blended in float32 at least: in bf16 the weights (fractions of a cell) would lose their low bits.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    values = x.to(dtype)
    subdivision = _subdivision(src, dst)
    # Eager only: the gathers need no size arithmetic that an exporter would have to prove for every size.
    traced = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if subdivision is not None and not traced and x.dim() == 4:
        # dst's cells subdivide src's (every resize of the Lite0 path): source cell k is destination cell r k + q,
        # which F.interpolate(align_corners=True) gives exactly onto the r (n - 1) + 1 cells between the first and
        # the last centre; the cells before and after repeat those. PyTorch's kernel: about twice as fast.
        ratio, first_y, first_x = subdivision
        exact = F.interpolate(values, size=(ratio * (x.shape[-2] - 1) + 1, ratio * (x.shape[-1] - 1) + 1),
                              mode="bilinear", align_corners=True)
        after_y = max(0, height - first_y - exact.shape[-2])
        after_x = max(0, width - first_x - exact.shape[-1])
        pads = (first_x, after_x, first_y, after_y)
        out = F.pad(exact, pads, mode="replicate") if any(pads) else exact  # no second full-size copy if none
        return out[..., :height, :width].to(x.dtype)
    rows0, rows1, row_w = _taps(height, x.shape[-2], src.stride, src.offset_y, dst.stride, dst.offset_y,
                                x.device, dtype)
    cols0, cols1, col_w = _taps(width, x.shape[-1], src.column_stride, src.offset_x, dst.column_stride,
                                dst.offset_x, x.device, dtype)
    row_w = row_w.unsqueeze(-1)
    rows = values.index_select(-2, rows0) * (1 - row_w) + values.index_select(-2, rows1) * row_w
    out = rows.index_select(-1, cols0) * (1 - col_w) + rows.index_select(-1, cols1) * col_w
    return out.to(x.dtype)


def resize_to_pixels(x: Tensor, size: Sequence[int], grid: CellGrid | None, align_corners: bool,
                     input_size: Sequence[int] | None = None) -> Tensor:
    """A model's output map (cells on ``grid``, in pixels of its ``input_size`` image, default ``size``) onto
    the pixels of that image resized to ``size`` (H, W): labels, a window, the image before a test-time resize.

    ``grid`` None is a model that does not declare its geometry (HRNetV2, whose official resizes this keeps, or
    a network of your own): a size-based ``F.interpolate`` with its ``align_corners``, as before."""
    size = tuple(size)
    if grid is None:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    if input_size is not None and tuple(input_size) != tuple(size):
        grid = grid.resized(input_size, size)
    return regrid(x, size, grid, PIXELS)
