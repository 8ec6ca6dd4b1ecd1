"""Training a network of the user's own (``ovenet.train(config, model=...)``): what ovenet needs from it, checked
once before training with one clear error, and the config that records what it is.

ovenet's loop needs only the module's ``forward``: images ``[B, 3, H, W]`` -> :class:`~ovenet.models.SegOutput`
with ``logits_initial`` and ``logits_final`` (``[B, C, h, w]``, C = the data's classes; any stride, upsampled to
the labels) and, for the offset losses, ``logits_seed``, ``offsets`` and ``confidence`` as
:func:`~ovenet.models.offset_outputs` returns them. What it reads when the module has it: ``num_classes``,
``align_corners`` (how logits are upsampled to the labels) and, from an
:class:`~ovenet.models.OffsetSegmenter`, its offset config (``offset_cfg``: the loss reads labels where its seeds
are). ``set_activation_checkpointing`` is needed only with ``train.activation_checkpointing``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import class_path, custom_network
from ..config import Config, OffsetConfig
from ..errors import CheckpointError, ConfigError
from ..models import SegOutput


def custom_model_config(cfg: Config, model: nn.Module, device: torch.device) -> Config:
    """The run config for training ``model`` (moved to ``device``): its ``model`` section records what the
    module is (classes, offsets, align_corners, the offset config of an OffsetSegmenter) rather than the recipe's
    network, so that ``config.yaml``, the losses and validation agree with it. Raises :class:`ConfigError` naming
    what the module lacks, or a ``model.*`` option that only ovenet's own networks have."""
    name = class_path(model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"ovenet.train(model=...) takes a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"the model passed to ovenet.train ({name}) has no trainable parameters")
    cfg = copy.deepcopy(cfg)
    m = cfg.model
    if m.pretrained:  # ImageNet weights of ovenet's own backbones: they would not reach the user's layers
        raise ConfigError(f"model.pretrained={m.pretrained} initialises the config's own network, not {name}; set "
                          "model.pretrained=null (load your encoder's weights when you build it)")
    if m.freeze_main:
        raise ConfigError(f"model.freeze_main applies to ovenet's own networks, not {name}; set it to false and "
                          "freeze parameters yourself (requires_grad=False: the optimiser skips them)")
    if cfg.train.activation_checkpointing and not hasattr(model, "set_activation_checkpointing"):
        raise ConfigError(f"train.activation_checkpointing needs a set_activation_checkpointing(enabled) method, "
                          f"which {name} lacks; set train.activation_checkpointing=false")
    model.to(device)
    output = probe_output(model, name, cfg.data.crop_size or cfg.data.image_size or [64, 64], device)
    m.num_classes = int(output.logits_final.shape[1])
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int) and declared != m.num_classes:
        raise ConfigError(f"{name}.num_classes is {declared} but its logits have {m.num_classes} channels; make "
                          "them agree")
    if isinstance(getattr(model, "align_corners", None), bool):
        m.align_corners = model.align_corners
    if isinstance(getattr(model, "offset_cfg", None), OffsetConfig):
        m.offset = copy.deepcopy(model.offset_cfg)  # the loss reads labels where this module's seeds are
    m.offset.enabled = output.offsets is not None
    return cfg


def probe_output(model: nn.Module, name: str, size: Any, device: torch.device) -> SegOutput:
    """One forward of a blank image of the training crop's size (eval mode, no gradients: no weight, statistic
    or random stream changes), its output checked for what the losses and validation read."""
    height, width = (int(s) for s in (size if isinstance(size, (list, tuple)) else (size, size)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, 3, height, width, device=device))
    finally:
        model.train(was_training)
    if not isinstance(output, SegOutput):
        raise ConfigError(
            f"the model passed to ovenet.train ({name}) returns {type(output).__name__}, not ovenet.SegOutput: "
            "return SegOutput(logits_initial=logits, logits_final=logits) (with offsets, confidence and "
            "logits_seed from ovenet.models.offset_outputs for the offset losses)")
    for field in ("logits_initial", "logits_final"):
        value = getattr(output, field)
        if not (isinstance(value, Tensor) and value.dim() == 4 and value.shape[0] == 1):
            shape = tuple(value.shape) if isinstance(value, Tensor) else value
            raise ConfigError(f"the model passed to ovenet.train ({name}) returns SegOutput.{field} = {shape} for "
                              f"one {height}x{width} image; it must be logits [batch, classes, h, w]")
    if output.offsets is not None and (output.logits_seed is None or output.confidence is None):
        raise ConfigError(f"the model passed to ovenet.train ({name}) returns offsets without logits_seed and "
                          "confidence, which the offset losses need; build its output with "
                          "ovenet.models.offset_outputs (or return no offsets)")
    return output


def check_data_classes(cfg: Config, data_classes: int, own_model: bool) -> None:
    """The network predicts as many classes as the training data has; the fix differs for a user's own one."""
    if data_classes == cfg.model.num_classes:
        return
    if own_model:
        raise ConfigError(f"the model passed to ovenet.train predicts {cfg.model.num_classes} classes but the "
                          f"{cfg.data.name} training set has {data_classes}; build it with {data_classes} classes")
    raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the {cfg.data.name} training set has "
                      f"{data_classes} classes; set model.num_classes={data_classes}")


def check_resume_network(ckpt: dict | None, model: nn.Module | None) -> None:
    """A resume continues the network it trained: a user's own one only with that module passed again."""
    if ckpt is None:
        return
    custom = custom_network(ckpt)
    if custom is not None and model is None:
        raise CheckpointError(
            f"checkpoint {ckpt['path']} holds weights of a custom network ({custom}); resume it in Python, passing "
            f"the model: ovenet.train(config, run_dir, model={custom.rsplit('.', 1)[-1]}(...), resume='auto')")
    if custom is None and model is not None:
        raise CheckpointError(f"checkpoint {ckpt['path']} holds the network its config builds, not one passed as "
                              "model=; resume it without model=, or start a new run for your module")
