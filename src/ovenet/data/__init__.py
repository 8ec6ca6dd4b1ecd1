"""Datasets, transforms and loaders.

Every dataset is a ``torch.utils.data.Dataset`` whose ``ds[i]`` is a dict:

- ``image``: float32 [3,H,W], RGB, ImageNet-normalised;
- ``label``: int64 [H,W] train ids, 255 = ignore (absent for unlabelled splits);
- ``name``: stable relative id, usable as an output file stem (e.g. ``frankfurt/frankfurt_000000_000294``);
- optional ``condition`` (ACDC), ``instance`` (int32) and ``label_ids`` (int64) (Cityscapes with_instances).

Each dataset has ``num_classes``, ``class_names``, ``palette`` and ``ignore_index`` (255). Broken layouts and
files raise :class:`ovenet.errors.DataError`; :func:`check_dataset` lists every problem at once.
"""

from ovenet.data.ade20k import ADE20KDataset
from ovenet.data.base import SegmentationDataset, check_dataset
from ovenet.data.camvid import CamVidDataset
from ovenet.data.cityscapes import (
    CITYSCAPES_ID_TO_TRAINID,
    ACDCDataset,
    CityscapesDataset,
    trainid_to_labelid,
)
from ovenet.data.factory import (
    DATASET_NAMES,
    build_dataset,
    build_transform,
    check_splits_apart,
    class_info,
    dataset_info,
)
from ovenet.data.folder import FolderDataset, ListDataset
from ovenet.data.loader import build_loader, collate_samples, seed_worker
from ovenet.data.synthetic import SyntheticScenes
from ovenet.data.transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    Normalisation,
    TrainTransform,
    denormalize,
    normalize,
)

__all__ = [
    "CITYSCAPES_ID_TO_TRAINID",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ACDCDataset",
    "ADE20KDataset",
    "CamVidDataset",
    "CityscapesDataset",
    "EvalTransform",
    "FolderDataset",
    "ListDataset",
    "Normalisation",
    "SegmentationDataset",
    "SyntheticScenes",
    "TrainTransform",
    "build_dataset",
    "build_loader",
    "build_transform",
    "check_dataset",
    "check_splits_apart",
    "class_info",
    "collate_samples",
    "dataset_info",
    "denormalize",
    "normalize",
    "seed_worker",
    "trainid_to_labelid",
]
