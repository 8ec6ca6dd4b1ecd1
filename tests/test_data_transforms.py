"""TrainTransform / EvalTransform behaviour on small hand-built samples."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from helpers import assert_close_scaled

from ovenet.data import EvalTransform, TrainTransform, denormalize, normalize
from ovenet.data.transforms import CropParams, resize_image, resize_label

# Distinct colours per class so a label can be read back from the image.
COLOURS = np.array(
    [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250)], dtype=np.uint8
)


def block_sample(height: int = 60, width: int = 90) -> dict:
    """Labels in 15x15 blocks, image = the class colour: big uniform regions, known correspondence."""
    rows, cols = np.meshgrid(np.arange(height) // 15, np.arange(width) // 15, indexing="ij")
    label = ((rows * 3 + cols * 2) % len(COLOURS)).astype(np.uint8)
    label[:5, :7] = 255  # some ignore pixels
    image = COLOURS[np.where(label == 255, 0, label)]
    return {"image": image, "label": label}


def colour_to_class(image: torch.Tensor) -> np.ndarray:
    pixels = denormalize(image).astype(np.int32)
    distances = ((pixels[:, :, None, :] - COLOURS[None, None].astype(np.int32)) ** 2).sum(-1)
    return distances.argmin(-1)


def test_train_output_has_crop_shape_and_types():
    random.seed(0)
    transform = TrainTransform((32, 48), base_size=90, scale_range=(0.5, 2.0))
    for _ in range(5):
        out = transform(block_sample())
        assert out["image"].shape == (3, 32, 48) and out["image"].dtype == torch.float32
        assert out["label"].shape == (32, 48) and out["label"].dtype == torch.int64
        assert set(out["label"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_train_image_and_label_stay_aligned_through_scale_crop_and_flip():
    random.seed(1)
    transform = TrainTransform((40, 40), base_size=90, scale_range=(0.7, 1.8))
    flips = 0
    for _ in range(10):
        params = transform.sample_params(60, 90)
        flips += params.flip
        out = transform.apply(block_sample(), params)
        label, predicted = out["label"].numpy(), colour_to_class(out["image"])
        valid = label != 255
        # Bilinear blends colours only on block borders; everywhere else the classes agree.
        assert (predicted[valid] == label[valid]).mean() > 0.9
    assert 0 < flips < 10


def test_flip_mirrors_image_and_label_together():
    sample = block_sample()
    transform = TrainTransform((60, 90), scale_range=(1.0, 1.0))
    out = transform.apply(sample, CropParams(60, 90, 0, 0, 60, 90, flip=True))
    np.testing.assert_array_equal(out["label"].numpy(), sample["label"][:, ::-1])
    np.testing.assert_array_equal(denormalize(out["image"]), sample["image"][:, ::-1])


def test_crop_window_matches_full_resize_then_crop():
    image = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 19, (64, 128), dtype=np.uint8)
    transform = TrainTransform((48, 64), base_size=128)
    rng = random.Random(3)
    for _ in range(6):
        params = transform.sample_params(64, 128, rng)
        out = transform.apply({"image": image, "label": label}, params)
        size = (params.scaled_h, params.scaled_w)
        window = (
            slice(params.top, params.top + params.height),
            slice(params.left, params.left + params.width),
        )
        ref_image = resize_image(torch.from_numpy(image).permute(2, 0, 1), size)[:, window[0], window[1]]
        ref_label = resize_label(label, size)[window]
        if params.flip:
            ref_image, ref_label = ref_image.flip(-1), ref_label[:, ::-1]
        got = out["image"][:, : params.height, : params.width]
        assert_close_scaled(got, normalize(ref_image.permute(1, 2, 0).to(torch.uint8).numpy()))
        np.testing.assert_array_equal(out["label"][: params.height, : params.width].numpy(), ref_label)


SCALES = (0.5, 0.75, 1.5, 1.75)


def _cv2():
    return pytest.importorskip("cv2", reason="opencv-python-headless (the test extra) is the reference")


@pytest.mark.parametrize("scale", SCALES)
def test_image_resize_matches_opencv_inter_linear(scale):
    cv2 = _cv2()
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd sides: no exact 2x shortcut anywhere
    size = (int(37 * scale + 0.5), int(53 * scale + 0.5))
    expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR).astype(np.int64)
    got = resize_image(image, size)  # numpy HxWx3 -> [3, h, w]
    assert got.shape == (3, *size)
    # OpenCV's uint8 path uses 11-bit fixed-point weights: 1 grey level of rounding.
    assert np.abs(got.permute(1, 2, 0).numpy().astype(np.int64) - expected).max() <= 1
    # Float inputs (as at test time, after normalisation) match to float rounding, channels-first and batched.
    floats = rng.normal(0.0, 2.0, (37, 53, 3)).astype(np.float32)
    expected = torch.from_numpy(cv2.resize(floats, size[::-1], interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)
    got = resize_image(torch.from_numpy(floats).permute(2, 0, 1)[None], size)[0]
    assert_close_scaled(got, expected)


@pytest.mark.parametrize("scale", SCALES)
def test_label_resize_matches_opencv_inter_nearest(scale):
    cv2 = _cv2()
    label = np.random.default_rng(3).integers(0, 19, (37, 53), dtype=np.uint8)
    label[::7] = 255
    size = (int(37 * scale + 0.5), int(53 * scale + 0.5))
    expected = cv2.resize(label, size[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resize_label(label, size), expected)
    # Any integer dtype (instance ids do not fit in uint8).
    wide = label.astype(np.int32) * 1000
    np.testing.assert_array_equal(resize_label(wide, size), expected.astype(np.int32) * 1000)


def test_train_transform_reproduces_the_official_opencv_augmentation():
    """The official gen_sample order: resize (cv2 INTER_LINEAR / INTER_NEAREST) -> pad bottom/right to the crop
    (black, ignore) -> random crop -> flip the crop, so a flipped sample that needed padding has it on the left."""
    cv2 = _cv2()
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (45, 67, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (45, 67), dtype=np.uint8)
    crop_h, crop_w = 24, 48
    transform = TrainTransform((crop_h, crop_w), base_size=67, scale_range=(0.4, 1.75))
    draws = random.Random(5)
    flipped_and_padded = 0
    for _ in range(24):
        params = transform.sample_params(45, 67, draws)
        out = transform.apply({"image": image, "label": label}, params)
        dsize = (params.scaled_w, params.scaled_h)
        pad_h, pad_w = max(crop_h - params.scaled_h, 0), max(crop_w - params.scaled_w, 0)
        ref_image = cv2.copyMakeBorder(cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR), 0, pad_h, 0, pad_w,
                                       cv2.BORDER_CONSTANT, value=(0, 0, 0))
        ref_label = cv2.copyMakeBorder(cv2.resize(label, dsize, interpolation=cv2.INTER_NEAREST), 0, pad_h, 0, pad_w,
                                       cv2.BORDER_CONSTANT, value=(255,))
        rows, cols = slice(params.top, params.top + crop_h), slice(params.left, params.left + crop_w)
        ref_image, ref_label = ref_image[rows, cols], ref_label[rows, cols]
        if params.flip:
            ref_image, ref_label = ref_image[:, ::-1], ref_label[:, ::-1]
            flipped_and_padded += pad_w > 0
        assert np.abs(denormalize(out["image"]).astype(np.int64) - ref_image).max() <= 1
        np.testing.assert_array_equal(out["label"].numpy(), ref_label)
    assert flipped_and_padded >= 2  # the case the order decides was drawn


def test_a_flipped_padded_crop_has_its_padding_on_the_left():
    """The audit's case: a 36-wide scaled label in a 64-wide crop, flipped: valid columns 28-63, as the official
    code (ovenet had 0-35 before)."""
    sample = block_sample(20, 36)
    transform = TrainTransform((20, 64), scale_range=(1.0, 1.0))
    params = transform.sample_params(20, 36)
    out = transform.apply(sample, dataclasses.replace(params, flip=True))
    valid = (out["label"] != 255).any(dim=0).nonzero().flatten()
    assert (int(valid.min()), int(valid.max())) == (28, 63)
    np.testing.assert_array_equal(out["label"][:, 28:].numpy(), sample["label"][:, ::-1])
    black = normalize(np.zeros((1, 1, 3), dtype=np.uint8))
    assert torch.equal(out["image"][:, :, :28], black.expand(3, 20, 28))
    unflipped = transform.apply(sample, dataclasses.replace(params, flip=False))
    np.testing.assert_array_equal(unflipped["label"][:, :36].numpy(), sample["label"])


def test_resize_window_must_lie_inside_the_output():
    with pytest.raises(ValueError, match="window"):
        resize_image(torch.zeros(3, 8, 8), (4, 4), window=(2, 0, 3, 4))
    with pytest.raises(ValueError, match="window"):
        resize_label(np.zeros((8, 8), np.uint8), (0, 4))


def test_image_smaller_than_crop_is_padded_with_ignore_and_black():
    sample = block_sample(20, 30)
    out = TrainTransform((32, 40), scale_range=(1.0, 1.0), flip=False)(sample)
    np.testing.assert_array_equal(out["label"][:20, :30].numpy(), sample["label"])
    assert torch.all(out["label"][20:] == 255) and torch.all(out["label"][:, 30:] == 255)
    # The official code pads the raw image with 0 (black) before normalising.
    black = normalize(np.zeros((1, 1, 3), dtype=np.uint8))
    assert torch.equal(out["image"][:, 20:], black.expand(3, 12, 40))
    assert torch.equal(out["image"][:, :, 30:], black.expand(3, 32, 10))
    np.testing.assert_array_equal(denormalize(out["image"][:, :20, :30]), sample["image"])


def test_base_size_sets_the_long_side():
    transform = TrainTransform((8, 8), base_size=200, scale_range=(1.5, 1.5))
    params = transform.sample_params(60, 90)
    assert (params.scaled_h, params.scaled_w) == (200, 300)
    own_size = TrainTransform((8, 8), scale_range=(0.5, 0.5)).sample_params(60, 90)
    assert (own_size.scaled_h, own_size.scaled_w) == (30, 45)


def test_train_transform_is_reproducible_from_the_seed():
    transform = TrainTransform((24, 24), base_size=90)
    random.seed(7)
    first = [transform(block_sample()) for _ in range(3)]
    random.seed(7)
    second = [transform(block_sample()) for _ in range(3)]
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_extra_maps_follow_the_geometry_with_their_own_padding():
    sample = block_sample(20, 30)
    sample["instance"] = (sample["label"].astype(np.int32) + 1) * 1000
    out = TrainTransform((24, 32), scale_range=(1.0, 1.0), flip=False)(sample)
    assert out["instance"].dtype == torch.int32
    np.testing.assert_array_equal(out["instance"][:20, :30].numpy(), sample["instance"])
    assert torch.all(out["instance"][20:] == 0)


def test_normalize_uses_imagenet_statistics():
    image = np.array([[[124, 116, 104], [255, 255, 255]]], dtype=np.uint8)
    out = normalize(image)
    expected = (np.array([[124, 116, 104], [255, 255, 255]]) / 255 - [0.485, 0.456, 0.406]) / [
        0.229,
        0.224,
        0.225,
    ]
    np.testing.assert_allclose(out[:, 0].T.numpy(), expected, atol=1e-5)


def test_eval_transform_resizes_image_only():
    sample = block_sample(60, 90)
    plain = EvalTransform()(sample)
    np.testing.assert_array_equal(denormalize(plain["image"]), sample["image"])
    resized = EvalTransform(resize_short=30)(sample)
    assert resized["image"].shape == (3, 30, 45)
    assert resized["label"].shape == (60, 90)  # metrics stay at annotation resolution
    assert EvalTransform(size_divisor=32)(sample)["image"].shape == (3, 64, 96)


@pytest.mark.parametrize("kwargs", [{"crop_size": (0, 8)}, {"crop_size": (8, 8), "scale_range": (2.0, 1.0)}])
def test_bad_train_settings_raise(kwargs):
    with pytest.raises(ValueError):
        TrainTransform(**kwargs)
