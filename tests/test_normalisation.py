"""Normalisation belongs to the weights (issue 26, item 3): ``model.input_mean``/``model.input_std`` (0-255 pixel
units) are part of the config, the checkpoint and the ONNX metadata, and every path feeds the network with them:
training's and validation's transforms, eval, predict, ONNX Runtime predict (the report's gallery is predict's).
A checkpoint always runs with its own: overriding them against one is refused; one written before the keys
existed reads as ImageNet's.

Each path is watched at the network's door: the network records its input, whose per-channel values show the
normalisation actually applied (a uniform colour becomes (value - mean) / std exactly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import save_tiny_checkpoint
from ovenet import checkpoint
from ovenet.config import load_config
from ovenet.data.transforms import IMAGENET, Normalisation, normalize
from ovenet.errors import CheckpointError, OvenetError
from ovenet.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TF = Normalisation(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
TF_KEYS = ["model.input_mean=[127,127,127]", "model.input_std=[128,128,128]"]
TINY = ["device=cpu", "data.num_samples=4", "data.val_samples=2", "data.image_size=[48,64]",
        "data.crop_size=[48,64]", "eval.crop_size=[48,64]", "train.report=false", "data.scale_range=[1,1]",
        "data.flip=false", "train.iters=1", "train.batch_size=2", "train.tensorboard=false"]
COLOUR = (200, 100, 50)


@pytest.fixture
def network_inputs(monkeypatch):
    """Every input the quickstart network (its class) is run on, in order."""
    cls = type(build_model(load_config("quickstart").model))
    seen: list[torch.Tensor] = []
    forward = cls.forward

    def recording(self, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", recording)
    return seen


def uniform_image(height: int = 40, width: int = 56) -> np.ndarray:
    return np.broadcast_to(np.array(COLOUR, np.uint8), (height, width, 3)).copy()


def assert_uniform_colour_normalised(x: torch.Tensor, normalisation: Normalisation) -> None:
    expected = torch.tensor([(c - m) / s for c, m, s in zip(COLOUR, normalisation.mean, normalisation.std)])
    per_channel = x.float().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel, expected[:, None].expand_as(per_channel), atol=1e-5), \
        (per_channel.mean(1), expected)


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tf") / "tf.pth", [*TINY, *TF_KEYS])


def test_the_lite0_recipes_declare_tf_normalisation_and_hrnet_keeps_imagenet():
    for name in ("camvid_efficientnet_lite0", "camvid_efficientnet_lite0_ovenet"):
        assert Normalisation.of(load_config(name).model) == TF
    for name in ("camvid_hrnetv2_w18", "quickstart"):
        assert Normalisation.of(load_config(name).model) == IMAGENET


def test_training_and_validation_batches_use_the_config_normalisation(tmp_path):
    from ovenet.engine.distributed import DistInfo
    from ovenet.engine.logging import close_logger
    from ovenet.engine.train import setup

    cfg = load_config("quickstart", [*TINY, *TF_KEYS])
    try:
        run = setup(cfg, None, tmp_path / "run", DistInfo())
    finally:
        close_logger()
    from ovenet.data import build_dataset

    for loader, split, train in ((run.loader, cfg.data.train_split, True),
                                 (run.val_loader, cfg.data.val_split, False)):
        raw = build_dataset(cfg.data, split, train=train)
        expected = sorted(normalize(raw.load(i)["image"], normalisation=TF).mean((1, 2)).tolist()
                          for i in range(len(raw)))
        batch = next(iter(loader))["image"]
        for image in batch:  # scale 1, no flip, crop = image: the transform only normalises
            means = image.mean((1, 2)).tolist()
            assert any(np.allclose(means, e, atol=1e-5) for e in expected), (means, expected)


def test_predict_uses_the_checkpoint_normalisation(tf_checkpoint, network_inputs):
    model = checkpoint.load(tf_checkpoint)
    assert Normalisation.of(model.config.model) == TF
    model.predict(uniform_image())
    assert_uniform_colour_normalised(network_inputs[-1], TF)


def test_eval_uses_the_checkpoint_normalisation_whatever_the_config(tf_checkpoint, network_inputs, tmp_path):
    from ovenet.data import build_dataset
    from ovenet.engine.evaluate import evaluate

    imagenet_cfg = load_config("quickstart", TINY)  # a config with ImageNet's: the checkpoint's still wins
    evaluate(imagenet_cfg, tf_checkpoint, out_dir=tmp_path, progress=False)
    raw = build_dataset(imagenet_cfg.data, train=False)
    expected = [normalize(raw.load(i)["image"], normalisation=TF) for i in range(len(raw))]
    assert len(network_inputs) == len(expected)
    for seen, image in zip(network_inputs, expected):
        assert torch.allclose(seen[0], image, atol=1e-5)


def test_onnx_export_records_and_runtime_predict_uses_the_checkpoint_normalisation(tf_checkpoint, tmp_path,
                                                                                  monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ovenet.export import OnnxFileModel, OnnxRuntimeModel, read_onnx_metadata

    seen: list[torch.Tensor] = []
    forward = OnnxRuntimeModel.forward
    monkeypatch.setattr(OnnxRuntimeModel, "forward",
                        lambda self, x: (seen.append(x.clone()), forward(self, x))[1])
    runtime = OnnxRuntimeModel(checkpoint.load(tf_checkpoint), tmp_path)
    meta = read_onnx_metadata(runtime.path)
    assert json.loads(meta["mean"]) == pytest.approx([127 / 255] * 3) and \
        json.loads(meta["std"]) == pytest.approx([128 / 255] * 3)
    from ovenet.inference import predict

    predict(runtime, uniform_image())
    assert_uniform_colour_normalised(seen[-1], TF)
    predict(OnnxFileModel(runtime.path), uniform_image())  # the export alone: its metadata's config
    assert_uniform_colour_normalised(seen[-1], TF)


@pytest.mark.parametrize("override, trained", [("model.input_mean=[127,127,127]", "[127.0, 127.0, 127.0]"),
                                               ("model.input_std=[1,1,1]", "[128.0, 128.0, 128.0]")])
def test_overriding_a_checkpoint_normalisation_is_refused_in_one_line(tf_checkpoint, override, trained):
    """Even to the value it holds: the normalisation is the checkpoint's, not an option."""
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(tf_checkpoint, overrides=[override])
    message = str(refused.value)
    key = override.split("=")[0]
    assert "\n" not in message and f"{key} of checkpoint" in message and trained in message
    assert isinstance(refused.value, OvenetError)


def test_cli_eval_and_predict_refuse_the_override(tf_checkpoint, tmp_path, capsys):
    from PIL import Image

    from ovenet.cli.main import main

    image = tmp_path / "frame.png"
    Image.fromarray(uniform_image()).save(image)
    for argv in (["eval", str(tf_checkpoint), "model.input_std=[58,57,57]", "--out", str(tmp_path / "eval")],
                 ["predict", str(tf_checkpoint), str(image), "--out", str(tmp_path / "pred"),
                  "model.input_std=[58,57,57]", "--runtime", "torch"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "model.input_std" in err and "drop the model.input_std override" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())


def test_info_shows_the_checkpoint_normalisation(tf_checkpoint, capsys):
    from ovenet.cli.main import main

    assert main(["info", str(tf_checkpoint)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("input "))
    assert row.split(None, 1)[1] == "(pixel - mean) / std, mean [127.0, 127.0, 127.0], std [128.0, 128.0, 128.0] " \
        "(0-255 pixel units)"


def test_a_checkpoint_from_before_the_keys_reads_as_imagenet(tmp_path, network_inputs):
    path = save_tiny_checkpoint(tmp_path / "old.pth", TINY)
    old = torch.load(path, weights_only=True)
    del old["config"]["model"]["input_mean"], old["config"]["model"]["input_std"]
    torch.save(old, path)
    model = checkpoint.load(path)
    assert Normalisation.of(model.config.model) == IMAGENET
    model.predict(uniform_image())
    assert_uniform_colour_normalised(network_inputs[-1], IMAGENET)
