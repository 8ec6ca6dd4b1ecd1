"""The official optimiser recipe: SGD with momentum, weight decay on every parameter, poly LR decay per iteration.

``lr(i) = lr0 * (1 - i / total) ** power`` for iteration ``i`` (0-based), optionally times a linear warmup factor
``min(1, (i + 1) / warmup_iters)``. HRNet / OVeNet use power 0.9 and no warmup.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters; as the official code, weight decay applies to all of them (BN too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_factor(total_iters: int, power: float = 0.9, warmup_iters: int = 0) -> Callable[[int], float]:
    """The LR multiplier of iteration ``i``: poly decay, times a linear ramp over the first ``warmup_iters``."""

    def factor(i: int) -> float:
        decay = max(0.0, 1.0 - i / total_iters) ** power
        if warmup_iters > 0 and i < warmup_iters:
            decay *= (i + 1) / warmup_iters
        return decay

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, power: float = 0.9,
                    warmup_iters: int = 0) -> LambdaLR:
    """Poly LR stepped once per iteration. The factor is a plain function, so the scheduler's state dict holds
    only the step count: a resumed run follows the schedule of its *current* config (e.g. more iterations)."""
    return LambdaLR(optimizer, poly_factor(total_iters, power, warmup_iters))
