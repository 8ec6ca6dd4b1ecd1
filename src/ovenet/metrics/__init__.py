"""Evaluation metrics: confusion-matrix IoU/accuracy, boundary (trimap) IoU, Cityscapes benchmark figures."""

from ovenet.metrics.boundary import BoundaryConfusion, boundary_band
from ovenet.metrics.cityscapes import CityscapesMetric
from ovenet.metrics.confusion import ConfusionMatrix

__all__ = ["BoundaryConfusion", "CityscapesMetric", "ConfusionMatrix", "boundary_band"]
