"""Initial weights of a training run: ImageNet HRNet (``model.pretrained``), then trained weights
(``model.init_from``: an ovenet checkpoint or an official ``final_state.pth``), each reported, none silently empty.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoint import FORMAT, load_file
from .config import ModelConfig
from .errors import CheckpointError, install_command
from .models import OffsetSegmenter, OVeNet
from .official import convert_state_dict


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _by_part(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        part = k.split(".")[0]
        counts[part] = counts.get(part, 0) + 1
    return ", ".join(f"{part} {n}" for part, n in counts.items())


def describe_report(what: str, report: dict[str, list[str]]) -> str:
    """One log line saying how many tensors a weight file gave, to which parts, and what it left out."""
    loaded, skipped, missing = report["loaded"], report["skipped"], report["missing"]
    line = f"{what}: {len(loaded)} tensors loaded ({_by_part(loaded)})"
    if skipped:
        line += f"; {len(skipped)} in the file skipped (e.g. {_examples(skipped)})"
    if report.get("mismatched"):
        line += f", of which {len(report['mismatched'])} with another shape (e.g. {_examples(report['mismatched'], 2)})"
    if missing:
        line += f"; {len(missing)} of the model's not in the file keep their initialisation (e.g. {_examples(missing)})"
    return line


def load_pretrained_backbone(model: OVeNet, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet HRNet classification weights into the backbone and, as the official code does, the offset
    branch copy (stage k of the branch takes ImageNet's stage k; surplus modules of the main stage are dropped).

    Returns ``{"loaded": [...], "skipped": [...], "missing": [...]}`` (names in the model) for reporting. A file
    none of whose tensors fits is an error, so a wrong file cannot leave the backbone silently random.
    """
    if isinstance(model, OffsetSegmenter):
        return load_pretrained_encoder(model, path)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights '{path}' do not exist; set model.pretrained to an HRNet ImageNet "
                              "checkpoint (e.g. hrnetv2_w48_imagenet_pretrained.pth) or null")
    raw = load_file(path, f"pretrained weights '{path}'")
    state = raw
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        state = {}
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items() if torch.is_tensor(v)}
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in state.items():
        targets = [f"backbone.{key}"]
        if model.offset_branch is not None:
            first = model.offset_branch.first
            name = key.split(".")[0]
            if name.startswith("stage") and name[5:].isdigit() and int(name[5:]) >= first or \
                    name.startswith("transition") and name[10:].isdigit() and int(name[10:]) >= first - 1:
                targets.append(f"offset_branch.{key}")
        hit = False
        for t in targets:
            if t in own and own[t].shape == value.shape:
                new[t] = value
                hit = True
        if not hit:
            skipped.append(key)  # classifier (incre_modules, downsamp_modules, final_layer, classifier) etc.
    if not new:
        hint = ("it is an ovenet checkpoint, so give it as model.init_from" if isinstance(raw, dict)
                and raw.get("format") == FORMAT else f"it has {len(state)} tensors, none with a backbone name "
                f"and shape of {getattr(getattr(model, 'cfg', None), 'arch', 'this model')}")
        raise CheckpointError(f"pretrained weights '{path}' load nothing ({hint}); set model.pretrained to HRNet "
                              "ImageNet weights of model.arch, or null")
    missing = [k for k in own if k not in new and (k.startswith(("backbone.", "offset_branch.")))]
    own.update(new)
    model.load_state_dict(own)
    return {"loaded": sorted(new), "skipped": skipped, "missing": missing}


def load_pretrained_encoder(model: OffsetSegmenter, path: str | Path) -> dict[str, list[str]]:
    """ImageNet weights for an encoder model: the EfficientNet-Lite0 file (``efficientnet_lite0_imagenet`` names the
    one the registry package ships) into the encoder and the offset branch's copied stages, or a timm state dict
    into a timm encoder and its copy. Same report as :func:`load_pretrained_backbone`; loading nothing is an error."""
    from .models.efficientnet import EfficientNetLite0Encoder, lite0_state_from_file, load_lite0_file, pretrained_file
    from .models.segmenter import StageCopy

    parts = {"backbone.": model.backbone}
    if model.offset_branch is not None:
        branch = model.offset_branch
        parts["offset_branch.stages." if isinstance(branch, StageCopy) else "offset_branch."] = \
            branch.stages if isinstance(branch, StageCopy) else branch
    if isinstance(model.backbone, EfficientNetLite0Encoder):
        file = pretrained_file(str(path))
        if not file.is_file():
            raise CheckpointError(f"pretrained weights '{file}' do not exist; set model.pretrained to "
                                  f"efficientnet_lite0_imagenet ({install_command('pretrained')}) or null")
        source = load_lite0_file(file)
        new = {}
        for prefix, part in parts.items():
            new.update(lite0_state_from_file(part, source, prefix))
        used = {theirs for part in parts.values() for theirs in part.pretrained_keys().values()}
        skipped = [k for k in source if k not in used]  # the classifier: _conv_head, _bn1, _fc
    else:
        file = Path(path)
        if not file.is_file():
            raise CheckpointError(f"pretrained weights '{file}' do not exist; set model.pretrained to the timm "
                                  "model's state dict file or null")
        source = load_file(file, f"pretrained weights '{file}'")
        source = source.get("state_dict", source) if isinstance(source, dict) else {}
        own = model.state_dict()
        new = {f"{prefix}model.{k}": v for prefix in parts for k, v in source.items()
               if torch.is_tensor(v) and own.get(f"{prefix}model.{k}", torch.empty(0)).shape == v.shape}
        skipped = [k for k in source if not any(f"{prefix}model.{k}" in new for prefix in parts)]
    if not new:
        raise CheckpointError(f"pretrained weights '{file}' load nothing into the {type(model.backbone).__name__}; "
                              "give ImageNet weights of model.backbone, or null")
    own = model.state_dict()
    missing = [k for k in own if k not in new and k.startswith(tuple(parts))]
    own.update(new)
    model.load_state_dict(own)
    return {"loaded": sorted(new), "skipped": skipped, "missing": missing}


def _trained_state(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ovenet's names held by a loaded file, and what the file was."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("model"), dict):
        return obj["model"], "ovenet checkpoint"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # official checkpoint.pth.tar
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return {}, "not a state dict"
    state = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if any(k.startswith("model.") for k in state):
        return convert_state_dict(state), "official checkpoint"
    return {k.removeprefix("module."): v for k, v in state.items()}, "state dict"


def load_init_from(model: OVeNet, path: str | Path) -> dict[str, Any]:
    """Initialise ``model`` from trained weights: every tensor of the file with a model tensor of the same name and
    shape, whatever the part (backbone, decode head, offset branch, offset head).

    ``path`` is an ovenet checkpoint (a run's ``best.pth``/``last.pth`` or a converted one), an official OVeNet/HRNet
    ``final_state.pth`` (``model.``-prefixed keys, mapped with :func:`ovenet.official.map_key`) or a bare ovenet
    state dict. From a baseline this gives the backbone and decode head and leaves the offset parts as they were
    (e.g. ImageNet via ``model.pretrained``, as in the paper's "Fr" ablation); from an OVeNet checkpoint the offset
    parts load too. Tensors whose shape differs (e.g. the classifier of another dataset) are skipped.

    Returns ``{"loaded", "skipped", "mismatched", "missing", "kind"}``; loading nothing is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.init_from '{path}' does not exist; set it to a trained ovenet checkpoint "
                              "(e.g. runs/<baseline>/best.pth) or an official final_state.pth, or null")
    obj = load_file(path, f"model.init_from '{path}'")
    state, kind = _trained_state(obj)
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    skipped, mismatched = [], []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            new[key] = value
        else:
            skipped.append(key)
            if key in own:
                mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    if not new:
        raise CheckpointError(f"model.init_from '{path}' ({kind}, {len(state)} tensors) has no tensor with the "
                              "model's names and shapes; give a checkpoint of this architecture (ovenet or official "
                              "final_state.pth), or ImageNet classification weights as model.pretrained")
    own.update(new)
    model.load_state_dict(own)
    missing = [k for k in own if k not in new]
    return {"loaded": sorted(new), "skipped": skipped, "mismatched": mismatched, "missing": missing, "kind": kind}


def load_initial_weights(model: OVeNet, cfg: ModelConfig,
                         log: logging.Logger | None = None) -> dict[str, dict[str, Any]]:
    """Apply ``cfg.pretrained`` (ImageNet) and then ``cfg.init_from`` (trained weights, which win where both give a
    tensor), logging what each loaded and skipped. Returns the reports by config key."""
    log = log or logging.getLogger("ovenet")
    reports: dict[str, dict[str, Any]] = {}
    if cfg.pretrained:
        reports["pretrained"] = load_pretrained_backbone(model, cfg.pretrained)
        log.info(describe_report(f"model.pretrained {cfg.pretrained}", reports["pretrained"]))
    if cfg.init_from:
        reports["init_from"] = report = load_init_from(model, cfg.init_from)
        log.info(describe_report(f"model.init_from {cfg.init_from} ({report['kind']})", report))
    if cfg.freeze_main:
        # A frozen part never changes, so whatever it did not get from a trained file stays as initialised for good.
        frozen = ("backbone.", "decode_head.")
        if "init_from" not in reports:
            log.warning("model.freeze_main without model.init_from: the frozen backbone and decode head keep "
                        "ImageNet or random weights; set model.init_from to the trained baseline's best.pth")
        elif untrained := [k for k in reports["init_from"]["missing"] if k.startswith(frozen)]:
            log.warning(f"model.freeze_main: {len(untrained)} frozen tensors are not in model.init_from and stay "
                        f"as initialised (e.g. {_examples(untrained)})")
    return reports
