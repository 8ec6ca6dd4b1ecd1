"""Big inputs (issue 25, item 5): the pixel budget runs big images in windows, a warning says when an image is far
from the training scale, ``max_size`` shrinks it first; and predict's runtime choice says something true of a
video (item 11)."""

import logging

import numpy as np
import pytest
import torch
from helpers import assert_close_scaled, tiny
from PIL import Image
from torch import nn

import ovenet.inference as inference
from ovenet.config import Config
from ovenet.data.transforms import normalize_pixels, resize_image
from ovenet.engine.predict import predict_files
from ovenet.errors import OvenetError
from ovenet.inference import InferenceSettings, budget_window, infer_logits, predict
from ovenet.models.ovenet import SegOutput


class Pointwise(nn.Module):
    """Logits from each pixel alone (a 1x1 convolution at full resolution): windows and the whole image must give
    exactly the same map, so any error in placing or averaging windows shows. Records every input's size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.sizes, self.batches = [], []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        self.batches.append(x.shape[0])
        logits = self.conv(x)
        return SegOutput(logits_initial=logits, logits_final=logits)


IMAGE = np.random.default_rng(5).integers(0, 256, (45, 70, 3), dtype=np.uint8)


def test_budget_window_is_square_within_the_budget():
    assert budget_window(4500, 6000, 2048 * 2048) == (2048, 2048)
    assert budget_window(500, 10000, 2048 * 2048) == (500, 8388)  # a long strip: the whole height, wider window
    assert budget_window(30, 40, 10_000) == (30, 40)


def test_an_image_beyond_the_budget_runs_in_windows_with_the_whole_images_labels():
    model = Pointwise().eval()
    whole = predict(model, IMAGE, return_logits=True, pixel_budget=None)
    assert model.sizes == [(45, 70)]
    model.sizes.clear()
    windowed = predict(model, IMAGE, return_logits=True, pixel_budget=40 * 40)  # windows of a quarter
    # 20x20 windows, stride 13: rows start at 0, 13, 25; columns at 0, 13, 26, 39, 50.
    assert model.sizes == [(20, 20)] * 15
    assert windowed.labels.shape == (45, 70)
    assert_close_scaled(torch.from_numpy(windowed.logits), torch.from_numpy(whole.logits), rel=1e-5)
    np.testing.assert_array_equal(windowed.labels, whole.labels)
    np.testing.assert_array_equal(predict(model, IMAGE, pixel_budget=40 * 40).labels, whole.labels)  # in bands


def test_the_default_budget_leaves_standard_images_whole():
    settings = InferenceSettings()
    assert settings.infer_options((1024, 2048))["mode"] == "whole"  # Cityscapes: what eval scores
    assert settings.infer_options((4500, 6000)) | {"scales": None} == {
        "mode": "slide", "crop_size": (1024, 1024), "stride": None, "scales": None, "flip": False, "base_size": None}


def _configured(base_size: int) -> nn.Module:
    model = tiny()
    model.config = Config()
    model.config.data.base_size, model.config.data.scale_range = base_size, [0.5, 2.0]
    model.config.eval.mode = "whole"
    return model


def test_a_warning_when_far_from_the_training_scale(caplog, monkeypatch):
    monkeypatch.setattr(inference, "_warned", set())
    model = _configured(base_size=10)  # trained at long sides 5-20: 70 is 3.5x the largest
    with caplog.at_level(logging.WARNING, logger="ovenet.inference"):
        predict(model, [IMAGE, IMAGE])
        predict(model, IMAGE)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # once per size
    assert "45x70 (HxW)" in lines[0] and "3.5x" in lines[0] and "--max-size 10" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ovenet.inference"):
        predict(model, IMAGE[:30])  # another size: said again
        predict(model, IMAGE, max_size=20)  # at the training scale: nothing to say
        predict(_configured(base_size=30), IMAGE)  # 70 < 3 x 60
    assert len(caplog.records) == 1 and "30x70" in caplog.records[0].getMessage()


def test_max_size_runs_the_shrunk_image_and_returns_the_input_size():
    model = tiny()
    out = predict(model, IMAGE, max_size=32, return_logits=True)
    assert out.labels.shape == (45, 70) and out.logits.shape[-2:] == (45, 70)
    # Defined as: the image resized as eval resizes (long side 70 -> 32, short 45 * 32 / 70 = 20.57 -> 21, bilinear,
    # values rounded), through the network, and the output resized once, bilinearly, to the input's size.
    shrunk = resize_image(torch.from_numpy(IMAGE).permute(2, 0, 1)[None], (21, 32))
    expected = infer_logits(model, normalize_pixels(shrunk), size=(45, 70))["logits"][0]
    assert_close_scaled(torch.from_numpy(out.logits), expected, rel=1e-5)
    assert not np.array_equal(out.labels, predict(model, IMAGE).labels)  # it did change what the network saw
    assert predict(model, IMAGE, max_size=70).labels.tolist() == predict(model, IMAGE).labels.tolist()
    with pytest.raises(OvenetError, match="max_size must be a positive"):
        predict(model, IMAGE, max_size=0)


def test_max_size_is_recorded_and_a_rerun_with_another_is_refused(tmp_path):
    model = tiny()
    Image.fromarray(IMAGE).save(tmp_path / "photo.png")
    written = predict_files(model, [tmp_path / "photo.png"], tmp_path / "out", save=["labels"], max_size=28)
    assert Image.open(written[0]).size == (70, 45)
    assert '"max_size": 28' in Image.open(written[0]).info["ovenet"]
    with pytest.raises(OvenetError, match="max_size differ"):
        predict_files(model, [tmp_path / "photo.png"], tmp_path / "out", save=["labels"], max_size=40)


def test_the_runtime_choice_counts_a_videos_frames(tmp_path):
    av = pytest.importorskip("av")
    from ovenet.cli.commands import _megapixels, _megapixels_text

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert _megapixels([(path, tmp_path / "clip", True)]) == pytest.approx(6 * 64 * 48 / 1e6)
    assert "inf" not in _megapixels_text(float("inf")) and "unknown" in _megapixels_text(float("inf"))


def test_pictures_rendered_in_bands_equal_the_whole_picture(monkeypatch):
    from types import SimpleNamespace

    from ovenet import vis
    from ovenet.engine import predict as predict_module

    monkeypatch.setattr(predict_module, "RENDER_ROWS", 16)  # 45 rows: bands of 16, 16 and 13
    rng = np.random.default_rng(1)
    offsets = rng.normal(size=(2, 45, 70)).astype(np.float32)
    offsets[:, 40, 3] = 5.0  # the longest offset lies in the last band: it sets the saturation of every band
    offsets[0, 2, 2] = np.nan
    prediction = SimpleNamespace(offsets=offsets, confidence=rng.random((45, 70)).astype(np.float32))
    color = vis.colorize(rng.integers(0, 4, (45, 70)), [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)])

    def rendered(kind):
        return predict_module._rendered(kind, IMAGE, prediction, color, 4, 0.3)

    np.testing.assert_array_equal(rendered("offsets"), vis.with_key(vis.flow_to_color(offsets), "offsets"))
    np.testing.assert_array_equal(rendered("confidence"),
                                  vis.with_key(vis.confidence_to_color(prediction.confidence), "confidence"))
    np.testing.assert_array_equal(rendered("overlay"), vis.overlay(IMAGE, color, 0.3))


def test_labels_only_keep_a_band_of_scores_and_equal_the_full_windows():
    model = tiny()
    image = np.random.default_rng(2).integers(0, 256, (70, 45, 3), dtype=np.uint8)
    # 40x40 budget: 20x20 windows, rows start at 0, 13, 26, 39, 50 (the last band shorter than the stride).
    full = predict(model, image, pixel_budget=40 * 40, return_logits=True)  # the whole image's scores kept
    banded = predict(model, image, pixel_budget=40 * 40)
    np.testing.assert_array_equal(banded.labels, full.labels)
    assert banded.labels.dtype == full.labels.dtype and banded.logits is None
    assert_close_scaled(torch.from_numpy(banded.offsets), torch.from_numpy(full.offsets), rel=1e-6)
    assert_close_scaled(torch.from_numpy(banded.confidence), torch.from_numpy(full.confidence), rel=1e-6)
    assert not np.array_equal(banded.labels, predict(model, image, pixel_budget=None).labels)  # windows indeed


def test_the_slide_mode_keeps_a_band_of_scores_too():
    model = tiny()
    image = np.random.default_rng(3).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    options = dict(mode="slide", crop_size=(24, 32), stride=(10, 7))
    full = predict(model, image, return_logits=True, **options)
    banded = predict(model, image, **options)
    np.testing.assert_array_equal(banded.labels, full.labels)
    assert_close_scaled(torch.from_numpy(banded.offsets), torch.from_numpy(full.offsets), rel=1e-6)
    assert_close_scaled(torch.from_numpy(banded.confidence), torch.from_numpy(full.confidence), rel=1e-6)


def test_images_beyond_the_budget_run_one_at_a_time():
    model = Pointwise().eval()
    predict(model, [IMAGE, IMAGE], pixel_budget=40 * 40)  # 15 windows each, one image at a time
    predict(model, [IMAGE, IMAGE])  # within the default budget: one batch of two, whole
    assert model.batches == [1] * 30 + [2]
