"""Boundary (trimap) IoU: the confusion matrix restricted to a band around ground-truth label boundaries.

Definitions used here:

- A pixel is a *boundary pixel* when its 3x3 window (itself and its 8 neighbours) holds more than one label.
  Both sides of an edge are therefore boundary pixels. The image border is not an edge (the map is padded by
  replication).
- With ``ignore_is_boundary=True`` (default) a change between a valid label and ``ignore_index`` is an edge
  too: in Cityscapes and VOC the void pixels mostly outline objects, so that is where boundaries are.
  With ``False`` only changes between two valid labels count. Two ignore pixels never make an edge.
- The band holds every pixel within ``width`` pixels (Chebyshev distance, i.e. a square window) of a boundary
  pixel; ``width=0`` is the boundary pixels alone. Ignore pixels inside the band stay ignored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ovenet.errors import CheckpointError
from ovenet.metrics.confusion import ConfusionMatrix


def _window_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over a (2r+1)^2 window of an ``N x 1 x H x W`` float map, border replicated."""
    if radius == 0:
        return x
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.max_pool2d(padded, kernel_size=2 * radius + 1, stride=1)


@torch.no_grad()
def boundary_band(
    target: torch.Tensor, width: int = 3, ignore_index: int = 255, ignore_is_boundary: bool = True
) -> torch.Tensor:
    """Boolean mask of the pixels within ``width`` px of a label boundary; ``target`` is ``[..., H, W]``."""
    if target.dim() < 2:
        raise ValueError(f"target must have at least 2 dims [..., H, W], got shape {tuple(target.shape)}")
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    shape = target.shape
    # Label ids (<= 2^24) are exact in float32, which max_pool2d needs.
    labels = target.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float32)
    ignore = labels == ignore_index
    if ignore_is_boundary:
        high = _window_max(labels, 1)
        low = -_window_max(-labels, 1)
        edge = high != low
    else:
        # Hide ignore pixels from both extremes; a window with no valid pixel gives high < low, not an edge.
        high = _window_max(torch.where(ignore, -torch.inf, labels), 1)
        low = -_window_max(torch.where(ignore, -torch.inf, -labels), 1)
        edge = high > low
    band = _window_max(edge.to(torch.float32), width) > 0
    return band.reshape(shape)


class BoundaryConfusion:
    """:class:`ConfusionMatrix` over the boundary band of the ground truth only; same update/compute API."""

    def __init__(
        self,
        num_classes: int,
        width: int = 3,
        ignore_index: int = 255,
        ignore_is_boundary: bool = True,
        device: torch.device | str | None = None,
    ):
        if width < 0:
            raise ValueError(f"width must be >= 0, got {width}")
        self.width = int(width)
        self.ignore_is_boundary = ignore_is_boundary
        self.confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)

    @property
    def num_classes(self) -> int:
        return self.confusion.num_classes

    @property
    def ignore_index(self) -> int:
        return self.confusion.ignore_index

    @property
    def matrix(self) -> torch.Tensor:
        return self.confusion.matrix

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds label maps ``[..., H, W]``; only ground-truth pixels inside the band are counted."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        band = boundary_band(target, self.width, self.ignore_index, self.ignore_is_boundary)
        target = target.to(torch.int64)  # so that any ignore_index fits
        self.confusion.update(pred, target.masked_fill(~band, self.ignore_index))

    def reset(self) -> None:
        self.confusion.reset()

    def merge(self, other: BoundaryConfusion) -> None:
        if other.width != self.width:
            raise ValueError(f"cannot merge band width {other.width} into band width {self.width}")
        self.confusion.merge(other.confusion)

    def all_reduce(self) -> None:
        self.confusion.all_reduce()

    def compute(self) -> dict[str, Any]:
        """Same keys as :meth:`ConfusionMatrix.compute`, restricted to the band."""
        return self.confusion.compute()

    def state_dict(self) -> dict[str, Any]:
        return {**self.confusion.state_dict(), "width": self.width}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("width", self.width) != self.width:
            raise CheckpointError(
                f"boundary confusion state has width={state['width']}, expected {self.width}; "
                "build the BoundaryConfusion with the same width"
            )
        self.confusion.load_state_dict(state)
