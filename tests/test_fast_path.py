"""Speed options never change results: bf16 autocast + channels_last vs the fp32 eager reference."""

import pytest
import torch
from helpers import TINY

from ovenet.config import LossConfig, ModelConfig
from ovenet.losses import build_loss
from ovenet.models import build_model


@pytest.mark.parametrize("head", ["fcn", "ocr"])
def test_channels_last_is_numerically_the_same(head):
    model = build_model(ModelConfig(**TINY, head=head)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    for name, t in ref.tensors().items():
        torch.testing.assert_close(getattr(fast, name), t, atol=1e-4, rtol=1e-4, msg=name)


def test_bf16_autocast_within_bf16_tolerance():
    model = build_model(ModelConfig(**TINY)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model.to(memory_format=torch.channels_last)(x)
    for name in ("logits_final", "logits_seed", "offsets", "confidence"):
        a, b = getattr(fast, name).float(), getattr(ref, name)
        scale = b.abs().max().clamp(min=1e-3)
        assert ((a - b).abs().max() / scale) < 0.05, name
    agree = (fast.logits_final.argmax(1) == ref.logits_final.argmax(1)).float().mean()
    assert agree > 0.95


def test_bf16_loss_and_gradients_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).train()
    criterion = build_loss(LossConfig(type="ohem", ohem_min_kept=100), num_classes=5)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(autocast: bool):
        model.load_state_dict(state)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = criterion(model(x), y)
        loss.backward()
        return loss.detach(), model.offset_head[-1].weight.grad.clone()

    (loss32, g32), (loss16, g16) = run(False), run(True)
    assert abs(loss16 - loss32) / loss32 < 0.02
    cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert cos > 0.98


def test_seed_sampling_and_fusion_run_in_fp32_under_bf16_autocast():
    """Under autocast the logits arrive in bf16; resampling them with bf16 bilinear weights put ~2% of error into
    the offsets' gradient. The sampler and the fusion compute in fp32: given the same (bf16) logits, outputs and
    the offset gradient equal the fp32 computation to float precision."""
    from ovenet import method

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 24, 32, generator=g) * 4).to(torch.bfloat16)
    raw_offsets = torch.randn(2, 2, 24, 32, generator=g) * 0.3
    confidence = torch.rand(2, 1, 24, 32, generator=g)
    weight = torch.randn(2, 5, 24, 32, generator=g)

    def run(autocast: bool):
        offsets = raw_offsets.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            values = logits if autocast else logits.float()
            seed = method.resample(values, offsets)
            final = method.fuse(values, seed, confidence)
        (final * weight).sum().backward()
        return seed, final, offsets.grad

    (seed32, final32, grad32), (seed16, final16, grad16) = run(False), run(True)
    assert seed16.dtype == final16.dtype == torch.float32
    for name, a, b in (("seed", seed16, seed32), ("final", final16, final32), ("offset grad", grad16, grad32)):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 1e-5 * scale, name
