"""The OVeNet method (Sec. 3 of the paper): seed resampling, fusion and losses, Eq. 2-7.

Conventions: logits are ``B x C x H x W``; offsets are ``B x 2 x H x W`` in normalised image coordinates
(channel 0 = x, channel 1 = y, the range [-1, 1] spanning the first to the last pixel centre); the confidence is
``B x 1 x H x W`` in [0, 1].

The seed positions are sampled by a small gather-based bilinear sampler instead of ``F.grid_sample``: it works in
pixel units, so a zero offset reads exactly the pixel itself (grid_sample's normalise/unnormalise round trip is
off by ~1e-7), and it exports to ONNX at any opset with dynamic height and width.

``align_corners`` selects the convention. ``True`` ("exact") reads pixel p itself at zero offset, so S_s == S_i
when o == 0. ``False`` reproduces the official code on PyTorch >= 1.3: its grid is built for align_corners=True
but sampled with the default False, which stretches the read position outward by up to half a pixel (the
identity only under PyTorch 1.1, where the authors trained).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .geometry import CellGrid, resize_to_pixels


def seed_positions(offsets: Tensor, align_corners: bool = True) -> tuple[Tensor, Tensor]:
    """Pixel coordinates (x, y), each ``B x H x W``, of the seeds p + o(p), clamped to the image (border).

    Positions are built from ``torch.arange`` on the offsets' device: no host sync, and dynamic in ONNX export.
    """
    h, w = offsets.shape[-2:]
    cols = torch.arange(w, device=offsets.device, dtype=offsets.dtype).view(1, 1, w)
    rows = torch.arange(h, device=offsets.device, dtype=offsets.dtype).view(1, h, 1)
    if align_corners:
        # Exact: normalised -1..1 spans pixel centres 0..size-1, so o == 0 gives p itself, bit for bit.
        px = cols + offsets[:, 0] * ((w - 1) / 2)
        py = rows + offsets[:, 1] * ((h - 1) / 2)
    else:
        # Official on PyTorch >= 1.3: grid 2j/(W-1) - 1 (+ o, clamped to [-1, 1]) unnormalised as align_corners=False.
        gx = (cols * (2.0 / max(w - 1, 1)) - 1.0 + offsets[:, 0]).clamp(-1.0, 1.0)
        gy = (rows * (2.0 / max(h - 1, 1)) - 1.0 + offsets[:, 1]).clamp(-1.0, 1.0)
        px = ((gx + 1.0) * w - 1.0) / 2.0
        py = ((gy + 1.0) * h - 1.0) / 2.0
    return px.clamp(0, w - 1), py.clamp(0, h - 1)


def _gather(values: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """values[b, :, y, x] for integer index maps ``B x H x W``; result ``B x C x H x W``."""
    b, c, _h, w = values.shape
    index = (y * w + x).flatten(1).unsqueeze(1).expand(b, c, -1)
    return values.flatten(2).gather(2, index).view(b, c, *x.shape[1:])


def sample_bilinear(values: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """Bilinear interpolation of ``values`` at pixel positions inside the image (differentiable in px, py)."""
    h, w = values.shape[-2:]
    x0, y0 = px.floor(), py.floor()
    wx, wy = (px - x0).unsqueeze(1).to(values.dtype), (py - y0).unsqueeze(1).to(values.dtype)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    top = _gather(values, x0, y0) * (1 - wx) + _gather(values, x1, y0) * wx
    bottom = _gather(values, x0, y1) * (1 - wx) + _gather(values, x1, y1) * wx
    return top * (1 - wy) + bottom * wy


def resample(values: Tensor, offsets: Tensor, align_corners: bool = True) -> Tensor:
    """Eq. 2-3: C_s(p) = C(p + o(p)), bilinear, border padding (sizes of values and offsets agree).

    Computed in fp32 whatever the autocast dtype: in bf16 the bilinear weights (fractions of a pixel) lose their
    low bits and the offsets' gradient, which comes only through them, is off by ~2%."""
    return sample_bilinear(values.float(), *seed_positions(offsets.float(), align_corners))


def refine_offsets(offsets: Tensor, align_corners: bool = True) -> Tensor:
    """One iterative-refinement step (official ITERATIVE_REFINEMENT): o <- o(p) + o(p + o(p))."""
    return offsets + resample(offsets, offsets, align_corners)


def fuse(initial: Tensor, seed: Tensor, confidence: Tensor) -> Tensor:
    """Eq. 4: S_f = (1 - F) S_i + F S_s, in fp32 (S_f - S_i is small next to S_i: bf16 would round it away)."""
    confidence = confidence.float()
    return (1.0 - confidence) * initial.float() + confidence * seed.float()


def semantic_loss(loss_final: Tensor, loss_seed: Tensor, loss_initial: Tensor, kappa: float = 0.5,
                  lam: float = 0.5) -> Tensor:
    """Eq. 5: L_semantic = L(S_f, H) + kappa L(S_s, H) + lambda L(S_i, H)."""
    return loss_final + kappa * loss_seed + lam * loss_initial


def seed_labels(offsets: Tensor, target: Tensor, align_corners: bool = True,
                sampling_align_corners: bool = True, grid: CellGrid | None = None) -> Tensor:
    """H(p + o(p)) at label resolution: nearest sampling, so no gradient reaches the offsets.

    The offsets are upsampled to the labels by the model's ``grid`` (where its cells sit, ``SegOutput.grid``) or,
    without one, with the network's ``align_corners``, and read in the model's sampling convention
    (``sampling_align_corners``: True for "exact", False for "official"), so the seed whose label is compared is
    the one the model's S_s really read."""
    off = resize_to_pixels(offsets.float(), target.shape[-2:], grid, align_corners)
    px, py = seed_positions(off, sampling_align_corners)
    return _gather(target.unsqueeze(1), px.round().long(), py.round().long()).squeeze(1)


def confidence_loss(confidence: Tensor, offsets: Tensor, target: Tensor, ignore_index: int = 255,
                    align_corners: bool = True, sampling_align_corners: bool = True,
                    grid: CellGrid | None = None) -> Tensor:
    """Eq. 6: L_f = -1[H(p) = H(p+o(p))] log F(p) - 1[H(p) != H(p+o(p))] log(1 - F(p)).

    Averaged over pixels whose label and whose seed's label are both valid (conventions as :func:`seed_labels`).
    """
    conf = resize_to_pixels(confidence.float(), target.shape[-2:], grid, align_corners).squeeze(1)
    seed = seed_labels(offsets.detach(), target, align_corners, sampling_align_corners, grid)
    valid = (target != ignore_index) & (seed != ignore_index)
    agree = (seed == target).float()
    eps = 1e-7
    per_pixel = -(agree * torch.log(conf + eps) + (1.0 - agree) * torch.log(1.0 - conf + eps))
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def confidence_loss_official(confidence: Tensor, offsets: Tensor, target: Tensor, ignore_index: int = 255,
                             grid: CellGrid | None = None) -> Tensor:
    """Eq. 6 as the official code computes it: ignore pixels count as class 0, the grid is not clamped and is
    sampled with align_corners=False, and the batch sum is divided by h * w (not by the pixel count). Maps
    are upsampled with align_corners=False, as the official code, unless the model declares its ``grid``."""
    h, w = target.shape[-2:]
    conf = resize_to_pixels(confidence.float(), (h, w), grid, False).squeeze(1)
    off = resize_to_pixels(offsets.float(), (h, w), grid, False)
    labels = target.masked_fill(target == ignore_index, 0)
    # The official grid is not clamped here, but border padding clips the read position the same way.
    px, py = seed_positions(off, align_corners=False)
    picked = _gather(labels.unsqueeze(1), px.round().long(), py.round().long()).squeeze(1)
    agree = picked == labels
    eps = 1e-7
    per_pixel = torch.where(agree, -torch.log(conf + eps), -torch.log(1.0 - conf + eps))
    return per_pixel.sum() / (h * w)


def total_loss(semantic: Tensor, confidence: Tensor, confidence_weight: float = 1.0) -> Tensor:
    """Eq. 7: L_final = L_semantic + L_f."""
    return semantic + confidence_weight * confidence
