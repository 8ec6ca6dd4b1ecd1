"""Your own data: the splits kept apart (training refuses validating on training images unless asked),
data.ignore_ids for void ids, errors that name the fix, check-data that groups repeats, JPEG labels refused by
name, convert-labels from colour masks to palette id PNGs, and data.palette in predict's colour output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import assert_one_line_error, run
from PIL import Image

from ovenet import vis
from ovenet.config import load_config
from ovenet.data import CamVidDataset, FolderDataset, ListDataset, build_dataset, check_splits_apart
from ovenet.data.base import read_label_map
from ovenet.data.camvid import CAMVID_PALETTE
from ovenet.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = ["device=cpu", "model.backbone=hrnetv2", "model.arch=hrnetv2_w18_small_v1", "model.head=fcn",
              "model.pretrained=null", "data.crop_size=[32,32]", "data.base_size=48", "data.num_workers=0",
              "train.iters=1", "train.batch_size=2", "train.report=false", "train.log_every=1", "loss.type=ce"]


def labels_with_void(seed: int, shape=(24, 32), num_classes: int = 3, void: int = 11) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, shape).astype(np.uint8)
    label[: shape[0] // 3] = void  # a band of void pixels
    return label


def own_data(root: Path, splits=("train", "val"), count: int = 3, void: int | None = None) -> Path:
    """images/<split>/im<i>.png and labels/<split>/im<i>.png, 3 classes (plus ``void`` pixels when given)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for i in range(count):
            for sub in ("images", "labels"):
                (root / sub / split).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"im{i}.png")
            label = labels_with_void(i, void=void) if void is not None else labels_with_void(i) % 3
            Image.fromarray(label).save(root / "labels" / split / f"im{i}.png")
    return root


def folder_config(tmp_path: Path, root: Path, **data) -> Path:
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump({
        "_base_": "own_data_lite0_ovenet", "name": "own", "model": {"num_classes": 3},
        "data": {"root": str(root), "num_classes": 3, **data}}))
    return config


# --- validation split vs training split ---------------------------------------------------------------------------

def test_training_refuses_validating_on_the_training_folder(capsys, tmp_path):
    """image_dir without {split}: both splits are images/train, and training says so before anything trains."""
    root = own_data(tmp_path / "own", splits=("train",))
    config = folder_config(tmp_path, root, image_dir="images/train", label_dir="labels/train")
    code, out, err = run(capsys, "train", str(config), "--run-dir", str(tmp_path / "run"), *TINY_TRAIN)
    assert code == 2
    assert_one_line_error(err, "the validation set (val: ", "is the training set (train: ",
                          str(root / "images" / "train"), "{split}", "data.allow_val_overlap=true")
    assert not (tmp_path / "run" / "last.pth").exists()
    # check-data says the same before a training is started
    code, out, err = run(capsys, "check-data", str(config), "data.image_dir=images/train",
                         "data.label_dir=labels/train")
    assert code == 2 and "[train/val] the validation set (val: " in out and "{split}" in out


def test_overlap_trains_when_asked_for_explicitly_with_a_warning(capsys, tmp_path):
    root = own_data(tmp_path / "own", splits=("train",), count=2)
    config = folder_config(tmp_path, root, image_dir="images/train", label_dir="labels/train",
                           allow_val_overlap=True)
    code, _, err = run(capsys, "train", str(config), "--run-dir", str(tmp_path / "run"), *TINY_TRAIN)
    assert code == 0, err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING" in log and "validation scores training images (data.allow_val_overlap=true)" in log
    assert "best val mIoU" in log  # validation ran, on the training images as asked


def test_split_placeholder_separates_and_a_partial_overlap_is_counted(tmp_path):
    root = own_data(tmp_path / "own")
    cfg = load_config(folder_config(tmp_path, root, image_dir="images/{split}", label_dir="labels/{split}"))
    train_set, val_set = build_dataset(cfg.data, "train", train=False), build_dataset(cfg.data, "val", train=False)
    assert [s.image.parent.name for s in val_set.samples] == ["val"] * 3
    assert check_splits_apart(cfg.data, train_set, val_set) is None

    # a list file whose val lines repeat one training image
    (root / "train.txt").write_text("".join(f"images/train/im{i}.png labels/train/im{i}.png\n" for i in range(3)))
    (root / "val.txt").write_text("images/val/im0.png labels/val/im0.png\nimages/train/im2.png labels/train/im2.png\n")
    cfg = load_config(folder_config(tmp_path, root, name="list", list_file="{split}.txt"))
    train_set, val_set = build_dataset(cfg.data, "train", train=False), build_dataset(cfg.data, "val", train=False)
    with pytest.raises(ConfigError, match=r"1 of the 2 validation images .* are also training images"):
        check_splits_apart(cfg.data, train_set, val_set)
    cfg.data.allow_val_overlap = True
    assert "1 of the 2 validation images" in check_splits_apart(cfg.data, train_set, val_set)


def test_shipped_camvid_splits_are_apart(shared_dir):
    camvid = shared_dir / "data" / "camvid"
    cfg = load_config("camvid_efficientnet_lite0_ovenet", [f"data.root={camvid}"])
    assert check_splits_apart(cfg.data, CamVidDataset(camvid, "train"), CamVidDataset(camvid, "val")) is None


# --- void ids ---------------------------------------------------------------------------------------------------

def test_ignore_ids_read_void_as_ignore_with_and_without_a_label_map(tmp_path):
    root = own_data(tmp_path / "own", splits=("train",), count=1, void=11)
    raw = np.asarray(Image.open(root / "labels/train/im0.png"))
    expected = np.where(raw == 11, 255, raw)
    dataset = FolderDataset(root / "images/train", root / "labels/train", num_classes=3, ignore_ids=[11])
    np.testing.assert_array_equal(dataset.load(0)["label"], expected)
    swapped = {0: 2, 1: 1, 2: 0}  # a map for the classes only; the void id comes from ignore_ids
    dataset = FolderDataset(root / "images/train", root / "labels/train", num_classes=3, label_map=swapped,
                            ignore_ids=[11])
    np.testing.assert_array_equal(dataset.load(0)["label"], np.where(raw == 11, 255, 2 - raw.astype(int)))
    with pytest.raises(DataError, match="class ids 0-2"):  # a class cannot be void too
        FolderDataset(root / "images/train", root / "labels/train", num_classes=3, ignore_ids=[1])


def test_out_of_range_error_names_ignore_ids_and_a_partial_map_names_the_missing_value(tmp_path):
    root = own_data(tmp_path / "own", splits=("train",), count=1, void=11)
    dataset = FolderDataset(root / "images/train", root / "labels/train", num_classes=3)
    with pytest.raises(DataError) as error:
        dataset.load(0)
    message = str(error.value)
    assert "contains values 11 outside the class range 0-2 (255 = ignore)" in message
    assert "if 11 marks void pixels set data.ignore_ids=[11]" in message and "data.label_map" in message
    dataset = FolderDataset(root / "images/train", root / "labels/train", num_classes=3, label_map={0: 0, 1: 1, 2: 2})
    with pytest.raises(DataError, match=r"data.label_map must list every raw value \(add 11: <class id>\), or set "
                                        r"data.ignore_ids=\[11\]"):
        dataset.load(0)


def test_check_data_groups_one_problem_over_many_files_into_one_line(capsys, tmp_path):
    root = own_data(tmp_path / "own", count=5, void=11)
    Image.fromarray(np.full((24, 32), 7, np.uint8)).save(root / "labels/val/im4.png")  # another problem
    config = folder_config(tmp_path, root)
    code, out, err = run(capsys, "check-data", str(config), "--split", "val")
    assert code == 2
    assert_one_line_error(err, "5 problem(s)")
    lines = [line for line in out.splitlines() if line.startswith("[val]")]
    assert len(lines) == 3, lines  # the void id in 4 files, the 7 in one, the summary
    assert "im0.png contains values 11" in lines[0] and "(the same in 3 more files)" in lines[0]
    assert "values 7" in lines[1] and "more files" not in lines[1]
    code, out, _ = run(capsys, "check-data", str(config), "data.ignore_ids=[11]", "--split", "train")
    assert code == 0 and "[train] 5 samples of folder" in out and "OK" in out


# --- labels saved as JPEG -----------------------------------------------------------------------------------------

def test_jpeg_labels_are_named_and_refused_not_reported_missing(tmp_path):
    root = own_data(tmp_path / "own", splits=("train",), count=2)
    label = root / "labels/train/im1.png"
    Image.open(label).save(label.with_suffix(".jpg"))
    label.unlink()
    with pytest.raises(DataError) as error:
        FolderDataset(root / "images/train", root / "labels/train", num_classes=3)
    message = str(error.value)
    assert f"{label} is missing but {label.with_suffix('.jpg')} exists, a JPEG" in message
    assert "JPEG compression changes the ids at region edges" in message and "PNG" in message
    # a list file that names the .jpg directly: read_label_map refuses the format, not only the name
    (root / "train.txt").write_text("images/train/im1.png labels/train/im1.jpg\n")
    dataset = ListDataset(root / "train.txt", num_classes=3)
    with pytest.raises(DataError, match=r"im1.jpg is a JPEG; JPEG compression changes the ids"):
        dataset.load(0)


# --- convert-labels -----------------------------------------------------------------------------------------------

def colour_mask(ids: np.ndarray, palette, void_colour=(0, 0, 0)) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette
    table[255] = void_colour
    return table[ids]


def test_convert_labels_round_trip_gives_the_ids_with_the_palette_attached(capsys, tmp_path):
    rng = np.random.default_rng(0)
    masks = tmp_path / "masks"
    originals = {}
    for name in ("a", "sub/b"):
        ids = rng.integers(0, 11, (20, 30)).astype(np.uint8)
        ids[:4] = 255  # void, drawn black
        originals[name] = ids
        (masks / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colour_mask(ids, CAMVID_PALETTE)).save(masks / f"{name}.png")
    with pytest.raises(DataError, match="has image mode RGB.*convert it with `ovenet convert-labels"):
        read_label_map(masks / "a.png")  # training refuses the colour mask and names the way out
    out = tmp_path / "labels"
    code, stdout, err = run(capsys, "convert-labels", str(masks), str(out), "--palette", "camvid", "--void", "0,0,0")
    assert code == 0, err
    assert "wrote 2 id PNG(s) with 11 classes" in stdout
    for name, ids in originals.items():
        with Image.open(out / f"{name}.png") as image:
            assert image.mode == "P"
            assert image.getpalette()[: 3 * 11] == [v for colour in CAMVID_PALETTE for v in colour]
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), colour_mask(ids, CAMVID_PALETTE))
        np.testing.assert_array_equal(read_label_map(out / f"{name}.png"), ids)  # what training reads
    # an existing output is not replaced without --overwrite
    before = (out / "a.png").read_bytes()
    code, _, err = run(capsys, "convert-labels", str(masks), str(out), "--palette", "camvid", "--void", "0,0,0")
    assert code == 2 and "--overwrite" in err and (out / "a.png").read_bytes() == before


def test_convert_labels_refuses_a_colour_outside_the_palette_and_writes_nothing(capsys, tmp_path):
    ids = np.zeros((10, 12), np.uint8)
    mask = colour_mask(ids, [(10, 20, 30), (200, 0, 0)])
    mask[2:5, 3:7] = (1, 2, 3)  # 12 pixels of a colour in no palette
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "m.png")
    palette = tmp_path / "colours.json"
    palette.write_text(json.dumps([[10, 20, 30], [200, 0, 0]]))
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert-labels", str(tmp_path / "masks"), str(out), "--palette", str(palette))
    assert code == 2
    assert_one_line_error(err, str(tmp_path / "masks" / "m.png"), "colour 1,2,3 in 12 pixels", "--void 1,2,3")
    assert not out.exists() or not any(out.iterdir())
    code, _, err = run(capsys, "convert-labels", str(tmp_path / "masks"), str(out), "--palette", str(palette),
                       "--void", "1,2,3")
    assert code == 0, err
    expected = np.zeros((10, 12), np.uint8)
    expected[2:5, 3:7] = 255
    np.testing.assert_array_equal(read_label_map(out / "m.png"), expected)


# --- data.palette -------------------------------------------------------------------------------------------------

def test_data_palette_colours_predicts_output(capsys, tmp_path):
    from helpers import save_tiny_checkpoint

    palette = [[250, 0, 0], [0, 250, 0], [0, 0, 250]]
    ckpt = save_tiny_checkpoint(tmp_path / "own.pth", [
        "data.name=folder", "data.num_classes=3", "model.num_classes=3", f"data.palette={palette}"])
    image = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(image)
    code, _, err = run(capsys, "predict", str(ckpt), str(image), "--out", str(tmp_path / "p"),
                       "--save", "color,labels", "--runtime", "torch")
    assert code == 0, err
    labels = np.asarray(Image.open(tmp_path / "p" / "im_labels.png"))
    colour = np.asarray(Image.open(tmp_path / "p" / "im_color.png").convert("RGB"))
    np.testing.assert_array_equal(colour, vis.colorize(labels, palette))
    assert {tuple(c) for c in colour.reshape(-1, 3)} <= {tuple(c) for c in palette}
    # the Python API too: predict_files on the loaded checkpoint, no palette given
    from ovenet import checkpoint
    from ovenet.engine.predict import predict_files

    predict_files(checkpoint.load(ckpt, "cpu"), [image], tmp_path / "api", save=["color"])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "api" / "im_color.png").convert("RGB")), colour)
