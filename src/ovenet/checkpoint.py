"""Checkpoints: ovenet's own format, atomic writes, and loading HRNet ImageNet weights.

An ovenet checkpoint is a ``torch.save``'d dict read back with ``weights_only=True``::

    {"format": "ovenet", "version": 1, "config": <Config as a dict>, "model": <state dict>,
     ... training state (optimizer, scheduler, scaler, iteration, rng, ...) for run checkpoints}

so every checkpoint, a converted official one or a training run's ``last``/``best``, loads with :func:`load`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, apply_overrides, from_dict
from .errors import CheckpointError, ConfigError
from .models import OVeNet, build_model

FORMAT = "ovenet"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(path: str | Path, model: nn.Module, cfg: Config, **extra: Any) -> Path:
    """Write an ovenet checkpoint (config + weights [+ training state in ``extra``]) atomically."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "model": state, **extra},
                       path)


def read(path: str | Path) -> dict:
    """Read an ovenet checkpoint dict (weights only, on the CPU) with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}); is it complete and a torch file?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and any(str(k).startswith("model.") for k in ckpt):
            hint = "; it looks like an official OVeNet checkpoint: run `ovenet convert-official CONFIG.yaml " \
                   f"{path.name} OUT.pth` first"
        raise CheckpointError(f"checkpoint '{path}' is not an ovenet checkpoint{hint}")
    return ckpt


def load_state(model: nn.Module, state: dict, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` whose error names the missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}; check that the config's "
                              "architecture, head, offset branch and num_classes match the checkpoint")
    model.load_state_dict(state)


def load(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None) -> OVeNet:
    """The model of any ovenet checkpoint, in eval mode, on ``device``.

    ``overrides`` (dotted ``model.*`` keys) may change inference-only options such as ``model.offset.sampling``.
    """
    ckpt = read(path)
    try:
        cfg = from_dict(apply_overrides(ckpt["config"], overrides or []))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{path}' holds an invalid config: {e}") from None
    cfg.model.pretrained = None
    cfg.model.freeze_main = False
    model = build_model(cfg.model)
    load_state(model, ckpt["model"], f"checkpoint '{path}'")
    model.config = cfg
    return model.to(device).eval()


# --- ImageNet-pretrained HRNet (official HRNet-Image-Classification files or timm weights) -----------------------

def load_pretrained_backbone(model: OVeNet, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet HRNet classification weights into the backbone and, as the official code does, the offset
    branch copy (stage k of the branch takes ImageNet's stage k; surplus modules of the main stage are dropped).

    Returns ``{"loaded": [...], "skipped": [...], "missing": [...]}`` (names in the model) for reporting.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights '{path}' do not exist; set model.pretrained to an HRNet ImageNet "
                              "checkpoint (e.g. hrnetv2_w48_imagenet_pretrained.pth) or null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"pretrained weights '{path}' cannot be read: {type(e).__name__}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
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
    missing = [k for k in own if k not in new and (k.startswith(("backbone.", "offset_branch.")))]
    own.update(new)
    model.load_state_dict(own)
    return {"loaded": sorted(new), "skipped": skipped, "missing": missing}
