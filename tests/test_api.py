"""The Python predict API: every input type, odd sizes, batches, mode restoration and errors."""

import numpy as np
import pytest
import torch
from helpers import tiny
from PIL import Image

from ovenet.data.transforms import normalize_image
from ovenet.errors import DataError, OvenetError
from ovenet.inference import Prediction, infer_logits, predict


@pytest.fixture(scope="module")
def model():
    return tiny(True, head="fcn")


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (67, 101, 3), dtype=np.uint8)


def reference_labels(model, rgb: np.ndarray) -> np.ndarray:
    x = normalize_image(torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)).unsqueeze(0)
    return infer_logits(model, x)["logits"].argmax(1)[0].numpy()


def test_every_input_type_gives_the_same_label_map_at_the_input_size(model, rgb, tmp_path):
    path = tmp_path / "odd.png"
    Image.fromarray(rgb).save(path)
    expected = reference_labels(model, rgb)
    inputs = {
        "str path": str(path),
        "Path": path,
        "PIL": Image.fromarray(rgb),
        "numpy uint8": rgb,
        "tensor uint8": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
        "tensor float": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
    }
    for kind, item in inputs.items():
        result = predict(model, item)
        assert isinstance(result, Prediction), kind
        assert result.labels.shape == (67, 101) and result.labels.dtype == np.uint8, kind
        np.testing.assert_array_equal(result.labels, expected, err_msg=kind)
        assert result.offsets.shape == (2, 67, 101) and result.offsets.dtype == np.float32
        assert result.confidence.shape == (67, 101) and result.confidence.dtype == np.float32
        assert ((result.confidence >= 0) & (result.confidence <= 1)).all()
    assert len(np.unique(expected)) > 1  # a random model that predicts one class would prove little


def test_batch_prediction_matches_single_predictions(model, rgb):
    rng = np.random.default_rng(1)
    images = [rgb, rng.integers(0, 256, (67, 101, 3), dtype=np.uint8), rng.integers(0, 256, (40, 56, 3), np.uint8),
              rgb]
    results = predict(model, images, batch_size=2)
    assert isinstance(results, list) and len(results) == 4
    assert [r.labels.shape for r in results] == [(67, 101), (67, 101), (40, 56), (67, 101)]
    for image, result in zip(images, results):
        np.testing.assert_array_equal(result.labels, reference_labels(model, image))
    batch = predict(model, torch.from_numpy(np.stack(images[:2])).permute(0, 3, 1, 2))  # [B, 3, H, W] uint8
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_array_equal(batch[1].labels, results[1].labels)


def test_probabilities_logits_and_test_time_augmentation(model, rgb):
    result = predict(model, rgb, return_probs=True, return_logits=True, scales=(0.75, 1.0), flip=True)
    assert result.probs.shape == (5, 67, 101) and result.logits.shape == (5, 67, 101)
    np.testing.assert_allclose(result.probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.probs.argmax(0), result.labels)
    slide = predict(model, rgb, mode="slide", crop_size=(48, 64))
    assert slide.labels.shape == (67, 101)


def test_baseline_has_no_offsets_and_model_predict_delegates(rgb):
    baseline = tiny(False, head="fcn")
    result = baseline.predict(rgb)
    assert result.offsets is None and result.confidence is None
    np.testing.assert_array_equal(result.labels, reference_labels(baseline, rgb))


def test_train_mode_is_restored_and_inference_runs_in_eval_mode(model, rgb):
    expected = reference_labels(model, rgb)
    model.train()
    try:
        result = predict(model, rgb)
        assert model.training
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    np.testing.assert_array_equal(result.labels, expected)  # BN used running statistics, not batch ones


def test_bf16_precision_runs(model, rgb):
    result = predict(model, rgb, precision="bf16")
    assert result.labels.shape == (67, 101)
    with pytest.raises(OvenetError, match="precision"):
        predict(model, rgb, precision="int8")


def test_bad_inputs_raise_one_line_errors(model, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png"):
        predict(model, broken)
    with pytest.raises(DataError, match="missing.png"):
        predict(model, tmp_path / "missing.png")
    with pytest.raises(OvenetError, match=r"\[0, 1\]"):
        predict(model, torch.rand(3, 20, 20) * 255)
    with pytest.raises(OvenetError, match="HxWx3"):
        predict(model, np.zeros((20, 20, 5), np.uint8))
    with pytest.raises(OvenetError, match="cannot read an image"):
        predict(model, 42)
