"""HRNetV2 for semantic segmentation (Wang et al., "Deep High-Resolution Representation Learning", 2019).

The stage layouts and parameter names follow the official HRNet-Semantic-Segmentation configs, so ImageNet
classification checkpoints and OVeNet checkpoints load by name. Unlike timm's classification HRNet, the fuse
layers upsample bilinearly to the exact size of the target branch, so any input size works.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Stage layouts as data: (num_modules, block, num_blocks per branch, channels per branch).
# STAGE1 is the ResNet-style stem stage (one branch of bottlenecks).
ARCHS: dict[str, dict[str, dict]] = {
    "hrnetv2_w18_small_v1": {
        "STAGE1": dict(NUM_MODULES=1, BLOCK="BOTTLENECK", NUM_BLOCKS=[1], NUM_CHANNELS=[32]),
        "STAGE2": dict(NUM_MODULES=1, BLOCK="BASIC", NUM_BLOCKS=[2, 2], NUM_CHANNELS=[16, 32]),
        "STAGE3": dict(NUM_MODULES=1, BLOCK="BASIC", NUM_BLOCKS=[2, 2, 2], NUM_CHANNELS=[16, 32, 64]),
        "STAGE4": dict(NUM_MODULES=1, BLOCK="BASIC", NUM_BLOCKS=[2, 2, 2, 2], NUM_CHANNELS=[16, 32, 64, 128]),
    },
    "hrnetv2_w18_small_v2": {
        "STAGE1": dict(NUM_MODULES=1, BLOCK="BOTTLENECK", NUM_BLOCKS=[2], NUM_CHANNELS=[64]),
        "STAGE2": dict(NUM_MODULES=1, BLOCK="BASIC", NUM_BLOCKS=[2, 2], NUM_CHANNELS=[18, 36]),
        "STAGE3": dict(NUM_MODULES=3, BLOCK="BASIC", NUM_BLOCKS=[2, 2, 2], NUM_CHANNELS=[18, 36, 72]),
        "STAGE4": dict(NUM_MODULES=2, BLOCK="BASIC", NUM_BLOCKS=[2, 2, 2, 2], NUM_CHANNELS=[18, 36, 72, 144]),
    },
}


def _standard(width: int) -> dict[str, dict]:
    c = [width, 2 * width, 4 * width, 8 * width]
    return {
        "STAGE1": dict(NUM_MODULES=1, BLOCK="BOTTLENECK", NUM_BLOCKS=[4], NUM_CHANNELS=[64]),
        "STAGE2": dict(NUM_MODULES=1, BLOCK="BASIC", NUM_BLOCKS=[4, 4], NUM_CHANNELS=c[:2]),
        "STAGE3": dict(NUM_MODULES=4, BLOCK="BASIC", NUM_BLOCKS=[4, 4, 4], NUM_CHANNELS=c[:3]),
        "STAGE4": dict(NUM_MODULES=3, BLOCK="BASIC", NUM_BLOCKS=[4, 4, 4, 4], NUM_CHANNELS=c),
    }


for _w in (18, 32, 48):
    ARCHS[f"hrnetv2_w{_w}"] = _standard(_w)


def arch_spec(arch: str) -> dict[str, dict]:
    if arch not in ARCHS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown architecture '{arch}'; choose one of {sorted(ARCHS)}")
    return copy.deepcopy(ARCHS[arch])


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def make_blocks(block: type, cin: int, planes: int, num_blocks: int, bn_momentum: float) -> nn.Sequential:
    downsample = None
    if cin != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(cin, planes * block.expansion, 1, bias=False),
            nn.BatchNorm2d(planes * block.expansion, momentum=bn_momentum),
        )
    layers = [block(cin, planes, downsample=downsample, bn_momentum=bn_momentum)]
    layers += [block(planes * block.expansion, planes, bn_momentum=bn_momentum) for _ in range(num_blocks - 1)]
    return nn.Sequential(*layers)


class _FrozenRunningStats:
    """Context of a checkpoint's recomputation: its BatchNorm layers update throwaway copies of their running
    statistics, which the forward pass has updated already (a second update would apply the momentum twice).
    Copies rather than ``track_running_stats=False``: the recomputation must save the same tensors as the
    forward pass, and the running statistics are among them."""

    _NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, modules: tuple[nn.Module, ...]):
        self.layers = [m for module in modules for m in module.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.kept: list[list[Tensor]] = []

    def __enter__(self) -> None:
        self.kept = [[getattr(m, name) for name in self._NAMES] for m in self.layers]
        for m in self.layers:
            for name in self._NAMES:
                setattr(m, name, getattr(m, name).clone())

    def __exit__(self, *exc: object) -> None:
        for m, kept in zip(self.layers, self.kept):
            for name, buffer in zip(self._NAMES, kept):
                setattr(m, name, buffer)
        self.kept = []


def recomputed(fn: Callable[..., Any], *args: Any, scope: tuple[nn.Module, ...]) -> Any:
    """``fn(*args)`` keeping only its inputs for backward, which runs it again (activation checkpointing,
    ``torch.utils.checkpoint`` non-reentrant: RNG and autocast state are replayed). Same outputs, gradients and
    BatchNorm running statistics as ``fn(*args)``; ``scope``: the modules ``fn`` runs (for their BatchNorms)."""

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _FrozenRunningStats(scope)

    if torch.compiler.is_compiling():
        # Inside a compiled graph (train.compile=full) the partitioner recomputes from the traced graph, whose
        # BatchNorm buffer updates happen once, in the forward graph; dynamo takes no custom context_fn.
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def upsample_to(x: Tensor, size: tuple[int, int] | torch.Size, align_corners: bool) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class HighResolutionModule(nn.Module):
    """Parallel branches of residual blocks followed by an all-to-all exchange between resolutions."""

    def __init__(self, block: type, num_blocks: list[int], cin: list[int], channels: list[int],
                 align_corners: bool, bn_momentum: float):
        super().__init__()
        n = len(channels)
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            make_blocks(block, cin[i], channels[i], num_blocks[i], bn_momentum) for i in range(n)
        )
        out = [c * block.expansion for c in channels]
        self.out_channels = out
        if n == 1:
            self.fuse_layers = None
            return
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:  # lower resolution: 1x1 conv, then upsample in forward
                    row.append(nn.Sequential(nn.Conv2d(out[j], out[i], 1, bias=False),
                                             nn.BatchNorm2d(out[i], momentum=bn_momentum)))
                elif j == i:
                    row.append(None)
                else:  # higher resolution: i - j strided 3x3 convs
                    steps = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = out[i] if last else out[j]
                        layer = [conv3x3(out[j], cout, 2), nn.BatchNorm2d(cout, momentum=bn_momentum)]
                        if not last:
                            layer.append(nn.ReLU(inplace=True))
                        steps.append(nn.Sequential(*layer))
                    row.append(nn.Sequential(*steps))
            self.fuse_layers.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        fused = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y = xs[0] if i == 0 else row[0](xs[0])
            for j in range(1, len(xs)):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + upsample_to(row[j](xs[j]), size, self.align_corners)
                else:
                    y = y + row[j](xs[j])
            fused.append(self.relu(y))
        return fused


def make_transition(cin: list[int], cout: list[int], bn_momentum: float) -> nn.ModuleList:
    """Adapt the branches of one stage to the next; new lower-resolution branches come from the last one."""
    layers = nn.ModuleList()
    for i, c in enumerate(cout):
        if i < len(cin):
            layers.append(None if c == cin[i] else nn.Sequential(
                conv3x3(cin[i], c), nn.BatchNorm2d(c, momentum=bn_momentum), nn.ReLU(inplace=True)))
        else:
            steps = []
            for k in range(i + 1 - len(cin)):
                step_out = c if k == i - len(cin) else cin[-1]
                steps.append(nn.Sequential(conv3x3(cin[-1], step_out, 2),
                                           nn.BatchNorm2d(step_out, momentum=bn_momentum), nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*steps))
    return layers


def make_stage(spec: dict, cin: list[int], align_corners: bool, bn_momentum: float) -> nn.Sequential:
    block = BLOCKS[spec["BLOCK"]]
    modules = []
    for _ in range(spec["NUM_MODULES"]):
        module = HighResolutionModule(block, spec["NUM_BLOCKS"], cin, spec["NUM_CHANNELS"], align_corners,
                                      bn_momentum)
        cin = module.out_channels
        modules.append(module)
    return nn.Sequential(*modules)


def apply_transition(transition: nn.ModuleList, xs: list[Tensor]) -> list[Tensor]:
    out = []
    for i, layer in enumerate(transition):
        x = xs[min(i, len(xs) - 1)]
        out.append(x if layer is None else layer(x))
    return out


class HRNetStages(nn.Module):
    """Stages ``first``..4 of HRNet, each preceded by its transition.

    The backbone uses stages 2-4; the OVeNet offset branch is another instance starting at its branch stage,
    fed by the backbone's output of the stage before. Parameter names are ``transition{k-1}`` and ``stage{k}``
    as in the official code.
    """

    def __init__(self, spec: dict[str, dict], first: int, cin: list[int], align_corners: bool,
                 bn_momentum: float):
        super().__init__()
        self.first = first
        # Activation checkpointing (OVeNet.set_activation_checkpointing): each HRNet module is recomputed in
        # backward while training, so only the module inputs stay alive between forward and backward.
        self.activation_checkpointing = False
        for k in range(first, 5):
            s = spec[f"STAGE{k}"]
            cout = [c * BLOCKS[s["BLOCK"]].expansion for c in s["NUM_CHANNELS"]]
            setattr(self, f"transition{k - 1}", make_transition(cin, cout, bn_momentum))
            stage = make_stage(s, cout, align_corners, bn_momentum)
            setattr(self, f"stage{k}", stage)
            cin = stage[-1].out_channels
        self.out_channels = cin

    def stage_pairs(self) -> list[tuple[nn.ModuleList, nn.Sequential]]:
        return [(getattr(self, f"transition{k - 1}"), getattr(self, f"stage{k}")) for k in range(self.first, 5)]

    def _checkpointing(self) -> bool:
        return self.activation_checkpointing and self.training and torch.is_grad_enabled()

    def _run(self, layers: nn.Sequential, x: Any) -> Any:
        """``layers(x)``, each layer recomputed in backward when checkpointing."""
        if not self._checkpointing():
            return layers(x)
        for layer in layers:
            x = recomputed(layer, x, scope=(layer,))
        return x

    def forward(self, xs: list[Tensor], keep: int | None = None) -> tuple[list[Tensor], list[Tensor] | None]:
        """Run the stages; also return the output of stage ``keep`` (the offset branch's input) if asked."""
        kept = None
        for k, (transition, stage) in zip(range(self.first, 5), self.stage_pairs()):
            xs = self._run(stage, apply_transition(transition, xs))
            if k == keep:
                kept = xs
        return xs, kept


class HRNetV2(HRNetStages):
    """HRNetV2 backbone: stem, stage 1 (bottlenecks), stages 2-4. Returns the four resolutions (1/4..1/32).

    Parameter names match the official HRNet checkpoints (``conv1``, ``layer1``, ``transition1``, ``stage2``...).
    """

    def __init__(self, spec: dict[str, dict], align_corners: bool = True, bn_momentum: float = 0.1):
        s1 = spec["STAGE1"]
        block = BLOCKS[s1["BLOCK"]]
        stage1_channels = [s1["NUM_CHANNELS"][0] * block.expansion]
        super().__init__(spec, 2, stage1_channels, align_corners, bn_momentum)
        self.spec = spec
        self.align_corners = align_corners
        self.stage1_channels = stage1_channels
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_blocks(block, 64, s1["NUM_CHANNELS"][0], s1["NUM_BLOCKS"][0], bn_momentum)

    def stage_channels(self, k: int) -> list[int]:
        """Channels of the output of stage ``k`` (1..4)."""
        return self.stage1_channels if k == 1 else getattr(self, f"stage{k}")[-1].out_channels

    def stem(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))

    def forward(self, x: Tensor, keep: int | None = None) -> tuple[list[Tensor], list[Tensor] | None]:
        if self._checkpointing():
            x = recomputed(self.stem, x, scope=(self.bn1, self.bn2))
        else:
            x = self.stem(x)
        xs = [self._run(self.layer1, x)]
        out, kept = super().forward(xs, keep)
        return out, (xs if keep == 1 else kept)


def concat_resolutions(xs: list[Tensor], align_corners: bool) -> Tensor:
    """HRNetV2's representation: every branch upsampled to 1/4 resolution and concatenated."""
    size = xs[0].shape[-2:]
    return torch.cat([xs[0]] + [upsample_to(x, size, align_corners) for x in xs[1:]], dim=1)
