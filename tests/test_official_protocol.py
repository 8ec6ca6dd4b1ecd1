"""eval.mode "official": the authors' multi-scale test (official cityscapes.py:125-178), checked against a
reference built by hand from a toy model whose logits are known in closed form."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_scaled, tiny
from torch import Tensor, nn

from ovenet.cli.main import build_parser
from ovenet.config import load_config
from ovenet.data.transforms import resize_image
from ovenet.errors import OvenetError
from ovenet.inference import infer_logits, scaled_size

WEIGHTS = torch.tensor([1.0, -0.5, 0.8, 0.3])
CONTEXT = torch.tensor([0.0, 2.0, -1.5, 3.0])


def toy_logits(x: Tensor) -> Tensor:
    """A per-pixel term plus a global one (each class weighs the mean of channel 0 over the whole input), like
    OCR's image-level context: padding, or a different window layout, changes every logit of a window."""
    local = x[:, [0, 1, 2, 0]] * WEIGHTS.view(1, 4, 1, 1)
    return local + x[:, :1].mean((2, 3), keepdim=True) * CONTEXT.view(1, 4, 1, 1)


class ToyModel(nn.Module):
    """Full-resolution outputs (no upsampling inside a window): logits from :func:`toy_logits` times ``gain``,
    offsets a constant (0.1, -0.2) in window-normalised coordinates, confidence sigmoid(channel 1)."""

    align_corners = False
    num_classes = 4

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = gain

    def forward(self, x: Tensor) -> SimpleNamespace:
        offsets = x.new_tensor([0.1, -0.2]).view(1, 2, 1, 1).expand(x.shape[0], 2, *x.shape[-2:])
        return SimpleNamespace(logits_final=toy_logits(x) * self.gain, logits_initial=None, logits_seed=None,
                               offsets=offsets, confidence=torch.sigmoid(x[:, 1:2]))


@pytest.fixture(scope="module")
def image() -> Tensor:
    return torch.randn(1, 3, 10, 14, generator=torch.Generator().manual_seed(0))


CROP = (8, 10)
# Scale -> (scaled size, window row starts, window column starts), worked out by hand for a 10x14 image:
# long side round(14 * s), short side round(10 * long / 14); scales > 1 in 8x10 windows with stride = crop,
# the last window shifted back to end at the border.
LAYOUT = {
    0.5: ((5, 7), None, None),
    1.0: ((10, 14), None, None),
    1.5: ((15, 21), [0, 7], [0, 10, 11]),
}


def reference(image: Tensor, scales: list[float], flip: bool, gain: float = 1.0) -> Tensor:
    """The official protocol written out: per window exp(mean of plain and mirrored logits), windows averaged in
    exp space, every scale resized back to the image and summed; returned as log(sum / number of scales)."""
    height, width = image.shape[-2:]

    def window_exp(window: Tensor) -> Tensor:
        logits = toy_logits(window) * gain
        if flip:
            logits = (logits + toy_logits(window.flip(-1)).flip(-1) * gain) / 2
        return logits.double().exp()

    total = torch.zeros(1, 4, height, width, dtype=torch.float64)
    for scale in scales:
        size, row_starts, col_starts = LAYOUT[scale]
        x = image if size == (height, width) else resize_image(image, size)
        if row_starts is None:
            per_scale = window_exp(x)
        else:
            summed = torch.zeros(1, 4, *size, dtype=torch.float64)
            count = torch.zeros(1, 1, *size, dtype=torch.float64)
            for top in row_starts:
                for left in col_starts:
                    region = (slice(None), slice(None), slice(top, top + CROP[0]), slice(left, left + CROP[1]))
                    summed[region] += window_exp(x[region])
                    count[region] += 1
            assert bool((count > 0).all())  # the hand-made layout covers the scaled image
            per_scale = summed / count
        total += F.interpolate(per_scale, size=(height, width), mode="bilinear", align_corners=False)
    return torch.log(total / len(scales))


@pytest.mark.parametrize("flip", [False, True])
def test_official_mode_matches_the_hand_built_reference(image, flip):
    scales = [0.5, 1.0, 1.5]
    out = infer_logits(ToyModel(), image, mode="official", crop_size=CROP, scales=scales, flip=flip)
    expected = reference(image, scales, flip)
    assert_close_scaled(out["logits"], expected.float())
    assert torch.equal(out["logits"].argmax(1), expected.argmax(1))


def test_the_scaled_sizes_follow_the_official_long_side_rule():
    for scale, (size, _, _) in LAYOUT.items():
        assert scaled_size(10, 14, scale) == size
    assert scaled_size(1024, 2048, 0.75) == (768, 1536) and scaled_size(1024, 2048, 1.75) == (1792, 3584)
    assert scaled_size(14, 10, 1.5) == (21, 15)  # portrait: the height is the long side
    # ADE20K's TEST.BASE_SIZE 520 sets the long side of a short-side-520 image to 520 at scale 1.
    assert scaled_size(520, 694, 1.0, base_size=520) == (390, 520)


def test_one_scale_without_flip_is_the_whole_image_pass(image):
    model = tiny(True, zero_output_bias=True)
    whole = infer_logits(model, image, mode="whole")
    official = infer_logits(model, image, mode="official")
    assert_close_scaled(official["logits"], whole["logits"])
    assert_close_scaled(official["offsets"], whole["offsets"])


def test_large_scales_use_unpadded_windows_unlike_slide(image):
    """At 1.25x the image is 13x18, shorter than a 16x16 crop: official runs two unpadded 13x16 windows, slide
    pads the image to 16 rows, which moves the toy model's global context."""
    model = ToyModel()
    crop = (16, 16)
    official = infer_logits(model, image, mode="official", crop_size=crop, scales=[1.25])
    scaled = resize_image(image, scaled_size(10, 14, 1.25))
    assert tuple(scaled.shape[-2:]) == (13, 18)
    windows = [scaled[..., :, 0:16], scaled[..., :, 2:18]]
    summed = torch.zeros(1, 4, 13, 18, dtype=torch.float64)
    summed[..., 0:16] += toy_logits(windows[0]).double().exp()
    summed[..., 2:18] += toy_logits(windows[1]).double().exp()
    count = torch.ones(1, 1, 13, 18, dtype=torch.float64)
    count[..., 2:16] = 2
    expected = F.interpolate(summed / count, size=(10, 14), mode="bilinear", align_corners=False).log()
    assert_close_scaled(official["logits"], expected.float())
    slide = infer_logits(model, image, mode="slide", crop_size=crop, stride=crop, scales=[1.25])
    assert not torch.allclose(slide["logits"].softmax(1), official["logits"].softmax(1), atol=1e-3)


def test_window_offsets_are_rescaled_to_the_scaled_image(image):
    out = infer_logits(ToyModel(), image, mode="official", crop_size=CROP, scales=[1.5])
    # Every window is 8x10 in the 15x21 scaled image: (0.1, -0.2) per window = (0.1 * 9/20, -0.2 * 7/14).
    expected = torch.tensor([0.1 * 9 / 20, -0.2 * 7 / 14]).view(1, 2, 1, 1).expand(1, 2, 10, 14)
    assert_close_scaled(out["offsets"], expected)
    assert out["confidence"].shape == (1, 1, 10, 14)


def test_exp_of_large_logits_does_not_overflow(image):
    """exp in float32 overflows above 88; the official sum is taken in float64, so the argmax survives."""
    scales = [0.5, 1.0, 1.5]
    out = infer_logits(ToyModel(gain=200.0), image, mode="official", crop_size=CROP, scales=scales, flip=True)
    assert torch.isfinite(out["logits"]).all()
    expected = reference(image, scales, True, gain=200.0)
    assert torch.isfinite(expected).all() and expected.abs().max() > 100  # really beyond float32's exp
    assert_close_scaled(out["logits"], expected.float())
    small = infer_logits(ToyModel(gain=200.0), image, mode="official", crop_size=CROP, scales=[1.0])
    assert_close_scaled(small["logits"], toy_logits(image) * 200.0)


def test_base_size_sets_the_long_side_at_scale_one(image):
    model = ToyModel()
    shrunk = infer_logits(model, image, mode="official", scales=[1.0], base_size=7)
    half = infer_logits(model, image, mode="official", scales=[0.5])
    assert_close_scaled(shrunk["logits"], half["logits"])
    with pytest.raises(OvenetError, match="official mode only"):
        infer_logits(model, image, mode="whole", base_size=7)


def test_output_size_resizes_the_summed_exp_map(image):
    out = infer_logits(ToyModel(), image, mode="official", crop_size=CROP, scales=[0.5, 1.0, 1.5], size=(20, 28))
    expected = F.interpolate(reference(image, [0.5, 1.0, 1.5], False).exp(), size=(20, 28), mode="bilinear",
                             align_corners=False).log()
    assert_close_scaled(out["logits"], expected.float())


def test_windows_need_a_crop_size(image):
    with pytest.raises(OvenetError, match="crop_size"):
        infer_logits(ToyModel(), image, mode="official", scales=[1.0, 1.5])
    infer_logits(ToyModel(), image, mode="official", scales=[0.5, 1.0])  # no windows, no crop needed


def test_config_and_cli_accept_the_official_mode():
    assert load_config("quickstart", ["eval.mode=official"]).eval.mode == "official"
    args = build_parser().parse_args(["eval", "ckpt.pth", "--mode", "official"])
    assert args.mode == "official"
    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    help_text = " ".join(sub.format_help().split())
    for phrase in ("whole: each scaled image in one pass", "padded up to it", "stride = crop", "exp(logits)"):
        assert phrase in help_text
