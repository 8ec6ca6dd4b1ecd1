"""Pixel-wise cross-entropy and online hard example mining (OHEM) cross-entropy.

Each loss scores logits already at the label resolution (``forward``) or logits to be upsampled to it
(``upsampled``, ``loss.chunked``): the latter upsamples and scores a few images at a time and recomputes that in
backward, so no full-resolution logit map outlives its chunk. Same numbers, a fraction of the memory: at 512x1024
and batch 8, OVeNet+OCR's six fp32 maps hold 1.9 GiB until backward (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..geometry import CellGrid, resize_to_pixels

# Logit elements (images x classes x label pixels) upsampled at once by the chunked loss: 32 Mi elements, 128 MiB
# in fp32 (3 Cityscapes 512x1024 images of 19 classes, 1 ADE20K 520x520 image of 150).
CHUNK_ELEMENTS = 2**25

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

    def upsampled_per_pixel(self, logits: Tensor, target: Tensor, align_corners: bool,
                            probability: bool = False, grid: CellGrid | None = None) -> tuple[Tensor, Tensor | None]:
        """``per_pixel`` of ``logits`` bilinearly upsampled to the label size, a chunk of images at a time (by
        the model's ``grid`` when it declares one, else with ``align_corners``: :mod:`ovenet.geometry`).

        While gradients are on, each chunk runs under non-reentrant ``torch.utils.checkpoint``: backward keeps
        only the low-resolution logits and upsamples the chunk again. ``probability``: also return the
        ground-truth class probability map (no gradient; OHEM's selection), from the forward pass only.
        """
        b, c = logits.shape[:2]
        size = target.shape[-2:]
        step = max(1, CHUNK_ELEMENTS // max(1, c * size[0] * size[1]))
        grad = torch.is_grad_enabled() and logits.requires_grad
        losses, probs = [], []
        for start in range(0, b, step):
            chunk, chunk_target = logits[start:start + step], target[start:start + step]
            first_pass = [True]

            def score(chunk: Tensor, chunk_target: Tensor, first_pass: list[bool] = first_pass) -> Tensor:
                up = resize_to_pixels(chunk, size, grid, align_corners)
                if probability and first_pass[0]:  # the recomputation in backward needs no probabilities
                    first_pass[0] = False
                    with torch.no_grad():
                        probs.append(self._target_probability(up, chunk_target))
                return self.per_pixel(up, chunk_target)

            losses.append(checkpoint(score, chunk, chunk_target, use_reentrant=False) if grad
                          else score(chunk, chunk_target))
        return torch.cat(losses), (torch.cat(probs) if probability else None)

    def _target_probability(self, logits: Tensor, target: Tensor) -> Tensor:
        safe_target = target.masked_fill(target == self.ignore_index, 0)
        return torch.softmax(logits.float(), dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)

    def upsampled(self, logits: Tensor, target: Tensor, align_corners: bool, grid: CellGrid | None = None
                  ) -> Tensor:
        """``forward`` of ``logits`` bilinearly upsampled to the label size, without keeping the upsampled map."""
        losses, _ = self.upsampled_per_pixel(logits, target, align_corners, grid=grid)
        valid = target != self.ignore_index
        # F.cross_entropy's mean: the sum over valid pixels over their count, or over their class weights' sum.
        count = valid.sum() if self.weight is None else (self.weight[target.masked_fill(~valid, 0)] * valid).sum()
        return losses.sum() / count


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
        with torch.no_grad():
            prob = self._target_probability(logits, target)
        return self._hard_mean(self.per_pixel(logits, target), prob, target)

    def upsampled(self, logits: Tensor, target: Tensor, align_corners: bool, grid: CellGrid | None = None
                  ) -> Tensor:
        losses, prob = self.upsampled_per_pixel(logits, target, align_corners, probability=True, grid=grid)
        return self._hard_mean(losses, prob, target)

    def _hard_mean(self, losses: Tensor, prob: Tensor, target: Tensor) -> Tensor:
        """Mean of the per-pixel ``losses`` over the hard pixels, selected by their target ``prob``."""
        losses = losses.flatten()
        valid = target.flatten() != self.ignore_index
        with torch.no_grad():
            prob = prob.flatten().masked_fill(~valid, float("inf"))
            k = min(self.min_kept + 1, prob.numel())
            smallest = torch.topk(prob, k, largest=False, sorted=True).values
            # index of the official `min_value`: min(min_kept, n_valid - 1)
            index = (valid.sum() - 1).clamp(min=0, max=k - 1)
            threshold = smallest.gather(0, index.view(1)).clamp(min=self.thresh)
            keep = valid & (prob < threshold)
        return (losses * keep).sum() / keep.sum().clamp(min=1)
