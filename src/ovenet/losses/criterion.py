"""The training objective: Eq. 5-7 of the paper over every prediction head.

For each prediction S (initial, seed, final), L(S) sums the heads with ``aux_weights`` (OCR: 0.4 x aux + 1 x OCR;
plain HRNetV2 has one head). Logits are upsampled to the label resolution first, as in HRNet (by the model's
``SegOutput.grid`` where it declares one: :mod:`ovenet.geometry`); with
``loss.chunked`` a few images at a time, recomputed in backward (same numbers, less memory: see losses.ce).

``formula: official`` reproduces the official training loop's numbers. Its OHEM criterion returns the auxiliary
term unreduced, so ``losses.mean()`` averages it over *all* pixels (ignored ones as 0); its plain CE criterion
(the official Cityscapes/ACDC configs, ``USE_OHEM: false``) is a (class-weighted) mean over valid pixels for the
auxiliary and the OCR output alike. Its confidence loss is :func:`ovenet.method.confidence_loss_official`.
``formula: paper`` averages every CE term over valid pixels. Both are checked against terms recorded from the
official criterion, with and without class weights (tests/test_official.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import method
from ..config import LossConfig
from ..geometry import CellGrid, resize_to_pixels
from ..models.ovenet import SegOutput
from .ce import CrossEntropy, OhemCrossEntropy, class_weights


class SegmentationLoss(nn.Module):
    """Loss of the baseline or OVeNet model; returns ``(total, terms)`` with ``terms`` detached for logging."""

    def __init__(self, cfg: LossConfig, num_classes: int, ignore_index: int = 255, align_corners: bool = True,
                 sampling: str = "exact"):
        super().__init__()
        self.cfg = cfg
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.sampling_align_corners = sampling == "exact"  # the model's seed-sampling convention (method.py)
        weight = class_weights(cfg.class_weights, num_classes)
        self.ce = CrossEntropy(ignore_index, weight)
        self.main = (OhemCrossEntropy(ignore_index, cfg.ohem_thresh, cfg.ohem_min_kept, weight)
                     if cfg.type == "ohem" else self.ce)

    def prediction_loss(self, logits: Tensor, aux: Tensor | None, target: Tensor, grid: CellGrid | None = None
                        ) -> Tensor:
        """L(S): the (OCR) main head and, when present, the auxiliary head, weighted by ``aux_weights``. ``grid``:
        where the maps' cells sit (``SegOutput.grid``); labels cover the network's input pixel for pixel."""
        if self.cfg.chunked:  # same numbers without keeping the full-resolution maps (losses.ce)
            main = self.main.upsampled(logits, target, self.align_corners, grid)
        else:
            main = self.main(resize_to_pixels(logits, target.shape[-2:], grid, self.align_corners), target)
        if aux is None:
            return main
        official_ohem = self.cfg.formula == "official" and self.cfg.type == "ohem"
        if self.cfg.chunked:
            aux_term = (self.ce.upsampled_per_pixel(aux, target, self.align_corners, grid=grid)[0].mean()
                        if official_ohem else self.ce.upsampled(aux, target, self.align_corners, grid))
        else:
            aux = resize_to_pixels(aux, target.shape[-2:], grid, self.align_corners)
            if official_ohem:
                aux_term = self.ce.per_pixel(aux, target).mean()  # unreduced map averaged over all pixels
            else:
                aux_term = self.ce(aux, target)  # the auxiliary head always uses plain CE, as in HRNet-OCR
        w_aux, w_main = self.cfg.aux_weights
        return w_aux * aux_term + w_main * main

    def forward(self, out: SegOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        initial = self.prediction_loss(out.logits_initial, out.aux_logits_initial, target, out.grid)
        if out.offsets is None:
            total = self.cfg.weight_semantic * initial
            return total, {"loss": total.detach(), "loss_initial": initial.detach()}
        seed = self.prediction_loss(out.logits_seed, out.aux_logits_seed, target, out.grid)
        final = self.prediction_loss(out.logits_final, out.aux_logits_final, target, out.grid)
        semantic = method.semantic_loss(final, seed, initial, self.cfg.weight_seed, self.cfg.weight_initial)
        if self.cfg.confidence == "none":
            conf = torch.zeros((), device=target.device)
        elif self.cfg.confidence == "official":
            conf = method.confidence_loss_official(out.confidence, out.offsets, target, self.ignore_index, out.grid)
        else:
            conf = method.confidence_loss(out.confidence, out.offsets, target, self.ignore_index,
                                          self.align_corners, self.sampling_align_corners, out.grid)
        total = method.total_loss(self.cfg.weight_semantic * semantic, conf, self.cfg.confidence_weight)
        terms = {"loss": total, "loss_initial": initial, "loss_seed": seed, "loss_final": final,
                 "loss_confidence": conf}
        return total, {k: v.detach() for k, v in terms.items()}


def build_loss(cfg: LossConfig, num_classes: int, ignore_index: int = 255, align_corners: bool = True,
               sampling: str = "exact") -> SegmentationLoss:
    """The training objective; ``align_corners`` and ``sampling`` are the model's (``model.align_corners``,
    ``model.offset.sampling``), so labels are read where the model's seeds are."""
    return SegmentationLoss(cfg, num_classes, ignore_index, align_corners, sampling)
