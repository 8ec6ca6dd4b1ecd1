"""The OVeNet method (Sec. 3 of the paper): seed resampling, fusion and losses, Eq. 2-7.

Conventions: logits are ``B x C x H x W``; offsets are ``B x 2 x H x W`` in normalised image coordinates
(channel 0 = x, channel 1 = y, the range [-1, 1] spanning the first to the last pixel centre); the confidence is
``B x 1 x H x W`` in [0, 1]. The base grid is built with ``torch.arange`` on the input's device, so it costs no
host sync and stays dynamic in ONNX export.

``align_corners`` selects the sampling convention. ``True`` ("exact") reads pixel p itself at zero offset, so
S_s == S_i when o == 0. ``False`` reproduces the official code on PyTorch >= 1.3: its grid is built for
align_corners=True but sampled with the default False, which stretches the read position outward by up to half
a pixel (the identity only under PyTorch 1.1, where the authors trained).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def base_grid(height: int, width: int, like: Tensor) -> Tensor:
    """Normalised pixel-centre coordinates, ``1 x H x W x 2`` (x, y), first/last pixel at -1/+1."""
    xs = torch.arange(width, device=like.device, dtype=like.dtype) * (2.0 / max(width - 1, 1)) - 1.0
    ys = torch.arange(height, device=like.device, dtype=like.dtype) * (2.0 / max(height - 1, 1)) - 1.0
    return torch.stack([xs.expand(height, width), ys.unsqueeze(1).expand(height, width)], dim=-1).unsqueeze(0)


def seed_grid(offsets: Tensor, clamp: bool = True) -> Tensor:
    """Sampling positions p + o(p) as a ``B x H x W x 2`` grid (clamped to the image, as the official code)."""
    grid = base_grid(offsets.shape[-2], offsets.shape[-1], offsets) + offsets.permute(0, 2, 3, 1)
    return grid.clamp(-1.0, 1.0) if clamp else grid


def resample(values: Tensor, grid: Tensor, align_corners: bool = True) -> Tensor:
    """Eq. 2-3: C_s(p) = C(p + o(p)), bilinear with border padding."""
    return F.grid_sample(values, grid.to(values.dtype), mode="bilinear", padding_mode="border",
                         align_corners=align_corners)


def refine_offsets(offsets: Tensor, grid: Tensor, align_corners: bool = True) -> Tensor:
    """One iterative-refinement step (official ITERATIVE_REFINEMENT): o <- o(p) + o(p + o(p))."""
    return offsets + F.grid_sample(offsets, grid.to(offsets.dtype), mode="bilinear", padding_mode="zeros",
                                   align_corners=align_corners)


def fuse(initial: Tensor, seed: Tensor, confidence: Tensor) -> Tensor:
    """Eq. 4: S_f = (1 - F) S_i + F S_s."""
    return (1.0 - confidence) * initial + confidence * seed


def semantic_loss(loss_final: Tensor, loss_seed: Tensor, loss_initial: Tensor, kappa: float = 0.5,
                  lam: float = 0.5) -> Tensor:
    """Eq. 5: L_semantic = L(S_f, H) + kappa L(S_s, H) + lambda L(S_i, H)."""
    return loss_final + kappa * loss_seed + lam * loss_initial


def seed_labels(offsets: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """H(p + o(p)) at label resolution: nearest sampling, so no gradient reaches the offsets."""
    h, w = target.shape[-2:]
    off = F.interpolate(offsets.float(), size=(h, w), mode="bilinear", align_corners=True)
    grid = seed_grid(off)
    picked = F.grid_sample(target.unsqueeze(1).float(), grid, mode="nearest", padding_mode="border",
                           align_corners=True)
    return picked.squeeze(1).long()


def confidence_loss(confidence: Tensor, offsets: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Eq. 6: L_f = -1[H(p) = H(p+o(p))] log F(p) - 1[H(p) != H(p+o(p))] log(1 - F(p)).

    Averaged over pixels whose label and whose seed's label are both valid.
    """
    h, w = target.shape[-2:]
    conf = F.interpolate(confidence.float(), size=(h, w), mode="bilinear", align_corners=True).squeeze(1)
    seed = seed_labels(offsets.detach(), target, ignore_index)
    valid = (target != ignore_index) & (seed != ignore_index)
    agree = (seed == target).float()
    eps = 1e-7
    per_pixel = -(agree * torch.log(conf + eps) + (1.0 - agree) * torch.log(1.0 - conf + eps))
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def confidence_loss_official(confidence: Tensor, offsets: Tensor, target: Tensor, ignore_index: int = 255
                             ) -> Tensor:
    """Eq. 6 as the official code computes it: ignore pixels count as class 0, the grid is not clamped and is
    sampled with align_corners=False, and the batch sum is divided by h * w (not by the pixel count)."""
    h, w = target.shape[-2:]
    conf = F.interpolate(confidence.float(), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
    off = F.interpolate(offsets.float(), size=(h, w), mode="bilinear", align_corners=False)
    labels = target.masked_fill(target == ignore_index, 0).float().unsqueeze(1)
    picked = F.grid_sample(labels, seed_grid(off, clamp=False), mode="nearest", padding_mode="border",
                           align_corners=False)
    agree = (picked == labels).squeeze(1)
    eps = 1e-7
    per_pixel = torch.where(agree, -torch.log(conf + eps), -torch.log(1.0 - conf + eps))
    return per_pixel.sum() / (h * w)


def total_loss(semantic: Tensor, confidence: Tensor, confidence_weight: float = 1.0) -> Tensor:
    """Eq. 7: L_final = L_semantic + L_f."""
    return semantic + confidence_weight * confidence
