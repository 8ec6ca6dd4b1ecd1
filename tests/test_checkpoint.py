"""ovenet checkpoints: round trip, clear errors, ImageNet-pretrained backbone loading."""

import pytest
import torch
from helpers import TINY

from ovenet import checkpoint, weights
from ovenet.config import Config, ModelConfig, OffsetConfig
from ovenet.errors import CheckpointError
from ovenet.models import build_model
from ovenet.models.hrnet import HRNetV2, arch_spec


def _cfg(**model) -> Config:
    return Config(model=ModelConfig(**{**TINY, **model}))


def test_save_load_roundtrip(tmp_path):
    cfg = _cfg()
    model = build_model(cfg.model).eval()
    path = checkpoint.save(tmp_path / "m.pth", model, cfg, iteration=7)
    loaded = checkpoint.load(path)
    assert not loaded.training and loaded.config.model == cfg.model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits_final, model(x).logits_final, rtol=0, atol=0)
    assert checkpoint.read(path)["iteration"] == 7
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    cfg = _cfg()
    path = checkpoint.save(tmp_path / "m.pth", build_model(cfg.model), cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.pth' is a damaged or incomplete PyTorch file"):
        checkpoint.load(path)


def test_random_bytes_are_not_a_checkpoint_and_pickles_are_not_weights(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert message == (f"checkpoint '{path}' is not a checkpoint (not a file written by torch.save); give a .pth "
                       "from ovenet train or convert-official")
    assert "weights_only" not in message and "\n" not in message
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "whole.pth")  # a pickled module, not weights
    with pytest.raises(CheckpointError, match="holds pickled Python objects besides tensors"):
        checkpoint.load(tmp_path / "whole.pth")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pth")
    torch.save({"model.conv1.weight": torch.zeros(1)}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="convert-official"):
        checkpoint.load(tmp_path / "official.pth")


def test_class_count_mismatch_names_the_keys(tmp_path):
    cfg = _cfg()
    path = checkpoint.save(tmp_path / "m.pth", build_model(cfg.model), cfg)
    ckpt = checkpoint.read(path)
    model = build_model(ModelConfig(**{**TINY, "num_classes": 7}))
    with pytest.raises(CheckpointError, match=r"shape mismatch \(e.g. decode_head.cls_head.weight"):
        checkpoint.load_state(model, ckpt["model"], "checkpoint")


def test_inference_overrides_on_load(tmp_path):
    cfg = _cfg()
    path = checkpoint.save(tmp_path / "m.pth", build_model(cfg.model), cfg)
    model = checkpoint.load(path, overrides=["model.offset.sampling=official"])
    assert model.config.model.offset.sampling == "official" and not model.sampling_align_corners


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "last.pth"
    checkpoint.atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def _imagenet_state(arch: str) -> dict:
    """An HRNet-Image-Classification style state dict: backbone keys plus classification-only modules."""
    torch.manual_seed(3)
    backbone = HRNetV2(arch_spec(arch))
    for p in backbone.parameters():
        p.data.normal_()
    state = dict(backbone.state_dict())
    state["incre_modules.0.0.conv1.weight"] = torch.zeros(4, 4, 1, 1)
    state["classifier.weight"] = torch.zeros(1000, 2048)
    return state


@pytest.mark.parametrize("branch", [3, 4])
def test_pretrained_backbone_also_initialises_offset_branch(tmp_path, branch):
    arch = "hrnetv2_w18_small_v2"  # stage3 has 3 modules, stage4 2: the branch copies them all
    state = _imagenet_state(arch)
    torch.save(state, tmp_path / "imagenet.pth")
    model = build_model(ModelConfig(arch=arch, num_classes=5, offset=OffsetConfig(branch_stage=branch),
                                    ocr_mid_channels=16, ocr_key_channels=8))
    report = weights.load_pretrained_backbone(model, tmp_path / "imagenet.pth")
    own = model.state_dict()
    assert torch.equal(own["backbone.stage4.1.branches.0.0.conv1.weight"],
                       state["stage4.1.branches.0.0.conv1.weight"])
    assert torch.equal(own["offset_branch.stage4.0.fuse_layers.0.1.0.weight"], state["stage4.0.fuse_layers.0.1.0.weight"])
    assert (f"offset_branch.stage{branch}.0.branches.0.0.conv1.weight" in report["loaded"])
    assert not any(k.startswith("offset_branch.stage2") for k in report["loaded"])
    assert "classifier.weight" in report["skipped"] and "incre_modules.0.0.conv1.weight" in report["skipped"]
    assert report["missing"] == []


def test_pretrained_missing_file_is_clear(tmp_path):
    model = build_model(ModelConfig(**TINY))
    with pytest.raises(CheckpointError, match="imagenet.pth.*model.pretrained"):
        weights.load_pretrained_backbone(model, tmp_path / "imagenet.pth")
