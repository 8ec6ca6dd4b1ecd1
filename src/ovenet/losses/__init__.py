"""Losses: cross-entropy, OHEM cross-entropy and the OVeNet objective (Eq. 5-7)."""

from .ce import CITYSCAPES_CLASS_WEIGHTS, CrossEntropy, OhemCrossEntropy
from .criterion import SegmentationLoss, build_loss

__all__ = ["CITYSCAPES_CLASS_WEIGHTS", "CrossEntropy", "OhemCrossEntropy", "SegmentationLoss", "build_loss"]
