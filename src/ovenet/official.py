"""Reading the official OVeNet / HRNet-Semantic-Segmentation configs and checkpoints.

The official ``final_state.pth`` is ``FullModel.state_dict()``: every key prefixed ``model.``, plus a dead
``model.coords`` grid buffer and, with class weights, ``loss.criterion.weight``. Network keys map onto ovenet's
by prefix: the HRNet body goes to ``backbone.``, the offset branch copy (``transition3_2``, ``stage4_2``, ...) to
``offset_branch.`` without the ``_2``, ``aux_head_offset`` to ``offset_head``, the OCR modules and ``aux_head``
to ``decode_head.``, and plain HRNet's ``last_layer`` to ``decode_head``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import load_file, load_state, save
from .config import Config, from_dict
from .errors import CheckpointError, ConfigError
from .models import build_model

OCR_KEYS = ("aux_head.", "conv3x3_ocr.", "ocr_distri_head.", "cls_head.")
OFFICIAL_DATASETS = ("cityscapes", "acdc", "ade20k", "camvid")  # DATASET.DATASET values ovenet reads


def map_key(key: str) -> str | None:
    """Official network key (without ``model.``) -> ovenet key; None for keys that carry no weights we use."""
    if key == "coords":
        return None
    m = re.match(r"(transition|stage)(\d)_2\.(.*)", key)
    if m:
        return f"offset_branch.{m[1]}{m[2]}.{m[3]}"
    if key.startswith("aux_head_offset."):
        return "offset_head." + key.removeprefix("aux_head_offset.")
    if key.startswith(OCR_KEYS):
        return "decode_head." + key
    if key.startswith("last_layer."):
        return "decode_head." + key.removeprefix("last_layer.")
    return "backbone." + key


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("loss."):
            continue  # CE class-weight buffer of the official FullModel
        new = map_key(key.removeprefix("model."))
        if new is not None:
            out[new] = value
    return out


def _stage(d: dict) -> dict:
    return {k: d[k] for k in ("NUM_MODULES", "BLOCK", "NUM_BLOCKS", "NUM_CHANNELS")}


def config_from_official(official: dict, sampling: str = "official") -> Config:
    """An ovenet :class:`Config` equivalent to an official experiment YAML (as a parsed dict)."""
    try:
        model = official["MODEL"]
        extra = model["EXTRA"]
        name = model.get("NAME", "seg_hrnet_ocr")
        stages = {k: _stage(v) for k, v in extra.items() if re.fullmatch(r"STAGE\d(_2)?", k)}
        is_ovenet = "OFFSET_BRANCH" in extra or any(k.endswith("_2") for k in stages)
        ocr = model.get("OCR", {})
        dataset = official.get("DATASET", {})
        train = official.get("TRAIN", {})
        loss = official.get("LOSS", {})
        ds_name = str(dataset.get("DATASET", "")).lower()
        ds_name = ds_name if ds_name in OFFICIAL_DATASETS else "cityscapes"
        data = {"name": ds_name, "root": str(Path(dataset.get("ROOT", "data")) / ds_name)}
        if "IMAGE_SIZE" in train:
            w, h = train["IMAGE_SIZE"]  # official order is width, height
            data["crop_size"] = [int(h), int(w)]
        if "BASE_SIZE" in train:
            data["base_size"] = int(train["BASE_SIZE"])
        cfg = {
            "name": Path(str(official.get("_name", "official"))).stem,
            "model": {
                "head": "ocr" if "ocr" in name else "fcn",
                "num_classes": int(dataset.get("NUM_CLASSES", 19)),
                "align_corners": bool(model.get("ALIGN_CORNERS", True)),
                "stages": stages,
                # The official OCR head hard-codes dropout 0.05 and ignores OCR.DROPOUT.
                "ocr_mid_channels": int(ocr.get("MID_CHANNELS", 512)),
                "ocr_key_channels": int(ocr.get("KEY_CHANNELS", 256)),
                "freeze_main": bool(model.get("FREEZED_PAR", False)),
                "offset": {
                    "enabled": is_ovenet,
                    "branch_stage": int(extra.get("OFFSET_BRANCH", 4)),
                    "tau": float(extra.get("OFFSET_THRESHOLD", 0.2)),
                    "fusion": "logits" if extra.get("LOGITS", True) else "probs",
                    "sampling": sampling,
                    "iterative_refinement": int(extra.get("ITERATIVE_REFINEMENT", 0)),
                },
            },
            "data": data,
            "loss": {
                "type": "ohem" if loss.get("USE_OHEM", False) else "ce",
                "ohem_thresh": float(loss.get("OHEMTHRES", 0.9)),
                "ohem_min_kept": int(loss.get("OHEMKEEP", 131072)),
                "class_weights": ("cityscapes" if ds_name in ("cityscapes", "acdc")
                                  and int(dataset.get("NUM_CLASSES", 19)) == 19 else None),
                "aux_weights": [float(w) for w in loss.get("BALANCE_WEIGHTS", [0.4, 1.0])],
                "confidence": "official",
                "formula": "official",
            },
            "train": {
                "epochs": int(train.get("END_EPOCH", 484)),
                "batch_size": int(train.get("BATCH_SIZE_PER_GPU", 2)),
                "lr": float(train.get("LR", 0.01)),
                "weight_decay": float(train.get("WD", 5e-4)),
                "momentum": float(train.get("MOMENTUM", 0.9)),
                "seed": 304,
            },
        }
        if model.get("FREEZED_PAR", False):
            cfg["model"]["freeze_main"] = True
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"official config is missing or has a malformed entry: {e}") from None
    return from_dict(cfg)


def read_official_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"official config '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"official config '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or "MODEL" not in data:
        raise ConfigError(f"'{path}' is not an official HRNet/OVeNet experiment YAML (no MODEL section)")
    data["_name"] = path.stem
    return data


def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint '{path}' does not exist")
    state = load_file(path, f"official checkpoint '{path}'")
    if isinstance(state, dict) and "state_dict" in state:  # checkpoint.pth.tar: {epoch, state_dict, optimizer}
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(str(k).startswith("model.") for k in state):
        raise CheckpointError(f"'{path}' is not an official final_state.pth/best.pth (no 'model.*' keys)")
    return state


def build_official(official: dict, state: dict[str, torch.Tensor], sampling: str = "official") -> Any:
    cfg = config_from_official(official, sampling)
    model = build_model(cfg.model)
    load_state(model, convert_state_dict(state), "official checkpoint")
    model.config = cfg
    return model


def convert_official(yaml_path: str | Path, state_path: str | Path, out_path: str | Path,
                     sampling: str = "official") -> Path:
    """``ovenet convert-official``: official YAML + final_state.pth -> one ovenet checkpoint."""
    if sampling not in ("official", "exact"):
        raise ConfigError(f"--sampling must be 'official' or 'exact', got '{sampling}'")
    model = build_official(read_official_yaml(yaml_path), read_official_state(state_path), sampling)
    return save(out_path, model, model.config)
