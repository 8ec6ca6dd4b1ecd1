"""Models: the HRNetV2 backbone, decode heads and OVeNet; the offset head on other encoders (segmenter)."""

from torch import nn

from ..config import ModelConfig
from .hrnet import ARCHS, HRNetV2
from .ovenet import OVeNet, SegOutput, offset_outputs
from .segmenter import ConcatHead, OffsetSegmenter, StageCopy, build_encoder_model

__all__ = ["ARCHS", "ConcatHead", "HRNetV2", "OVeNet", "OffsetSegmenter", "SegOutput", "StageCopy", "build_model",
           "offset_outputs"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build OVeNet (or the baseline when ``cfg.offset.enabled`` is False) from a model config, freshly
    initialised: no file is read. ``cfg.backbone`` hrnetv2 gives :class:`OVeNet` (HRNetV2 or HRNetV2+OCR, the
    official-equivalent network); any other encoder an :class:`OffsetSegmenter`. Training then applies
    ``cfg.pretrained`` and ``cfg.init_from`` with :func:`ovenet.weights.load_initial_weights`."""
    if cfg.backbone == "hrnetv2":
        return OVeNet(cfg)
    return build_encoder_model(cfg)
