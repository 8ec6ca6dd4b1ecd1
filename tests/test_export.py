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
