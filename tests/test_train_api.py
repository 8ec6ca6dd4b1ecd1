"""``ovenet.train(config, run_dir, model=...)``: ovenet's loop on a network of the user's own (the README's
OffsetSegmenter snippet with a tiny encoder), exact resume, ``ovenet.load(..., model=...)``, and the one-line errors
for a checkpoint whose network the config cannot build and for a module that does not return a SegOutput."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from torch import nn

import ovenet
from ovenet import checkpoint
from ovenet.cli.main import main
from ovenet.engine import train as train_mod
from ovenet.engine.guards import TrainingInterrupted
from ovenet.errors import CheckpointError, ConfigError
from ovenet.models import ConcatHead, OffsetSegmenter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one intra-op thread

# The quickstart recipe's synthetic scenes, shrunk: 8 training and 2 validation scenes of 32x48, 3 iterations.
SMALL = ["device=cpu", "data.num_samples=8", "data.image_size=[32,48]", "data.crop_size=[32,48]",
         "eval.crop_size=[32,48]", "train.iters=3", "train.batch_size=2", "train.warmup_iters=0", "train.log_every=1",
         "train.ckpt_every=100", "train.report=false", "loss.type=ohem",
         "model.offset.sampling=official"]  # the recipe's seed convention: the module's own (exact) must win
CHANNELS = [4, 8, 8, 8]


class TinyEncoder(nn.Module):
    """x -> [f4, f8, f16, f32], as the README snippet's ``my_encoder``."""

    def __init__(self):
        super().__init__()
        widths = [3, *CHANNELS]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, 4 if i == 0 else 2, 1), nn.BatchNorm2d(widths[i + 1]),
                          nn.ReLU())
            for i in range(4))

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def snippet_net(num_classes: int = 8, seed: int = 1) -> OffsetSegmenter:
    """The README's network: OffsetSegmenter(my_encoder, ConcatHead(...), ..., offset_branch=copy of the encoder)."""
    torch.manual_seed(seed)
    encoder = TinyEncoder()
    return OffsetSegmenter(encoder, ConcatHead(CHANNELS, num_classes), channels=CHANNELS, num_classes=num_classes,
                           offset_branch=copy.deepcopy(encoder))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-iteration run with the report on (its gallery needs the network passed in memory)."""
    torch.set_num_threads(1)
    run_dir = ovenet.train("quickstart", tmp_path_factory.mktemp("straight") / "run", model=snippet_net(),
                           overrides=[*SMALL, "train.report=true"])
    return run_dir


def test_interrupted_custom_run_resumes_exactly(tmp_path, monkeypatch, capsys, straight):
    run_dir = tmp_path / "run"
    real_step, calls = train_mod.train_step, []

    def step_then_signal(*args, **kwargs):  # a SIGTERM after the 2nd step: last.pth at iteration 2 of 3
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted):
        ovenet.train("quickstart", run_dir, model=snippet_net(), overrides=SMALL)
    monkeypatch.undo()
    saved = checkpoint.read(run_dir / "last.pth")
    assert saved["iteration"] == 2
    assert saved["network"] == "custom"
    assert saved["network_class"] == "ovenet.models.segmenter.OffsetSegmenter"

    # Without the module (Python or CLI) the resume is refused in one line, before anything is written.
    log_before = (run_dir / "train.log").read_text()
    with pytest.raises(CheckpointError, match=r"holds weights of a custom network \(ovenet.models.segmenter."
                                              r"OffsetSegmenter\); resume it in Python, passing the model"):
        ovenet.train("quickstart", run_dir, overrides=SMALL, resume="auto")
    capsys.readouterr()
    assert main(["train", str(run_dir), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "custom network" in err and "model=OffsetSegmenter(...), resume='auto')" in err
    assert (run_dir / "train.log").read_text() == log_before

    # Resumed into a freshly built module (other initial weights): the checkpoint's weights and state continue.
    resumed_net = snippet_net(seed=2)
    ovenet.train("quickstart", run_dir, model=resumed_net, overrides=SMALL, resume="auto")
    resumed, reference = checkpoint.read(run_dir / "last.pth"), checkpoint.read(straight / "last.pth")
    assert resumed["iteration"] == reference["iteration"] == 3
    assert resumed["model"].keys() == reference["model"].keys()
    for name, value in reference["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for key, state in reference["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])
    assert resumed["best_miou"] == reference["best_miou"]
    for name, value in resumed_net.state_dict().items():  # the module passed was trained in place
        assert torch.equal(value, resumed["model"][name]), name


def test_custom_run_records_the_module_and_validates(straight):
    best = checkpoint.read(straight / "best.pth")
    assert best["network"] == "custom" and best["val_metrics"]["miou"] >= 0
    cfg = ovenet.load_config(straight / "config.yaml")
    # The model section describes the module trained, not the recipe's HRNet: classes from its logits, its own
    # offset settings (what the confidence loss sampled with) and align_corners.
    assert cfg.model.num_classes == 8 and cfg.model.offset.enabled and cfg.model.align_corners is False
    assert cfg.model.offset.sampling == "exact"
    log = (straight / "train.log").read_text()
    assert "ovenet.models.segmenter.OffsetSegmenter offset=True" in log
    assert "loss_confidence" in log  # the offset losses ran
    assert (straight / "report" / "gallery_0.png").is_file()  # the report drew the in-memory network


def test_load_back_into_the_module_and_predict(straight, tmp_path, capsys):
    best = straight / "best.pth"
    line = (f"checkpoint {best} holds weights of a custom network (ovenet.models.segmenter.OffsetSegmenter); "
            f"load it in Python: ovenet.load('{best}', model=OffsetSegmenter(...))")
    with pytest.raises(CheckpointError) as refused:
        ovenet.load(best)
    assert str(refused.value) == line
    assert main(["eval", str(best)]) == 2
    assert capsys.readouterr().err == f"ovenet: error: {line}\n"

    net = snippet_net(seed=3)
    loaded = ovenet.load(best, model=net)
    assert loaded is net and not net.training and net.config.data.name == "synthetic"
    for name, value in checkpoint.read(best)["model"].items():
        assert torch.equal(net.state_dict()[name], value), name
    image = torch.rand(3, 32, 48)
    result = net.predict(image)
    with torch.no_grad():  # predict = the network's S_f at the input size (ImageNet-normalised input)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        logits = net(((image - mean) / std)[None]).logits_final
        expected = torch.nn.functional.interpolate(logits, size=(32, 48), mode="bilinear").argmax(1)[0]
    assert torch.equal(torch.as_tensor(result.labels).long(), expected)
    assert result.offsets is not None

    with pytest.raises(CheckpointError, match=r"does not fit the model: 2 shape mismatch \(e.g. decode_head.head.3"
                                              r".weight \(8, 28, 1, 1\) vs model \(5, 28, 1, 1\).*build the module as"):
        ovenet.load(best, model=snippet_net(num_classes=5))  # another module: the keys and shapes are named


class LogitsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.conv(x)


def test_modules_that_cannot_train_get_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"LogitsOnly\) returns Tensor, not ovenet.SegOutput: return SegOutput"):
        ovenet.train("quickstart", tmp_path / "tensor", model=LogitsOnly(), overrides=SMALL)
    with pytest.raises(ConfigError, match="predicts 5 classes but the synthetic training set has 8; build it with 8"):
        ovenet.train("quickstart", tmp_path / "classes", model=snippet_net(num_classes=5), overrides=SMALL)
    assert not (tmp_path / "tensor").exists() and not (tmp_path / "classes").exists()  # nothing left behind


class PlainNet(nn.Module):
    """A module of no ovenet class, returning a SegOutput without offsets: load gives it what predict reads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        logits = self.conv(x)[..., ::4, ::4]
        return ovenet.SegOutput(logits_initial=logits, logits_final=logits)


def test_load_gives_a_plain_module_what_ovenets_networks_carry(tmp_path):
    cfg = ovenet.load_config("quickstart", [*SMALL, "model.offset.enabled=false", "model.align_corners=false"])
    trained = PlainNet()
    path = checkpoint.save(tmp_path / "plain.pth", trained, cfg, **checkpoint.custom_network_marks(trained))
    with pytest.raises(CheckpointError, match=r"test_train_api.PlainNet\); load it in Python: .*model=PlainNet"):
        ovenet.load(path)
    net = ovenet.load(path, model=PlainNet())
    assert torch.equal(net.conv.weight, trained.conv.weight) and not net.training
    assert (net.num_classes, net.align_corners, net.is_ovenet) == (8, False, False)
    image = torch.rand(3, 32, 48)
    result = net.predict(image)  # the eval settings of its config: whole image, one scale
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        logits = net(((image - mean) / std)[None]).logits_final
    expected = torch.nn.functional.interpolate(logits, size=(32, 48), mode="bilinear").argmax(1)[0]
    assert torch.equal(torch.as_tensor(result.labels).long(), expected) and result.offsets is None
