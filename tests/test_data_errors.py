"""Every bad-input case raises DataError naming the culprit file; check_dataset collects them all."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovenet.data import (
    ACDCDataset,
    ADE20KDataset,
    CamVidDataset,
    CityscapesDataset,
    FolderDataset,
    ListDataset,
    check_dataset,
)
from ovenet.errors import DataError, OvenetError


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def image(h: int = 8, w: int = 12) -> np.ndarray:
    return np.full((h, w, 3), 100, np.uint8)


def camvid_tree(root: Path, n: int = 3) -> Path:
    for i in range(n):
        write_png(root / f"train/f{i}.png", image())
        write_png(root / f"trainannot/f{i}.png", np.full((8, 12), i, np.uint8))
    return root


def cityscapes_tree(root: Path) -> Path:
    write_png(root / "leftImg8bit/val/bonn/bonn_0_leftImg8bit.png", image())
    write_png(root / "gtFine/val/bonn/bonn_0_gtFine_labelIds.png", np.full((8, 12), 7, np.uint8))
    return root


def raises_data_error(*fragments: str):
    """pytest.raises(DataError) whose one-line message contains every fragment."""
    return pytest.raises(DataError, match="(?s)" + "".join(f"(?=.*{re.escape(str(f))})" for f in fragments))


# --- layout errors at construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda root: CityscapesDataset(root, "train"), "leftImg8bit/train/*/*_leftImg8bit.png"),
        (lambda root: ACDCDataset(root, "train"), "rgb_anon/fog/train/*/*_rgb_anon.png"),
        (lambda root: ADE20KDataset(root, "training"), "images/training/*.jpg"),
        (lambda root: CamVidDataset(root, "train"), "train/*.(png|jpg)"),
        (lambda root: FolderDataset(root / "images", num_classes=2), "images/**/*."),
    ],
)
def test_empty_root_names_expected_layout_and_what_was_found(tmp_path, build, pattern):
    (tmp_path / "unrelated.txt").write_text("x")
    with raises_data_error(pattern, "unrelated.txt") as info:
        build(tmp_path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, OvenetError)


def test_wrongly_nested_cityscapes_root_reports_contents(tmp_path):
    cityscapes_tree(tmp_path)
    with raises_data_error(
        "leftImg8bit/val/*/*_leftImg8bit.png", "does not exist", "leftImg8bit contains val/"
    ):
        CityscapesDataset(tmp_path / "leftImg8bit", "val")  # one level too deep
    with raises_data_error("split 'testing' is unknown"):
        CityscapesDataset(tmp_path, "testing")


@pytest.mark.parametrize("which", ["cityscapes", "instances", "ade20k", "camvid", "folder", "list"])
def test_missing_label_names_image_and_expected_path(tmp_path, which):
    if which in ("cityscapes", "instances"):
        cityscapes_tree(tmp_path)
        img = tmp_path / "leftImg8bit/val/bonn/bonn_0_leftImg8bit.png"
        if which == "cityscapes":
            expected = tmp_path / "gtFine/val/bonn/bonn_0_gtFine_labelIds.png"
            expected.unlink()
            build = lambda: CityscapesDataset(tmp_path, "val")
        else:
            expected = tmp_path / "gtFine/val/bonn/bonn_0_gtFine_instanceIds.png"
            build = lambda: CityscapesDataset(tmp_path, "val", with_instances=True)
    elif which == "ade20k":
        img = write_png(tmp_path / "images/validation/ADE_val_1.jpg", image())
        expected = tmp_path / "annotations/validation/ADE_val_1.png"
        build = lambda: ADE20KDataset(tmp_path, "validation")
    elif which == "camvid":
        camvid_tree(tmp_path)
        (tmp_path / "train.txt").write_text(
            "train/f0.png trainannot/f0.png\ntrain/f1.png trainannot/nope.png\n"
        )
        img, expected = tmp_path / "train/f1.png", tmp_path / "trainannot/nope.png"
        build = lambda: CamVidDataset(tmp_path, "train")
    elif which == "folder":
        camvid_tree(tmp_path)
        (tmp_path / "trainannot/f1.png").unlink()
        img, expected = tmp_path / "train/f1.png", tmp_path / "trainannot/f1.png"
        build = lambda: FolderDataset(tmp_path / "train", tmp_path / "trainannot", num_classes=11)
    else:
        camvid_tree(tmp_path)
        (tmp_path / "l.txt").write_text("train/f2.png trainannot/f9.png\n")
        img, expected = tmp_path / "train/f2.png", tmp_path / "trainannot/f9.png"
        build = lambda: ListDataset(tmp_path / "l.txt", num_classes=11)
    with raises_data_error("no label for image", img, expected):
        build()


def test_missing_labels_are_counted(tmp_path):
    camvid_tree(tmp_path, n=3)
    for i in range(3):
        (tmp_path / f"trainannot/f{i}.png").unlink()
    with raises_data_error("f0.png", "and 2 more images without labels"):
        CamVidDataset(tmp_path, "train")


def test_bad_list_files(tmp_path):
    camvid_tree(tmp_path)
    (tmp_path / "three.txt").write_text("train/f0.png trainannot/f0.png extra\n")
    with raises_data_error("three.txt:1", "3 fields"):
        ListDataset(tmp_path / "three.txt", num_classes=11)
    (tmp_path / "mixed.txt").write_text("train/f0.png trainannot/f0.png\ntrain/f1.png\n")
    with raises_data_error("mixes lines with and without labels"):
        ListDataset(tmp_path / "mixed.txt", num_classes=11)
    with raises_data_error("nothere.txt", "does not exist"):
        ListDataset(tmp_path / "nothere.txt", num_classes=11)


# --- broken files at load time -------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_and_truncated_files_are_named(tmp_path):
    camvid_tree(tmp_path, n=3)
    big = np.random.default_rng(0).integers(
        0, 256, (64, 96, 3), dtype=np.uint8
    )  # incompressible: truncation bites
    write_png(tmp_path / "train/f0.png", big)
    write_png(tmp_path / "trainannot/f0.png", np.zeros((64, 96), np.uint8))
    truncate(tmp_path / "train/f0.png")
    (tmp_path / "train/f1.png").write_bytes(b"not an image at all")
    (tmp_path / "trainannot/f2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = CamVidDataset(tmp_path, "train")
    with raises_data_error("image", tmp_path / "train/f0.png", "corrupt or truncated"):
        dataset[0]
    with raises_data_error("image", tmp_path / "train/f1.png"):
        dataset[1]
    with raises_data_error("label", tmp_path / "trainannot/f2.png"):
        dataset[2]


@pytest.mark.parametrize(
    "name, bad_value, allowed",
    [("camvid", 37, "0-11"), ("ade20k", 151, "0-150"), ("cityscapes", 34, "0-33")],
)
def test_label_values_outside_the_table(tmp_path, name, bad_value, allowed):
    label = np.full((8, 12), 1, np.uint8)
    label[2, 3] = bad_value
    if name == "camvid":
        camvid_tree(tmp_path, n=1)
        path = write_png(tmp_path / "trainannot/f0.png", label)
        dataset = CamVidDataset(tmp_path, "train")
    elif name == "ade20k":
        write_png(tmp_path / "images/training/ADE_train_1.jpg", image())
        path = write_png(tmp_path / "annotations/training/ADE_train_1.png", label)
        dataset = ADE20KDataset(tmp_path, "train")
    else:
        cityscapes_tree(tmp_path)
        path = write_png(tmp_path / "gtFine/val/bonn/bonn_0_gtFine_labelIds.png", label)
        dataset = CityscapesDataset(tmp_path, "val")
    with raises_data_error(path, f"values {bad_value} outside", allowed):
        dataset[0]


def test_cityscapes_accepts_255_as_id_minus_one(tmp_path):
    cityscapes_tree(tmp_path)
    label = np.full((8, 12), 255, np.uint8)
    write_png(tmp_path / "gtFine/val/bonn/bonn_0_gtFine_labelIds.png", label)
    assert CityscapesDataset(tmp_path, "val")[0]["label"].unique().tolist() == [255]


def test_size_mismatch_names_both_sizes(tmp_path):
    camvid_tree(tmp_path, n=1)
    write_png(tmp_path / "trainannot/f0.png", np.zeros((10, 12), np.uint8))
    with raises_data_error("8x12", "10x12", tmp_path / "train/f0.png", tmp_path / "trainannot/f0.png"):
        CamVidDataset(tmp_path, "train")[0]


def test_colour_label_is_rejected(tmp_path):
    camvid_tree(tmp_path, n=1)
    write_png(tmp_path / "trainannot/f0.png", image())
    with raises_data_error(tmp_path / "trainannot/f0.png", "mode RGB", "single-channel"):
        CamVidDataset(tmp_path, "train")[0]


def test_user_dataset_label_range(tmp_path):
    camvid_tree(tmp_path, n=3)
    dataset = FolderDataset(tmp_path / "train", tmp_path / "trainannot", num_classes=2)
    with raises_data_error("f2.png", "values 2 outside", "0-1 (255 = ignore)"):
        dataset[2]
    with raises_data_error("label_map"):
        FolderDataset(tmp_path / "train", tmp_path / "trainannot", num_classes=2, label_map={0: 5})


# --- check_dataset -------------------------------------------------------------------------------------------------


def test_check_dataset_lists_every_bad_file(tmp_path):
    camvid_tree(tmp_path, n=6)
    (tmp_path / "train/f1.png").write_bytes(b"junk")
    write_png(tmp_path / "trainannot/f3.png", np.full((8, 12), 37, np.uint8))
    write_png(tmp_path / "trainannot/f4.png", np.zeros((4, 4), np.uint8))
    problems = check_dataset(CamVidDataset(tmp_path, "train"))
    assert len(problems) == 3
    assert "f1.png" in problems[0] and "37" in problems[1] and "4x4" in problems[2]
    assert check_dataset(CamVidDataset(camvid_tree(tmp_path / "clean"), "train")) == []


def test_check_dataset_on_shipped_camvid_val_is_clean():
    camvid = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
    if not camvid.is_dir():
        pytest.skip(f"shared CamVid not found at {camvid}")
    assert check_dataset(CamVidDataset(camvid, "val")) == []
