"""Cross-entropy, OHEM and the confidence loss against straightforward reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from ovenet import method
from ovenet.config import LossConfig
from ovenet.errors import ConfigError
from ovenet.losses import CITYSCAPES_CLASS_WEIGHTS, OhemCrossEntropy, build_loss
from ovenet.losses.ce import class_weights
from ovenet.models import SegOutput


def ohem_by_sorting(logits, target, thresh, min_kept, ignore=255, weight=None):
    """The HRNet OHEM definition, written the obvious way (full sort on the valid pixels)."""
    losses = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction="none").flatten()
    valid = target.flatten() != ignore
    prob = torch.softmax(logits, 1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).flatten()
    p_sorted, order = prob[valid].sort()
    threshold = max(p_sorted[min(min_kept, p_sorted.numel() - 1)].item(), thresh)
    kept = losses[valid][order][p_sorted < threshold]
    return kept.mean()


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 10), (0.9, 300), (0.3, 50), (0.99, 5000)])
@pytest.mark.parametrize("weighted", [False, True])
def test_ohem_matches_sorting_reference(thresh, min_kept, weighted):
    logits = torch.randn(2, 19, 16, 20) * 3
    target = torch.randint(0, 19, (2, 16, 20))
    target[:, :3] = 255
    weight = torch.tensor(CITYSCAPES_CLASS_WEIGHTS) if weighted else None
    ours = OhemCrossEntropy(255, thresh, min_kept, weight)(logits, target)
    torch.testing.assert_close(ours, ohem_by_sorting(logits, target, thresh, min_kept, weight=weight))


def test_ohem_all_ignored_is_zero_not_nan():
    loss = OhemCrossEntropy(255, 0.7, 10)(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0


def test_ohem_gradient_only_from_kept_pixels():
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 0, 0, 0] = 10.0  # pixel 0 is easy (p ~ 1), pixels 1, 2 are hard (p = 0.5)
    logits.requires_grad_(True)
    OhemCrossEntropy(255, 0.7, 1)(logits, torch.zeros(1, 1, 3, dtype=torch.long)).backward()
    assert logits.grad[0, :, 0, 0].abs().sum() == 0 and logits.grad[0, :, 0, 1:].abs().sum() > 0


def test_class_weights_validation():
    assert class_weights("cityscapes", 19).shape == (19,)
    with pytest.raises(ConfigError, match="19 numbers"):
        class_weights([1.0, 2.0], 19)


def test_confidence_loss_hand_computed():
    # 1 x 1 x 1 x 3 labels [0, 0, 1]; offset +1 px in x everywhere: seeds read [0, 1, 1].
    target = torch.tensor([[[0, 0, 1]]])
    offsets = torch.zeros(1, 2, 1, 3)
    offsets[:, 0] = 2 / (3 - 1)
    conf = torch.tensor([0.9, 0.2, 0.6]).view(1, 1, 1, 3)
    expected = -(math.log(0.9) + math.log(1 - 0.2) + math.log(0.6)) / 3
    assert method.confidence_loss(conf, offsets, target).item() == pytest.approx(expected, rel=1e-5)


def test_confidence_loss_skips_ignore_and_seeds_on_ignore():
    target = torch.tensor([[[0, 255, 1, 1]]])
    offsets = torch.zeros(1, 2, 1, 4)
    offsets[:, 0] = 2 / 3  # +1 px: pixel 0 reads the ignore pixel 1, pixel 2 reads 1, pixel 3 reads itself
    conf = torch.tensor([0.5, 0.5, 0.7, 0.8]).view(1, 1, 1, 4)
    expected = -(math.log(0.7) + math.log(0.8)) / 2
    assert method.confidence_loss(conf, offsets, target).item() == pytest.approx(expected, rel=1e-5)


def test_seed_labels_follow_the_models_sampling_convention():
    """Labels = column index on a 6x9 map, x offset 0.2 (normalised) everywhere. Exact (zero offset = the pixel):
    x + 0.2 * (9 - 1) / 2 = x + 0.8. Official (grid 2x/8 - 1 + 0.2 read as align_corners=False):
    ((2x/8 + 0.2) * 9 - 1) / 2 = 1.125 x + 0.4. Nearest, clamped to the image."""
    target = torch.arange(9).repeat(1, 6, 1)
    offsets = torch.zeros(1, 2, 6, 9)
    offsets[:, 0] = 0.2
    exact = method.seed_labels(offsets, target, sampling_align_corners=True)[0, 0].tolist()
    official = method.seed_labels(offsets, target, sampling_align_corners=False)[0, 0].tolist()
    assert exact == [min(round(x + 0.8), 8) for x in range(9)] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert official == [min(round(1.125 * x + 0.4), 8) for x in range(9)] == [0, 2, 3, 4, 5, 6, 7, 8, 8]

    # The training loss reads the seed labels in the model's convention (model.offset.sampling).
    conf = torch.rand(1, 1, 6, 9)
    out = SegOutput(logits_initial=torch.randn(1, 9, 6, 9), logits_seed=torch.randn(1, 9, 6, 9),
                    logits_final=torch.randn(1, 9, 6, 9), offsets=offsets, confidence=conf)
    for sampling, flag in (("exact", True), ("official", False)):
        terms = build_loss(LossConfig(type="ce"), 9, sampling=sampling)(out, target)[1]
        expected = method.confidence_loss(conf, offsets, target, sampling_align_corners=flag)
        assert terms["loss_confidence"].item() == pytest.approx(expected.item(), rel=1e-6), sampling
    assert method.confidence_loss(conf, offsets, target, sampling_align_corners=False).item() != pytest.approx(
        method.confidence_loss(conf, offsets, target).item(), rel=1e-3)


def test_confidence_loss_trains_confidence_not_offsets():
    target = torch.randint(0, 3, (1, 8, 8))
    offsets = (torch.randn(1, 2, 2, 2) * 0.3).requires_grad_(True)
    conf = torch.rand(1, 1, 2, 2).requires_grad_(True)
    method.confidence_loss(conf, offsets, target).backward()
    assert offsets.grad is None or offsets.grad.abs().sum() == 0
    assert conf.grad.abs().sum() > 0


def test_semantic_loss_weights_eq5():
    cfg = LossConfig(type="ce", weight_seed=0.25, weight_initial=0.75, confidence="none")
    criterion = build_loss(cfg, num_classes=3)
    logits = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    out = SegOutput(logits_initial=logits[0], logits_seed=logits[1], logits_final=logits[2],
                    offsets=torch.zeros(1, 2, 4, 4), confidence=torch.full((1, 1, 4, 4), 0.5))
    target = torch.randint(0, 3, (1, 8, 8))
    total, terms = criterion(out, target)
    up = [F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=True) for x in logits]
    ce = [F.cross_entropy(x, target) for x in up]
    torch.testing.assert_close(total, ce[2] + 0.25 * ce[1] + 0.75 * ce[0])
    assert terms["loss_confidence"].item() == 0


def test_baseline_loss_is_the_initial_prediction_loss():
    criterion = build_loss(LossConfig(type="ce", aux_weights=[0.4, 1.0]), num_classes=3)
    main, aux = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    total, terms = criterion(SegOutput(logits_initial=main, logits_final=main, aux_logits_initial=aux), target)
    torch.testing.assert_close(total, 0.4 * F.cross_entropy(aux, target) + F.cross_entropy(main, target))
    assert set(terms) == {"loss", "loss_initial"}


def test_weight_semantic_scales_the_semantic_loss_of_baseline_and_ovenet():
    target = torch.randint(0, 3, (1, 8, 8))
    logits = [torch.randn(1, 3, 4, 4) for _ in range(3)]
    conf = torch.rand(1, 1, 4, 4)
    out = SegOutput(logits_initial=logits[0], logits_seed=logits[1], logits_final=logits[2],
                    offsets=torch.zeros(1, 2, 4, 4), confidence=conf)
    plain = build_loss(LossConfig(type="ce"), num_classes=3)(out, target)[1]
    doubled = build_loss(LossConfig(type="ce", weight_semantic=2.0), num_classes=3)(out, target)[1]
    semantic = plain["loss"] - plain["loss_confidence"]
    torch.testing.assert_close(doubled["loss"], 2 * semantic + plain["loss_confidence"])
    baseline = SegOutput(logits_initial=logits[0], logits_final=logits[0])
    one = build_loss(LossConfig(type="ce"), num_classes=3)(baseline, target)[0]
    two = build_loss(LossConfig(type="ce", weight_semantic=2.0), num_classes=3)(baseline, target)[0]
    torch.testing.assert_close(two, 2 * one)
