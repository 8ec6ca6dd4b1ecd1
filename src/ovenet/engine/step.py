"""One optimisation step and the validation pass, shared by the training loop and the memory estimator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.training import loader_error
from ..device import autocast
from ..geometry import resize_to_pixels
from ..metrics import ConfusionMatrix
from .logging import Progress
from .optim import step_unless_nonfinite


def batch_to_device(batch: dict[str, Tensor], device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Images (channels_last if asked) and labels of a batch on ``device``, copied asynchronously."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(device, non_blocking=True)


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    scaler: torch.amp.GradScaler | None = None,
    precision: str = "fp32",
    grad_clip: float | None = None,
    channels_last: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward, loss, backward and optimizer step on one batch (``image`` [B,3,H,W], ``label`` [B,H,W]).

    A NaN/inf loss skips the parameter update on the device (fp16: GradScaler skips it). Returns the detached
    loss and the loss terms as device tensors: nothing here waits for the GPU.
    """
    device = next(model.parameters()).device
    images, labels = batch_to_device(batch, device, channels_last)
    # Before the forward, not after it: the last step's gradients would stay alive through this forward (one
    # copy of the parameters on top of the activations, from the second step on).
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        output = model(images)
        loss, terms = criterion(output, labels)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        step_unless_nonfinite(optimizer, loss.detach())
    return loss.detach(), terms


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
    align_corners: bool = True,
    ignore_index: int = 255,
    channels_last: bool = False,
    progress: bool = False,
    write: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Single-scale whole-image mIoU of ``logits_final`` upsampled to the label size (summed over ranks), by the
    model's ``SegOutput.grid`` when it declares one (:mod:`ovenet.geometry`), else with ``align_corners``.

    Returns the metrics and, for visualisation, the first sample's prediction, label, offsets and confidence.
    The metrics also list the samples skipped as unreadable (``skipped``) and, when a sample could not be read and
    nothing skips it, the error (``problem``: validation stopped there; the caller saves and reports).
    ``progress``: a bar on a terminal (under training's), otherwise a line every few seconds through ``write``.
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device=device)
    first = None
    images_total = len(loader.sampler) if isinstance(loader, DataLoader) else None  # this rank's images
    skipped: list[str] = []
    problem = None
    batches = iter(loader)
    with Progress(images_total, "val", enabled=progress, write=write, leave=False) as meter:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # a bad sample (in any worker): stop here, the caller saves and reports
                problem = loader_error(exc)
                if problem is None:
                    raise
                break
            if "image" not in batch:  # data.loader.SkipBadSamples stood in for an unreadable sample
                skipped += list(batch["skipped"])
                continue
            images, labels = batch_to_device(batch, device, channels_last)
            with autocast(device, precision):
                output = model(images)
            logits = resize_to_pixels(output.logits_final.float(), labels.shape[-2:], output.grid, align_corners,
                                      input_size=images.shape[-2:])
            prediction = logits.argmax(1)
            matrix.update(prediction, labels)
            if first is None:
                first = {
                    "prediction": prediction[0],
                    "label": labels[0],
                    "offsets": None if output.offsets is None else output.offsets[0].float(),
                    "confidence": None if output.confidence is None else output.confidence[0, 0].float(),
                }
            meter.update(images.shape[0])
    matrix.all_reduce()
    model.train(was_training)
    return {**matrix.compute(), "skipped": skipped, "problem": problem}, first
