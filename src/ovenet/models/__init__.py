"""Models: the HRNetV2 backbone, decode heads and OVeNet."""

from .hrnet import ARCHS, HRNetV2
from .ovenet import OVeNet, SegOutput, build_model

__all__ = ["ARCHS", "HRNetV2", "OVeNet", "SegOutput", "build_model"]
