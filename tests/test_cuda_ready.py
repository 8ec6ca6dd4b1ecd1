"""Ready for CUDA without a GPU: the training step and inference run on PyTorch's ``meta`` device.

A meta tensor has a shape and a device but no data, so everything that would be wrong on a GPU fails here too:
a tensor created on the CPU and mixed with the model's (``Tensor on device cpu is not on the expected device
meta``), and every host sync -- ``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero`` and other
data-dependent shapes, a copy to the CPU. (Autocast and the fused optimizer have no meta kernels; the bf16 path
is covered by tests/test_fast_path.py.)
"""

import pytest
import torch
from helpers import tiny_config

from ovenet.config import LossConfig, TrainConfig
from ovenet.engine.optim import build_optimizer
from ovenet.engine.step import train_step
from ovenet.inference import infer_logits
from ovenet.losses import build_loss
from ovenet.models import build_model

META = torch.device("meta")


def test_meta_device_catches_what_a_gpu_would():
    """The premise of this file: each kind of mistake raises on meta tensors."""
    x = torch.empty(2, 3, device=META)
    for mistake in (lambda: x + torch.arange(3), lambda: x.sum().item(), lambda: x.tolist(),
                    lambda: bool(x.sum() > 0), lambda: x[x > 0], lambda: x.cpu()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            mistake()


@pytest.mark.parametrize("head,sampling,confidence,formula", [("ocr", "exact", "paper", "paper"),
                                                               ("ocr", "official", "official", "official"),
                                                               ("fcn", "exact", "paper", "paper")])
def test_one_training_step_runs_on_the_meta_device(head, sampling, confidence, formula):
    cfg = tiny_config(head=head, sampling=sampling)
    cfg.offset.iterative_refinement = 1
    model = build_model(cfg).to(META).train()
    loss_cfg = LossConfig(type="ohem", ohem_min_kept=50, confidence=confidence, formula=formula,
                          class_weights=[1.0, 0.9, 1.1, 1.0, 1.2])
    criterion = build_loss(loss_cfg, 5, align_corners=cfg.align_corners, sampling=sampling).to(META)
    optimizer = build_optimizer(model, TrainConfig(lr=0.01))
    # A loader's batch lives on the CPU; train_step moves it.
    batch = {"image": torch.randn(2, 3, 64, 80), "label": torch.randint(0, 5, (2, 64, 80))}
    loss, terms = train_step(model, criterion, optimizer, batch, grad_clip=1.0, channels_last=True)
    assert loss.device == META and loss.shape == ()
    assert set(terms) == {"loss", "loss_initial", "loss_seed", "loss_final", "loss_confidence"}
    assert all(t.device == META for t in terms.values())
    assert all(p.device == META for p in model.parameters())


@pytest.mark.parametrize("options", [dict(), dict(scales=(0.5, 1.0, 1.5), flip=True),
                                     dict(mode="slide", crop_size=(48, 64), scales=(1.25,), flip=True)])
def test_inference_runs_on_the_meta_device(options):
    model = build_model(tiny_config()).to(META).eval()
    with torch.inference_mode():
        out = infer_logits(model, torch.empty(1, 3, 61, 83, device=META), **options)
    assert out["logits"].device == META and out["logits"].shape == (1, 5, 61, 83)
    assert out["offsets"].shape == (1, 2, 61, 83) and out["confidence"].shape == (1, 1, 61, 83)


def test_model_predict_runs_on_the_meta_device():
    """model.predict as a GPU pipeline uses it: a uint8 camera frame already on the device, results kept there."""
    model = build_model(tiny_config()).to(META)
    frames = torch.empty(2, 3, 61, 83, dtype=torch.uint8, device=META)
    results = model.predict(frames, scales=(0.75, 1.0), flip=True, return_probs=True, as_tensors=True)
    assert len(results) == 2 and model.training  # the mode it was in is restored
    first = results[0]
    assert first.labels.device == META and first.labels.shape == (61, 83) and first.labels.dtype == torch.uint8
    assert first.probs.shape == (5, 61, 83) and first.offsets.shape == (2, 61, 83)
    assert first.confidence.shape == (61, 83)
    with pytest.raises(NotImplementedError, match="meta"):  # the default copies to numpy: a sync, caught here
        model.predict(frames[0])
