"""The offset head on any segmentation network: an encoder that returns multi-scale feature maps, a decode head
that returns logits, and OVeNet's offset branch and head (Sec. 3.2; the equations in :mod:`ovenet.method`).

    encoder(x) -> [f_1, ..., f_n]        strides ascending (e.g. 4, 8, 16, 32)
    decode_head(feats) -> logits         any stride; upsampled to the offsets' resolution if coarser
    offset_branch -> [g_1, ...]          a copy of the later encoder stages (the paper's design), a second encoder,
                                         or the encoder's own features (None: the cheap shared-encoder variant)
    offset_head(concat(g)) -> 3 maps     offsets tanh(.) * tau and confidence sigmoid(.) at g_1's resolution

The outputs are the same :class:`~ovenet.models.SegOutput` as the HRNet OVeNet's, so losses, training, eval,
predict, ONNX export and the studies run unchanged. Bring your own network with :class:`OffsetSegmenter`; the
configs build one with ``model.backbone`` (``efficientnet_lite0``, ``timm:NAME``) through :func:`build_encoder_model`.

Geometry: an encoder that declares where its levels' cells sit (``feature_grids(height, width)``, a
:class:`~ovenet.geometry.CellGrid` per level) gets registered resizes: the head's fusion of levels, coarse logits
to the offsets' cells, and (through ``SegOutput.grid``, :meth:`OffsetSegmenter.output_grid`) the outputs to the
label or image pixels in the losses, validation, eval, predict and export. Without it every resize is size-based
with ``align_corners``, as for HRNetV2.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ModelConfig, OffsetConfig
from ..errors import ConfigError
from ..geometry import CellGrid, regrid
from .efficientnet import EfficientNetLite0Encoder
from .heads import fcn_head
from .ovenet import SegOutput, offset_outputs


def concat_features(feats: Sequence[Tensor], align_corners: bool = False,
                    grids: Sequence[CellGrid] | None = None) -> Tensor:
    """Every feature map bilinearly upsampled to the first one's size, concatenated (HRNetV2's head input).

    With ``grids`` (where each map's cells sit on the input, :class:`~ovenet.geometry.CellGrid`) each map is
    resampled onto the first one's cells (:func:`~ovenet.geometry.regrid`); without, a size-based
    ``F.interpolate`` with ``align_corners``, which assumes the cells of each map tile the image."""
    size = feats[0].shape[-2:]
    if grids is not None:
        return torch.cat([feats[0], *(regrid(f, size, g, grids[0]) for f, g in zip(feats[1:], grids[1:]))], 1)
    return torch.cat([f if f.shape[-2:] == size else
                      F.interpolate(f, size=size, mode="bilinear", align_corners=align_corners) for f in feats], 1)


class ConcatHead(nn.Module):
    """HRNetV2's FCN head for any encoder: all features at the finest one's resolution, concatenated,
    conv1x1-BN-ReLU-conv1x1. ``levels`` picks which features it reads (e.g. ``[-1]``: the coarsest only, logits
    at stride 32). Returns ``(logits, None)`` as the HRNet heads do. Given the encoder's ``grids`` (as
    :class:`OffsetSegmenter` passes them), the levels are registered onto the finest one's cells, and the logits
    sit on that level's grid (:meth:`logits_grid`)."""

    def __init__(self, channels: Sequence[int], num_classes: int, levels: Sequence[int] | None = None,
                 align_corners: bool = False, bn_momentum: float = 0.1):
        super().__init__()
        self.levels = list(range(len(channels))) if levels is None else [int(i) for i in levels]
        self.align_corners = align_corners
        self.head = fcn_head(sum(channels[i] for i in self.levels), num_classes, bn_momentum)

    def logits_grid(self, grids: Sequence[CellGrid]) -> CellGrid:
        return grids[self.levels[0]]

    def forward(self, feats: Sequence[Tensor], grids: Sequence[CellGrid] | None = None) -> tuple[Tensor, None]:
        picked = None if grids is None else [grids[i] for i in self.levels]
        return self.head(concat_features([feats[i] for i in self.levels], self.align_corners, picked)), None


def _same_cells(a: CellGrid, b: CellGrid) -> bool:
    return a is b or (a.stride == b.stride and a.column_stride == b.column_stride and a.offset_y == b.offset_y
                      and a.offset_x == b.offset_x)


def _declared_grids(module: nn.Module, height: int, width: int) -> list[CellGrid] | None:
    declared = getattr(module, "feature_grids", None)
    return None if declared is None else list(declared(height, width))


class CoordinateFeatures(nn.Module):
    """What the content-free offset head reads (``model.offset.content_free``): features of the pixel positions
    of ``like`` only, never of its values. Normalised y and x (-1 to 1 from the first to the last pixel centre,
    as the offsets' coordinates) and sin/cos of pi 2^k y and pi 2^k x for k < ``frequencies``, so a small head
    can draw a field that varies row by row; built with ``torch.arange`` from the size, so ONNX stays dynamic."""

    def __init__(self, frequencies: int = 4):
        super().__init__()
        self.frequencies = frequencies
        self.out_channels = 2 + 4 * frequencies

    def forward(self, like: Tensor) -> Tensor:
        h, w = like.shape[-2:]
        ys = torch.arange(h, device=like.device, dtype=torch.float32) * (2.0 / max(h - 1, 1)) - 1.0
        xs = torch.arange(w, device=like.device, dtype=torch.float32) * (2.0 / max(w - 1, 1)) - 1.0
        coords = torch.stack([ys.view(-1, 1).expand(h, w), xs.view(1, -1).expand(h, w)])  # 2 x H x W
        scales = torch.tensor([math.pi * 2**k for k in range(self.frequencies)], device=like.device)
        angles = (coords.unsqueeze(0) * scales.view(-1, 1, 1, 1)).flatten(0, 1)  # 2F x H x W
        feats = torch.cat([coords, angles.sin(), angles.cos()]).to(like.dtype)
        return feats.unsqueeze(0).expand(like.shape[0], -1, -1, -1)


def content_free_head(bn_momentum: float = 0.1, hidden: int = 64) -> nn.Sequential:
    """The offset head of the content-free control: :class:`CoordinateFeatures`, then the offset head's
    conv1x1-BN-ReLU-conv1x1 (3 outputs: offsets and confidence, so the whole seed mechanism is one field)."""
    coords = CoordinateFeatures()
    return nn.Sequential(coords, nn.Conv2d(coords.out_channels, hidden, 1),
                         nn.BatchNorm2d(hidden, momentum=bn_momentum), nn.ReLU(inplace=True), nn.Conv2d(hidden, 3, 1))


class StageCopy(nn.Module):
    """The paper's offset branch for a staged encoder: the stages from ``first_stage`` on, copied (own weights),
    run on the shared features of the stage before; earlier features are shared."""

    def __init__(self, stages: nn.Module, first_stage: int):
        super().__init__()
        self.stages, self.first_stage = stages, first_stage

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [*feats[:self.first_stage], *self.stages(feats[self.first_stage - 1])]


class OffsetSegmenter(nn.Module):
    """Encoder + decode head, with OVeNet's offset head unless ``offset.enabled`` is false (the baseline).

    ``encoder``: image -> list of feature maps (finest first) with ``channels``; ``decode_head``: that list ->
    logits, or ``(logits, aux)``. ``offset_branch``, what the offset head reads (channels ``branch_channels``,
    default ``channels``): None for the encoder's own features (shared encoder), a :class:`StageCopy` of the later
    stages (run on the shared earlier features), or any second encoder (image -> features, e.g.
    ``copy.deepcopy(encoder)``).
    The offset head is conv1x1-BN-ReLU-conv1x1 (3 outputs), its last layer drawn from N(0, 1e-3) so training
    starts from o ~ 0 and F ~ 0.5, as the official FCN OVeNet. With ``offset.content_free`` it reads only pixel
    coordinates (:func:`content_free_head`; no branch): offsets and confidence are the same for every image.
    ``registered`` (``model.registered_resizes``) False keeps the size-based resizes even where the encoder
    declares its grids (networks trained with them).

    Example, a network of your own::

        model = OffsetSegmenter(my_encoder, my_head, channels=[64, 128, 320, 512], num_classes=19)
        out = model(images)          # SegOutput: logits_initial/seed/final, offsets, confidence
    """

    def __init__(self, encoder: nn.Module, decode_head: nn.Module, channels: Sequence[int], num_classes: int,
                 offset: OffsetConfig | None = None, offset_branch: nn.Module | None = None,
                 branch_channels: Sequence[int] | None = None, align_corners: bool = False,
                 bn_momentum: float = 0.1, registered: bool = True):
        super().__init__()
        self.registered = registered  # False: size-based resizes even for an encoder with feature_grids
        self.offset_cfg = offset if offset is not None else OffsetConfig()
        self.backbone, self.decode_head = encoder, decode_head
        self.num_classes, self.align_corners = num_classes, align_corners
        self.sampling_align_corners = self.offset_cfg.sampling == "exact"
        self.config: Config | None = None  # the run config when loaded from a checkpoint (as OVeNet)
        self.offset_branch: nn.Module | None = None
        self.offset_head: nn.Sequential | None = None
        if self.offset_cfg.enabled and self.offset_cfg.content_free:
            self.offset_head = content_free_head(bn_momentum)
        elif self.offset_cfg.enabled:
            self.offset_branch = offset_branch
            self.offset_head = fcn_head(sum(branch_channels or channels), 3, bn_momentum)
        if self.offset_head is not None:
            nn.init.normal_(self.offset_head[-1].weight, std=0.001)
            nn.init.zeros_(self.offset_head[-1].bias)

    @property
    def is_ovenet(self) -> bool:
        return self.offset_head is not None

    @property
    def activation_checkpointing(self) -> bool:
        return False

    def set_activation_checkpointing(self, enabled: bool = True) -> OffsetSegmenter:
        if enabled:
            raise ConfigError("train.activation_checkpointing is implemented for HRNetV2 backbones only; set it "
                              "to false for this encoder")
        return self

    def grids(self, height: int, width: int) -> tuple[list[CellGrid] | None, list[CellGrid] | None]:
        """Where the levels of the encoder and of the offset branch sit on a ``height`` x ``width`` input (their
        ``feature_grids``); None for a module that does not declare it. A :class:`StageCopy` branch copies the
        encoder's own later stages, so it shares the encoder's grids."""
        if not self.registered:
            return None, None
        encoder = _declared_grids(self.backbone, height, width)
        if self.offset_branch is None or isinstance(self.offset_branch, StageCopy):
            return encoder, encoder
        return encoder, _declared_grids(self.offset_branch, height, width)

    def _logits_grid(self, grids: list[CellGrid] | None) -> CellGrid | None:
        if grids is None or not isinstance(self.decode_head, ConcatHead):
            return None
        return self.decode_head.logits_grid(grids)

    def output_grid(self, height: int, width: int) -> CellGrid | None:
        """Where the cells of the outputs (logits, offsets, confidence) sit on a ``height`` x ``width`` input:
        the offset branch's finest level for OVeNet, the decode head's logits for the baseline. Losses,
        validation, eval, predict and export resize the outputs to pixels by it (:mod:`ovenet.geometry`).

        None when the encoder has no ``feature_grids`` or the decode head is not a :class:`ConcatHead` (a network
        of your own that says nothing about its geometry): every resize is then size-based, with
        ``align_corners``, as before."""
        grids, branch = self.grids(height, width)
        logits_grid = self._logits_grid(grids)
        if not self.is_ovenet:
            return logits_grid
        return None if logits_grid is None or branch is None else branch[0]

    def forward(self, x: Tensor) -> SegOutput:
        feats = self.backbone(x)
        grids, branch_grids = self.grids(x.shape[-2], x.shape[-1])
        logits_grid = self._logits_grid(grids)
        logits = self.decode_head(feats) if logits_grid is None else self.decode_head(feats, grids)
        logits, aux = logits if isinstance(logits, tuple) else (logits, None)
        if not self.is_ovenet:
            return SegOutput(logits_initial=logits, logits_final=logits, aux_logits_initial=aux,
                             aux_logits_final=aux, grid=logits_grid)
        if self.offset_cfg.content_free:  # only the size of the stride-4 features reaches the head
            raw = self.offset_head(feats[0]).float()
        else:
            raw = self.offset_head(concat_features(self._branch_features(x, feats), self.align_corners,
                                                   branch_grids)).float()
        size = raw.shape[-2:]
        registered = logits_grid is not None and branch_grids is not None
        if registered:
            # Decided by the grids, not the shapes: torch.export cannot prove ceil(H / 32) != ceil(H / 4).
            if not _same_cells(logits_grid, branch_grids[0]):  # coarse logits: onto the offsets' cells
                logits, aux = (None if t is None else regrid(t, size, logits_grid, branch_grids[0])
                               for t in (logits, aux))
        elif logits.shape[-2:] != size:
            logits, aux = (None if t is None else
                           F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners)
                           for t in (logits, aux))
        out = offset_outputs(raw, logits, aux, self.offset_cfg, self.sampling_align_corners)
        out.grid = branch_grids[0] if registered else None
        return out

    def _branch_features(self, x: Tensor, feats: list[Tensor]) -> list[Tensor]:
        if self.offset_branch is None:
            return feats
        if isinstance(self.offset_branch, StageCopy):
            return self.offset_branch(feats)
        return self.offset_branch(x)

    def predict(self, image, **kwargs):
        """Label map (and offsets/confidence) for one image or a batch; see :func:`ovenet.inference.predict`."""
        from ..inference import predict

        return predict(self, image, **kwargs)


class TimmEncoder(nn.Module):
    """A timm model with ``features_only=True`` (optional dependency), returning its feature maps of strides
    4, 8, 16, 32 when it has them."""

    def __init__(self, name: str):
        super().__init__()
        try:
            import timm
        except Exception as exc:  # ImportError, or a timm/torchvision built for another torch
            raise ConfigError(f"model.backbone=timm:{name} needs timm (pip install timm): {exc}".splitlines()[0]) \
                from None
        try:
            self.model = timm.create_model(name, features_only=True, pretrained=False)
        except RuntimeError as exc:
            raise ConfigError(f"timm cannot build '{name}' with features_only ({exc})") from None
        info = self.model.feature_info
        wanted = [i for i, r in enumerate(info.reduction()) if r >= 4]
        self.indices = wanted[-4:]
        self.out_channels = [info.channels()[i] for i in self.indices]

    def feature_grids(self, height: int, width: int) -> list[CellGrid]:
        """Each level's cells at its reduction r, centred on input pixel r * k: an assumption (true of
        convolutions padded k // 2 on both sides, as timm's non-"tf_" models are), not measured per model."""
        return [CellGrid(self.model.feature_info.reduction()[i]) for i in self.indices]

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.model(x)
        return [feats[i] for i in self.indices]


def build_encoder(cfg: ModelConfig) -> tuple[nn.Module, list[int]]:
    if cfg.backbone == "efficientnet_lite0":
        encoder = EfficientNetLite0Encoder(cfg.bn_momentum, padding=cfg.encoder_padding)
        return encoder, encoder.out_channels
    if cfg.backbone.startswith("timm:"):
        encoder = TimmEncoder(cfg.backbone.removeprefix("timm:"))
        return encoder, encoder.out_channels
    raise ConfigError(f"model.backbone '{cfg.backbone}' is unknown; use hrnetv2, efficientnet_lite0 or timm:NAME")


def build_encoder_model(cfg: ModelConfig) -> OffsetSegmenter:
    """``model.backbone`` other than hrnetv2: the encoder, a :class:`ConcatHead` (``model.head: fcn`` reads all
    levels, ``coarse`` the stride-32 one only) and, for OVeNet, the offset branch: a copy of the encoder stages from
    ``model.offset.branch_stage`` on (2, 3, 4 = strides 8, 16, 32; a timm encoder is copied whole), the shared
    encoder with ``model.offset.shared_encoder``, or none with ``model.offset.content_free``. The main body is built before the branch draws random numbers,
    so a baseline and an OVeNet from one seed share its initialisation."""
    if cfg.head not in ("fcn", "coarse"):
        raise ConfigError(f"model.head '{cfg.head}' needs an HRNetV2 backbone; use fcn or coarse with "
                          f"model.backbone={cfg.backbone}")
    encoder, channels = build_encoder(cfg)
    levels = [len(channels) - 1] if cfg.head == "coarse" else None
    head = ConcatHead(channels, cfg.num_classes, levels, cfg.align_corners, cfg.bn_momentum)
    branch, branch_channels = None, None
    if cfg.offset.enabled and not cfg.offset.shared_encoder and not cfg.offset.content_free:
        first = cfg.offset.branch_stage - 1  # HRNet numbering: stage k of 1..4 is encoder stage k-1 of 0..3
        if isinstance(encoder, EfficientNetLite0Encoder):
            branch = StageCopy(EfficientNetLite0Encoder(cfg.bn_momentum, first, cfg.encoder_padding), first)
        else:
            branch = copy.deepcopy(encoder)  # a second encoder, reading the image
        branch_channels = channels
    return OffsetSegmenter(encoder, head, channels, cfg.num_classes, cfg.offset, branch, branch_channels,
                           cfg.align_corners, cfg.bn_momentum, cfg.registered_resizes)
