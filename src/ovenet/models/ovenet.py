"""OVeNet: HRNetV2 (or HRNetV2+OCR) with a second head predicting seed offsets and a confidence map.

With ``offset.enabled = False`` the same class builds the plain baseline, so both train through one code path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .. import method
from ..config import Config, ModelConfig, OffsetConfig
from ..errors import ConfigError
from ..geometry import CellGrid
from .heads import FCNHead, OCRHead, fcn_head
from .hrnet import HRNetStages, HRNetV2, arch_spec, concat_resolutions

# Modules of each copied stage in the official offset branch (W48: STAGE2_2 1, STAGE3_2 3, STAGE4_2 2),
# capped by the main body's own count for the small widths.
OFFICIAL_BRANCH_MODULES = {2: 1, 3: 3, 4: 2}


@dataclass
class SegOutput:
    """Model outputs at 1/4 of the input resolution.

    ``logits_final`` is the prediction to use (S_f; equal to ``logits_initial`` for the baseline). For HRNet+OCR
    ``logits_*`` are the OCR head's and ``aux_logits_*`` the auxiliary head's.
    """

    logits_initial: Tensor
    logits_final: Tensor
    logits_seed: Tensor | None = None
    offsets: Tensor | None = None
    confidence: Tensor | None = None
    aux_logits_initial: Tensor | None = None
    aux_logits_seed: Tensor | None = None
    aux_logits_final: Tensor | None = None
    # Where the maps' cells sit on the input image (ovenet.geometry.CellGrid): outputs are resized to pixels by it.
    # None (HRNetV2, a network that does not say): resized by size with the model's align_corners.
    grid: CellGrid | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}


def model_spec(cfg: ModelConfig) -> dict[str, dict]:
    spec = copy.deepcopy(cfg.stages) if cfg.stages else arch_spec(cfg.arch)
    for k in range(1, 5):
        if f"STAGE{k}" not in spec:
            raise ConfigError(f"model.stages needs STAGE1..STAGE4, missing STAGE{k}")
    branch = cfg.offset.branch_stage
    for k in range(branch, 5):
        if f"STAGE{k}_2" in spec:
            continue
        copied = dict(spec[f"STAGE{k}"])
        if cfg.offset.branch_modules is not None:
            if len(cfg.offset.branch_modules) != 5 - branch:
                raise ConfigError(f"model.offset.branch_modules needs {5 - branch} entries (stages {branch}..4), "
                                  f"got {cfg.offset.branch_modules}")
            copied["NUM_MODULES"] = cfg.offset.branch_modules[k - branch]
        else:
            copied["NUM_MODULES"] = min(copied["NUM_MODULES"], OFFICIAL_BRANCH_MODULES[k])
        spec[f"STAGE{k}_2"] = copied
    return spec


def offset_outputs(raw: Tensor, logits: Tensor, aux: Tensor | None, offset: OffsetConfig,
                   sampling_align_corners: bool) -> SegOutput:
    """The offset head's raw 3 channels -> offsets (tanh x tau) and confidence (sigmoid), the seed-based and fused
    logits (Eq. 2-4, :mod:`ovenet.method`) for the main and, with OCR, the auxiliary logits. ``logits`` must be
    at the offsets' resolution."""
    offsets = torch.tanh(raw[:, 0:2]) * offset.tau
    if offset.zero_offsets:  # the study control: same graph and compute, seeds read p itself
        offsets = offsets * 0.0
    confidence = torch.sigmoid(raw[:, 2:3])
    for _ in range(offset.iterative_refinement):
        offsets = method.refine_offsets(offsets, sampling_align_corners)

    out = SegOutput(logits_initial=logits, logits_final=logits, offsets=offsets, confidence=confidence)
    for name, initial in (("logits", logits), ("aux_logits", aux)):
        if initial is None:
            continue
        if offset.fusion == "probs":
            # Eq. 3 with h = softmax; log-probabilities are returned so that downstream CE/argmax still apply.
            probs = torch.softmax(initial.float(), dim=1)
            seed = method.resample(probs, offsets, sampling_align_corners)
            final = method.fuse(probs, seed, confidence)
            initial, seed, final = (torch.log(p.clamp_min(1e-8)) for p in (probs, seed, final))
        else:
            seed = method.resample(initial, offsets, sampling_align_corners)
            final = method.fuse(initial, seed, confidence)
        setattr(out, f"{name}_initial", initial)
        setattr(out, f"{name}_seed", seed)
        setattr(out, f"{name}_final", final)
    return out


class OVeNet(nn.Module):
    """HRNetV2 backbone -> decode head (FCN or OCR) and, unless baseline, offset branch -> offset head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # The whole run config (data, eval, ...) when loaded from a checkpoint (ovenet.checkpoint.load sets it):
        # inference reads its eval settings, e.g. the sliding-window crop. None for a freshly built model.
        self.config: Config | None = None
        spec = model_spec(cfg)
        self.align_corners = cfg.align_corners
        self.backbone = HRNetV2(spec, cfg.align_corners, cfg.bn_momentum)
        feat_channels = sum(self.backbone.out_channels)
        self.num_classes = cfg.num_classes
        if cfg.head == "ocr":
            self.decode_head = OCRHead(feat_channels, cfg.num_classes, cfg.ocr_mid_channels, cfg.ocr_key_channels,
                                       cfg.ocr_dropout, cfg.bn_momentum)
        else:
            self.decode_head = FCNHead(feat_channels, cfg.num_classes, cfg.bn_momentum)
        # The main body is built and initialised before the branch draws any random number, so a baseline and an
        # OVeNet built from the same seed start from the same backbone and decode head (paired comparisons).
        self._init_weights(self.backbone, self.decode_head)
        self.offset_branch: HRNetStages | None = None
        self.offset_head: nn.Sequential | None = None
        if cfg.offset.enabled:
            k = cfg.offset.branch_stage
            branch_spec = {f"STAGE{s}": spec[f"STAGE{s}_2"] for s in range(k, 5)}
            self.offset_branch = HRNetStages(branch_spec, k, self.backbone.stage_channels(k - 1), cfg.align_corners,
                                             cfg.bn_momentum)
            self.offset_head = fcn_head(sum(self.offset_branch.out_channels), 3, cfg.bn_momentum)
            self._init_weights(self.offset_branch, self.offset_head)
        self.tau = cfg.offset.tau
        self.sampling_align_corners = cfg.offset.sampling == "exact"
        if cfg.freeze_main:
            self.freeze_main()

    @property
    def is_ovenet(self) -> bool:
        return self.offset_head is not None

    def _init_weights(self, body: nn.Module, head: nn.Module) -> None:
        """Conv weights N(0, 1e-3), BN (1, 0); conv biases keep PyTorch's default, as in both official codes.

        The OCR code (OVeNet seg_hrnet_ocr.py) skips every module whose name contains 'cls', 'aux' or 'ocr': the
        whole OCR head, the aux head and the offset head (`aux_head_offset`) keep PyTorch's default init. The
        plain-HRNet code the FCN rows were trained with (thesis branched_seg_hrnet.py, upstream seg_hrnet.py) has
        no exception: its class layer (`last_layer`) and offset head (`offset_layer`) are drawn from N(0, 1e-3).
        """
        for part in (body, head) if self.cfg.head == "fcn" else (body,):
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.001)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    @property
    def activation_checkpointing(self) -> bool:
        return self.backbone.activation_checkpointing

    def set_activation_checkpointing(self, enabled: bool = True) -> OVeNet:
        """``train.activation_checkpointing``: while training, recompute the stem, each stage-1 block and each
        HRNet module of the backbone and of the offset branch in backward instead of keeping their activations.
        Same losses, gradients and BatchNorm statistics; less memory, more compute (benchmarks/RESULTS.md)."""
        for body in (self.backbone, self.offset_branch):
            if body is not None:
                body.activation_checkpointing = enabled
        return self

    def main_modules(self) -> list[nn.Module]:
        return [self.backbone, self.decode_head]

    def freeze_main(self) -> None:
        """Ablation "Fr": only the offset branch and head train. The frozen part stays in eval mode under
        ``train()``, so it keeps its BN statistics and its OCR dropout is off. Its weights come from
        ``model.init_from`` (the trained baseline), loaded after building."""
        if not self.is_ovenet:
            raise ConfigError("model.freeze_main needs the offset head (model.offset.enabled: true)")
        for m in self.main_modules():
            m.requires_grad_(False)
        self._frozen = True

    def train(self, mode: bool = True) -> OVeNet:
        super().train(mode)
        if getattr(self, "_frozen", False):
            for m in self.main_modules():
                m.eval()  # the official code kept these in train mode, so frozen BN statistics drifted
        return self

    def forward(self, x: Tensor) -> SegOutput:
        feats, branch_input = self.backbone(x, keep=self.cfg.offset.branch_stage - 1 if self.is_ovenet else None)
        feats = concat_resolutions(feats, self.align_corners)
        logits, aux = self.decode_head(feats)  # aux: OCR's auxiliary logits, None for the FCN head
        if not self.is_ovenet:
            return SegOutput(logits_initial=logits, logits_final=logits, aux_logits_initial=aux,
                             aux_logits_final=aux)

        branch_feats, _ = self.offset_branch(branch_input)
        raw = self.offset_head(concat_resolutions(branch_feats, self.align_corners)).float()
        return offset_outputs(raw, logits, aux, self.cfg.offset, self.sampling_align_corners)

    def predict(self, image, **kwargs):
        """Label map (and offsets/confidence) for one image or a batch; see :func:`ovenet.inference.predict`."""
        from ..inference import predict

        return predict(self, image, **kwargs)
