"""CityscapesMetric against cityscapesScripts' evalPixelLevelSemanticLabeling on a real (downscaled) frame."""

import contextlib
import io
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovenet.errors import ConfigError, DataError
from ovenet.metrics import CityscapesMetric
from ovenet.metrics.cityscapes import TRAIN_ID_TO_LABEL_ID

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GT_DIR = SHARED / "data" / "cityscapes_sample" / "gtFine" / "val" / "frankfurt"
GT_LABELS = GT_DIR / "frankfurt_000000_000294_gtFine_labelIds.png"
GT_INSTANCES = GT_DIR / "frankfurt_000000_000294_gtFine_instanceIds.png"
GT_TRAIN_IDS = GT_DIR / "frankfurt_000000_000294_gtFine_labelTrainIds.png"


@pytest.fixture(scope="module")
def frame():
    if not GT_LABELS.exists():
        pytest.skip(f"Cityscapes sample not found at {GT_DIR}")
    labels = np.array(Image.open(GT_LABELS)).astype(np.int64)
    instances = np.array(Image.open(GT_INSTANCES)).astype(np.int64)
    return labels, instances


@pytest.fixture
def reference(monkeypatch, tmp_path):
    """Runs cityscapesscripts on label-id predictions, one GT file per prediction; returns its result dict."""
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    if not hasattr(np, "in1d"):  # removed from numpy 2.4, still used by the script
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)

    def run(predictions: list[np.ndarray]) -> dict:
        files = []
        for i, pred in enumerate(predictions):
            path = tmp_path / f"pred_{i}.png"
            Image.fromarray(pred.astype(np.uint8)).save(path)
            files.append(str(path))
        args = types.SimpleNamespace(
            evalInstLevelScore=True,
            evalPixelAccuracy=False,
            evalLabels=[],
            printRow=5,
            normalized=True,
            colorized=False,
            bold="",
            nocol="",
            JSONOutput=True,
            quiet=True,
            exportFile=str(tmp_path / "result.json"),
            avgClassSize=dict(ev.args.avgClassSize),
        )
        with contextlib.redirect_stdout(io.StringIO()):
            result = ev.evaluateImgLists(files, [str(GT_LABELS)] * len(files), args)
        assert (tmp_path / "result.json").exists()
        return result

    return run


def assert_same(ours: dict, ref: dict) -> None:
    def close(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9

    pairs = [
        ("miou", "averageScoreClasses"),
        ("iiou_class", "averageScoreInstClasses"),
        ("iou_category", "averageScoreCategories"),
        ("iiou_category", "averageScoreInstCategories"),
    ]
    for key, ref_key in pairs:
        assert close(ours[key], ref[ref_key]), (key, ours[key], ref[ref_key])
    for key, ref_key in [
        ("iou_per_class", "classScores"),
        ("iiou_per_class", "classInstScores"),
        ("iou_per_category", "categoryScores"),
        ("iiou_per_category", "categoryInstScores"),
    ]:
        for name, value in ref[ref_key].items():
            # Entries we leave out (ignored classes, 'void', non-instance classes) are NaN in the script.
            assert close(ours[key].get(name, math.nan), value), (key, name, ours[key].get(name), value)
        assert set(ours[key]) <= set(ref[ref_key])


def imperfect_predictions(labels: np.ndarray, instances: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shifted = labels.copy()
    shifted[20:70, 30:130] = labels[28:78, 41:141]
    swapped = labels.copy()
    for a, b in [(7, 8), (24, 25), (26, 27), (21, 22)]:
        swapped[labels == a], swapped[labels == b] = b, a
    erased = labels.copy()
    car_ids = sorted(i for i in np.unique(instances) if i // 1000 == 26)
    erased[instances == car_ids[0]] = 7  # one car becomes road
    erased[instances == car_ids[1]] = 29  # another becomes caravan: a vehicle hit for iIoU category only
    person = np.argwhere(instances == 24001)
    erased[tuple(person[: len(person) // 2].T)] = 0  # half a person predicted 'unlabeled'
    noisy = labels.copy()
    noisy[64:, 128:] = rng.integers(0, 34, size=(64, 128))
    one_class = np.full_like(labels, 23)
    return {"shifted": shifted, "swapped": swapped, "erased": erased, "noisy": noisy, "sky_only": one_class}


@pytest.mark.parametrize("case", ["shifted", "swapped", "erased", "noisy", "sky_only"])
def test_single_image_matches_cityscapesscripts(frame, reference, case):
    labels, instances = frame
    pred = imperfect_predictions(labels, instances)[case]
    metric = CityscapesMetric()
    metric.update(
        torch.from_numpy(pred), torch.from_numpy(labels), torch.from_numpy(instances), pred_is_train_ids=False
    )
    assert_same(metric.compute(), reference([pred]))


def test_multi_image_matches_cityscapesscripts(frame, reference):
    labels, instances = frame
    preds = imperfect_predictions(labels, instances)
    chosen = [preds["shifted"], preds["erased"], preds["noisy"]]
    ref = reference(chosen)

    one_by_one = CityscapesMetric()
    for pred in chosen:
        one_by_one.update(pred, labels, instances, pred_is_train_ids=False)
    assert one_by_one.num_images == 3
    assert_same(one_by_one.compute(), ref)

    batched = CityscapesMetric()  # instance ids repeat across the batch and must stay per image
    batched.update(
        np.stack(chosen), np.stack([labels] * 3), np.stack([instances] * 3), pred_is_train_ids=False
    )
    assert_same(batched.compute(), ref)

    merged, other = CityscapesMetric(), CityscapesMetric()
    merged.update(chosen[0], labels, instances, pred_is_train_ids=False)
    for pred in chosen[1:]:
        other.update(pred, labels, instances, pred_is_train_ids=False)
    merged.merge(other)
    restored = CityscapesMetric()
    restored.load_state_dict(merged.state_dict())
    assert_same(restored.compute(), ref)


def test_train_id_predictions_match_label_id_png(frame, reference):
    labels, instances = frame
    if not GT_TRAIN_IDS.exists():
        pytest.skip("labelTrainIds.png missing from the sample")
    train_ids = np.array(Image.open(GT_TRAIN_IDS)).astype(np.int64)
    train_ids[:8, :] = 255  # no decision: scored like 'unlabeled'
    as_label_ids = np.where(train_ids < 19, TRAIN_ID_TO_LABEL_ID[np.minimum(train_ids, 18)], 0)
    metric = CityscapesMetric()
    metric.update(train_ids, labels, instances)
    assert_same(metric.compute(), reference([as_label_ids]))


def test_train_id_table():
    """The metric maps train ids back with the same table as the dataset (its literal values: test_data_datasets)."""
    from ovenet.data.cityscapes import trainid_to_labelid

    assert TRAIN_ID_TO_LABEL_ID.tolist() == trainid_to_labelid(np.arange(19)).tolist()


def test_without_instances_iiou_is_nan(frame):
    labels, _ = frame
    metric = CityscapesMetric()
    metric.update(labels, labels, None, pred_is_train_ids=False)
    result = metric.compute()
    assert result["miou"] == 1.0 and math.isnan(result["iiou_class"]) and math.isnan(result["iiou_category"])


def test_bad_input_raises(frame):
    labels, instances = frame
    with pytest.raises(DataError, match="outside 0..33"):
        CityscapesMetric().update(labels, np.full_like(labels, 255), instances)
    with pytest.raises(ValueError, match="shape"):
        CityscapesMetric().update(labels[:, :10], labels, instances)
    with pytest.raises(ConfigError, match="person"):
        CityscapesMetric(avg_class_size={"car": 1.0})
