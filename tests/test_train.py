"""Training engine: a whole tiny run, its files and checkpoint contents, the LR schedule, train_step against a
hand-written step, validation against hand-counted IoUs, the sampler and the per-sample augmentation seeding.

The tiny setup here (``tiny_config``) is shared by the other training test files.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from ovenet import checkpoint
from ovenet.config import Config, load_config
from ovenet.data import build_dataset
from ovenet.data.training import ResumableSampler, TrainingSet
from ovenet.engine.optim import build_optimizer, build_scheduler, poly_factor
from ovenet.engine.step import train_step, validate
from ovenet.engine.train import train
from ovenet.errors import ConfigError, OvenetError
from ovenet.losses import build_loss
from ovenet.models import SegOutput, build_model

TINY_STAGES = {
    "STAGE1": {"NUM_MODULES": 1, "BLOCK": "BOTTLENECK", "NUM_BLOCKS": [1], "NUM_CHANNELS": [8]},
    "STAGE2": {"NUM_MODULES": 1, "BLOCK": "BASIC", "NUM_BLOCKS": [1, 1], "NUM_CHANNELS": [8, 16]},
    "STAGE3": {"NUM_MODULES": 1, "BLOCK": "BASIC", "NUM_BLOCKS": [1, 1, 1], "NUM_CHANNELS": [8, 16, 32]},
    "STAGE4": {
        "NUM_MODULES": 1,
        "BLOCK": "BASIC",
        "NUM_BLOCKS": [1, 1, 1, 1],
        "NUM_CHANNELS": [8, 16, 32, 64],
    },
}


def tiny_config(*overrides: str) -> Config:
    """OVeNet + OCR (with dropout: RNG state matters) on 8 synthetic 64x64 scenes, 32x32 crops, CPU, fp32."""
    cfg = load_config(
        None,
        [
            "device=cpu",
            "data.name=synthetic",
            "data.num_samples=8",
            "data.image_size=[64,64]",
            "data.crop_size=[32,32]",
            "data.base_size=64",
            "data.num_workers=0",
            "model.arch=hrnetv2_w18_small_v1",
            "model.num_classes=8",
            "model.head=ocr",
            "model.ocr_mid_channels=16",
            "model.ocr_key_channels=8",
            "model.ocr_dropout=0.5",
            "loss.type=ce",
            "train.iters=6",
            "train.batch_size=2",
            "train.lr=0.01",
            "train.log_every=2",
            "train.ckpt_every=100",
            "train.tensorboard=false",
            "train.report=false",  # tests/test_report.py covers it; elsewhere it would only add seconds
            *overrides,
        ],
    )
    cfg.model.stages = TINY_STAGES
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread


def test_full_run_writes_run_folder_and_complete_checkpoints(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config("train.tensorboard=true", "train.ckpt_every=4")
    run_dir = train(cfg, run_dir=tmp_path / "run")

    assert run_dir == tmp_path / "run"
    assert load_config(run_dir / "config.yaml").to_dict() == cfg.to_dict()
    log = (run_dir / "train.log").read_text()
    assert "iter 2/6" in log and "iter 6/6" in log and "img/s" in log and "eta" in log
    assert "val iter 6: mIoU" in log and "training finished" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload().Tags()
    assert {"train/loss", "train/lr", "train/images_per_s", "val/miou"} <= set(events["scalars"])
    assert {"val/prediction", "val/ground_truth", "val/offsets", "val/confidence"} <= set(events["images"])

    # torch.load(weights_only=True) inside read(): every entry has a safe type.
    last = checkpoint.read(run_dir / "last.pth")
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "iteration",
        "rng",
        "best_miou",
        "config",
    ):
        assert key in last, key
    assert last["iteration"] == 6 and last["epoch"] == 1  # 8 samples / batch 2 = 4 iterations per epoch
    assert last["scheduler"]["last_epoch"] == 6
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)  # poly reaches 0 at the end
    assert len(last["optimizer"]["state"]) > 0  # momentum buffers
    (rng,) = last["rng"]  # one entry per rank
    assert set(rng) == {"torch", "cuda", "python", "numpy"}
    assert 0.0 <= last["best_miou"] <= 1.0

    best = checkpoint.read(run_dir / "best.pth")
    assert best["val_metrics"]["miou"] == last["best_miou"]
    model = checkpoint.load(run_dir / "last.pth")  # a training checkpoint is an ordinary ovenet checkpoint
    assert not model.training
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_poly_schedule_with_warmup_matches_formula():
    factor = poly_factor(total_iters=10, power=0.9)
    assert [factor(i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5**0.9, 0.0])
    warm = poly_factor(total_iters=10, power=0.9, warmup_iters=4)
    assert [warm(i) for i in (0, 1, 3, 4)] == pytest.approx(
        [0.25 * 1.0, 0.5 * 0.9**0.9, 1.0 * 0.7**0.9, 0.6**0.9]
    )

    param = nn.Parameter(torch.zeros(1))
    cfg = tiny_config("train.lr=0.02").train
    optimizer = build_optimizer(nn.ParameterList([param]), cfg)
    scheduler = build_scheduler(optimizer, 10, 0.9)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.02 * (1 - i / 10) ** 0.9 for i in range(10)])
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4 and not group["nesterov"]


def _tiny_model_and_batch(num_classes=8):
    cfg = tiny_config()
    cfg.model.ocr_dropout = 0.0
    torch.manual_seed(0)
    model = build_model(cfg.model)
    criterion = build_loss(cfg.loss, num_classes)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, num_classes, (2, 32, 32))
    labels[:, :4] = 255
    return cfg, model, criterion, {"image": images, "label": labels}


def test_train_step_equals_a_hand_written_sgd_step():
    cfg, model, criterion, batch = _tiny_model_and_batch()
    reference = build_model(cfg.model)
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, cfg.train)

    loss, terms = train_step(model, criterion, optimizer, batch)

    assert not loss.requires_grad and isinstance(loss, torch.Tensor)
    assert set(terms) >= {"loss", "loss_initial", "loss_seed", "loss_final", "loss_confidence"}
    ref_loss, _ = criterion(reference(batch["image"]), batch["label"])
    ref_loss.backward()
    with torch.no_grad():
        for p in reference.parameters():  # first SGD step: buffer = grad + wd * p
            p -= cfg.train.lr * (p.grad + cfg.train.weight_decay * p)
    assert torch.allclose(loss, ref_loss.detach())
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-7), name


def test_train_step_grad_clip_bounds_the_update():
    cfg, model, criterion, batch = _tiny_model_and_batch()
    cfg.train.weight_decay = 0.0
    cfg.train.lr = 1.0
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, criterion, build_optimizer(model, cfg.train), batch, grad_clip=1e-3)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert 0 < step.norm() <= 1e-3 * (1 + 1e-4)


class _Oracle(nn.Module):
    """Predicts given label maps (one-hot logits) or a constant class."""

    def __init__(self, labels=None, constant=None, num_classes=3):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.labels, self.constant, self.num_classes = labels, constant, num_classes

    def forward(self, x):
        b, _, h, w = x.shape
        if self.constant is not None:
            logits = torch.zeros(b, self.num_classes, h, w)
            logits[:, self.constant] = 1
        else:
            logits = nn.functional.one_hot(self.labels.clamp(max=self.num_classes - 1), self.num_classes)
            logits = logits.permute(0, 3, 1, 2).float()
        return SegOutput(logits_initial=logits, logits_final=logits)


def test_validate_counts_iou_like_a_hand_count():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])  # 1 image 2x4, 2 ignored pixels
    loader = [{"image": torch.zeros(1, 3, 2, 4), "label": labels}]
    metrics, first = validate(_Oracle(labels=labels), loader, 3, torch.device("cpu"))
    assert metrics["miou"] == 1.0 and metrics["pixel_acc"] == 1.0
    assert torch.equal(first["prediction"], torch.where(labels[0] == 255, 2, labels[0]))
    # Always class 0: IoU0 = 2 / 6, IoU1 = IoU2 = 0 -> mIoU 1/9; pixel acc 2 / 6.
    metrics, _ = validate(_Oracle(constant=0), loader, 3, torch.device("cpu"))
    assert metrics["miou"] == pytest.approx(1 / 9) and metrics["pixel_acc"] == pytest.approx(1 / 3)


def test_sampler_partitions_ranks_and_resumes_mid_epoch():
    full = list(ResumableSampler(10, seed=3))
    assert sorted(i for _, i in full) == list(range(10))
    assert full == list(ResumableSampler(10, seed=3))  # reproducible
    second = ResumableSampler(10, seed=3)
    second.set_epoch(1)
    assert [i for _, i in second] != [i for _, i in full] and all(e == 1 for e, _ in second)

    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    shares = [[i for _, i in s] for s in ranks]
    assert all(len(s) == 3 for s in shares)  # drop_last: 10 // 3 each
    assert len({i for share in shares for i in share}) == 9

    tail = ResumableSampler(10, seed=3)
    tail.set_epoch(0, start=4)
    assert list(tail) == full[4:] and len(tail) == 6


def test_training_set_augmentation_is_a_function_of_epoch_and_index():
    cfg = tiny_config()
    base = build_dataset(cfg.data, train=True)
    data = TrainingSet(base, seed=5)
    random.seed(123)
    np.random.seed(123)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)

    a, b, c = data[(0, 2)], data[(0, 2)], data[(1, 2)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])  # another epoch, another crop/flip
    assert a["skipped"] == "" and a["name"] == base.samples[2].name
    # Loading data leaves the caller's random streams untouched.
    assert random.random() == expected_py and np.random.rand() == expected_np


def test_device_cuda_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        OvenetError,
        match=r"^device 'cuda' requested but no CUDA GPU is available .*; use --device cpu",
    ):
        train(tiny_config("device=cuda"), run_dir=tmp_path / "run")


def test_class_count_mismatch_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.num_classes is 19 .* set model.num_classes=8"):
        train(tiny_config("model.num_classes=19"), run_dir=tmp_path / "run")


def test_epochs_mode_validates_each_epoch(tmp_path):
    run_dir = train(
        tiny_config("train.iters=null", "train.epochs=2", "train.log_every=100"), run_dir=tmp_path / "run"
    )
    log = (run_dir / "train.log").read_text()
    assert "val iter 4 (fp32, whole image, one scale):" in log and "val iter 8 (fp32" in log and "iter 8/8" in log
    assert checkpoint.read(run_dir / "last.pth")["epoch"] == 2


def test_regional_compile_wraps_every_hrnet_module():
    from ovenet.engine.train import compile_regions
    from ovenet.models.hrnet import HighResolutionModule

    model = build_model(tiny_config().model)
    modules = [m for m in model.modules() if isinstance(m, HighResolutionModule)]
    assert compile_regions(model) == len(modules) == 4  # backbone stages 2-4 and the offset branch's stage 4
    assert all(m._compiled_call_impl is not None for m in modules)  # compiled lazily, at the first call
