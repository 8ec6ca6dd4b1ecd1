"""Confusion matrix accumulated on the device, with IoU / accuracy figures.

Rows are ground-truth classes, columns are predicted classes. Pixels whose target is ``ignore_index`` or
outside ``[0, C)`` are skipped. A prediction outside ``[0, C)`` (e.g. 255 "no decision") on a valid pixel is
kept in an extra, hidden column: it is a false negative of the true class and a false positive of nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ovenet.errors import CheckpointError


def _nan_mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _use_bincount(device: torch.device) -> bool:
    # torch.bincount on CUDA reads min() and max() back to the host to size its output, i.e. two syncs per
    # call; elsewhere it is the fastest histogram.
    return device.type == "cpu"


class ConfusionMatrix:
    """Accumulates a ``C x C`` confusion matrix with one histogram pass per :meth:`update`.

    ``update`` never synchronises with the host, so it can run every eval step on a GPU; only :meth:`compute`
    reads numbers back.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # Without an explicit device the counts follow the tensors given to update().
        self._follow_inputs = device is None
        # Layout: C rows x (C + 1) columns (the last one = invalid predictions), then one trash bin that
        # collects every skipped pixel. A fixed length lets the histogram run without the data's range.
        self._counts = torch.zeros(self._num_bins, dtype=torch.int64, device=device or "cpu")

    @property
    def _num_bins(self) -> int:
        return self.num_classes * (self.num_classes + 1) + 1

    @property
    def device(self) -> torch.device:
        return self._counts.device

    @property
    def _table(self) -> torch.Tensor:
        """Counts as ``C x (C + 1)``: the matrix plus the invalid-prediction column."""
        c = self.num_classes
        return self._counts[: c * (c + 1)].view(c, c + 1)

    @property
    def matrix(self) -> torch.Tensor:
        """The ``C x C`` int64 confusion matrix (rows: ground truth, columns: prediction)."""
        return self._table[:, : self.num_classes]

    def reset(self) -> None:
        self._counts.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch of integer label maps of the same shape (any leading dims)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer label maps (take argmax of logits first)")
        if self._follow_inputs and self._counts.device != target.device:
            self._counts = self._counts.to(target.device)
        c = self.num_classes
        pred = pred.to(self.device, torch.int64).reshape(-1)
        target = target.to(self.device, torch.int64).reshape(-1)
        valid_target = (target >= 0) & (target < c) & (target != self.ignore_index)
        valid_pred = (pred >= 0) & (pred < c)
        # Masking with boolean indexing would sync (its size is data dependent); routing skipped pixels to a
        # trash bin keeps every shape static.
        bins = torch.where(
            valid_target,
            target * (c + 1) + torch.where(valid_pred, pred, c),
            self._num_bins - 1,
        )
        if _use_bincount(bins.device):
            self._counts += torch.bincount(bins, minlength=self._num_bins)
        else:
            # A scatter-add into the fixed-size buffer is the same histogram without a host sync.
            self._counts.scatter_add_(0, bins, torch.ones_like(bins))

    def merge(self, other: ConfusionMatrix) -> None:
        """Adds another matrix's counts (e.g. from a second evaluation pass or another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one"
            )
        self._counts += other._counts.to(self.device)

    def all_reduce(self) -> None:
        """Sums the counts over all ranks; a no-op when torch.distributed is not initialised.

        The official HRNet/OVeNet code divides the reduced matrix by the world size. The IoU ratios survive
        that, but the counts become per-rank averages (integer counts would be truncated); we keep the sum.
        Note that a DistributedSampler that pads the dataset still counts the duplicated samples twice.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, Any]:
        """Returns the figures as Python floats / lists (NaN where a figure is undefined).

        - ``iou``: per class ``tp / (gt + pred - tp)``, NaN where the class is in neither ground truth nor
          prediction.
        - ``miou``: mean of ``iou`` over classes that are present (union > 0), the usual benchmark definition.
        - ``miou_all``: mean over all C classes with absent ones counted as 0, as the official HRNet/OVeNet
          code reports it (``tp / max(1, union)``). It is lower whenever a class never appears, e.g. on a
          small val subset; the two agree when every class is present.
        - ``pixel_acc``: correct / valid pixels.
        - ``per_class_acc``: ``tp / gt`` per class, NaN where the class has no ground-truth pixel.
        - ``mean_acc``: mean of ``per_class_acc`` over classes with ground-truth pixels.
        - ``confusion``: the ``C x C`` pixel counts, row = ground truth, column = prediction.
        """
        table = self._table.detach().to("cpu", torch.float64)
        matrix = table[:, : self.num_classes]
        tp = matrix.diagonal()
        gt = table.sum(dim=1)  # includes invalid predictions: those are false negatives
        predicted = matrix.sum(dim=0)
        union = gt + predicted - tp
        nan = torch.tensor(math.nan, dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        per_class_acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = float(gt.sum())
        return {
            "miou": _nan_mean(iou),
            "miou_all": float((tp / union.clamp(min=1)).mean()),
            "iou": iou.tolist(),
            "pixel_acc": float(tp.sum()) / total if total > 0 else math.nan,
            "mean_acc": _nan_mean(per_class_acc),
            "per_class_acc": per_class_acc.tolist(),
            # counts: row = ground-truth class, column = predicted class (invalid predictions left out)
            "confusion": matrix.to(torch.int64).tolist(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counts as a CPU ``C x (C + 1)`` tensor (last column: predictions outside ``[0, C)``)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "counts": self._table.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = state.get("counts")
        expected = (self.num_classes, self.num_classes + 1)
        if state.get("num_classes") != self.num_classes or counts is None or tuple(counts.shape) != expected:
            raise CheckpointError(
                f"confusion matrix state has num_classes={state.get('num_classes')}, "
                f"expected {self.num_classes}; "
                "load it into a ConfusionMatrix built with the same num_classes"
            )
        self._counts.zero_()
        self._table.copy_(counts.to(self.device, torch.int64))
