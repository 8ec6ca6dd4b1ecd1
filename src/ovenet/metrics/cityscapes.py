"""Cityscapes benchmark figures, computed as cityscapesScripts' ``evalPixelLevelSemanticLabeling`` does.

Everything is accumulated over the 34 Cityscapes *label ids* (not train ids), as the official script does:

- IoU of a class: ``tp / (tp + fp + fn)`` where ``fn`` counts every other prediction on the class's pixels
  (including predictions of ignored labels) and ``fp`` counts predictions of the class on pixels of
  *evaluated* classes only (pixels of ignored labels are not false positives). NaN when the denominator is 0.
- iIoU of a class (instance classes only): ``tp`` and ``fn`` come from the ground-truth instances, each pixel
  weighted by ``avg_class_size[class] / instance_size``; ``fp`` is the unweighted one above.
- IoU of a category: the same with the category's evaluated classes merged into one.
- iIoU of a category: only for ``human`` and ``vehicle`` (every labelled member has instances). A quirk of the
  script kept here: its prediction mask and false positives use *all* the category's label ids, so predicting
  ``caravan``/``trailer`` (ignored classes) on a car counts as a vehicle hit.
- Averages skip NaN entries; the average is NaN when every entry is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ovenet.data.base import to_numpy
from ovenet.data.cityscapes import LABELS
from ovenet.errors import CheckpointError, ConfigError, DataError

NUM_LABEL_IDS = 34

# Mean instance size per class over the Cityscapes training set at 1024x2048, as in cityscapesScripts.
DEFAULT_AVG_CLASS_SIZE: dict[str, float] = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}

NAMES = [name for name, *_ in LABELS]
EVAL_IDS = [lid for _, lid, _, _, _, ignored in LABELS if not ignored]
CLASS_NAMES = [NAMES[lid] for lid in EVAL_IDS]  # the 19 evaluated classes, in train-id order
INSTANCE_IDS = [lid for _, lid, _, _, has_inst, ignored in LABELS if has_inst and not ignored]
# 'void' is left out: it has no evaluated class, so its score is always NaN and never enters an average.
CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
INSTANCE_CATEGORIES = ("human", "vehicle")
TRAIN_ID_TO_LABEL_ID = np.array([lid for _, lid, tid, *_ in sorted(LABELS, key=lambda r: r[2]) if tid != 255])

_CATEGORY_OF = [cat for _, _, _, cat, _, _ in LABELS]
_IGNORED = np.array([ignored for *_, ignored in LABELS])
_CATEGORY_EVAL_IDS = {c: [lid for lid in EVAL_IDS if _CATEGORY_OF[lid] == c] for c in CATEGORIES}
_CATEGORY_ALL_IDS = {c: [lid for lid in range(NUM_LABEL_IDS) if _CATEGORY_OF[lid] == c] for c in CATEGORIES}


def _score_average(scores: list[float]) -> float:
    valid = [s for s in scores if not math.isnan(s)]
    return sum(valid) / len(valid) if valid else math.nan


def _ratio(tp: float, fp: float, fn: float) -> float:
    denom = tp + fp + fn
    return float(tp) / float(denom) if denom != 0 else math.nan


class CityscapesMetric:
    """Accumulates Cityscapes mIoU, iIoU class, IoU category and iIoU category over images.

    ``avg_class_size`` maps instance class names to the reference instance size (default: the benchmark's
    values, calibrated for 1024x2048 frames: iIoU on downscaled images is not comparable to published ones).
    """

    def __init__(self, avg_class_size: Mapping[str, float] | None = None):
        sizes = dict(DEFAULT_AVG_CLASS_SIZE if avg_class_size is None else avg_class_size)
        missing = [NAMES[lid] for lid in INSTANCE_IDS if NAMES[lid] not in sizes]
        if missing:
            raise ConfigError(
                f"avg_class_size lacks {', '.join(missing)}; give a size for every instance class"
            )
        self.avg_class_size = sizes
        self.reset()

    def reset(self) -> None:
        self.matrix = np.zeros((NUM_LABEL_IDS, NUM_LABEL_IDS), dtype=np.int64)
        self._class_tp = np.zeros(NUM_LABEL_IDS)  # weighted instance true positives, by label id
        self._class_fn = np.zeros(NUM_LABEL_IDS)
        self._category_tp = np.zeros(len(INSTANCE_CATEGORIES))
        self._category_fn = np.zeros(len(INSTANCE_CATEGORIES))
        self.num_images = 0
        self.num_images_without_instances = 0

    def update(
        self, pred: Any, gt_label_ids: Any, gt_instance_ids: Any | None = None, pred_is_train_ids: bool = True
    ) -> None:
        """Adds one image ``[H, W]`` or a batch ``[..., H, W]`` (numpy arrays or torch tensors).

        ``pred`` holds train ids (0..18, anything else = no class, scored like the label 'unlabeled') or, with
        ``pred_is_train_ids=False``, label ids 0..33. ``gt_instance_ids`` is the ``*_instanceIds.png`` content
        (label id * 1000 + k); without it iIoU figures come out NaN.
        """
        pred, gt = to_numpy(pred).astype(np.int64), to_numpy(gt_label_ids).astype(np.int64)
        inst = None if gt_instance_ids is None else to_numpy(gt_instance_ids).astype(np.int64)
        if pred.shape != gt.shape or (inst is not None and inst.shape != gt.shape) or gt.ndim < 2:
            shapes = [tuple(a.shape) for a in (pred, gt, inst) if a is not None]
            raise ValueError(
                f"pred, gt_label_ids and gt_instance_ids must share one [..., H, W] shape, got {shapes}"
            )
        if gt.size and (gt.min() < 0 or gt.max() >= NUM_LABEL_IDS):
            raise DataError(
                f"ground truth holds label id {gt.min() if gt.min() < 0 else gt.max()}, outside 0..33; "
                "pass the gtFine *_labelIds.png content, not train ids"
            )
        if pred_is_train_ids:
            in_range = (pred >= 0) & (pred < len(TRAIN_ID_TO_LABEL_ID))
            pred = np.where(
                in_range, TRAIN_ID_TO_LABEL_ID[np.clip(pred, 0, len(TRAIN_ID_TO_LABEL_ID) - 1)], 0
            )
        elif pred.size and (pred.min() < 0 or pred.max() >= NUM_LABEL_IDS):
            raise ValueError(
                "pred holds values outside the label ids 0..33; pass pred_is_train_ids=True for train ids"
            )

        self.matrix += np.bincount(
            (gt * NUM_LABEL_IDS + pred).ravel(), minlength=NUM_LABEL_IDS * NUM_LABEL_IDS
        ).reshape(NUM_LABEL_IDS, NUM_LABEL_IDS)
        height, width = gt.shape[-2:]
        images = pred.reshape(-1, height, width)
        self.num_images += len(images)
        if inst is None:
            self.num_images_without_instances += len(images)
            return
        for image_pred, image_inst in zip(images, inst.reshape(-1, height, width), strict=True):
            self._add_instances(image_pred, image_inst)

    def _add_instances(self, pred: np.ndarray, inst: np.ndarray) -> None:
        # Instance ids are only unique within one image, hence one call per image.
        selected = inst > 1000  # the script's test; ids below are plain label ids (crowd or stuff regions)
        instance_ids, index = np.unique(inst[selected], return_inverse=True)
        if not len(instance_ids):
            return
        pred = pred[selected]
        sizes = np.bincount(index)
        label_ids = instance_ids // 1000
        hits = np.bincount(index, weights=pred == label_ids[index])
        category_hits = [
            np.bincount(index, weights=np.isin(pred, _CATEGORY_ALL_IDS[c]), minlength=len(instance_ids))
            for c in INSTANCE_CATEGORIES
        ]
        for i, label_id in enumerate(label_ids):
            if label_id >= NUM_LABEL_IDS:
                raise DataError(f"instance id {instance_ids[i]} names label id {label_id}, outside 0..33")
            if _IGNORED[label_id]:
                continue
            name = NAMES[label_id]
            if label_id not in INSTANCE_IDS:
                raise DataError(
                    f"instance id {instance_ids[i]} belongs to '{name}', a class without instances"
                )
            weight = self.avg_class_size[name] / float(sizes[i])
            self._class_tp[label_id] += float(hits[i]) * weight
            self._class_fn[label_id] += float(sizes[i] - hits[i]) * weight
            category = _CATEGORY_OF[label_id]
            if category in INSTANCE_CATEGORIES:
                c = INSTANCE_CATEGORIES.index(category)
                self._category_tp[c] += float(category_hits[c][i]) * weight
                self._category_fn[c] += float(sizes[i] - category_hits[c][i]) * weight

    def compute(self) -> dict[str, Any]:
        """Returns ``miou``, ``iiou_class``, ``iou_category``, ``iiou_category`` and per-class/category dicts.

        ``iou_per_class`` has the 19 classes, ``iiou_per_class`` the 8 instance classes, ``iou_per_category``
        the 7 categories and ``iiou_per_category`` human and vehicle; missing entries are NaN in the script.
        """
        m = self.matrix
        no_instances = self.num_images_without_instances > 0
        iou, iiou = {}, {}
        for label_id in EVAL_IDS:
            tp = int(m[label_id, label_id])
            fn = int(m[label_id].sum()) - tp
            fp = int(m[EVAL_IDS, label_id].sum()) - tp
            iou[NAMES[label_id]] = _ratio(tp, fp, fn)
            if label_id in INSTANCE_IDS:
                tp_w, fn_w = self._class_tp[label_id], self._class_fn[label_id]
                iiou[NAMES[label_id]] = math.nan if no_instances else _ratio(tp_w, fp, fn_w)
        iou_category, iiou_category = {}, {}
        for category in CATEGORIES:
            ids = _CATEGORY_EVAL_IDS[category]
            outside = [lid for lid in EVAL_IDS if _CATEGORY_OF[lid] != category]
            tp = int(m[np.ix_(ids, ids)].sum())
            fn = int(m[ids].sum()) - tp
            iou_category[category] = _ratio(tp, int(m[np.ix_(outside, ids)].sum()), fn)
            if category in INSTANCE_CATEGORIES:
                c = INSTANCE_CATEGORIES.index(category)
                fp = int(m[np.ix_(outside, _CATEGORY_ALL_IDS[category])].sum())
                tp_w, fn_w = self._category_tp[c], self._category_fn[c]
                iiou_category[category] = math.nan if no_instances else _ratio(tp_w, fp, fn_w)
        return {
            "miou": _score_average(list(iou.values())),
            "iiou_class": _score_average(list(iiou.values())),
            "iou_category": _score_average(list(iou_category.values())),
            "iiou_category": _score_average(list(iiou_category.values())),
            "iou_per_class": iou,
            "iiou_per_class": iiou,
            "iou_per_category": iou_category,
            "iiou_per_category": iiou_category,
        }

    def _packed(self) -> np.ndarray:
        return np.concatenate(
            [
                self.matrix.ravel().astype(np.float64),  # exact: counts stay far below 2**53
                self._class_tp,
                self._class_fn,
                self._category_tp,
                self._category_fn,
                [self.num_images, self.num_images_without_instances],
            ]
        )

    def _unpack(self, packed: np.ndarray) -> None:
        sizes = [
            NUM_LABEL_IDS**2,
            NUM_LABEL_IDS,
            NUM_LABEL_IDS,
            len(INSTANCE_CATEGORIES),
            len(INSTANCE_CATEGORIES),
            2,
        ]
        matrix, class_tp, class_fn, cat_tp, cat_fn, counts = np.split(packed, np.cumsum(sizes)[:-1])
        self.matrix = np.rint(matrix).astype(np.int64).reshape(NUM_LABEL_IDS, NUM_LABEL_IDS)
        self._class_tp, self._class_fn = class_tp.copy(), class_fn.copy()
        self._category_tp, self._category_fn = cat_tp.copy(), cat_fn.copy()
        self.num_images, self.num_images_without_instances = (round(v) for v in counts)

    def merge(self, other: CityscapesMetric) -> None:
        """Adds another metric's accumulated state (same ``avg_class_size`` assumed)."""
        self._unpack(self._packed() + other._packed())

    def all_reduce(self) -> None:
        """Sums the state over all ranks; a no-op when torch.distributed is not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        packed = torch.from_numpy(self._packed()).to(device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        self._unpack(packed.cpu().numpy())

    def state_dict(self) -> dict[str, Any]:
        return {"avg_class_size": dict(self.avg_class_size), "packed": self._packed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        packed = np.asarray(state.get("packed", ()), dtype=np.float64)
        if packed.shape != self._packed().shape:
            raise CheckpointError(
                "Cityscapes metric state has the wrong layout; save it with CityscapesMetric"
            )
        self.avg_class_size = dict(state.get("avg_class_size", self.avg_class_size))
        self._unpack(packed)
