"""evaluate_model against hand-computed confusion figures, per-condition and Cityscapes results, DDP sharding,
and evaluate() writing JSON/Markdown files without overwriting."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovenet import checkpoint
from ovenet.config import Config, EvalConfig
from ovenet.data.cityscapes import trainid_to_labelid
from ovenet.engine.evaluate import evaluate, evaluate_model
from ovenet.errors import DataError, OvenetError
from ovenet.metrics import CityscapesMetric
from ovenet.models import build_model


class OracleModel(nn.Module):
    """Full-resolution stub whose prediction is written in the image's first channel, so the dataset decides
    exactly what is predicted."""

    align_corners = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        pred = x[:, 0].round().long().clamp(0, self.num_classes - 1)
        logits = F.one_hot(pred, self.num_classes).permute(0, 3, 1, 2).float() * 10
        return SimpleNamespace(logits_final=logits, offsets=None, confidence=None)


L_FOG = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2], [2, 2, 255, 255, 2, 2]]
P_FOG = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2], [2, 2, 0, 0, 2, 2]]  # perfect on valid pixels
L_NIGHT = [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2]]
P_NIGHT = [[0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 0, 0]]


class OracleDataset:
    class_names = ("a", "b", "c")
    num_classes = 3

    def __init__(self, samples):
        self.samples = samples  # (prediction, label, condition)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        pred, label, condition = self.samples[index]
        image = torch.tensor(pred, dtype=torch.float32).expand(3, -1, -1).clone()
        sample = {"image": image, "label": torch.tensor(label, dtype=torch.int64), "name": f"s{index}"}
        if condition is not None:
            sample["condition"] = condition
        return sample


def acdc_like():
    return OracleDataset([(P_FOG, L_FOG, "fog"), (P_NIGHT, L_NIGHT, "night"), (P_FOG, L_FOG, "fog")])


def test_figures_match_hand_computed_confusion():
    dataset = OracleDataset([(P_FOG, L_FOG, "fog"), (P_NIGHT, L_NIGHT, "night")])
    result = evaluate_model(OracleModel(3), dataset, EvalConfig(boundary_width=10), "cpu", num_classes=3)
    # class 0: gt 12, tp 10, predicted 12; class 1: gt 18, tp 18, predicted 20; class 2: gt 16, tp 14, pred 14.
    iou = [10 / 14, 18 / 20, 14 / 16]
    assert result["iou"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(sum(iou) / 3)
    assert result["pixel_acc"] == pytest.approx(42 / 46)
    assert result["mean_acc"] == pytest.approx((10 / 12 + 1 + 14 / 16) / 3)
    assert result["num_images"] == 2 and result["class_names"] == ["a", "b", "c"]
    # A 10 px band around the boundaries covers these 4x6 images entirely.
    assert result["boundary_miou"] == pytest.approx(result["miou"])
    night = result["per_condition"]["night"]
    assert night["iou"] == pytest.approx([4 / 8, 12 / 14, 4 / 6])
    assert night["pixel_acc"] == pytest.approx(20 / 24)
    assert result["per_condition"]["fog"]["miou"] == pytest.approx(1.0)


def test_boundary_band_excludes_pixels_far_from_edges():
    label = np.zeros((12, 12), dtype=np.int64)
    label[:, 6:] = 1
    pred = label.copy()
    pred[:, 0] = 1  # wrong, but 6 px from the only edge
    result = evaluate_model(OracleModel(2), OracleDataset([(pred.tolist(), label.tolist(), None)]),
                            EvalConfig(boundary_width=2), "cpu", num_classes=2)
    assert result["boundary_miou"] == pytest.approx(1.0)
    assert result["miou"] < 1.0
    assert "per_condition" not in result


def test_class_count_mismatch_and_missing_labels_are_user_errors():
    with pytest.raises(OvenetError, match="classes"):
        evaluate_model(OracleModel(4), acdc_like(), EvalConfig(), "cpu", num_classes=3)

    class Unlabelled(OracleDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            del sample["label"]
            return sample

    with pytest.raises(DataError, match="no label"):
        evaluate_model(OracleModel(3), Unlabelled(acdc_like().samples), EvalConfig(), "cpu", num_classes=3)


class CityscapesLike:
    class_names = tuple(f"c{i}" for i in range(19))
    num_classes = 19

    def __init__(self, with_instances=True):
        rng = np.random.default_rng(0)
        self.items = []
        for _ in range(2):
            label = rng.choice([0, 2, 11, 13, 255], size=(16, 20)).astype(np.int64)
            pred = np.where(rng.random((16, 20)) < 0.8, np.where(label == 255, 0, label), 13)
            label_ids = trainid_to_labelid(np.where(label == 255, 255, label)).astype(np.int64)
            instance = np.where(np.isin(label, (11, 13)), label_ids * 1000 + (np.arange(20) >= 10), label_ids)
            self.items.append((pred, label, label_ids, instance.astype(np.int32)))
        self.with_instances = with_instances

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        pred, label, label_ids, instance = self.items[index]
        sample = {"image": torch.tensor(pred, dtype=torch.float32).expand(3, -1, -1).clone(),
                  "label": torch.from_numpy(label), "name": f"c{index}"}
        if self.with_instances:
            sample.update(label_ids=torch.from_numpy(label_ids), instance=torch.from_numpy(instance))
        return sample


def test_cityscapes_figures_equal_the_reference_metric():
    dataset = CityscapesLike()
    result = evaluate_model(OracleModel(19), dataset, EvalConfig(), "cpu", num_classes=19, cityscapes=True)
    reference = CityscapesMetric()
    for pred, _, label_ids, instance in dataset.items:
        reference.update(pred, label_ids, instance)
    expected = reference.compute()
    for key in ("miou", "iiou_class", "iou_category", "iiou_category"):
        assert result["cityscapes"][key] == pytest.approx(expected[key], nan_ok=True), key
    assert not math.isnan(result["cityscapes"]["iiou_class"])
    with pytest.raises(DataError, match="with_instances=True"):
        evaluate_model(OracleModel(19), CityscapesLike(False), EvalConfig(), "cpu", num_classes=19, cityscapes=True)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = evaluate_model(OracleModel(3), acdc_like(), EvalConfig(), "cpu", num_classes=3, distributed=True)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({k: result[k] for k in ("iou", "pixel_acc", "num_images", "per_condition")}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_shards_sum_to_the_single_process_result(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    single = evaluate_model(OracleModel(3), acdc_like(), EvalConfig(), "cpu", num_classes=3)
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            shard = json.load(f)
        assert shard["num_images"] == 3  # 3 samples over 2 ranks: nothing padded or counted twice
        assert shard["iou"] == pytest.approx(single["iou"])
        assert shard["pixel_acc"] == pytest.approx(single["pixel_acc"])
        assert shard["per_condition"]["night"]["iou"] == pytest.approx(single["per_condition"]["night"]["iou"])


def test_evaluate_writes_json_and_markdown_and_never_overwrites(tmp_path):
    cfg = Config()
    cfg.data.name = "synthetic"
    cfg.data.image_size = [32, 48]
    cfg.data.num_samples = 8  # the val split gets 8 // 4 = 2 scenes
    cfg.model.arch, cfg.model.head, cfg.model.num_classes = "hrnetv2_w18_small_v1", "fcn", 8
    cfg.eval.boundary_width = 2
    torch.manual_seed(0)
    ckpt = checkpoint.save(tmp_path / "run" / "best.pth", build_model(cfg.model), cfg)

    result = evaluate(cfg, ckpt, progress=False)
    json_path, md_path = tmp_path / "run" / "eval_val.json", tmp_path / "run" / "eval_val.md"
    saved = json.loads(json_path.read_text())
    assert saved["num_images"] == 2 and saved["split"] == "val" and saved["dataset"] == "synthetic"
    assert len(saved["iou"]) == 8 and saved["class_names"][0] == "sky"
    assert saved["miou"] == pytest.approx(result["miou"])
    assert 0.0 <= saved["pixel_acc"] <= 1.0
    markdown = md_path.read_text()
    assert "| sky |" in markdown and "boundary mIoU (2 px)" in markdown

    json_path.write_text("{}")
    with pytest.raises(OvenetError, match=r"eval_val.json already exists.*--overwrite"):
        evaluate(cfg, ckpt, progress=False)
    assert json_path.read_text() == "{}"  # untouched
    evaluate(cfg, ckpt, progress=False, overwrite=True)
    assert json.loads(json_path.read_text())["num_images"] == 2
    other = evaluate(None, ckpt, out_dir=tmp_path / "elsewhere", progress=False)  # the checkpoint's own config
    assert (tmp_path / "elsewhere" / "eval_val.json").is_file()
    assert other["miou"] == pytest.approx(result["miou"])


@pytest.mark.parametrize("label_resolution", ["official", "original"])
def test_ade20k_label_resolution_decides_the_labels_the_metric_counts(tmp_path, monkeypatch, label_resolution):
    from PIL import Image

    import ovenet.engine.evaluate as evaluate_module

    seen = []

    class Spy(evaluate_module.ConfusionMatrix):
        def update(self, pred, target):
            seen.append((tuple(pred.shape), target.clone()))
            super().update(pred, target)

    monkeypatch.setattr(evaluate_module, "ConfusionMatrix", Spy)
    root = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    annotation = rng.integers(0, 151, (13, 25)).astype(np.uint8)
    for folder, name, array in (("images", "ADE_val_00000001.jpg", rng.integers(0, 256, (13, 25, 3), np.uint8)),
                                ("annotations", "ADE_val_00000001.png", annotation)):
        (root / folder / "validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / folder / "validation" / name)
    cfg = Config()
    cfg.data.name, cfg.data.root, cfg.data.val_split = "ade20k", str(root), "validation"
    cfg.data.eval_resize_short = 10  # stands in for 520: short side 13 -> 10, long side 25 -> 19
    cfg.model.arch, cfg.model.head, cfg.model.num_classes = "hrnetv2_w18_small_v1", "fcn", 150
    cfg.model.offset.enabled = False
    cfg.eval.label_resolution = label_resolution
    torch.manual_seed(0)
    ckpt = checkpoint.save(tmp_path / "run" / "best.pth", build_model(cfg.model), cfg)

    result = evaluate(cfg, ckpt, progress=False)
    (pred_shape, label), = seen
    reduced = torch.from_numpy(np.where(annotation == 0, 255, annotation.astype(np.int64) - 1))
    if label_resolution == "official":
        # Short side 10, padded with ignore to multiples of 8: 16 x 24; the prediction is made at that size too.
        assert pred_shape == tuple(label.shape) == (16, 24)
        assert torch.all(label[10:] == 255) and torch.all(label[:, 19:] == 255)
        rows = (np.arange(10) * 13 / 10).astype(np.int64)  # nearest: source floor(i * in / out)
        cols = (np.arange(19) * 25 / 19).astype(np.int64)
        assert torch.equal(label[:10, :19], reduced[rows][:, cols])
    else:
        assert pred_shape == tuple(label.shape) == (13, 25) and torch.equal(label, reduced)
    assert result["eval"]["label_resolution"] == label_resolution
    saved = json.loads((tmp_path / "run" / "eval_validation.json").read_text())
    assert saved["eval"]["label_resolution"] == label_resolution
    assert f"labels {label_resolution}" in (tmp_path / "run" / "eval_validation.md").read_text()
