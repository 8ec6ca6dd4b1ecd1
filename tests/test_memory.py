"""The training-memory estimate (ovenet.engine.memory): a fake-tensor run of the real training step, checked
against the peak the CPU allocator reports for the same step on real tensors, and the pre-training warning."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from ovenet.config import Config, LossConfig, TrainConfig
from ovenet.engine.memory import (
    BACKWARD,
    MEMORY_LEVERS,
    cuda_autocast_rules,
    estimate_training_memory,
    warn_if_over_memory,
)
from ovenet.engine.optim import build_optimizer
from ovenet.engine.step import train_step
from ovenet.losses import build_loss
from ovenet.models import build_model

B, H, W = 2, 64, 128


def _config(levers: bool = False) -> Config:
    cfg = Config(model=tiny_config(), loss=LossConfig(ohem_min_kept=1000, chunked=levers),
                 train=TrainConfig(activation_checkpointing=levers, amp="fp32"))
    cfg.data.crop_size = [H, W]
    return cfg


def measured_cpu_peak(cfg: Config, steps: int = 3, channels_last: bool = False) -> int:
    """Peak bytes over ``steps`` real training steps on the CPU (the first step has no gradients or momentum
    buffers alive yet; the steady state from the second on has), from the allocator's own running total as
    ``torch.profiler`` records it (independent of the estimate's dispatch-level accounting), plus the tensors
    alive before the first step (weights, BatchNorm buffers, the batch)."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train().set_activation_checkpointing(cfg.train.activation_checkpointing)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = build_loss(cfg.loss, cfg.model.num_classes, 255, cfg.model.align_corners, cfg.model.offset.sampling)
    optimizer = build_optimizer(model, cfg.train)
    batch = {"image": torch.randn(B, 3, H, W), "label": torch.randint(0, cfg.model.num_classes, (B, H, W))}
    before = [*model.parameters(), *model.buffers(), *batch.values()]
    before += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            train_step(model, criterion, optimizer, batch, channels_last=channels_last)
    allocations = []

    def walk(event) -> None:
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    assert len(allocations) > 100
    allocations.sort(key=lambda a: a[0])
    first = allocations[0][1]
    start = first.total_allocated - first.alloc_size  # the allocator's running total before the step
    peak = max(a.total_allocated for _, a in allocations) - start
    return sum(t.untyped_storage().nbytes() for t in before) + peak


@pytest.fixture(scope="module")
def estimates():
    return {levers: estimate_training_memory(_config(levers), device_type="cpu", block=1)
            for levers in (False, True)}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("levers", [False, True], ids=["plain", "checkpointing+chunked_loss"])
def test_estimate_within_10_percent_of_the_measured_cpu_peak(one_thread, estimates, levers, channels_last):
    """Over three real steps (the steady state, gradients of the last step freed before the forward), in either
    memory layout: the estimate simulates contiguous tensors, and channels_last moved the CPU peak by < 1%."""
    measured = measured_cpu_peak(_config(levers), channels_last=channels_last)
    estimate = estimates[levers]
    assert (estimate.batch_size, estimate.crop, estimate.amp) == (B, (H, W), "fp32")
    assert abs(estimate.peak - measured) <= 0.10 * measured, (estimate.peak, measured)


def test_estimate_names_what_the_levers_remove(estimates):
    plain, levers = estimates[False], estimates[True]
    for part in ("stem + layer1", "stage 2", "stage 3", "stage 4", "decode head", "offset branch", "offset head",
                 "losses"):
        assert plain.saved[part] > 0, part
    assert {"parameters", "optimizer state", "batch"} <= plain.at_peak.keys()
    assert BACKWARD not in plain.saved  # backward's temporaries are no saved activations
    # Checkpointing keeps only the HRNet modules' inputs, the chunked loss no full-resolution map.
    for part in ("stage 2", "stage 3", "stage 4", "offset branch"):
        assert levers.saved[part] < plain.saved[part] / 2, part
    assert levers.saved["losses"] < plain.saved["losses"] / 4
    assert levers.peak < plain.peak
    assert plain.summary().startswith(f"{plain.config}: batch {B}, {H}x{W}, fp32: peak ")


def test_cuda_autocast_rules_cast_like_cuda_and_go_away():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        assert F.interpolate(y, size=(16, 16), mode="bilinear").dtype == torch.bfloat16  # CPU autocast
        with cuda_autocast_rules():
            assert conv(x).dtype == torch.bfloat16  # convolutions: bf16 on both
            up = F.interpolate(y, size=(16, 16), mode="bilinear", align_corners=True)
            assert up.dtype == torch.float32  # CUDA autocast: upsampling in fp32
            assert torch.softmax(y, 1).dtype == torch.float32 and y.log_softmax(1).dtype == torch.float32
            assert torch.softmax(y, 1, dtype=torch.bfloat16).dtype == torch.bfloat16  # an explicit dtype wins
            up.sum().backward()  # the cast is part of the graph
        assert conv.weight.grad is not None
        assert F.interpolate(y, size=(16, 16), mode="bilinear").dtype == torch.bfloat16
        assert torch.softmax(y, 1).dtype == torch.bfloat16


def test_warning_names_the_levers_when_over_memory(caplog):
    cfg = _config()
    model = build_model(cfg.model)
    log = logging.getLogger("ovenet.test_memory")
    with caplog.at_level(logging.INFO, logger=log.name):
        estimate = warn_if_over_memory(model, cfg, torch.device("cpu"), log, total_memory=2**20)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{estimate.peak / 2**30:.1f} GiB" in warnings[0]
    for lever in MEMORY_LEVERS:
        assert lever in warnings[0]
    caplog.clear()
    model.set_activation_checkpointing(True)
    with caplog.at_level(logging.INFO, logger=log.name):
        enough = warn_if_over_memory(model, cfg, torch.device("cpu"), log, total_memory=2**40)
    assert enough.activation_checkpointing and enough.peak < estimate.peak
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "training memory estimate" in caplog.text
    assert warn_if_over_memory(model, cfg, torch.device("cpu"), log) is None  # no device memory to compare with
