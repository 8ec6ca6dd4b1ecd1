"""ONNX export with dynamic batch, height and width.

The exported graph takes ``image``: float32 ``[B, 3, H, W]``, RGB normalised as the checkpoint's weights were
trained (``model.input_mean``/``input_std``; the metadata's ``mean``/``std``, as
:func:`ovenet.data.transforms.normalize_image` makes it) and returns, in this order, whichever of

- ``logits``: ``[B, C, h, w]`` the final prediction S_f (the plain logits for the baseline);
- ``offsets``: ``[B, 2, h, w]`` offset vectors in normalised image coordinates (x, y), OVeNet only;
- ``confidence``: ``[B, 1, h, w]`` the fusion confidence F in [0, 1], OVeNet only;
- ``logits_initial``, ``logits_seed``: S_i and S_s, OVeNet only (not exported unless asked for);

were asked for, at 1/4 of the input size (``h = ceil(H / 4)``), or at ``H x W`` with ``full_resolution=True``
(bilinear: registered to the pixels for a model that declares its cells' geometry, ``ovenet.geometry``; else
with the model's ``align_corners``). Argmax over ``logits`` gives the label map.

We use the TorchScript-based exporter (``dynamo=False``): the torch.export-based one needs the optional
``onnxscript`` package and adds nothing for this model, whose control flow does not depend on the data.

Opset: the seed resampling is a gather-based bilinear sampler (``ovenet.method``), not ``grid_sample`` (which
would need opset 16), but it clamps int64 indices, and ONNX ``Clip`` accepts integers only from opset 12; lower
opsets are refused. Opsets 12, 13, 16 and 17 were checked against onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ovenet.checkpoint import weights_digest
from ovenet.errors import ConfigError, OvenetError, install_command
from ovenet.files import replaced
from ovenet.geometry import CellGrid, resize_to_pixels
from ovenet.models import SegOutput, build_model

OUTPUT_NAMES = ("logits", "offsets", "confidence", "logits_initial", "logits_seed")
DEFAULT_OUTPUTS = ("logits", "offsets", "confidence")  # OVeNet's; the baseline has logits only
MIN_OPSET = 12


class ExportWrapper(nn.Module):
    """The model as a function of the image returning plain tensors (ONNX cannot return a dataclass)."""

    def __init__(self, model: nn.Module, outputs: Sequence[str], full_resolution: bool = False):
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)
        self.full_resolution = full_resolution
        self.align_corners = bool(getattr(model, "align_corners", True))

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.model(image)
        tensors = {"logits": out.logits_final, "offsets": out.offsets, "confidence": out.confidence,
                   "logits_initial": out.logits_initial, "logits_seed": out.logits_seed}
        result = []
        for name in self.outputs:
            tensor = tensors[name].float()
            if self.full_resolution:  # by the model's grid where it declares one (ovenet.geometry)
                tensor = resize_to_pixels(tensor, image.shape[-2:], out.grid, self.align_corners)
            result.append(tensor)
        return tuple(result)


def _load_model(model_or_checkpoint: nn.Module | str | Path) -> nn.Module:
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint
    from ovenet.checkpoint import load

    return load(model_or_checkpoint, "cpu")


def _prepare(model_or_checkpoint: nn.Module | str | Path, out_path: Path, outputs: Sequence[str] | None,
             overwrite: bool) -> tuple[nn.Module, tuple[str, ...]]:
    """Checks shared by every format; returns the model and the output names."""
    if out_path.exists() and not overwrite:
        raise OvenetError(f"{out_path} already exists; pass --overwrite to replace it")
    model = _load_model(model_or_checkpoint)
    is_ovenet = bool(getattr(model, "is_ovenet", False))
    if outputs is None:
        outputs = DEFAULT_OUTPUTS if is_ovenet else ("logits",)
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUT_NAMES]
    if unknown or not outputs or len(set(outputs)) != len(outputs):
        raise OvenetError(f"export outputs {list(outputs)} are invalid; choose distinct names from {OUTPUT_NAMES}")
    if not is_ovenet and set(outputs) - {"logits"}:
        raise OvenetError(f"{'/'.join(o for o in outputs if o != 'logits')} outputs need an OVeNet model; this one "
                          "is the baseline (model.offset.enabled: false), export outputs=('logits',)")
    return model, outputs


def export_program(
    model_or_checkpoint: nn.Module | str | Path,
    out_path: str | Path,
    outputs: Sequence[str] | None = None,
    full_resolution: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export with ``torch.export`` to a ``.pt2`` file (load with ``torch.export.load(path).module()``).

    Batch, height and width are dynamic; HRNet's 1/32 branch needs images larger than 32 px on each side.
    Same inputs and outputs as :func:`export_onnx`.
    """
    out_path = Path(out_path)
    model, outputs = _prepare(model_or_checkpoint, out_path, outputs, overwrite)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    wrapper = ExportWrapper(model.cpu().eval(), outputs, full_resolution)
    # Batch 2 and a size off any power of two: an example of 1 would specialise the batch to a constant.
    example = torch.zeros(2, 3, 96, 160)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=33, max=16384),
            3: torch.export.Dim("width", min=33, max=16384)}
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,), dynamic_shapes={"image": dims})
        with replaced(out_path) as tmp:  # whole or absent, also on a full disk
            torch.export.save(program, str(tmp))
    finally:
        model.to(device).train(was_training)
    return out_path


def export_onnx(
    model_or_checkpoint: nn.Module | str | Path,
    out_path: str | Path,
    opset: int = 17,
    height: int = 512,
    width: int = 1024,
    outputs: Sequence[str] | None = None,
    full_resolution: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export a model (or an ovenet checkpoint file) to ONNX; returns ``out_path``.

    ``height``/``width`` only size the example input used for tracing: batch, height and width stay dynamic.
    ``outputs`` defaults to ``("logits",)`` for the baseline and ``("logits", "offsets", "confidence")`` for
    OVeNet. The model is exported on the CPU in eval mode; its own mode and device are left as they were.
    """
    out_path = Path(out_path)
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes the file with it)
    except ImportError:
        raise OvenetError("ONNX export needs the onnx package, which is not installed: "
                          f"{install_command('export')} (or --format torch-export, which needs nothing more)") from None
    if opset < MIN_OPSET:
        raise OvenetError(f"ONNX opset {opset} is too old: the model needs opset >= {MIN_OPSET} (integer Clip in "
                          f"the seed sampler); use --opset 17")
    if height < 4 or width < 4:
        raise OvenetError(f"export size {height}x{width} is too small; use at least 4x4 (e.g. 512x1024)")
    model, outputs = _prepare(model_or_checkpoint, out_path, outputs, overwrite)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    wrapper = ExportWrapper(model.cpu().eval(), outputs, full_resolution)
    example = torch.zeros(1, 3, int(height), int(width))
    out_axes = {0: "batch", 2: "height", 3: "width"} if full_resolution else \
        {0: "batch", 2: "out_height", 3: "out_width"}
    with replaced(out_path) as tmp:  # whole, its metadata included, or absent (also on a full disk)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(tmp),
                    opset_version=int(opset),
                    input_names=["image"],
                    output_names=list(outputs),
                    dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                  **{o: out_axes for o in outputs}},
                    do_constant_folding=True,
                    dynamo=False,
                )
        finally:
            model.to(device).train(was_training)
        _write_metadata(tmp, model, outputs, full_resolution)
    return out_path


def onnx_metadata(model: nn.Module, outputs: Sequence[str], full_resolution: bool) -> dict[str, str]:
    """What a program needs to use the ONNX file without ovenet: input normalisation, classes, colours, the
    offset head's settings and the output layout (``metadata_props``, all strings; lists and dicts as JSON)."""
    from .data import class_info
    from .data.transforms import IMAGENET, Normalisation

    cfg = getattr(model, "config", None)
    normalisation = IMAGENET if cfg is None else Normalisation.of(cfg.model)
    meta = {
        "producer": "ovenet",
        "input": "image: float32 Bx3xHxW RGB, (pixel / 255 - mean) / std",
        # 0-1 units, as the input line says (the config's model.input_mean/input_std are the same x 255)
        "mean": json.dumps([round(v / 255.0, 12) for v in normalisation.mean]),
        "std": json.dumps([round(v / 255.0, 12) for v in normalisation.std]),
        "outputs": json.dumps(list(outputs)),
        "output_resolution": "input" if full_resolution else "about 1/4 of the input; upsample the logits bilinearly",
        "layout": json.dumps({"logits": "Bx{C}xhxw class scores (argmax: labels)", "offsets": "Bx2xhxw (x, y) in "
                              "normalised image coordinates, [-1, 1] spans the image", "confidence": "Bx1xhxw in [0, 1]",
                              "initial": "Bx{C}xhxw S_i", "seed": "Bx{C}xhxw S_s"}),
    }
    if cfg is not None:
        try:
            _, names, palette = class_info(cfg.data, cfg.model.num_classes)
        except Exception:  # a custom dataset without a table: the count is still known  # noqa: BLE001
            names, palette = [f"class_{i}" for i in range(cfg.model.num_classes)], []
        meta |= {"num_classes": str(cfg.model.num_classes), "class_names": json.dumps(names),
                 "palette": json.dumps([list(c) for c in palette]), "dataset": cfg.data.name,
                 "offset_head": json.dumps({"enabled": cfg.model.offset.enabled, "tau": cfg.model.offset.tau,
                                            "sampling": cfg.model.offset.sampling}),
                 "align_corners": str(cfg.model.align_corners).lower(),
                 "config": json.dumps(cfg.to_dict())}  # the whole training config, as ovenet reads it back
    # The checkpoint's fingerprint (predict's settings record): outputs of this file and of its checkpoint match.
    meta["weights_digest"] = weights_digest(model)
    return meta


def _write_metadata(path: Path, model: nn.Module, outputs: Sequence[str], full_resolution: bool) -> None:
    import onnx

    graph = onnx.load(str(path))
    for key, value in onnx_metadata(model, outputs, full_resolution).items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (what :func:`onnx_metadata` wrote, for an ovenet export)."""
    try:
        import onnx
    except ImportError:
        raise OvenetError("reading an ONNX file needs the onnx package: " + install_command("export")) from None
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (onnx raises DecodeError, OSError, ...)
        raise OvenetError(f"'{path}' is not an ONNX file ({type(exc).__name__}); give a file `ovenet export` wrote") from None
    return {p.key: p.value for p in graph.metadata_props}


def onnx_max_abs_diff(onnx_path: str | Path, model: nn.Module, image: Tensor,
                      full_resolution: bool = False) -> dict[str, float]:
    """Run the ONNX file with onnxruntime (optional dependency) and PyTorch on ``image``; max |diff| per output."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OvenetError("checking an ONNX export needs onnxruntime: " + install_command("export")) from None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, {"image": image.detach().cpu().float().numpy()})
    was_training = model.training
    try:
        with torch.no_grad():
            expected = ExportWrapper(model.eval(), names, full_resolution)(image)
    finally:
        model.train(was_training)
    return {name: float((torch.from_numpy(g) - e.cpu()).abs().max()) for name, g, e in zip(names, got, expected)}


def cache_dir() -> Path:
    """Where exported ONNX files are kept between runs: ``$OVENET_CACHE_DIR``, else ``$XDG_CACHE_HOME/ovenet``,
    else ``~/.cache/ovenet``."""
    root = os.environ.get("OVENET_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ovenet"


def export_key(model: nn.Module, outputs: Sequence[str], opset: int) -> str:
    """A name for the ONNX file of ``model``: every weight's bytes, the model config, the outputs, the opset, the
    torch version and the source of the code that builds the graph (any of them changes the graph)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for source in sorted([package / "method.py", package / "export.py", *(package / "models").glob("*.py")]):
        digest.update(source.read_bytes())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    config = getattr(model, "config", None)
    meta = {"model": asdict(config.model) if config is not None else None, "outputs": list(outputs),
            "opset": int(opset), "torch": torch.__version__}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:24]


ORT_OPSET = 17


def cached_onnx_path(model: nn.Module) -> Path:
    """The cache file that :class:`OnnxRuntimeModel` reads or writes for ``model`` by default."""
    return cache_dir() / "onnx" / f"{export_key(model, _ort_outputs(model), ORT_OPSET)}.onnx"


def _ort_outputs(model: nn.Module) -> tuple[str, ...]:
    return OUTPUT_NAMES if getattr(model, "is_ovenet", False) else ("logits",)


# How the fingerprint of an .onnx file without ``weights_digest`` metadata begins (predict names the cause).
ONNX_FILE_DIGEST = "onnx-file:"


class OnnxRuntimeModel(nn.Module):
    """An ovenet model exported to ONNX and run by ONNX Runtime on the CPU, with the model's own interface:
    ``model(images)`` returns a :class:`~ovenet.models.SegOutput` (S_f, S_i, S_s, offsets, confidence), so
    :mod:`ovenet.inference` runs on it unchanged, every ``output`` option included.

    On 2 CPU cores ONNX Runtime ran the W18-small OVeNet at 360x480 1.75x faster than eager PyTorch, with the same
    labels (benchmarks/RESULTS.md, "CPU speed"). The export is kept in ``onnx_dir`` (default
    :func:`cache_dir`), named by the weights, config, outputs and versions, so a second run of the same
    checkpoint skips it (``cached`` says whether this one did). It has no parameters; ``config``,
    ``num_classes``, ``is_ovenet`` and ``align_corners`` are the exported model's.
    """

    def __init__(self, model: nn.Module, onnx_dir: str | Path | None = None, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise OvenetError("--runtime onnxruntime needs onnxruntime: " + install_command("export")) from None
        self.weights_digest = weights_digest(model)  # the checkpoint's: predict records the weights, not the runtime
        self.config = getattr(model, "config", None)
        self.num_classes = getattr(model, "num_classes", None)
        self.is_ovenet = bool(getattr(model, "is_ovenet", False))
        self.align_corners = bool(getattr(model, "align_corners", True))
        self._grid_of = getattr(model, "output_grid", None)  # where the outputs' cells sit (ovenet.geometry)
        outputs = _ort_outputs(model)
        folder = Path(onnx_dir) if onnx_dir is not None else cache_dir() / "onnx"
        path = folder / f"{export_key(model, outputs, ORT_OPSET)}.onnx"
        self.cached = path.is_file()
        if not self.cached:
            # Exported beside its final name, then renamed: a file at ``path`` is always complete, also when two
            # processes export the same checkpoint at once.
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{path.stem}.{os.getpid()}.onnx.part"
            try:
                export_onnx(model, tmp, opset=ORT_OPSET, height=64, width=64, outputs=outputs, overwrite=True)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        self._open(ort, path, threads)

    def _open(self, ort: Any, path: Path, threads: int | None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def output_grid(self, height: int, width: int) -> CellGrid | None:
        """Where the exported model's output cells sit on a ``height`` x ``width`` input (the model's own
        ``output_grid``); None: its outputs are resized by size with ``align_corners`` (HRNetV2)."""
        return None if self._grid_of is None else self._grid_of(height, width)

    def forward(self, images: Tensor) -> SegOutput:
        outputs = dict(zip(self.output_names, self.session.run(None, {"image": images.float().cpu().numpy()})))
        tensors = {k: torch.from_numpy(v) for k, v in outputs.items()}
        final = tensors["logits"]
        return SegOutput(logits_final=final, logits_initial=tensors.get("logits_initial", final),
                         logits_seed=tensors.get("logits_seed"), offsets=tensors.get("offsets"),
                         confidence=tensors.get("confidence"), grid=self.output_grid(*images.shape[-2:]))


class OnnxFileModel(OnnxRuntimeModel):
    """An ONNX file that ``ovenet export`` wrote, run by ONNX Runtime with the model interface: its metadata holds
    the training config (classes, palette, eval settings), so ``ovenet predict model.onnx ...`` needs no
    checkpoint. Its ``weights_digest`` metadata is the checkpoint's fingerprint; an export from an older ovenet has
    none, and its file's SHA-256 stands for the weights in predict's settings record (:data:`ONNX_FILE_DIGEST`)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        nn.Module.__init__(self)
        try:
            import onnxruntime as ort
        except ImportError:
            raise OvenetError("running an ONNX file needs onnxruntime: " + install_command("export")) from None
        from .config import from_dict, saved_config

        path = Path(path)
        meta = read_onnx_metadata(path)
        if meta.get("producer") != "ovenet" or "config" not in meta:
            raise OvenetError(f"{path} carries no ovenet metadata (exported elsewhere, or by an older ovenet); export "
                              "the checkpoint again with `ovenet export`, or predict with the .pth")
        self.config = from_dict(saved_config(json.loads(meta["config"])))
        self.num_classes = self.config.model.num_classes
        self.is_ovenet = "offsets" in json.loads(meta["outputs"])
        self.align_corners = self.config.model.align_corners
        self._grid_of = _grid_function(self.config, path)
        self.weights_digest = meta.get("weights_digest") or \
            ONNX_FILE_DIGEST + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.cached = True
        self._open(ort, path, threads)


def _grid_function(config: Any, path: Path) -> Any:
    """``output_grid`` of the network an ONNX file was exported from, rebuilt (untrained) from its config: the
    geometry is the architecture's, so the file's outputs are resized to pixels as the checkpoint's. None for
    HRNetV2 (resized by size, as the official code)."""
    if config.model.backbone == "hrnetv2":
        return None
    try:
        return build_model(config.model).output_grid
    except ConfigError as exc:
        raise OvenetError(f"{path}: cannot rebuild its {config.model.backbone} network to place its outputs on the "
                          f"pixels ({exc})") from None
