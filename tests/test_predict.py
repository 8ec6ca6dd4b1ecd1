"""predict_files: the PNGs written (names, sizes, contents), refusal to overwrite, folder safety, bad inputs, video."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ovenet import vis
from ovenet.config import ModelConfig
from ovenet.data import dataset_info
from ovenet.data.cityscapes import CITYSCAPES_PALETTE, trainid_to_labelid
from ovenet.engine.inference import predict
from ovenet.engine.predict import predict_files
from ovenet.errors import DataError, OvenetError
from ovenet.models import build_model

CITYSCAPES_LABEL_IDS = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}


def tiny(num_classes: int, ovenet: bool = True):
    cfg = ModelConfig(arch="hrnetv2_w18_small_v1", head="fcn", num_classes=num_classes)
    cfg.offset.enabled = ovenet
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Spread the class scores so the colour map shows several classes.
    model.decode_head[-1].weight.data.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny(19)


def write_images(folder, sizes):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def read(path):
    return np.asarray(Image.open(path))


def test_writes_every_output_with_the_right_content(model, tmp_path):
    (image,) = write_images(tmp_path / "in", [(45, 70)])
    out = tmp_path / "out"
    written = predict_files(model, [image], out)
    names = sorted(p.name for p in written)
    assert names == sorted(f"img0_{k}.png" for k in ("color", "overlay", "labels", "labelIds", "offsets",
                                                      "confidence"))
    result = predict(model, image)
    color = read(out / "img0_color.png")
    assert color.shape == (45, 70, 3)
    np.testing.assert_array_equal(color, vis.colorize(result.labels, CITYSCAPES_PALETTE))
    np.testing.assert_array_equal(read(out / "img0_labels.png"), result.labels)
    label_ids = read(out / "img0_labelIds.png")
    np.testing.assert_array_equal(label_ids, trainid_to_labelid(result.labels))
    assert set(np.unique(label_ids)) <= CITYSCAPES_LABEL_IDS
    np.testing.assert_array_equal(read(out / "img0_overlay.png"), vis.overlay(read(image), color, 0.5))
    assert read(out / "img0_offsets.png").shape == (45, 70, 3)
    assert read(out / "img0_confidence.png").shape == (45, 70, 3)


def test_folders_keep_subfolders_and_baseline_writes_no_offsets(tmp_path):
    write_images(tmp_path / "in", [(32, 40)])
    write_images(tmp_path / "in" / "sub", [(20, 24)])
    baseline = tiny(8, ovenet=False)
    written = predict_files(baseline, [tmp_path / "in"], tmp_path / "out", dataset_name="synthetic")
    rel = sorted(str(p.relative_to(tmp_path / "out")) for p in written)
    assert rel == ["img0_color.png", "img0_labels.png", "img0_overlay.png",
                   "sub/img0_color.png", "sub/img0_labels.png", "sub/img0_overlay.png"]  # no labelIds/offsets
    labels = read(tmp_path / "out" / "sub" / "img0_labels.png")
    palette = dataset_info("synthetic")[2]
    np.testing.assert_array_equal(read(tmp_path / "out" / "sub" / "img0_color.png"), vis.colorize(labels, palette))


def test_refuses_to_overwrite_unless_asked(model, tmp_path):
    images = write_images(tmp_path / "in", [(24, 32), (24, 32)])
    out = tmp_path / "out"
    predict_files(model, images, out, save={"color"})
    before = (out / "img1_color.png").stat().st_mtime_ns
    (out / "img0_color.png").write_bytes(b"earlier result")
    with pytest.raises(OvenetError, match=r"img0_color.png already exists \(and 1 more\).*--overwrite"):
        predict_files(model, images, out, save={"color"})
    assert (out / "img0_color.png").read_bytes() == b"earlier result"
    assert (out / "img1_color.png").stat().st_mtime_ns == before
    predict_files(model, images, out, save={"color"}, overwrite=True)
    assert read(out / "img0_color.png").shape == (24, 32, 3)


def test_never_writes_into_the_input_folder_or_over_inputs(model, tmp_path):
    images = write_images(tmp_path / "in", [(24, 32)])
    with pytest.raises(OvenetError, match="separate output folder"):
        predict_files(model, images, tmp_path / "in")
    with pytest.raises(OvenetError, match="separate output folder"):
        predict_files(model, [tmp_path / "in"], tmp_path / "in", overwrite=True)
    clash = write_images(tmp_path / "other", [(24, 32)])  # also named img0.png
    with pytest.raises(OvenetError, match="would both write"):
        predict_files(model, images + clash, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs(model, tmp_path):
    (tmp_path / "in").mkdir()
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="broken.jpg"):
        predict_files(model, [broken], tmp_path / "out")
    with pytest.raises(DataError, match="nothing.png does not exist"):
        predict_files(model, [tmp_path / "nothing.png"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        predict_files(model, [tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(OvenetError, match="unknown output kind"):
        predict_files(model, [broken], tmp_path / "out", save={"colour"})


def test_video_without_pyav_names_the_install_command(model, tmp_path, monkeypatch):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(OvenetError, match="pip install av"):
        predict_files(model, [video], tmp_path / "out")


def test_video_frames_are_predicted(model, tmp_path):
    av = pytest.importorskip("av")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    written = predict_files(model, [video], tmp_path / "out", save={"color"})
    assert [p.name for p in written] == [f"clip_{i:06d}_color.png" for i in range(3)]
    assert read(written[0]).shape == (48, 64, 3)
    with pytest.raises(OvenetError, match="already exists"):
        predict_files(model, [video], tmp_path / "out", save={"color"})
