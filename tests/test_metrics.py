"""ConfusionMatrix: hand-computed cases, torchmetrics as reference, state handling."""

import math

import pytest
import torch

from ovenet.errors import CheckpointError
from ovenet.metrics import ConfusionMatrix
from ovenet.metrics import confusion as confusion_module

TARGET = torch.tensor([[0, 0, 1], [1, 2, 2], [255, 0, 1]])
PRED = torch.tensor([[0, 1, 1], [1, 2, 0], [2, 0, 2]])


def test_hand_computed_3x3():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    # (target, pred) pairs, the 255 pixel skipped: rows = target, columns = prediction.
    assert cm.matrix.tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    r = cm.compute()
    assert r["iou"] == pytest.approx([2 / 4, 2 / 4, 1 / 3])
    assert r["miou"] == pytest.approx(4 / 9)
    assert r["miou_all"] == pytest.approx(4 / 9)
    assert r["pixel_acc"] == pytest.approx(5 / 8)
    assert r["per_class_acc"] == pytest.approx([2 / 3, 2 / 3, 1 / 2])
    assert r["mean_acc"] == pytest.approx(11 / 18)


def test_absent_class_nan_vs_official_zero():
    cm = ConfusionMatrix(4)
    cm.update(PRED.unsqueeze(0), TARGET.unsqueeze(0).to(torch.uint8))  # leading dims, other int dtype
    r = cm.compute()
    assert math.isnan(r["iou"][3]) and math.isnan(r["per_class_acc"][3])
    assert r["miou"] == pytest.approx(4 / 9)  # mean over the 3 present classes
    assert r["miou_all"] == pytest.approx((4 / 3) / 4)  # official: absent class counts 0
    assert r["mean_acc"] == pytest.approx(11 / 18)


def test_prediction_outside_range_is_a_false_negative():
    cm = ConfusionMatrix(2)
    cm.update(
        torch.tensor([0, 7, 1, -1]), torch.tensor([0, 0, 1, 300])
    )  # target 300: outside [0, C), skipped
    r = cm.compute()
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    assert r["iou"] == pytest.approx([1 / 2, 1.0])
    assert r["pixel_acc"] == pytest.approx(2 / 3)
    assert r["per_class_acc"] == pytest.approx([1 / 2, 1.0])


def test_empty_is_nan():
    r = ConfusionMatrix(3).compute()
    assert math.isnan(r["miou"]) and math.isnan(r["pixel_acc"]) and math.isnan(r["mean_acc"])
    assert r["miou_all"] == 0.0


@pytest.mark.parametrize("use_bincount", [True, False], ids=["bincount", "scatter_add"])
def test_matches_torchmetrics(monkeypatch, use_bincount):
    tm = pytest.importorskip("torchmetrics.classification")
    monkeypatch.setattr(confusion_module, "_use_bincount", lambda device: use_bincount)
    num_classes, g = 5, torch.Generator().manual_seed(0)
    pred = torch.randint(0, num_classes, (2, 3, 17, 19), generator=g)
    noise = torch.randint(0, num_classes, pred.shape, generator=g)
    target = torch.where(torch.rand(pred.shape, generator=g) < 0.6, pred, noise)  # ~70 % correct
    target[torch.rand(pred.shape, generator=g) < 0.1] = 255

    cm = ConfusionMatrix(num_classes)
    for p, t in zip(pred, target, strict=True):  # accumulate over several updates
        cm.update(p, t)
    r = cm.compute()
    flat_pred, flat_target = pred.reshape(2, -1), target.reshape(2, -1)

    def ref(metric):
        return metric(flat_pred, flat_target)

    iou = ref(tm.MulticlassJaccardIndex(num_classes, average=None, ignore_index=255))
    assert r["iou"] == pytest.approx(iou.tolist(), abs=1e-6)
    assert r["miou"] == pytest.approx(
        float(ref(tm.MulticlassJaccardIndex(num_classes, ignore_index=255))), abs=1e-6
    )
    acc = ref(tm.MulticlassAccuracy(num_classes, average=None, ignore_index=255))
    assert r["per_class_acc"] == pytest.approx(acc.tolist(), abs=1e-6)
    macro = ref(tm.MulticlassAccuracy(num_classes, average="macro", ignore_index=255))
    assert r["mean_acc"] == pytest.approx(float(macro), abs=1e-6)
    micro = ref(tm.MulticlassAccuracy(num_classes, average="micro", ignore_index=255))
    assert r["pixel_acc"] == pytest.approx(float(micro), abs=1e-6)


def test_merge_reset_and_state_roundtrip():
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED, TARGET)
    b.update(PRED, TARGET)
    a.merge(b)
    assert a.matrix.tolist() == [[4, 2, 0], [0, 4, 2], [2, 0, 2]]
    restored = ConfusionMatrix(3)
    restored.load_state_dict(a.state_dict())
    assert restored.compute() == a.compute()
    with pytest.raises(CheckpointError, match="num_classes"):
        ConfusionMatrix(4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError):
        ConfusionMatrix(4).merge(a)
    a.reset()
    assert a.matrix.sum() == 0


def test_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(PRED, TARGET[:2])
    with pytest.raises(TypeError, match="integer"):
        cm.update(PRED.float(), TARGET)


def test_all_reduce_without_process_group_is_noop():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    cm.all_reduce()
    assert cm.matrix.sum() == 8


def _all_reduce_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cm = ConfusionMatrix(3)
    cm.update(PRED if rank == 0 else TARGET.clamp(max=2), TARGET)
    cm.all_reduce()
    results[rank] = cm.matrix.tolist()
    dist.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    mp = torch.multiprocessing.get_context("spawn")
    with mp.Manager() as manager:
        results = manager.dict()
        procs = [
            mp.Process(target=_all_reduce_worker, args=(r, str(tmp_path / "pg"), results)) for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
        expected = ConfusionMatrix(3)
        expected.update(PRED, TARGET)
        expected.update(TARGET.clamp(max=2), TARGET)
        # A sum, not the official code's per-rank average.
        assert results[0] == results[1] == expected.matrix.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_does_not_sync_on_cuda():
    cm = ConfusionMatrix(3, device="cuda")
    pred, target = PRED.cuda(), TARGET.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm.update(pred, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cm.matrix.cpu().tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
