"""predict_files: the PNGs written (names, sizes, contents), reruns that keep done outputs (never mixing settings),
whole-or-nothing writes, folder safety, bad inputs (skip_bad), video."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovenet import vis
from ovenet.config import ModelConfig
from ovenet.data import dataset_info
from ovenet.data.cityscapes import CITYSCAPES_PALETTE, trainid_to_labelid
from ovenet.engine.predict import predict_files
from ovenet.errors import DataError, OvenetError, install_command
from ovenet.inference import predict
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


def test_rerun_keeps_done_outputs_and_overwrite_redoes_them(model, tmp_path):
    images = write_images(tmp_path / "in", [(24, 32), (24, 32)])
    out = tmp_path / "out"
    predict_files(model, images, out, save={"color"})
    before = (out / "img1_color.png").stat().st_mtime_ns
    (out / "img0_color.png").write_bytes(b"earlier result")
    again = predict_files(model, images, out, save={"color"})
    assert list(again) == [] and again.already_done == 2 and again.skipped == []
    assert (out / "img0_color.png").read_bytes() == b"earlier result"  # never replaced without overwrite
    assert (out / "img1_color.png").stat().st_mtime_ns == before
    # A missing output is filled in; a new kind is added beside the kept ones.
    (out / "img1_color.png").unlink()
    again = predict_files(model, images, out, save={"color"})
    assert [p.name for p in again] == ["img1_color.png"] and again.already_done == 1
    again = predict_files(model, images, out, save={"color", "labels"})
    assert [p.name for p in again] == ["img0_labels.png", "img1_labels.png"] and again.already_done == 0
    assert (out / "img0_color.png").read_bytes() == b"earlier result"
    again = predict_files(model, images, out, save={"color"}, overwrite=True)
    assert len(again) == 2 and read(out / "img0_color.png").shape == (24, 32, 3)


def test_rerun_with_other_settings_or_weights_is_refused(model, tmp_path):
    images = write_images(tmp_path / "in", [(24, 32)])
    out = tmp_path / "out"
    predict_files(model, images, out, save={"color"})
    with pytest.raises(OvenetError, match=r"made with other settings \(flip differ\).*--overwrite"):
        predict_files(model, images, out, save={"color"}, flip=True)
    other = tiny(19)
    other.decode_head[-1].weight.data.normal_(0, 1.0)
    with pytest.raises(OvenetError, match=r"made with other settings \(weights differ\)"):
        predict_files(other, images, out, save={"color"})
    # Another input into the same folder has nothing to mix with.
    (fresh,) = write_images(tmp_path / "in2", [(24, 32)])
    fresh = fresh.rename(tmp_path / "in2" / "fresh.png")
    assert [p.name for p in predict_files(other, [fresh], out, save={"color"})] == ["fresh_color.png"]


def test_outputs_are_written_whole_or_not_at_all(model, tmp_path, monkeypatch):
    images = write_images(tmp_path / "in", [(24, 32), (24, 32)])
    out = tmp_path / "out"
    real_save, calls = Image.Image.save, []

    def killed_during_the_second_write(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            Path(fp).write_bytes(b"\x89PNG torn")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", killed_during_the_second_write)
    with pytest.raises(KeyboardInterrupt):
        predict_files(model, images, out, save={"color", "labels"})
    assert sorted(p.name for p in out.iterdir()) == ["img0_color.png"]  # no torn img0_labels.png, no temp file
    assert read(out / "img0_color.png").shape == (24, 32, 3)

    monkeypatch.undo()
    again = predict_files(model, images, out, save={"color", "labels"})
    assert [p.name for p in again] == ["img0_labels.png", "img1_color.png", "img1_labels.png"]


def test_skip_bad_reports_unreadable_inputs_and_predicts_the_rest(model, tmp_path):
    images = write_images(tmp_path / "in", [(24, 32), (24, 32)])
    images[0].write_bytes(b"\x89PNG corrupt")
    with pytest.raises(DataError, match=r"cannot decode image .*img0.png.*pass --skip-bad to skip"):
        predict_files(model, [tmp_path / "in"], tmp_path / "out", save={"color"})
    result = predict_files(model, [tmp_path / "in"], tmp_path / "out", save={"color"}, skip_bad=True)
    assert [p.name for p in result] == ["img1_color.png"]
    ((source, reason),) = result.skipped
    assert source == images[0] and reason.startswith(f"cannot decode image {images[0]}")


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
    with pytest.raises(OvenetError, match=re.escape(install_command("video"))):
        predict_files(model, [video], tmp_path / "out")


def _grey_video(av, path, frames: int):
    """A 64x48 MPEG-4 clip at 5 frames/s, frame i uniformly grey at 40 * i."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_frames_are_predicted(model, tmp_path):
    av = pytest.importorskip("av")
    video = _grey_video(av, tmp_path / "clip.mp4", 3)
    written = predict_files(model, [video], tmp_path / "out", save={"color"})
    assert [p.name for p in written] == [f"clip_{i:06d}_color.png" for i in range(3)] + ["clip_color.mp4"]
    assert read(written[0]).shape == (48, 64, 3)
    again = predict_files(model, [video], tmp_path / "out", save={"color"})  # a rerun keeps every done frame
    assert list(again) == [] and again.already_done == 3


def test_a_video_in_gives_an_overlay_video_out(model, tmp_path):
    av = pytest.importorskip("av")
    video = _grey_video(av, tmp_path / "clip.mp4", 4)
    written = predict_files(model, [video], tmp_path / "out", save={"overlay"})
    out = tmp_path / "out" / "clip" / "clip_overlay.mp4"
    assert out in written
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert float(container.streams.video[0].average_rate) == 5.0
    assert len(decoded) == 4 and decoded[0].shape == (48, 64, 3)
    first = read(tmp_path / "out" / "clip" / "clip_000000_overlay.png").astype(float)
    assert np.abs(decoded[0].astype(float) - first).mean() < 12  # the same picture, up to the codec's loss
