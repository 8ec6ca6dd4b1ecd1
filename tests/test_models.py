"""Model structure, parameter counts against the official code, and the behaviour of the offset head."""

import pytest
import torch
from helpers import TINY, assert_close_scaled

from ovenet import method
from ovenet.config import ModelConfig, OffsetConfig
from ovenet.models import SegOutput, build_model


def count(cfg: ModelConfig) -> float:
    with torch.device("meta"):
        model = build_model(cfg)
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


# Counts of the official HRNet-Semantic-Segmentation / OVeNet code, 19 classes.
@pytest.mark.parametrize("arch,millions", [
    ("hrnetv2_w18_small_v1", 1.54), ("hrnetv2_w18_small_v2", 3.94), ("hrnetv2_w18", 9.64),
    ("hrnetv2_w32", 29.55), ("hrnetv2_w48", 65.86),
])
def test_hrnetv2_parameter_counts(arch, millions):
    assert count(ModelConfig(arch=arch, head="fcn", offset=OffsetConfig(enabled=False))) == millions


@pytest.mark.parametrize("branch,millions", [(None, 70.37), (4, 103.31), (3, 114.98), (2, 116.19)])
def test_w48_ocr_parameter_counts(branch, millions):
    offset = OffsetConfig(enabled=False) if branch is None else OffsetConfig(branch_stage=branch)
    assert count(ModelConfig(arch="hrnetv2_w48", head="ocr", offset=offset)) == millions


def test_branch_modules_override_changes_the_copy():
    default = count(ModelConfig(offset=OffsetConfig(branch_stage=4)))
    three = count(ModelConfig(offset=OffsetConfig(branch_stage=4, branch_modules=[3])))
    assert three > default


@pytest.mark.parametrize("arch", ["hrnetv2_w18_small_v1", "hrnetv2_w18_small_v2", "hrnetv2_w18"])
@pytest.mark.parametrize("head", ["fcn", "ocr"])
def test_output_shapes_any_size(arch, head):
    model = build_model(ModelConfig(arch=arch, head=head, num_classes=7, ocr_mid_channels=16, ocr_key_channels=8))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 70, 97))  # not divisible by 32
    assert isinstance(out, SegOutput)
    h, w = 18, 25  # ceil(70/4), ceil(97/4)
    for name in ("logits_initial", "logits_seed", "logits_final"):
        assert getattr(out, name).shape == (2, 7, h, w)
    assert out.offsets.shape == (2, 2, h, w) and out.confidence.shape == (2, 1, h, w)
    assert (out.aux_logits_final is not None) == (head == "ocr")


def test_w48_ocr_forward_shapes():
    model = build_model(ModelConfig(arch="hrnetv2_w48", num_classes=19)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.logits_final.shape == (1, 19, 16, 16) and out.aux_logits_final.shape == (1, 19, 16, 16)


def test_offsets_bounded_by_tau_and_confidence_in_unit_range():
    model = build_model(ModelConfig(**TINY, offset=OffsetConfig(tau=0.3))).train()
    with torch.no_grad():  # push the head to saturation: offsets must still stay within tau
        model.offset_head[-1].weight.mul_(1e4)
        out = model(torch.randn(2, 3, 64, 64))
    assert out.offsets.abs().max() <= 0.3 + 1e-6
    assert out.offsets.abs().max() > 0.29  # saturated, so the bound is actually exercised
    assert 0 <= out.confidence.min() and out.confidence.max() <= 1


def test_zero_offset_seed_prediction_equals_initial_exactly():
    logits = torch.randn(2, 5, 9, 13)
    zero = torch.zeros(2, 2, 9, 13)
    assert torch.equal(method.resample(logits, zero, align_corners=True), logits)
    # The official convention (grid for align_corners=True sampled with False) is not the identity.
    assert (method.resample(logits, zero, align_corners=False) - logits).abs().max() > 0.1


@pytest.mark.parametrize("align_corners", [True, False])
def test_sampler_matches_grid_sample(align_corners):
    """Our gather-based sampler is grid_sample(bilinear, border) on the official grid 2j/(W-1) - 1 + o."""
    values, offsets = torch.randn(2, 4, 7, 11), torch.randn(2, 2, 7, 11) * 0.4
    h, w = 7, 11
    xs, ys = torch.linspace(-1, 1, w), torch.linspace(-1, 1, h)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).unsqueeze(0) + offsets.permute(0, 2, 3, 1)
    ref = torch.nn.functional.grid_sample(values, grid.clamp(-1, 1), mode="bilinear", padding_mode="border",
                                          align_corners=align_corners)
    assert_close_scaled(method.resample(values, offsets, align_corners), ref)


def test_zero_offset_model_gives_seed_equal_initial():
    model = build_model(ModelConfig(**TINY)).eval()
    with torch.no_grad():
        model.offset_head[-1].weight.zero_()
        model.offset_head[-1].bias.zero_()
        out = model(torch.randn(1, 3, 64, 64))
    assert torch.equal(out.offsets, torch.zeros_like(out.offsets))
    assert torch.equal(out.logits_seed, out.logits_initial)
    assert torch.equal(out.aux_logits_seed, out.aux_logits_initial)
    assert torch.allclose(out.confidence, torch.full_like(out.confidence, 0.5))
    torch.testing.assert_close(out.logits_final, out.logits_initial)


def test_resample_moves_by_the_offset():
    # A one-pixel shift to the right in normalised units is 2/(W-1).
    logits = torch.arange(20.0).view(1, 1, 4, 5)
    offsets = torch.zeros(1, 2, 4, 5)
    offsets[:, 0] = 2 / (5 - 1)
    out = method.resample(logits, offsets)
    assert torch.equal(out[..., :4], logits[..., 1:])
    assert torch.equal(out[..., 4], logits[..., 4])  # clamped at the border


def test_fusion_equation():
    init, seed, conf = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), torch.rand(1, 1, 2, 2)
    torch.testing.assert_close(method.fuse(init, seed, conf), init + conf * (seed - init))


def test_gradient_reaches_offsets_through_sampling():
    model = build_model(ModelConfig(**TINY)).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.logits_seed.square().mean().backward()
    grad = model.offset_head[-1].weight.grad
    assert grad is not None and grad[:2].abs().sum() > 0  # rows 0-1 produce the offsets


def test_baseline_has_no_offset_branch():
    model = build_model(ModelConfig(**TINY, offset=OffsetConfig(enabled=False))).eval()
    assert model.offset_branch is None and model.offset_head is None and not model.is_ovenet
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.logits_seed is None and out.offsets is None
    assert out.logits_final is out.logits_initial
    ovenet = build_model(ModelConfig(**TINY))
    own = set(model.state_dict())
    assert own < set(ovenet.state_dict())  # same network plus the offset branch: one flag apart


@pytest.mark.parametrize("branch", [2, 3, 4])
def test_branch_stages_run(branch):
    model = build_model(ModelConfig(**TINY, offset=OffsetConfig(branch_stage=branch))).eval()
    assert hasattr(model.offset_branch, f"stage{branch}")
    assert not hasattr(model.offset_branch, f"stage{branch - 1}")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).offsets.shape == (1, 2, 16, 16)


def test_probability_fusion_returns_log_probabilities():
    model = build_model(ModelConfig(**TINY, offset=OffsetConfig(fusion="probs"))).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    for t in (out.logits_initial, out.logits_seed, out.logits_final):
        torch.testing.assert_close(t.exp().sum(1), torch.ones(1, 16, 16), atol=1e-5, rtol=0)


def test_iterative_refinement_changes_offsets():
    torch.manual_seed(1)
    plain = build_model(ModelConfig(**TINY)).eval()
    refined = build_model(ModelConfig(**TINY, offset=OffsetConfig(iterative_refinement=2))).eval()
    refined.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), refined(x)
    torch.testing.assert_close(a.logits_initial, b.logits_initial)
    assert (a.offsets - b.offsets).abs().max() > 1e-4


def test_freeze_main_trains_only_the_offset_head():
    model = build_model(ModelConfig(**TINY, freeze_main=True)).train()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"offset_branch", "offset_head"}
    assert not model.backbone.training and not model.decode_head.training and model.offset_head.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.backbone.bn1.running_mean)  # frozen statistics stay frozen


# --- init and recipe settings of the two official codes --------------------------------------------------------------

def _convs(model: torch.nn.Module) -> list[tuple[str, torch.nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def _assert_official_normal(name: str, weight: torch.Tensor) -> None:
    # N(0, 1e-3): the sample std is within 10% for layers big enough (relative std error 1/sqrt(2n) <= 2.7%),
    # and no weight lies beyond 7 sigma. PyTorch's default (kaiming uniform, std 1/sqrt(3 fan_in)) is >= 1e-2 here.
    if weight.numel() >= 700:
        assert abs(weight.std().item() - 1e-3) <= 1e-4, f"{name}: std {weight.std().item():.3g}, expected 1e-3"
    assert weight.abs().max().item() <= 7e-3, f"{name}: |w| up to {weight.abs().max().item():.3g}"


def test_fcn_model_initialises_every_conv_as_the_plain_hrnet_code():
    # Thesis branched_seg_hrnet.py / upstream seg_hrnet.py init_weights: every conv N(0, 1e-3), the class layer
    # (last_layer) and the offset head (offset_layer) included; every BN (1, 0).
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, head="fcn"))
    convs = dict(_convs(model))
    assert {"decode_head.0", "decode_head.3", "offset_head.0", "offset_head.3"} <= set(convs)
    for name, conv in convs.items():
        _assert_official_normal(name, conv.weight.detach())
    for name in ("decode_head.3", "offset_head.3"):  # the class layer and the offset/confidence output
        assert convs[name].weight.numel() >= 700
    pooled = torch.cat([c.weight.detach().flatten() for c in convs.values()])
    assert abs(pooled.std().item() - 1e-3) <= 2e-5  # > 2e5 weights: relative std error < 0.2%
    for name, bn in model.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight)), name
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias)), name


def test_ocr_model_keeps_default_init_where_the_official_ocr_code_does():
    # seg_hrnet_ocr.py init_weights skips modules named with 'cls', 'aux' or 'ocr': the OCR head, the aux head and
    # the offset head (aux_head_offset). The backbone and the offset branch are N(0, 1e-3).
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, head="ocr"))
    kept = [(n, c) for n, c in _convs(model) if n.startswith(("decode_head.", "offset_head."))]
    assert {"decode_head.cls_head", "decode_head.aux_head.3", "decode_head.conv3x3_ocr.0", "offset_head.3"} <= {
        n for n, _ in kept}
    for name, conv in _convs(model):
        weight = conv.weight.detach()
        if (name, conv) not in kept:
            _assert_official_normal(name, weight)
            continue
        fan_in = weight[0].numel()
        default_std = (3 * fan_in) ** -0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert weight.abs().max().item() <= fan_in ** -0.5 * (1 + 1e-6), name
        tolerance = 0.1 if weight.numel() >= 700 else 0.5
        assert abs(weight.std().item() - default_std) <= tolerance * default_std, name


def test_recipes_carry_their_official_codes_bn_momentum_and_align_corners():
    # FCN recipes: the plain-HRNet code (BN_MOMENTUM 0.01, bilinear without align_corners, i.e. False).
    # OCR recipes: seg_hrnet_ocr.py (BN_MOMENTUM 0.1, MODEL.ALIGN_CORNERS True).
    from ovenet.config import CONFIG_DIR, load_config

    seen = {"fcn": set(), "ocr": set()}
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        if path.name.startswith("_") or path.stem == "quickstart":  # quickstart: a toy, not a recipe
            continue
        model = load_config(path).model
        expected = (0.01, False) if model.head == "fcn" else (0.1, True)
        assert (model.bn_momentum, model.align_corners) == expected, path.stem
        seen[model.head].add(path.stem)
    for dataset in ("cityscapes", "acdc", "ade20k"):
        assert {f"{dataset}_hrnetv2_w48", f"{dataset}_hrnetv2_w48_ovenet"} <= seen["fcn"]
        assert {f"{dataset}_hrnetv2_w48_ocr", f"{dataset}_hrnetv2_w48_ocr_ovenet"} <= seen["ocr"]
    assert "camvid_hrnetv2_w18s_ovenet" in seen["fcn"]
    # The layers really get the momentum.
    with torch.device("meta"):
        built = build_model(load_config("cityscapes_hrnetv2_w48").model)
    assert {m.momentum for m in built.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    assert built.align_corners is False


@pytest.mark.parametrize("head", ["fcn", "ocr"])
def test_baseline_and_ovenet_from_one_seed_share_the_main_body(head):
    """Paired comparisons: the offset branch is built after the main body is initialised, so it does not shift
    the random stream that initialises the backbone and decode head."""
    torch.manual_seed(7)
    baseline = build_model(ModelConfig(**TINY, head=head, offset=OffsetConfig(enabled=False))).state_dict()
    torch.manual_seed(7)
    ovenet = build_model(ModelConfig(**TINY, head=head)).state_dict()
    assert set(baseline) < set(ovenet)
    for key, value in baseline.items():
        assert torch.equal(value, ovenet[key]), key


def test_zero_offset_control_reads_the_pixel_itself_and_keeps_the_branch():
    cfg = ModelConfig(**TINY, head="fcn")
    cfg.offset.zero_offsets = True
    model = build_model(cfg).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert torch.equal(out.offsets, torch.zeros_like(out.offsets))
    assert torch.equal(out.logits_seed, out.logits_initial)  # S_s = S_i: the offsets cannot move the seeds
    (out.logits_final.sum() + out.confidence.sum()).backward()
    head = model.offset_head[-1].weight.grad
    assert head is not None and head[2].abs().sum() > 0  # the confidence channel still trains
