"""ONNX export: onnxruntime matches PyTorch at the export size and at another size and batch (dynamic axes)."""

import numpy as np
import pytest
import torch
from helpers import lively, tiny, tiny_config

from ovenet import checkpoint
from ovenet.config import Config
from ovenet.errors import OvenetError
from ovenet.export import export_onnx, onnx_max_abs_diff
from ovenet.models import build_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TOLERANCE = 1e-4  # outputs are O(1) (logits of unit std, offsets <= tau, confidence in [0, 1])


def inputs():
    g = torch.Generator().manual_seed(3)
    return {"export size": torch.randn(1, 3, 64, 96, generator=g),
            "other size and batch": torch.randn(2, 3, 67, 101, generator=g)}


@pytest.mark.parametrize("sampling,head", [("exact", "ocr"), ("official", "fcn")])
def test_ovenet_onnx_matches_pytorch_at_two_sizes(tmp_path, sampling, head):
    torch.manual_seed(0)
    model = lively(build_model(tiny_config(True, head=head, sampling=sampling))).train()
    path = export_onnx(model, tmp_path / "ovenet.onnx", height=64, width=96)
    assert model.training  # exported in eval mode, handed back as it came
    model.eval()
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["logits", "offsets", "confidence"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    for name, x in inputs().items():
        diffs = onnx_max_abs_diff(path, model, x)
        print(f"ovenet/{head}/{sampling} {name} {tuple(x.shape)}: max abs diff {diffs}")
        assert max(diffs.values()) < TOLERANCE, (name, diffs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, offsets, _ = session.run(None, {"image": inputs()["other size and batch"].numpy()})
    assert logits.shape == (2, 5, 17, 26) and offsets.shape == (2, 2, 17, 26)
    assert abs(offsets).max() > 0.05  # offsets really move the seeds


def test_baseline_from_a_checkpoint_at_the_lowest_opset_and_full_resolution(tmp_path):
    cfg = Config()
    cfg.model = tiny_config(False, head="fcn")
    torch.manual_seed(0)
    model = lively(build_model(cfg.model))
    ckpt = checkpoint.save(tmp_path / "baseline.pth", model, cfg)
    path = export_onnx(ckpt, tmp_path / "baseline.onnx", opset=12, height=64, width=96, full_resolution=True)
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]
    for name, x in inputs().items():
        diffs = onnx_max_abs_diff(path, model, x, full_resolution=True)
        print(f"baseline {name} {tuple(x.shape)}: max abs diff {diffs}")
        assert diffs["logits"] < TOLERANCE, (name, diffs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": inputs()["other size and batch"].numpy()})
    assert logits.shape == (2, 5, 67, 101)


def test_export_errors(tmp_path):
    baseline = build_model(tiny_config(False, head="fcn"))
    with pytest.raises(OvenetError, match="opset 11 is too old"):
        export_onnx(baseline, tmp_path / "a.onnx", opset=11)
    with pytest.raises(OvenetError, match="need an OVeNet model"):
        export_onnx(baseline, tmp_path / "a.onnx", outputs=("logits", "offsets"))
    with pytest.raises(OvenetError, match="invalid"):
        export_onnx(baseline, tmp_path / "a.onnx", outputs=("probs",))
    (tmp_path / "taken.onnx").write_bytes(b"keep me")
    with pytest.raises(OvenetError, match="already exists.*--overwrite"):
        export_onnx(baseline, tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep me"


@pytest.mark.parametrize("options", [dict(), dict(scales=(0.75, 1.25), flip=True),
                                     dict(mode="slide", crop_size=(48, 64), flip=True)])
def test_onnxruntime_model_predicts_what_pytorch_predicts(tmp_path, options):
    """``ovenet predict``'s default runtime on the CPU: the same multi-scale/flip/slide inference, run by ONNX
    Runtime on the exported graph, gives PyTorch's probabilities to float noise and the same labels."""
    from ovenet.export import OnnxRuntimeModel
    from ovenet.inference import predict

    model = tiny().eval()
    image = np.random.default_rng(0).integers(0, 256, (61, 90, 3), dtype=np.uint8)
    ort_model = OnnxRuntimeModel(model, tmp_path)
    ours = predict(ort_model, image, return_probs=True, **options)
    ref = predict(model, image, return_probs=True, **options)
    assert np.abs(ours.probs - ref.probs).max() < TOLERANCE
    assert (ours.labels == ref.labels).mean() > 0.999  # ties within float noise may flip a pixel
    assert np.abs(ours.offsets - ref.offsets).max() < TOLERANCE
    assert ort_model.num_classes == model.num_classes


def test_onnxruntime_model_answers_every_output_option(tmp_path):
    """S_i and S_s come from the exported graph too (they were S_f before); a baseline has no S_s and says so."""
    from ovenet.export import OnnxRuntimeModel
    from ovenet.inference import predict

    model = tiny().eval()
    ort_model = OnnxRuntimeModel(model, tmp_path)
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    finals = {}
    for output in ("final", "initial", "seed"):
        ours = predict(ort_model, image, output=output, return_logits=True)
        ref = predict(model, image, output=output, return_logits=True)
        assert np.abs(ours.logits - ref.logits).max() < TOLERANCE * max(1.0, np.abs(ref.logits).max()), output
        finals[output] = ref.logits
    assert np.abs(finals["initial"] - finals["final"]).max() > 0.1  # S_i really differs from S_f here

    baseline_ort = OnnxRuntimeModel(tiny(ovenet=False).eval(), tmp_path)
    assert predict(baseline_ort, image, output="initial").labels.shape == (50, 70)
    with pytest.raises(OvenetError, match="output 'seed' does not exist for this model"):
        predict(baseline_ort, image, output="seed")


def test_onnxruntime_export_is_cached_by_content(tmp_path, monkeypatch):
    """A second OnnxRuntimeModel of the same weights and config reuses the file; other weights get another."""
    from ovenet import export
    from ovenet.export import OnnxRuntimeModel

    model = tiny().eval()
    first = OnnxRuntimeModel(model, tmp_path)
    assert not first.cached and first.path.is_file() and list(tmp_path.glob(".*part")) == []
    calls = []
    real = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = OnnxRuntimeModel(tiny().eval(), tmp_path)
    assert again.cached and again.path == first.path and calls == []
    changed = tiny().eval()
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    other = OnnxRuntimeModel(changed, tmp_path)
    assert not other.cached and other.path != first.path and calls == [1]
