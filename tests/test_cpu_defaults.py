"""CPU training defaults: channels_last is used on the CPU too (it was CUDA-only), because it made the CamVid
pilot's training step 1.15x faster at one thread (benchmarks/RESULTS.md, "CPU speed"), and it changes results
only by float rounding."""

from __future__ import annotations

import pytest
import torch

from ovenet.config import Config, load_config
from ovenet.engine.distributed import DistInfo
from ovenet.engine.logging import close_logger
from ovenet.engine.step import train_step
from ovenet.engine.train import Run, setup

# channels_last changes only the order in which floats are summed (oneDNN's channels_last convolutions, and
# BatchNorm's channels_last CPU kernel, which sums each channel over N*H*W in another order). On 32x48 crops the
# 1/32 branch is 1x2 pixels, so train-mode BatchNorm normalises over 4 values and magnifies that rounding in the
# backward pass: the gradients differ by 2e-5 of their scale on one CPU and by up to 1e-3 of their norm (median
# 5e-4) on an AMD EPYC; the updated weights and BN statistics by ~2e-7. GRAD_REL and REL leave room for other
# CPUs' kernels, while any real change (a wrong layout, a different loss) is O(1).
REL = 1e-4
GRAD_REL = 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


def pilot_like(*overrides: str) -> Config:
    """The CamVid pilot's model, head and loss (W18-small-v1 OVeNet, FCN, OHEM) on synthetic 32x48 crops, CPU."""
    return load_config(None, [
        "device=cpu", "data.name=synthetic", "data.num_samples=4", "data.image_size=[48,64]",
        "data.crop_size=[32,48]", "data.base_size=64", "data.num_workers=0",
        "model.arch=hrnetv2_w18_small_v1", "model.num_classes=8", "model.head=fcn",
        "loss.type=ohem", "loss.ohem_min_kept=500", "train.iters=1", "train.batch_size=2",
        "train.tensorboard=false", *overrides,
    ])


def start(cfg: Config, run_dir) -> Run:
    try:
        run = setup(cfg, None, run_dir, DistInfo())
    finally:
        close_logger()
    assert run is not None
    return run


def test_cpu_training_runs_channels_last_by_default(tmp_path):
    run = start(pilot_like(), tmp_path / "run")
    assert run.device.type == "cpu" and run.channels_last
    conv = run.model.backbone.conv1.weight
    assert conv.dim() == 4 and conv.is_contiguous(memory_format=torch.channels_last)

    plain = start(pilot_like("train.channels_last=false"), tmp_path / "plain")  # still the way to opt out
    assert not plain.channels_last and plain.model.backbone.conv1.weight.is_contiguous()


def test_cpu_channels_last_step_matches_the_contiguous_step(tmp_path):
    """One optimisation step through the engine's own path, from the same weights and batch: same loss,
    gradients, updated weights and BatchNorm statistics up to float rounding."""
    fast = start(pilot_like(), tmp_path / "fast")
    plain = start(pilot_like("train.channels_last=false"), tmp_path / "plain")
    assert fast.channels_last and not plain.channels_last
    plain.model.load_state_dict(fast.model.state_dict())  # same initial weights whatever the seeding did
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (2, 32, 48), generator=g)
    labels[:, :3] = 255
    batch = {"image": torch.randn(2, 3, 32, 48, generator=g), "label": labels}

    results = []
    for run in (fast, plain):
        loss, _ = train_step(run.model, run.criterion, run.optimizer, batch, channels_last=run.channels_last)
        grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
        results.append((loss, grads, {k: v.clone() for k, v in run.model.state_dict().items()}))
    (loss_f, grads_f, state_f), (loss_p, grads_p, state_p) = results

    assert abs(loss_f.item() - loss_p.item()) <= REL * max(1.0, abs(loss_p.item()))
    assert grads_f.keys() == grads_p.keys() and len(grads_p) > 100
    assert max(g.abs().max().item() for g in grads_p.values()) > 1e-3  # the comparison is not of zeros
    for name, expected in grads_p.items():
        # Relative to the tensor's norm; biases in front of a BatchNorm have gradients of rounding size only.
        norm = expected.norm().item()
        if norm > 1e-4:
            assert (grads_f[name] - expected).norm().item() <= GRAD_REL * norm, f"grad {name}"
    pairs = [(f"state {n}", state_f[n], v) for n, v in state_p.items()]  # weights after the step, BN statistics
    for name, actual, expected in pairs:
        if not expected.is_floating_point():
            assert torch.equal(actual, expected), name
            continue
        scale = max(1.0, expected.abs().max().item())
        assert (actual - expected).abs().max().item() <= REL * scale, name
