"""Shared helpers for the tests (imported as a plain module: pytest puts tests/ on sys.path)."""

import torch
from torch import Tensor, nn

from ovenet.config import ModelConfig
from ovenet.models import build_model


def lively(model: nn.Module, seed: int = 0, zero_output_bias: bool = False) -> nn.Module:
    """He-initialise every conv and rescale the class/offset output convs to unit std, so that a random tiny model
    gives spatially varied logits, offsets of visible length and confidences away from 0/1 (the official init,
    N(0, 1e-3), makes a random model's outputs nearly constant)."""
    model.eval()  # calibrate with running BN statistics, as used at inference (and without updating them)
    g = torch.Generator().manual_seed(seed)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2.0 / conv.weight[0].numel()) ** 0.5
    x = torch.randn(1, 3, 64, 96, generator=g)
    for conv in convs:
        if conv.out_channels in (model.num_classes, 3):
            seen = {}
            hook = conv.register_forward_hook(lambda m, i, o, seen=seen: seen.update(std=o.std()))  # keeps o
            with torch.no_grad():
                model(x)
            hook.remove()
            conv.weight.data /= seen["std"]
            if zero_output_bias and conv.bias is not None:
                conv.bias.data.zero_()
    return model.eval()


# The smallest HRNetV2 (W18-small-v1) with a narrow OCR head: the model of the unit tests.
TINY = dict(arch="hrnetv2_w18_small_v1", num_classes=5, ocr_mid_channels=16, ocr_key_channels=8)


def tiny_config(ovenet: bool = True, head: str = "ocr", sampling: str = "exact", num_classes: int = 5) -> ModelConfig:
    cfg = ModelConfig(**{**TINY, "num_classes": num_classes}, head=head)
    cfg.offset.enabled = ovenet
    cfg.offset.sampling = sampling
    return cfg


def tiny(ovenet: bool = True, head: str = "ocr", zero_output_bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return lively(build_model(tiny_config(ovenet, head)), zero_output_bias=zero_output_bias)


def assert_close_scaled(actual: Tensor, expected: Tensor, rel: float = 1e-5, msg: str = "") -> None:
    """|actual - expected| <= rel * max(1, max|expected|), elementwise.

    The same code gives results that differ by ~1e-5 of the tensor's scale between CPUs (their convolution/BLAS
    kernels sum in different orders), so a reference comparison is relative to the scale of the reference, never
    a bare absolute bound."""
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.to(actual.dtype)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rel * scale, f"{msg} max |diff| {error:.3g} > {rel:g} * scale {scale:.3g}"


def save_tiny_checkpoint(path, overrides, iteration: int = 1):
    """An untrained quickstart-sized OVeNet saved as an ovenet checkpoint with the quickstart config plus
    ``overrides`` (a tiny synthetic dataset, for CLI tests); returns the path."""
    from ovenet import checkpoint
    from ovenet.config import load_config

    cfg = load_config("quickstart", overrides)
    torch.manual_seed(0)
    return checkpoint.save(path, build_model(cfg.model), cfg, iteration=iteration)


# A tiny synthetic setup for the command line: 2 validation scenes of 48x64.
TINY_CLI = ["data.num_samples=8", "data.image_size=[48,64]", "data.crop_size=[48,64]", "eval.crop_size=[48,64]",
            "train.report=false"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``ovenet ARGV`` in-process: (exit code, stdout, stderr)."""
    from ovenet.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """stderr is exactly one ``ovenet: error:`` line holding every fragment."""
    assert err.startswith("ovenet: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err

