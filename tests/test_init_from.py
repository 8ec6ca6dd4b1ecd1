"""model.init_from (trained weights for ablation "Fr") and the no-tensor-loaded errors of every weight loader."""

import logging

import pytest
import torch
import yaml
from helpers import assert_close_scaled, tiny, tiny_config
from test_train import tiny_config as train_config

from ovenet import checkpoint, weights
from ovenet.config import Config
from ovenet.engine.train import train
from ovenet.errors import CheckpointError
from ovenet.models import build_model
from ovenet.official import config_from_official, convert_state_dict

MAIN = ("backbone.", "decode_head.")
OFFSET = ("offset_branch.", "offset_head.")


def _save_baseline(tmp_path, num_classes: int = 5):
    cfg = Config(model=tiny_config(ovenet=False, num_classes=num_classes))
    baseline = tiny(ovenet=False) if num_classes == 5 else build_model(cfg.model)
    return baseline, checkpoint.save(tmp_path / "baseline_best.pth", baseline, cfg, iteration=3)


def _built_with_weights(cfg):
    model = build_model(cfg)
    weights.load_initial_weights(model, cfg)
    return model


def _fr_config(init_from):
    cfg = tiny_config(ovenet=True)
    cfg.freeze_main = True
    cfg.init_from = str(init_from)
    return cfg


def test_init_from_baseline_gives_the_frozen_body_its_trained_weights(tmp_path, caplog):
    baseline, path = _save_baseline(tmp_path)
    cfg = _fr_config(path)
    torch.manual_seed(1)
    fresh = build_model(tiny_config(ovenet=True)).state_dict()  # same seed: the initialisation init_from starts on
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="ovenet"):
        model = _built_with_weights(cfg)
    own, trained = model.state_dict(), baseline.state_dict()
    main = [k for k in own if k.startswith(MAIN)]
    offset = [k for k in own if k.startswith(OFFSET)]
    assert main and offset and len(main) + len(offset) == len(own)
    for k in main:
        assert torch.equal(own[k], trained[k]), k
    for k in offset:
        assert torch.equal(own[k], fresh[k]), k
    assert any(not torch.equal(fresh[k], trained[k]) for k in main if fresh[k].is_floating_point())

    # The report names what was loaded and what was left; the log line says it with counts and examples.
    report = weights.load_init_from(build_model(cfg), path)
    assert report["kind"] == "ovenet checkpoint"
    assert report["loaded"] == sorted(main) and report["skipped"] == [] and report["missing"] == offset
    line = next(r.getMessage() for r in caplog.records if "model.init_from" in r.getMessage())
    assert f"{len(main)} tensors loaded" in line and f"{len(offset)} of the model's not in the file" in line
    assert "offset_branch." in line and "\n" not in line

    # Frozen parts keep eval mode (BN statistics fixed, OCR dropout off) under train(); the offset parts train.
    model.train()
    assert not model.backbone.training and not model.decode_head.training and model.offset_branch.training
    assert not any(p.requires_grad for m in model.main_modules() for p in m.parameters())


def test_init_from_runs_after_pretrained_and_wins(tmp_path):
    baseline, path = _save_baseline(tmp_path)
    imagenet = {k.removeprefix("backbone."): torch.full_like(v, 0.25) if v.is_floating_point() else v
                for k, v in build_model(tiny_config(ovenet=False)).state_dict().items() if k.startswith("backbone.")}
    torch.save(imagenet, tmp_path / "imagenet.pth")
    cfg = _fr_config(path)
    cfg.pretrained = str(tmp_path / "imagenet.pth")
    reports = weights.load_initial_weights(model := build_model(cfg), cfg)
    assert set(reports) == {"pretrained", "init_from"}
    own = model.state_dict()
    w = "backbone.stage4.0.branches.0.0.conv1.weight"
    assert torch.equal(own[w], baseline.state_dict()[w])  # the trained baseline, not ImageNet
    assert (own["offset_branch.stage4.0.branches.0.0.conv1.weight"] == 0.25).all()  # the branch keeps ImageNet


def test_init_from_skips_other_shapes_and_warns_about_untrained_frozen_tensors(tmp_path, caplog):
    _, path = _save_baseline(tmp_path, num_classes=7)  # another dataset: only the classifier differs
    cfg = _fr_config(path)
    with caplog.at_level(logging.INFO, logger="ovenet"):
        reports = weights.load_initial_weights(build_model(cfg), cfg)
    report = reports["init_from"]
    assert report["skipped"] and all(k.startswith("decode_head.") for k in report["skipped"])
    assert len(report["mismatched"]) == len(report["skipped"]) and "(7," in report["mismatched"][0]
    assert any(k.startswith("backbone.") for k in report["loaded"])
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "frozen tensors are not in model.init_from" in warning[0]
    assert "decode_head.cls_head" in warning[0]


def _official(fixture, tmp_path, **model):
    cfg = config_from_official(yaml.safe_load(fixture["official_yaml"])).model
    for key, value in model.items():
        setattr(cfg, key, value)
    torch.save(fixture["checkpoint"], tmp_path / "final_state.pth")
    cfg.init_from = str(tmp_path / "final_state.pth")
    return cfg


def test_init_from_official_final_state(official_fixture, tmp_path):
    cfg = _official(official_fixture, tmp_path, freeze_main=True)
    model = _built_with_weights(cfg).eval()
    report = weights.load_init_from(build_model(cfg), cfg.init_from)
    converted = convert_state_dict(official_fixture["checkpoint"])
    assert report["kind"] == "official checkpoint" and report["missing"] == [] and report["skipped"] == []
    assert report["loaded"] == sorted(converted)
    with torch.no_grad():
        out = model(official_fixture["input"])
    assert_close_scaled(out.logits_final, official_fixture["eval_outputs"]["s_f"][1], msg="s_f")


def test_init_from_official_into_a_baseline_takes_the_main_body_only(official_fixture, tmp_path):
    cfg = _official(official_fixture, tmp_path)
    cfg.offset.enabled = False
    model = build_model(cfg)
    report = weights.load_init_from(model, cfg.init_from)
    converted = convert_state_dict(official_fixture["checkpoint"])
    assert report["skipped"] and all(k.startswith(OFFSET) for k in report["skipped"])
    assert sorted(report["skipped"] + report["loaded"]) == sorted(converted) and report["missing"] == []
    own = model.state_dict()
    assert all(torch.equal(own[k], converted[k]) for k in report["loaded"])


def test_weight_files_that_load_nothing_are_one_line_errors(tmp_path):
    _, ovenet_ckpt = _save_baseline(tmp_path)
    cfg = tiny_config(ovenet=True)
    # An ovenet checkpoint given as ImageNet weights used to load 0 tensors without a word.
    with pytest.raises(CheckpointError, match=r"baseline_best.pth.*load nothing.*model.init_from") as e:
        weights.load_pretrained_backbone(build_model(cfg), ovenet_ckpt)
    assert "\n" not in str(e.value)
    cfg.pretrained = str(ovenet_ckpt)
    with pytest.raises(CheckpointError, match=r"baseline_best.pth.*load nothing"):
        _built_with_weights(cfg)
    cfg.pretrained = None
    # ImageNet classification weights (backbone names without the prefix) given as init_from.
    imagenet = {k.removeprefix("backbone."): v for k, v in build_model(cfg).state_dict().items()
                if k.startswith("backbone.")}
    torch.save(imagenet, tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError, match=r"imagenet.pth.*no tensor with the model's names.*model.pretrained") as e:
        weights.load_init_from(build_model(cfg), tmp_path / "imagenet.pth")
    assert "\n" not in str(e.value)
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth.*load nothing"):
        weights.load_pretrained_backbone(build_model(cfg), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"model.init_from '.*missing.pth' does not exist"):
        weights.load_init_from(build_model(cfg), tmp_path / "missing.pth")


def test_frozen_main_body_has_ocr_dropout_off_in_train_mode():
    cfg = tiny_config(ovenet=True)
    cfg.freeze_main, cfg.ocr_dropout = True, 0.5
    model = build_model(cfg).train()
    dropouts = [m for m in model.decode_head.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert dropouts and not any(m.training for m in dropouts)
    x = torch.randn(2, 3, 64, 64)
    a, b = model(x), model(x)
    torch.testing.assert_close(a.logits_initial, b.logits_initial, rtol=0, atol=0)  # no random channel mask


def test_fr_training_run_starts_from_the_baseline_and_keeps_it_frozen(tmp_path, one_thread):
    """The engine applies model.init_from: an "Fr" run trained on a baseline's best.pth ends with the baseline's
    backbone and decode head bit for bit (weights and BN statistics), and its log says what init_from loaded."""
    base_dir = train(train_config("model.offset.enabled=false", "train.iters=2"), run_dir=tmp_path / "base")
    fr = train_config("train.iters=2", "model.freeze_main=true", f"model.init_from={base_dir / 'best.pth'}")
    fr_dir = train(fr, run_dir=tmp_path / "fr")
    baseline, trained = checkpoint.read(base_dir / "best.pth")["model"], checkpoint.read(fr_dir / "last.pth")["model"]
    for key, value in trained.items():
        if key.startswith(MAIN):
            assert torch.equal(value, baseline[key]), key
    assert "model.init_from" in (fr_dir / "train.log").read_text()
