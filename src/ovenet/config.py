"""Experiment configuration: typed dataclasses, YAML files, dotted command-line overrides.

A config file is plain YAML whose sections mirror the dataclasses below. A file may start from another one
with ``_base_: other.yaml`` (resolved relative to the file, or a shipped config name). Overrides such as
``train.lr=0.02 model.offset.tau=0.2`` are applied last. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the key and, for typos, the nearest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .files import write_text

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class OffsetConfig:
    """The OVeNet offset head (Sec. 3.2). ``enabled: false`` gives the plain baseline."""

    enabled: bool = True
    branch_stage: Literal[2, 3, 4] = 4  # HRNet stage at which the offset branch splits off (2, 3 or 4)
    branch_modules: list[int] | None = None  # modules of each copied stage; None: the official counts
    tau: float = 0.5  # max offset length in normalised image coordinates (paper 0.5; official configs 0.2)
    fusion: Literal["logits", "probs"] = "logits"  # fuse "logits" (paper's final model) or softmax "probs"
    sampling: Literal["exact", "official"] = "exact"  # "exact": zero offset samples the pixel itself; "official": as the official code
    iterative_refinement: int = 0  # extra offset-refinement passes (official ITERATIVE_REFINEMENT)
    # A control for studies: the branch, head, losses and compute of OVeNet, but offsets fixed at 0 (S_s = S_i),
    # so whatever OVeNet gains beyond it comes from the offsets moving.
    zero_offsets: bool = False
    # Encoders other than HRNetV2 (model.backbone): the offset head reads the encoder's own features instead of
    # a copy of its later stages (the paper's design) - cheaper, one encoder trained by both heads.
    shared_encoder: bool = False
    # A control for studies (encoders other than HRNetV2): the offset head reads only pixel-coordinate features
    # (normalised y, x and fixed Fourier features of them) instead of the branch's, so offsets and confidence are
    # one learned field, the same for every image; same losses and fusion. No offset branch is built.
    content_free: bool = False


@dataclass
class ModelConfig:
    # "hrnetv2" (the width from `arch`), "efficientnet_lite0" (ImageNet weights: pretrained
    # efficientnet_lite0_imagenet) or "timm:NAME" (any timm features_only model; needs timm)
    backbone: str = "hrnetv2"
    arch: str = "hrnetv2_w48"  # hrnetv2_w18_small_v1, hrnetv2_w18_small_v2, hrnetv2_w18, hrnetv2_w32, hrnetv2_w48
    # "fcn": concat head on every resolution; "ocr": HRNetV2 + OCR; "coarse" (other encoders): the stride-32
    # features only, so the logits are coarse while the offset head reads stride 4
    head: Literal["fcn", "ocr", "coarse"] = "ocr"
    # efficientnet_lite0: "tf_same" pads strided convolutions as TensorFlow, whose padding its ImageNet weights were
    # trained with (the Lite0 recipes); "symmetric" pads k // 2 on both sides (checkpoints from before the key).
    # Other backbones pad as their own code does (a config made from a Lite0 recipe may switch backbone).
    encoder_padding: Literal["symmetric", "tf_same"] = "symmetric"
    # The input normalisation the weights were trained on, (pixel - mean) / std per RGB channel in 0-255 pixel units:
    # ImageNet's by default (HRNet; checkpoints from before the keys); Inception-style 127 / 128 for EfficientNet-Lite.
    # A checkpoint always runs with its own (eval/predict refuse to override them).
    input_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    input_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    num_classes: int = 19
    align_corners: bool = True  # bilinear upsampling convention inside HRNet (official default True)
    # Other encoders: every resize places each cell on the pixel its receptive field is centred on (ovenet.geometry);
    # false: the size-based resizes (align_corners) of checkpoints saved before this key existed. HRNetV2: unused.
    registered_resizes: bool = True
    stages: dict | None = None  # explicit STAGE1..STAGE4 spec (official EXTRA layout) instead of `arch`
    ocr_mid_channels: int = 512
    ocr_key_channels: int = 256
    ocr_dropout: float = 0.05
    bn_momentum: float = 0.1
    offset: OffsetConfig = field(default_factory=OffsetConfig)
    pretrained: str | None = None  # ImageNet HRNet classification checkpoint (official file or timm)
    # Trained segmentation weights loaded after `pretrained`: an ovenet checkpoint (a run's best.pth) or an official
    # final_state.pth. Every tensor with the same name and shape loads: backbone and decode head, and an OVeNet
    # source's offset branch/head too. Ablation "Fr" sets it to the trained baseline's best.pth (paper Sec. 4.3).
    init_from: str | None = None
    # Ablation "Fr": train only the offset branch and head. The frozen backbone and decode head run in eval mode,
    # so their BN statistics stay fixed and OCR dropout is off (the official code left both active).
    freeze_main: bool = False

    @property
    def network(self) -> str:
        """What computes the features, for logs: the HRNetV2 width (``arch``) or the encoder (``backbone``)."""
        return self.arch if self.backbone == "hrnetv2" else self.backbone


DatasetName = Literal["cityscapes", "acdc", "ade20k", "camvid", "folder", "list", "synthetic"]
DATASET_NAMES: tuple[str, ...] = typing.get_args(DatasetName)


@dataclass
class DataConfig:
    """The ``data`` section, the one schema every dataset is built from (:func:`ovenet.data.build_dataset`).

    Values that differ per dataset (root, splits, crop and base size, ADE20K's eval resize) are set by the shipped
    ``_base_<dataset>.yaml`` files; the defaults here are Cityscapes'. Keys of one dataset only default to None
    (null), meaning "not used" elsewhere and the dataset's own default there.
    """

    name: DatasetName = "cityscapes"
    root: str | None = "data/cityscapes"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: list[int] | None = field(default_factory=lambda: [512, 1024])  # h, w; training crops
    base_size: int | None = 2048  # long side before random scaling; None: the image's own size
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    num_workers: int = 4
    eval_resize_short: int | None = None  # resize evaluated images to this short side (ADE20K: 520)
    num_classes: int | None = None  # folder/list: required; other datasets: checked against theirs
    # folder/list datasets (your own data); image_dir/label_dir/list_file may hold a {split} placeholder
    image_dir: str | None = None
    label_dir: str | None = None
    list_file: str | None = None
    class_names: list[str] | None = None  # None: class_0, class_1, ...
    palette: list[list[int]] | None = None  # [r, g, b] per class for pictures; None: the dataset's own colours
    # raw label value -> train id (255: ignore), listing every raw value that occurs; None: values are ids
    label_map: dict[int, int] | None = None
    ignore_ids: list[int] | None = None  # raw label values that mark void/unlabelled pixels (read as 255 = ignore)
    # validating on (some of) the training images is refused unless asked for here (a warning is logged then)
    allow_val_overlap: bool = False
    with_instances: bool = False  # Cityscapes: also read labelIds and instance maps (the iIoU figures need them)
    conditions: list[str] | None = None  # ACDC conditions to use; None: fog, night, rain, snow
    # synthetic scenes (quickstart, tests); None: 64 training scenes, a quarter as many for validation, 256x512
    num_samples: int | None = None
    val_samples: int | None = None
    image_size: list[int] | None = None  # h, w
    seed: int = 0  # synthetic scene generator


@dataclass
class LossConfig:
    type: Literal["ohem", "ce"] = "ohem"
    ohem_thresh: float = 0.9
    ohem_min_kept: int = 131072
    class_weights: str | list[float] | None = None  # None, "cityscapes" or one weight per class
    aux_weights: list[float] = field(default_factory=lambda: [0.4, 1.0])  # OCR: [aux, ocr]
    weight_seed: float = 0.5  # kappa in Eq. 5
    weight_initial: float = 0.5  # lambda in Eq. 5
    # Scales L_semantic (Eq. 7; the baseline's L(S_i)). A control for studies: OVeNet's body gets gradient from
    # 1 + kappa + lambda = 2 semantic terms, a baseline from one, so baseline + weight_semantic 2 matches the step.
    weight_semantic: float = 1.0
    confidence: Literal["paper", "official", "none"] = "paper"  # Eq. 6 as the paper defines it, "official" (its code), or "none"
    confidence_weight: float = 1.0
    formula: Literal["paper", "official"] = "paper"  # "official" reproduces the official code's reductions (see ovenet.losses)
    chunked: bool = False  # upsample+score logits a few images at a time, redone in backward: less memory


@dataclass
class TrainConfig:
    epochs: int | None = 484
    iters: int | None = None  # overrides epochs when set
    batch_size: int = 2  # per GPU
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    warmup_iters: int = 0
    amp: Literal["fp32", "bf16", "fp16"] = "bf16"  # GPU autocast precision (the CPU trains in fp32)
    channels_last: bool = True  # on CUDA and the CPU (1.15x on the CPU pilot: benchmarks/RESULTS.md, "CPU speed")
    compile: Literal["none", "regional", "full"] = "none"  # "none", "regional" (repeated HRNet blocks) or "full"
    sync_bn: bool = True  # only takes effect when world size > 1
    seed: int = 304
    deterministic: bool = False
    grad_clip: float | None = None
    ckpt_every: int = 1000  # iterations between `last` checkpoints
    keep_checkpoints: int = 2  # last.pth and the k-1 before it (iter_N.pth): a damaged last.pth falls back
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective before it gives up
    val_every: int = 0  # iterations between validations (0: once per epoch, or at the end for iters runs)
    log_every: int = 20
    bad_sample: Literal["stop", "skip"] = "stop"  # when a training or validation sample cannot be read
    tensorboard: bool = False  # TensorBoard scalars/images; needs the tensorboard extra
    report: bool = True  # at the end, RUN_DIR/report/index.html (`ovenet report`) when matplotlib is installed
    activation_checkpointing: bool = False  # recompute HRNet modules in backward instead of keeping their activations


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide", "official"] = "whole"  # "whole" image, sliding "slide" window, or the authors' multi-scale test "official"
    crop_size: list[int] = field(default_factory=lambda: [1024, 2048])
    stride: list[int] | None = None  # sliding-window stride; None: 2/3 of the crop
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    boundary_width: int = 3  # trimap width in pixels for the boundary mIoU
    # "original": score against the annotation at its own size. "official": where data.eval_resize_short resizes
    # the image (ADE20K), resize the label with it (nearest) and pad both to a multiple of 8 (label: ignore), as
    # the official ADE20K val loader; elsewhere the same as "original".
    label_resolution: Literal["original", "official"] = "original"


@dataclass
class Config:
    name: str = "ovenet"
    output_dir: str = "runs"
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_ranges(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    flat = _flatten(cfg.to_dict())
    need(cfg.model.offset.tau > 0, "model.offset.tau", f"must be > 0, got {cfg.model.offset.tau}")
    need(cfg.model.num_classes >= 1, "model.num_classes", "must be >= 1")
    need(cfg.model.offset.iterative_refinement >= 0, "model.offset.iterative_refinement", "must be >= 0")
    # "official" sampling reads a zero offset up to half a pixel away from p, so S_s != S_i: not a control
    zero_official = cfg.model.offset.zero_offsets and cfg.model.offset.sampling == "official"
    need(not zero_official, "model.offset.zero_offsets",
         "true with model.offset.sampling=official is no control (that sampling reads a zero offset up to half a "
         "pixel away, so S_s != S_i); set model.offset.sampling=exact")
    backbone = cfg.model.backbone
    need(backbone in ("hrnetv2", "efficientnet_lite0") or backbone.startswith("timm:") and len(backbone) > 5,
         "model.backbone", f"must be hrnetv2, efficientnet_lite0 or timm:NAME, got '{backbone}'")
    need((backbone == "hrnetv2") == (cfg.model.head != "coarse") or cfg.model.head == "fcn", "model.head",
         f"'{cfg.model.head}' does not go with model.backbone {backbone} (hrnetv2: fcn or ocr; others: fcn or coarse)")
    need(not (cfg.model.offset.content_free and backbone == "hrnetv2"), "model.offset.content_free",
         "is implemented for encoders other than HRNetV2 (model.backbone efficientnet_lite0 or timm:NAME); set it "
         "to false for hrnetv2")
    for key in ("model.input_mean", "model.input_std"):
        need(len(flat[key]) == 3, key, f"must be one value per RGB channel (3), got {flat[key]}")
    need(all(0 <= v <= 255 for v in cfg.model.input_mean), "model.input_mean", "must be 0-255 pixel values")
    need(all(v > 0 for v in cfg.model.input_std), "model.input_std", "must be > 0")
    need(max(cfg.model.input_mean) > 1 or max(cfg.model.input_std) > 1, "model.input_mean",
         f"is in 0-255 pixel units, but {cfg.model.input_mean} / {cfg.model.input_std} look like 0-1 values: "
         "multiply both by 255")
    need(cfg.train.lr > 0, "train.lr", f"must be > 0, got {cfg.train.lr}")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1 (last.pth counts)")
    need(cfg.train.dist_timeout > 0, "train.dist_timeout", "must be > 0 seconds")
    for key in ("train.ckpt_every", "train.log_every"):
        need(flat[key] >= 1, key, f"must be >= 1 (iterations between them), got {flat[key]}")
    need(cfg.train.val_every >= 0, "train.val_every", "must be >= 0 (0: once per epoch, or at the end)")
    need(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= cfg.train.momentum < 1, "train.momentum", "must be in [0, 1)")
    need(cfg.train.epochs is not None or cfg.train.iters is not None, "train.epochs", "set epochs or iters")
    for key in ("train.epochs", "train.iters"):
        need(flat[key] is None or flat[key] >= 1, key, "must be >= 1")
    for key in ("data.crop_size", "eval.crop_size", "data.image_size"):
        v = flat[key]
        need(v is None or (len(v) == 2 and all(int(x) > 0 for x in v)), key, f"must be [height, width] > 0, got {v}")
    need(all(c <= 8192 for c in cfg.data.crop_size or ()), "data.crop_size", "is larger than 8192 px")
    for key in ("data.num_samples", "data.val_samples", "data.eval_resize_short", "data.num_classes"):
        need(flat[key] is None or flat[key] >= 1, key, f"must be >= 1 (or null), got {flat[key]}")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    palette = cfg.data.palette or []
    need(all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette), "data.palette",
         "must be a list of [r, g, b] colours with values 0-255, one per class")
    need(all(0 <= v < 65536 for v in cfg.data.ignore_ids or ()), "data.ignore_ids",
         "must be raw label values 0-65535")
    lo, hi = cfg.data.scale_range
    need(0 < lo <= hi, "data.scale_range", f"must be [low, high] with 0 < low <= high, got {[lo, hi]}")
    need(cfg.loss.ohem_min_kept >= 1, "loss.ohem_min_kept", "must be >= 1")
    need(0 < cfg.loss.ohem_thresh <= 1, "loss.ohem_thresh", "must be in (0, 1]")
    need(all(s > 0 for s in cfg.eval.scales), "eval.scales", "must all be > 0")
    need(cfg.eval.boundary_width >= 1, "eval.boundary_width", "must be >= 1")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "stages":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item_tp) for v in value)
    if origin is dict or tp is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key_tp) and _type_ok(v, value_tp) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, data: dict, path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in hints:
            near = difflib.get_close_matches(str(key), names, n=1)
            inside = [f"{path}{n}.{key}" for n in names if dataclasses.is_dataclass(hints[n])
                      and key in {f.name for f in dataclasses.fields(hints[n])}]  # a bare `iters` -> train.iters
            if inside:
                hint = f"; did you mean '{inside[0]}'?"
            elif near:
                hint = f"; did you mean '{path}{near[0]}'?"
            else:
                hint = f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' must be a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, full + ".")
            continue
        value = _coerce_floats(value, tp)
        value = _LEGACY_VALUES.get((full, value), value) if isinstance(value, str) else value
        choices = _choices(tp)
        if choices and not _type_ok(value, tp):
            raise ConfigError(f"config key '{full}': {value!r} is not one of {list(choices)}")
        if isinstance(value, dict) and not _type_ok(value, tp):
            _reject_entry(full, value, tp)
        if not _type_ok(value, tp):
            raise ConfigError(f"config key '{full}' has the wrong type: got {value!r}, expected {_type_name(tp)}")
        kwargs[key] = value
    return cls(**kwargs)


def _reject_entry(key: str, value: dict, tp: Any) -> None:
    """Name the first entry of mapping ``value`` that ``tp`` (e.g. ``dict[int, int] | None``) does not admit.

    YAML reads ``{11:255}`` (no space after the colon) as the single key "11:255" with no value, and ``{1:30}``
    as {90: null} (base 60). Such an entry is refused with the fix rather than re-read as 11 -> 255: the same
    text in a config file means what YAML says, and guessing would turn ``{1:30}`` into a silently wrong map."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    mapping = next((t for t in options if typing.get_origin(t) is dict and typing.get_args(t)), None)
    if mapping is None:
        return
    key_tp, value_tp = typing.get_args(mapping)
    for k, v in value.items():
        if v is None:
            shown = str(k).replace(":", ": ", 1) if ":" in str(k) else "11: 255"
            raise ConfigError(f"config key '{key}': entry '{k}' has no value (YAML reads KEY:VALUE without a space "
                              f"as one key); write {{{shown}}}, with a space after the colon")
        if not _type_ok(k, key_tp) or not _type_ok(v, value_tp):
            raise ConfigError(f"config key '{key}': entry {k!r}: {v!r} must be {_type_name(key_tp)}: "
                              f"{_type_name(value_tp)}, e.g. {{11: 255}}")


# Values older configs and checkpoints hold, read as their current spelling.
_LEGACY_VALUES = {("train.amp", "none"): "fp32"}


def _choices(tp: Any) -> tuple:
    """The allowed values of a ``Literal[...]`` type (also inside ``X | None``), else ()."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return tuple(c for t in options if typing.get_origin(t) is Literal for c in typing.get_args(t))


def _float_kinds(tp: Any) -> tuple[bool, bool]:
    """Whether ``tp`` admits a float, and whether it admits a list of floats (also inside ``X | None``)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return float in options, any(typing.get_origin(t) is list and typing.get_args(t) == (float,) for t in options)


def _coerce_floats(value: Any, tp: Any) -> Any:
    """Ints and float spellings as floats where ``tp`` wants floats; the type check that follows judges the rest.

    YAML 1.1 (PyYAML) reads ``1e-3`` -- no dot before the exponent -- as a string, on the command line and in
    files alike, so float keys take every string that Python's ``float()`` parses ('1e-3', '5E-4', '.5')."""
    scalar, listed = _float_kinds(tp)
    if scalar and not isinstance(value, list):
        return _as_float(value) if not isinstance(value, str) or not _type_ok(value, tp) else value
    if listed and isinstance(value, list):
        return [_as_float(v) for v in value]
    return value


def _as_float(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "stages":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config path as given, relative to another config, or the name of a shipped config."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    stem = str(name).removesuffix(".yaml")
    candidates += [CONFIG_DIR / f"{stem}.yaml", *CONFIG_DIR.glob(f"*/{stem}.yaml")]
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(p.stem for p in CONFIG_DIR.rglob("*.yaml") if not p.stem.startswith("_"))
    near = difflib.get_close_matches(Path(stem).name, shipped, n=1, cutoff=0.6)
    if near:
        raise ConfigError(f"config '{name}' is neither a file nor a shipped config; did you mean '{near[0]}'?")
    raise ConfigError(f"config '{name}' is neither a file nor a shipped config; give a YAML path or a shipped "
                      "config name (`ovenet configs` lists them)")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"config '{path}' includes itself through _base_")
    raw = path.read_bytes()
    if raw.startswith(b"PK\x03\x04") or path.suffix in (".pth", ".pt"):  # torch.save writes a zip archive
        run = path.parent if (path.parent / "config.yaml").is_file() else "RUN_DIR"
        raise ConfigError(f"'{path}' is a checkpoint, not a YAML config: to continue its run, `ovenet train {run} "
                          f"--resume auto`; to start a new run from its weights, give a config and "
                          f"model.init_from={path}")
    try:
        data = yaml.safe_load(raw.decode("utf-8-sig")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config '{path}' is not a text file (byte {e.start} is not UTF-8); give a YAML config "
                          "(`ovenet configs` lists the shipped ones)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path}' must be a YAML mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    parent = _read_yaml(resolve_config_path(base, path.parent), (*seen, path.resolve()))
    return _merge(parent, data)


OVERRIDE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def is_override(text: str) -> bool:
    """``key.sub=value`` (as opposed to a file path)."""
    return bool(OVERRIDE_PATTERN.match(text))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value read as YAML (so 0.1, true, [1, 2] and null work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value, e.g. train.lr=0.02")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    _check_ranges(cfg)
    return cfg


def saved_config(data: dict) -> dict:
    """A config dict read from a checkpoint or an exported file (in place; returned), with the behaviour of the
    ovenet that wrote it where a later default changed it: no ``model.registered_resizes`` means size-based
    resizes, which such a network was trained with."""
    data.setdefault("model", {}).setdefault("registered_resizes", False)
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set each ``a.b=value`` of ``overrides`` in the nested dict ``data`` (in place; returned for chaining)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is a value, not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply dotted overrides."""
    data = _read_yaml(resolve_config_path(path)) if path is not None else {}
    return from_dict(apply_overrides(data, overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
