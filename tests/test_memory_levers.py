"""The memory levers change memory, not numbers: the chunked loss (``loss.chunked``) and activation checkpointing
(``train.activation_checkpointing``) give the plain path's losses, gradients, updated weights and BatchNorm
statistics (relative 1e-5), and really drop what they promise to drop."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_scaled, tiny
from torch import nn

from ovenet.config import LossConfig, TrainConfig
from ovenet.engine.guards import RESUMABLE_KEYS
from ovenet.engine.optim import build_optimizer
from ovenet.engine.step import train_step
from ovenet.losses import build_loss
from ovenet.losses import ce as ce_module
from ovenet.models import SegOutput


def _outputs(head: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Leaf tensors shaped like an OVeNet's outputs: 3 images, 19 classes, 8x12 logits for 32x48 labels."""
    shape = (3, 19, 8, 12)
    out = {f"logits_{k}": torch.randn(shape, generator=generator) * 3 for k in ("initial", "seed", "final")}
    if head == "ocr":
        out.update({f"aux_logits_{k}": torch.randn(shape, generator=generator) * 3
                    for k in ("initial", "seed", "final")})
    out["offsets"] = torch.rand(3, 2, 8, 12, generator=generator) - 0.5
    out["confidence"] = torch.rand(3, 1, 8, 12, generator=generator)
    return out


@pytest.mark.parametrize("head", ["ocr", "fcn"])
@pytest.mark.parametrize("loss_type", ["ohem", "ce"])
@pytest.mark.parametrize("weights", [None, "cityscapes"])
@pytest.mark.parametrize("formula", ["paper", "official"])
def test_chunked_loss_equals_the_plain_loss(monkeypatch, head, loss_type, weights, formula):
    # Chunks of 2 images, so the batch of 3 is split unevenly and the chunks' results are joined.
    monkeypatch.setattr(ce_module, "CHUNK_ELEMENTS", 2 * 19 * 32 * 48)
    g = torch.Generator().manual_seed(0)
    outputs = _outputs(head, g)
    target = torch.randint(0, 19, (3, 32, 48), generator=g)
    target[:, :4] = 255
    target[1, :, -5:] = 255
    results = {}
    for chunked in (False, True):
        cfg = LossConfig(type=loss_type, ohem_thresh=0.3, ohem_min_kept=400, class_weights=weights,
                         formula=formula, chunked=chunked)
        leaves = {k: v.clone().requires_grad_(k != "offsets") for k, v in outputs.items()}
        total, terms = build_loss(cfg, 19)(SegOutput(**leaves), target)
        total.backward()
        results[chunked] = total.detach(), terms, {k: v.grad for k, v in leaves.items() if v.grad is not None}
    (plain, plain_terms, plain_grads), (chunked, chunked_terms, chunked_grads) = results[False], results[True]
    assert torch.isfinite(plain) and plain > 0
    assert_close_scaled(chunked, plain, msg="total loss")
    for name in plain_terms:
        assert_close_scaled(chunked_terms[name], plain_terms[name], msg=name)
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0
        assert_close_scaled(chunked_grads[name], grad, msg=f"gradient of {name}")


def test_chunked_loss_keeps_no_full_resolution_map():
    """What backward holds on to: the plain loss saves each upsampled map (here 2 x 19 x 64 x 64 fp32 each), the
    chunked one only the low-resolution logits and per-pixel masks."""
    logits = torch.randn(2, 19, 8, 8, requires_grad=True)
    target = torch.randint(0, 19, (2, 64, 64))
    saved = {}
    for chunked in (False, True):
        largest = [0]

        def pack(t: torch.Tensor, largest: list[int] = largest) -> torch.Tensor:
            largest[0] = max(largest[0], t.numel())
            return t

        criterion = build_loss(LossConfig(type="ohem", chunked=chunked), 19)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            criterion.prediction_loss(logits, None, target)
        saved[chunked] = largest[0]
    assert saved[False] >= 2 * 19 * 64 * 64
    assert saved[True] <= 2 * 64 * 64


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 5, (2, 64, 96), generator=g)
    label[:, :6] = 255
    return {"image": torch.randn(2, 3, 64, 96, generator=g), "label": label}


@pytest.mark.parametrize("head,amp", [("ocr", "fp32"), ("fcn", "fp32"), ("ocr", "bf16")])
def test_activation_checkpointing_gives_the_plain_training_step(one_thread, head, amp):
    plain = tiny(ovenet=True, head=head).train()
    checkpointed = copy.deepcopy(plain).set_activation_checkpointing(True)
    criterion = build_loss(LossConfig(ohem_min_kept=2000), 5)
    results = []
    for model in (plain, checkpointed):
        optimizer = build_optimizer(model, TrainConfig())
        torch.manual_seed(1)  # the OCR head's dropout draws the same masks in both runs
        loss, terms = train_step(model, criterion, optimizer, _batch(), precision=amp)
        results.append((loss, terms, model))
    (loss, terms, plain), (ck_loss, ck_terms, checkpointed) = results
    assert_close_scaled(ck_loss, loss, msg="loss")
    for name in terms:
        assert_close_scaled(ck_terms[name], terms[name], msg=name)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in checkpointed.named_parameters():
        assert_close_scaled(p.grad, grads[n], msg=f"gradient of {n}")
    weights = dict(plain.named_parameters())
    for n, p in checkpointed.named_parameters():
        assert_close_scaled(p.detach(), weights[n].detach(), msg=f"updated {n}")
    # The recomputation in backward must not update the BatchNorm statistics a second time.
    buffers = dict(plain.named_buffers())
    for n, b in checkpointed.named_buffers():
        if n.endswith("num_batches_tracked"):
            assert b.item() == 1, f"{n} counts {b.item()} batches after one step"
        else:
            assert_close_scaled(b, buffers[n], msg=n)


def _saved_elements(model: nn.Module, x: torch.Tensor) -> int:
    """Elements of the tensors the backbone and offset branch save for backward in one forward pass."""
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, kept = model.backbone(x, keep=model.cfg.offset.branch_stage - 1)
        model.offset_branch(kept)
    return count[0]


def test_activation_checkpointing_keeps_only_module_inputs_and_only_while_training(one_thread):
    model = tiny(ovenet=True).train()
    x = torch.randn(2, 3, 64, 96)
    plain = _saved_elements(model, x)
    model.set_activation_checkpointing(True)
    assert model.activation_checkpointing
    checkpointed = _saved_elements(model, x)
    assert checkpointed < plain / 5, (checkpointed, plain)
    model.eval()  # evaluation and inference run the plain forward
    checkpointed_eval = _saved_elements(model, x)
    assert checkpointed_eval == _saved_elements(model.set_activation_checkpointing(False), x)
    with torch.no_grad():
        plain_logits = model(x).logits_final
        torch.testing.assert_close(model.set_activation_checkpointing(True)(x).logits_final, plain_logits)


def test_memory_levers_are_config_keys_a_run_can_resume_with():
    assert TrainConfig().activation_checkpointing is False and LossConfig().chunked is False
    assert {"train.activation_checkpointing", "loss.chunked"} <= RESUMABLE_KEYS


def test_training_with_the_levers_reaches_the_same_weights(tmp_path, one_thread, monkeypatch):
    """``ovenet train`` wires both levers: six iterations with them end at the plain run's weights and BatchNorm
    statistics, and a plain run resumes with them switched on."""
    from test_train import tiny_config as train_config

    from ovenet import checkpoint
    from ovenet.engine.train import train
    from ovenet.models.ovenet import OVeNet

    switched = []
    original = OVeNet.set_activation_checkpointing

    def spy(self: OVeNet, enabled: bool = True) -> OVeNet:
        switched.append(enabled)
        return original(self, enabled)

    monkeypatch.setattr(OVeNet, "set_activation_checkpointing", spy)
    states = {}
    for levers in (False, True):
        cfg = train_config("model.offset.enabled=true", f"train.activation_checkpointing={levers}",
                           f"loss.chunked={levers}", "loss.type=ohem", "loss.ohem_min_kept=500")
        states[levers] = checkpoint.read(train(cfg, run_dir=tmp_path / str(levers)) / "last.pth")["model"]
    assert switched == [False, True]
    assert states[False].keys() == states[True].keys()
    for name, value in states[False].items():
        assert_close_scaled(states[True][name].double(), value.double(), msg=name)
    resumed = train_config("model.offset.enabled=true", "train.activation_checkpointing=true", "loss.chunked=true",
                           "loss.type=ohem", "loss.ohem_min_kept=500", "train.iters=8")
    train(resumed, resume="auto", run_dir=tmp_path / "False")
