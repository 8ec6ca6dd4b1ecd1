"""`ovenet predict` writes the labels that `ovenet eval` scores: same test-time resize (data.base_size in the
official mode, data.eval_resize_short), same mode, scales and flip, for the same checkpoint. The labelIds PNGs
that predict writes, scored by cityscapesScripts, give eval's figures."""

from __future__ import annotations

import contextlib
import io
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import save_tiny_checkpoint
from ovenet import checkpoint
from ovenet.cli.main import main
from ovenet.data.transforms import EvalTransform
from ovenet.inference import InferenceSettings, infer_logits, predict

pytestmark = pytest.mark.usefixtures("one_thread")

STEM = "frankfurt_000000_000294"
SIZE = (128, 256)  # h, w: a frame that is not data.base_size wide


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    """The shared real Cityscapes frame, downscaled to 256x128 (labels and instances nearest), in the real
    layout."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cityscapes_sample"
    if not shared.is_dir():
        pytest.skip(f"{shared} is absent (CI has it)")
    root = tmp_path_factory.mktemp("cityscapes")
    image = Image.open(shared / "leftImg8bit" / "val" / "frankfurt" / f"{STEM}_leftImg8bit.png").convert("RGB")
    out = root / "leftImg8bit" / "val" / "frankfurt"
    out.mkdir(parents=True)
    image.resize(SIZE[::-1], Image.BILINEAR).save(out / f"{STEM}_leftImg8bit.png")
    gt = root / "gtFine" / "val" / "frankfurt"
    gt.mkdir(parents=True)
    for kind in ("labelIds", "instanceIds"):
        Image.open(shared / "gtFine" / "val" / "frankfurt" / f"{STEM}_gtFine_{kind}.png").resize(
            SIZE[::-1], Image.NEAREST).save(gt / f"{STEM}_gtFine_{kind}.png")
    return root


def cityscapes_scripts(prediction: Path, gt_labels: Path, workdir: Path) -> dict:
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    if not hasattr(np, "in1d"):  # removed from numpy 2.4, still used by the script
        np.in1d = np.isin
    args = types.SimpleNamespace(
        evalInstLevelScore=True, evalPixelAccuracy=False, evalLabels=[], printRow=5, normalized=True,
        colorized=False, bold="", nocol="", JSONOutput=True, quiet=True,
        exportFile=str(workdir / "result.json"), avgClassSize=dict(ev.args.avgClassSize))
    with contextlib.redirect_stdout(io.StringIO()):
        return ev.evaluateImgLists([str(prediction)], [str(gt_labels)], args)


def tiny_cityscapes_checkpoint(path: Path, root: Path, *overrides: str) -> Path:
    path = save_tiny_checkpoint(path, ["data.name=cityscapes", f"data.root={root}", "model.num_classes=19",
                                       "data.base_size=512", "eval.crop_size=[64,96]", *overrides])
    # HRNet's initial convolutions (std 0.001) with untrained BatchNorm statistics (mean 0, variance 1) give
    # spatially constant logits: calibrate the statistics on random images (a cumulative average) so that the
    # prediction holds many classes, a sharper comparison.
    model = checkpoint.load(path).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 96, generator=generator))
        model.decode_head[-1].weight.normal_(0, 1.0, generator=generator)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return checkpoint.save(path, model.eval(), model.config)


MODES = {
    "whole": ["eval.mode=whole", "eval.scales=[0.75,1.0]", "eval.flip=true"],
    "slide": ["eval.mode=slide", "eval.stride=[48,64]"],
    # base_size 512 at scales 0.75 (whole) and 1.25 (windows of the crop): the image is rescaled to 640 wide.
    "official": ["eval.mode=official", "eval.scales=[0.75,1.25]", "eval.flip=true"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_predicted_label_ids_score_what_eval_reports(mode, cityscapes_root, tmp_path):
    ckpt = tiny_cityscapes_checkpoint(tmp_path / "ckpt.pth", cityscapes_root, *MODES[mode])
    assert main(["eval", str(ckpt), "--out", str(tmp_path / "eval")]) == 0
    figures = json.loads((tmp_path / "eval" / "eval_val.json").read_text())["cityscapes"]
    image = cityscapes_root / "leftImg8bit" / "val" / "frankfurt" / f"{STEM}_leftImg8bit.png"
    assert main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "pred"), "--save", "labelids",
                 "--runtime", "torch"]) == 0
    written = tmp_path / "pred" / f"{STEM}_leftImg8bit_labelIds.png"
    assert np.asarray(Image.open(written)).shape == SIZE
    gt = cityscapes_root / "gtFine" / "val" / "frankfurt" / f"{STEM}_gtFine_labelIds.png"
    ref = cityscapes_scripts(written, gt, tmp_path)
    pairs = [("miou", "averageScoreClasses"), ("iiou_class", "averageScoreInstClasses"),
             ("iou_category", "averageScoreCategories"), ("iiou_category", "averageScoreInstCategories")]
    assert len(np.unique(np.asarray(Image.open(written)))) >= 5  # a sharp comparison: many classes predicted
    for ours, theirs in pairs:
        assert abs(figures[ours] - ref[theirs]) <= 1e-6, (mode, ours, figures[ours], ref[theirs])


def test_native_size_runs_the_image_at_its_own_size(cityscapes_root, tmp_path):
    """The official mode rescales a 256-wide frame to data.base_size (512) by default; native_size does not, and
    the two differ on this frame (the bug this default fixes)."""
    model = checkpoint.load(tiny_cityscapes_checkpoint(tmp_path / "c.pth", cityscapes_root, "eval.mode=official"))
    image = np.asarray(Image.open(next(cityscapes_root.glob("leftImg8bit/val/*/*.png"))))
    default, native = model.predict(image), model.predict(image, native_size=True)
    assert default.labels.shape == native.labels.shape == SIZE
    x = EvalTransform()({"image": image})["image"][None]
    with torch.no_grad():
        at_base = infer_logits(model, x, mode="official", scales=[1.0], base_size=512)["logits"].argmax(1)[0]
        at_own = infer_logits(model, x, mode="official", scales=[1.0])["logits"].argmax(1)[0]
    assert np.array_equal(default.labels, at_base.numpy()) and np.array_equal(native.labels, at_own.numpy())
    assert (default.labels != native.labels).mean() > 0.01


def test_predict_resizes_to_the_eval_short_side_and_pads_as_the_official_loader(tmp_path):
    """data.eval_resize_short (ADE20K's 520): predict feeds the network the evaluation transform's image, bit
    for bit, and returns labels at the input's size; with eval.label_resolution official the resized image is
    padded to a multiple of 8 as the official val loader does."""
    ckpt = save_tiny_checkpoint(tmp_path / "c.pth", ["data.eval_resize_short=52"])
    model = checkpoint.load(ckpt)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    result = model.predict(image)
    expected = EvalTransform(52)({"image": image})["image"]
    assert torch.equal(seen[-1][0], expected) and expected.shape[-2:] == (52, 86)
    assert result.labels.shape == (37, 61)
    with torch.no_grad():
        logits = infer_logits(model, expected[None], size=(37, 61))["logits"]
    assert np.array_equal(result.labels, logits.argmax(1)[0].numpy())

    model.config.eval.label_resolution = "official"
    settings = InferenceSettings.for_model(model)
    assert (settings.resize_short, settings.pad_multiple) == (52, 8)
    padded = model.predict(image)
    assert seen[-1].shape[-2:] == (56, 88) and padded.labels.shape == (37, 61)
    assert torch.equal(seen[-1][0, :, :52, :86], expected) and seen[-1][0, :, 52:].abs().max() == 0
    native = model.predict(image, native_size=True)
    hook.remove()
    assert seen[-1].shape[-2:] == (37, 61) and native.labels.shape == (37, 61)
