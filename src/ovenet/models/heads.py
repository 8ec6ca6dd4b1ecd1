"""Decode heads on HRNetV2's concatenated 1/4-resolution features: the FCN head and OCR (Yuan et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fcn_head(cin: int, cout: int, bn_momentum: float = 0.1) -> nn.Sequential:
    """conv1x1-BN-ReLU-conv1x1: HRNetV2's ``last_layer``, OCR's ``aux_head`` and OVeNet's offset head.

    Built with PyTorch's default init; ``OVeNet`` re-initialises it as the official code of its variant does.
    """
    return nn.Sequential(
        nn.Conv2d(cin, cin, 1),
        nn.BatchNorm2d(cin, momentum=bn_momentum),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1),
    )


class FCNHead(nn.Sequential):
    """HRNetV2's head (``last_layer``): :func:`fcn_head` returning ``(logits, None)`` like :class:`OCRHead`'s
    ``(logits, aux)``, so the model treats both heads alike. Parameter names are the Sequential's, as official."""

    def __init__(self, cin: int, num_classes: int, bn_momentum: float = 0.1):
        super().__init__(*fcn_head(cin, num_classes, bn_momentum))

    def forward(self, feats: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return super().forward(feats), None


def _conv_bn_relu(cin: int, cout: int, bn_momentum: float) -> list[nn.Module]:
    # BN+ReLU nested in a Sequential, so parameter names match the official OCR checkpoints (``f_pixel.1.0``).
    return [nn.Conv2d(cin, cout, 1, bias=False),
            nn.Sequential(nn.BatchNorm2d(cout, momentum=bn_momentum), nn.ReLU(inplace=True))]


class ObjectAttention(nn.Module):
    """Pixel-to-object-region attention: each pixel gathers the object-region representations it resembles."""

    def __init__(self, channels: int, key_channels: int, bn_momentum: float = 0.1):
        super().__init__()
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(*_conv_bn_relu(channels, key_channels, bn_momentum),
                                     *_conv_bn_relu(key_channels, key_channels, bn_momentum))
        self.f_object = nn.Sequential(*_conv_bn_relu(channels, key_channels, bn_momentum),
                                      *_conv_bn_relu(key_channels, key_channels, bn_momentum))
        self.f_down = nn.Sequential(*_conv_bn_relu(channels, key_channels, bn_momentum))
        self.f_up = nn.Sequential(*_conv_bn_relu(key_channels, channels, bn_momentum))

    def forward(self, x: Tensor, regions: Tensor) -> Tensor:
        b, _, h, w = x.shape
        query = self.f_pixel(x).flatten(2).transpose(1, 2)  # B x HW x K
        key = self.f_object(regions).flatten(2)  # B x K x R
        value = self.f_down(regions).flatten(2).transpose(1, 2)  # B x R x K
        attn = torch.softmax(torch.bmm(query, key) * self.key_channels ** -0.5, dim=-1)
        context = torch.bmm(attn, value).transpose(1, 2).reshape(b, self.key_channels, h, w)
        return self.f_up(context)


class SpatialOCR(nn.Module):
    def __init__(self, channels: int, key_channels: int, out_channels: int, dropout: float,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.object_context_block = ObjectAttention(channels, key_channels, bn_momentum)
        self.conv_bn_dropout = nn.Sequential(*_conv_bn_relu(2 * channels, out_channels, bn_momentum),
                                             nn.Dropout2d(dropout))

    def forward(self, feats: Tensor, regions: Tensor) -> Tensor:
        context = self.object_context_block(feats, regions)
        return self.conv_bn_dropout(torch.cat([context, feats], dim=1))


def object_regions(feats: Tensor, logits: Tensor) -> Tensor:
    """Soft object regions: features averaged under each class's spatial softmax, ``B x C_feat x K x 1``."""
    probs = torch.softmax(logits.flatten(2), dim=2)  # B x K x HW
    regions = torch.bmm(probs, feats.flatten(2).transpose(1, 2))  # B x K x C_feat
    return regions.transpose(1, 2).unsqueeze(3)


class OCRHead(nn.Module):
    """HRNetV2 + OCR: an auxiliary FCN prediction gives soft object regions that contextualise each pixel.

    Returns ``(ocr_logits, aux_logits)``; parameter names follow the official checkpoints.
    """

    def __init__(self, cin: int, num_classes: int, mid_channels: int = 512, key_channels: int = 256,
                 dropout: float = 0.05, bn_momentum: float = 0.1):
        super().__init__()
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(cin, mid_channels, 3, 1, 1),
                                         nn.BatchNorm2d(mid_channels, momentum=bn_momentum), nn.ReLU(inplace=True))
        self.ocr_distri_head = SpatialOCR(mid_channels, key_channels, mid_channels, dropout, bn_momentum)
        self.cls_head = nn.Conv2d(mid_channels, num_classes, 1)
        self.aux_head = fcn_head(cin, num_classes, bn_momentum)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        aux = self.aux_head(feats)
        x = self.conv3x3_ocr(feats)
        x = self.ocr_distri_head(x, object_regions(x, aux))
        return self.cls_head(x), aux


def upsample_logits(logits: Tensor, size: tuple[int, int], align_corners: bool = True) -> Tensor:
    """HRNet's size-based upsampling (the official code's); models that declare their cells' geometry are resized
    by :func:`ovenet.geometry.resize_to_pixels` instead."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
