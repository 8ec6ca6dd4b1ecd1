"""infer_logits: whole vs sliding window, window placement, flip equivariance, multi-scale combination."""

from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close_scaled, tiny
from torch import nn

from ovenet.data.transforms import resize_image
from ovenet.errors import OvenetError
from ovenet.inference import PAPER_SCALES, infer_logits, window_starts


@pytest.fixture(scope="module")
def ovenet_model():
    return tiny(True, zero_output_bias=True)


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))


class PixelModel(nn.Module):
    """A per-pixel model at full resolution: its output at a pixel depends on that pixel only, so any window
    layout must reproduce the whole-image result exactly. Offsets are a constant (0.1, -0.2) per window."""

    align_corners = True
    num_classes = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        logits = self.conv(x)
        offsets = x.new_tensor([0.1, -0.2]).view(1, 2, 1, 1).expand(x.shape[0], 2, *x.shape[-2:])
        conf = torch.sigmoid(x[:, :1])
        return SimpleNamespace(logits_final=logits, logits_initial=logits, logits_seed=None, offsets=offsets,
                               confidence=conf)


def test_window_starts_cover_the_axis_and_end_at_the_border():
    assert window_starts(100, 64, 43) == [0, 36]
    assert window_starts(150, 64, 43) == [0, 43, 86]
    assert window_starts(64, 64, 43) == [0]
    assert window_starts(50, 64, 43) == [0]  # smaller than the crop: one (padded) window


def test_slide_on_an_image_of_crop_size_equals_whole(ovenet_model, image):
    whole = infer_logits(ovenet_model, image)
    slide = infer_logits(ovenet_model, image, mode="slide", crop_size=(64, 96))
    for key in ("logits", "offsets", "confidence"):
        assert slide[key].shape == whole[key].shape
        assert_close_scaled(slide[key], whole[key])
    assert whole["logits"].shape == (1, 5, 64, 96)
    assert whole["offsets"].shape == (1, 2, 64, 96) and whole["confidence"].shape == (1, 1, 64, 96)


@pytest.mark.parametrize("size,crop,stride", [((64, 96), (32, 40), (20, 25)), ((30, 50), (40, 64), None),
                                              ((70, 45), (32, 64), (16, 30))])
def test_slide_windows_padding_and_count_map_reproduce_a_per_pixel_model(size, crop, stride):
    torch.manual_seed(0)
    model = PixelModel().eval()
    x = torch.randn(2, 3, *size)
    whole = infer_logits(model, x)
    slide = infer_logits(model, x, mode="slide", crop_size=crop, stride=stride)
    torch.testing.assert_close(slide["logits"], whole["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(slide["confidence"], whole["confidence"], rtol=0, atol=1e-6)


def test_slide_rescales_window_offsets_to_image_coordinates():
    model = PixelModel().eval()
    x = torch.randn(1, 3, 64, 96)
    # Two windows side by side, 48 px wide each: an x offset of 0.1 window-widths is 0.1 * 47 / 95 image-widths.
    out = infer_logits(model, x, mode="slide", crop_size=(64, 48), stride=(64, 48))
    torch.testing.assert_close(out["offsets"][0, 0], torch.full((64, 96), 0.1 * 47 / 95))
    torch.testing.assert_close(out["offsets"][0, 1], torch.full((64, 96), -0.2))
    # A window larger than the image pads it; offsets come back in the real image's coordinates.
    out = infer_logits(model, x[:, :, :40, :60], mode="slide", crop_size=(64, 96))
    torch.testing.assert_close(out["offsets"][0, 0], torch.full((40, 60), 0.1 * 95 / 59))
    torch.testing.assert_close(out["offsets"][0, 1], torch.full((40, 60), -0.2 * 63 / 39))


def test_flip_averages_probabilities_of_the_plain_and_mirrored_pass(ovenet_model, image):
    plain = infer_logits(ovenet_model, image)
    mirrored = infer_logits(ovenet_model, image.flip(-1))
    both = infer_logits(ovenet_model, image, flip=True)
    expected = (plain["logits"].softmax(1) + mirrored["logits"].flip(-1).softmax(1)) / 2
    assert_close_scaled(both["logits"].softmax(1), expected)
    sign = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    expected_offsets = (plain["offsets"] + mirrored["offsets"].flip(-1) * sign) / 2
    assert_close_scaled(both["offsets"], expected_offsets)
    assert plain["offsets"].abs().mean() > 0.01  # the check above is not vacuous


def test_flip_averaged_prediction_is_flip_equivariant(ovenet_model, image):
    out = infer_logits(ovenet_model, image, flip=True)
    out_mirrored = infer_logits(ovenet_model, image.flip(-1), flip=True)
    assert_close_scaled(out_mirrored["logits"], out["logits"].flip(-1))
    assert_close_scaled(out_mirrored["confidence"], out["confidence"].flip(-1))
    # Mirroring the image mirrors the vector field: x components change sign, y components do not.
    assert_close_scaled(out_mirrored["offsets"][:, 0], -out["offsets"][:, 0].flip(-1))
    assert_close_scaled(out_mirrored["offsets"][:, 1], out["offsets"][:, 1].flip(-1))


def test_multi_scale_is_the_mean_of_per_scale_probabilities(ovenet_model, image):
    combined = infer_logits(ovenet_model, image, scales=PAPER_SCALES, flip=True)
    assert combined["logits"].shape == (1, 5, 64, 96)
    assert combined["offsets"].shape == (1, 2, 64, 96)
    per_scale = [infer_logits(ovenet_model, image, scales=(s,), flip=True)["logits"].softmax(1) for s in PAPER_SCALES]
    assert_close_scaled(combined["logits"].softmax(1), torch.stack(per_scale).mean(0))
    assert not torch.allclose(per_scale[0], per_scale[-1], atol=1e-3)  # the scales really differ


def test_multi_scale_slide_and_output_size(ovenet_model):
    x = torch.randn(2, 3, 67, 101)
    out = infer_logits(ovenet_model, x, mode="slide", crop_size=(48, 64), scales=(0.75, 1.25), size=(30, 40))
    assert out["logits"].shape == (2, 5, 30, 40) and out["confidence"].shape == (2, 1, 30, 40)
    assert torch.isfinite(out["logits"]).all()


def test_scaled_inputs_are_the_official_size_and_resize():
    """A 6x11 image at 0.75x is 4x8 for the official multi_scale_aug (long side round(8.25) = 8, short side
    round(6 * 8 / 11) = 4), not round(4.5) = 5 rows; the pixels are OpenCV's bilinear (resize_image)."""
    seen = []

    class Recorder(PixelModel):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    x = torch.randn(1, 3, 6, 11, generator=torch.Generator().manual_seed(2))
    for mode in ("whole", "official"):
        seen.clear()
        infer_logits(Recorder().eval(), x, mode=mode, scales=(0.75,))
        assert len(seen) == 1 and seen[0].shape == (1, 3, 4, 8)
        assert torch.equal(seen[0], resize_image(x, (4, 8)))


def test_baseline_and_output_choice(ovenet_model, image):
    baseline = tiny(False, head="fcn", zero_output_bias=True)
    out = infer_logits(baseline, image, flip=True)
    assert out["logits"].shape == (1, 5, 64, 96) and out["offsets"] is None and out["confidence"] is None
    with pytest.raises(OvenetError, match="output 'seed'"):
        infer_logits(baseline, image, output="seed")
    initial = infer_logits(ovenet_model, image, output="initial")["logits"]
    final = infer_logits(ovenet_model, image)["logits"]
    assert not torch.allclose(initial, final)


def test_bad_arguments_raise_clear_errors(ovenet_model, image):
    with pytest.raises(OvenetError, match="crop_size"):
        infer_logits(ovenet_model, image, mode="slide")
    with pytest.raises(OvenetError, match="whole, slide, official"):
        infer_logits(ovenet_model, image, mode="tiles")
    with pytest.raises(OvenetError, match="scales"):
        infer_logits(ovenet_model, image, scales=(0.0,))
    with pytest.raises(OvenetError, match=r"\[B, 3, H, W\]"):
        infer_logits(ovenet_model, image[0])
