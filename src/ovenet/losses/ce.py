"""Pixel-wise cross-entropy and online hard example mining (OHEM) cross-entropy."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Class weights of the HRNet Cityscapes/ACDC configs (19 train ids).
CITYSCAPES_CLASS_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


def class_weights(spec: str | list[float] | None, num_classes: int) -> Tensor | None:
    from ..errors import ConfigError

    if spec is None:
        return None
    if spec == "cityscapes":
        spec = CITYSCAPES_CLASS_WEIGHTS
    if isinstance(spec, str) or len(spec) != num_classes:
        raise ConfigError(f"loss.class_weights must be null, 'cityscapes' or {num_classes} numbers, got {spec!r}")
    return torch.tensor(spec, dtype=torch.float32)


class CrossEntropy(nn.Module):
    """Cross-entropy averaged over non-ignored pixels (class-weighted mean when weights are given)."""

    def __init__(self, ignore_index: int = 255, weight: Tensor | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index)

    def per_pixel(self, logits: Tensor, target: Tensor) -> Tensor:
        """Unreduced loss map, 0 at ignore pixels."""
        return F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction="none")


class OhemCrossEntropy(CrossEntropy):
    """OHEM cross-entropy (Shrivastava et al. 2016, as in HRNet): average the loss over the pixels whose
    ground-truth probability is below ``max(thresh, p_k)``, p_k being the ``min_kept``-th smallest such probability,
    so at least ``min_kept`` hard pixels per batch always count.

    The k-th value comes from ``topk`` over a fixed k, not a full sort, and the number of valid pixels stays a
    tensor: no host synchronisation. With no valid pixel the loss is 0 (the official code returned NaN).
    """

    def __init__(self, ignore_index: int = 255, thresh: float = 0.7, min_kept: int = 100000,
                 weight: Tensor | None = None):
        super().__init__(ignore_index, weight)
        self.thresh = thresh
        self.min_kept = max(1, min_kept)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        losses = self.per_pixel(logits, target).flatten()
        valid = target.flatten() != self.ignore_index
        safe_target = target.masked_fill(target == self.ignore_index, 0)
        with torch.no_grad():
            prob = torch.softmax(logits.float(), dim=1).gather(1, safe_target.unsqueeze(1)).flatten()
            prob = prob.masked_fill(~valid, float("inf"))
            k = min(self.min_kept + 1, prob.numel())
            smallest = torch.topk(prob, k, largest=False, sorted=True).values
            # index of the official `min_value`: min(min_kept, n_valid - 1)
            index = (valid.sum() - 1).clamp(min=0, max=k - 1)
            threshold = smallest.gather(0, index.view(1)).clamp(min=self.thresh)
            keep = valid & (prob < threshold)
        return (losses * keep).sum() / keep.sum().clamp(min=1)
