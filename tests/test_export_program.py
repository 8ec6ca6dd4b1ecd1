"""torch.export: a .pt2 program with dynamic batch, height and width, equal to eager PyTorch."""

import pytest
import torch
from helpers import assert_close_scaled

from ovenet import checkpoint
from ovenet.config import Config, ModelConfig, OffsetConfig
from ovenet.errors import OvenetError
from ovenet.export import export_program
from ovenet.models import build_model


def test_program_matches_eager_at_other_sizes(tmp_path):
    cfg = ModelConfig(arch="hrnetv2_w18_small_v1", num_classes=5, ocr_mid_channels=16, ocr_key_channels=8,
                      offset=OffsetConfig(tau=1.0))
    model = build_model(cfg).eval()
    with torch.no_grad():  # long offsets: a sampling grid frozen at the export size would show
        model.offset_head[-1].bias.copy_(torch.tensor([1.5, -1.0, 0.0]))
    path = export_program(model, tmp_path / "m.pt2")
    program = torch.export.load(str(path)).module()
    for shape in ((1, 3, 67, 101), (3, 3, 40, 200)):
        x = torch.randn(shape)
        with torch.no_grad():
            logits, offsets, confidence = program(x)
            ref = model(x)
        assert logits.shape[-2:] == ((shape[2] + 3) // 4, (shape[3] + 3) // 4)
        assert offsets.abs().max() > 0.5  # about 0.9 tau: many pixels away
        for got, want in ((logits, ref.logits_final), (offsets, ref.offsets), (confidence, ref.confidence)):
            assert_close_scaled(got, want)


def test_baseline_checkpoint_and_refusals(tmp_path):
    cfg = Config(model=ModelConfig(arch="hrnetv2_w18_small_v1", head="fcn", num_classes=4,
                                   offset=OffsetConfig(enabled=False)))
    ckpt = checkpoint.save(tmp_path / "b.pth", build_model(cfg.model), cfg)
    path = export_program(ckpt, tmp_path / "b.pt2")
    (logits,) = torch.export.load(str(path)).module()(torch.randn(1, 3, 48, 64))
    assert logits.shape == (1, 4, 12, 16)
    with pytest.raises(OvenetError, match="already exists"):
        export_program(ckpt, path)
    with pytest.raises(OvenetError, match="need an OVeNet model"):
        export_program(ckpt, tmp_path / "c.pt2", outputs=("logits", "offsets"))
