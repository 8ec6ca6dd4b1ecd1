"""The official optimiser recipe: SGD with momentum, weight decay on every parameter, per-iteration poly LR.

``lr(i) = lr0 * (1 - i / total) ** power`` for iteration ``i`` (0-based), optionally times a linear warmup
factor ``min(1, (i + 1) / warmup_iters)``. HRNet / OVeNet use power 0.9 and no warmup.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.SGD:
    """SGD over the trainable parameters; as the official code, weight decay applies to all of them (BN too).

    Fused by default on CUDA and CPU: one kernel per step, and it can skip a step on the device (see
    :func:`step_unless_nonfinite`). Call it after moving the model to its device.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
    )
    if cfg.momentum:
        # Zero buffers make the first step the same update (buf = 0.9 * 0 + grad) and avoid the fused kernel's
        # uninitialised buffer when that first step is skipped.
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """``optimizer.step()``, skipped on the device when ``loss`` is NaN/inf, so bad weights never reach the
    next forward pass and no host sync is needed. Uses the ``found_inf`` input of fused optimizers (as
    GradScaler does); other optimizers just step.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.step()
        return
    optimizer.found_inf = (~torch.isfinite(loss)).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def poly_factor(total_iters: int, power: float = 0.9, warmup_iters: int = 0) -> Callable[[int], float]:
    """LR multiplier of iteration ``i``: poly decay, times a linear ramp over the first ``warmup_iters``.

    Iteration i steps with base * (1 - i/N)^power. The official loop sets the LR *after* each step from the index
    of the step just taken, so its step i uses (1 - (i-1)/N)^power (step 0 and 1 both the base LR): one iteration
    behind this schedule, a difference below 1/N of the LR everywhere but the last steps."""

    def factor(i: int) -> float:
        decay = max(0.0, 1.0 - i / total_iters) ** power
        if warmup_iters > 0 and i < warmup_iters:
            decay *= (i + 1) / warmup_iters
        return decay

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_iters: int, power: float = 0.9, warmup_iters: int = 0
) -> LambdaLR:
    """Poly LR stepped once per iteration. The factor is a plain function, so the scheduler's state dict holds
    only the step count: a resumed run follows the schedule of its *current* config (e.g. more iterations)."""
    return LambdaLR(optimizer, poly_factor(total_iters, power, warmup_iters))
