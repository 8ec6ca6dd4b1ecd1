"""The ``ovenet`` subcommands. Each ``cmd_*`` takes the parsed arguments and returns an exit code.

Heavy imports (torch, the engine) happen inside the commands so that ``ovenet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import yaml

from ovenet.cli.options import (
    AddCommand,
    add_data_root,
    add_device,
    add_inference_options,
    add_precision,
    save_kinds,
)
from ovenet.config import (CONFIG_DIR, Config, apply_overrides, from_dict, is_override, load_config,
                           saved_config)
from ovenet.device import resolve_device
from ovenet.engine.evaluate import percent
from ovenet.engine.predict import SAVE_KINDS
from ovenet.errors import CheckpointError, DataError, OvenetError, install_command
from ovenet.files import write_text
from ovenet.inference import PAPER_SCALES
from ovenet.threads import configure_threads

# --- helpers --------------------------------------------------------------------------------------------------

def require_file(path: str | Path, what: str = "checkpoint") -> Path:
    path = Path(path)
    if not path.exists():
        cls = CheckpointError if what == "checkpoint" else DataError
        raise cls(f"{what} '{path}' does not exist")
    if not path.is_file():
        raise OvenetError(f"{what} '{path}' is a folder, not a file")
    return path


def check_output_folder(path: str | Path, flag: str, holds: str = "results") -> None:
    """Fail early, naming ``flag``, when ``path`` cannot become a folder we write into.

    Nothing is left behind: the probe file is created in the nearest existing folder and removed at once.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OvenetError(f"{flag} {path} is a file; {holds} go to a folder: choose another {flag}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OvenetError(f"{flag} {path} is not writable ({existing} is a file): choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ovenet_write_test_", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OvenetError(f"{flag} {path} is not writable ({e.strerror or e}): choose another {flag}") from None


def config_from_checkpoint(checkpoint: str | Path, overrides: list[str]) -> Config:
    """The config stored in an ovenet checkpoint, with overrides applied (as ``load_config`` does for YAML)."""
    from ovenet.checkpoint import read

    data = saved_config(read(checkpoint)["config"])
    data.setdefault("model", {})["pretrained"] = None  # weights come from the checkpoint, not ImageNet
    return from_dict(apply_overrides(data, overrides))


def inference_overrides(args: argparse.Namespace) -> list[str]:
    """``--scales/--paper-scales/--flip/--mode`` as config overrides (they win over key=value overrides)."""
    out = []
    if getattr(args, "paper_scales", False):
        out += [f"eval.scales={PAPER_SCALES}", "eval.flip=true"]
    elif getattr(args, "scales", None):
        out.append(f"eval.scales={list(args.scales)}")
    if getattr(args, "flip", None):
        out.append("eval.flip=true")
    if getattr(args, "mode", None):
        out.append(f"eval.mode={args.mode}")
    return out


def print_metrics(result: dict) -> None:
    """The headline figures of an evaluation result, in percent."""
    # Two means: they agree when every class occurs (a full Cityscapes/ADE20K val set), not on a subset.
    n = len(result.get("iou") or []) or "all"
    rows = [("mIoU, classes present", result.get("miou")),
            (f"mIoU, all {n} classes (official code, paper tables)", result.get("miou_all")),
            ("pixel accuracy", result.get("pixel_acc")),
            ("mean class accuracy", result.get("mean_acc")),
            (f"boundary mIoU ({result.get('boundary_width', '?')} px)", result.get("boundary_miou"))]
    city = result.get("cityscapes") or {}
    rows += [(label, city[key]) for label, key in (("iIoU class", "iiou_class"), ("IoU category", "iou_category"),
                                                   ("iIoU category", "iiou_category")) if key in city]
    width = max(len(label) for label, _ in rows)
    print(f"{result.get('dataset', '?')} {result.get('split', '?')}: {result.get('num_images', '?')} images")
    for label, value in rows:
        print(f"  {label:<{width}}  {percent(value)}")


# --- commands -------------------------------------------------------------------------------------------------

def add_train_parser(command: AddCommand) -> None:
    p = command(
        "train", "train a model from a config",
        "Train from a YAML config (a path or a shipped config name, see `ovenet configs`), with optional\n"
        "dotted overrides. Writes checkpoints (last, best), the resolved config and logs to the run folder.\n"
        "Under torchrun every process runs this same command; the engine reads the distributed environment.",
        "  ovenet train camvid_hrnetv2_w18s_ovenet data.root=data/CamVid\n"
        "  ovenet train cityscapes_hrnetv2_w48_ocr_ovenet train.batch_size=2 model.offset.tau=0.2\n"
        "  ovenet train runs/my_run --resume auto               # continue a run: its folder knows its config\n"
        "  ovenet train runs/my_run --resume auto train.iters=120000   # train a finished run longer\n"
        "  torchrun --nproc_per_node 4 -m ovenet.cli train cityscapes_hrnetv2_w48_ovenet\n"
        "\n"
        "train refuses a run folder that holds checkpoints (last.pth, best.pth): continue that run with --resume\n"
        "auto, start it again with --overwrite (its checkpoints are removed), or pick another --run-dir. A resume\n"
        "may change only train.iters/epochs, logging, checkpoint and validation intervals, device, data.num_workers,\n"
        "the validation set and eval settings (logged, and recorded in config.yaml), and where the data lies\n"
        "(--data-root NEW: the data there must be the same samples with the same file sizes); a change to the\n"
        "model, data, loss or optimiser is refused. A resume with no iterations left says so and trains nothing\n"
        "(exit 0).",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config path or shipped config name")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    add_data_root(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="PATH|auto",
                       help="checkpoint to resume from, or 'auto' for the run folder's last checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="start again in a run folder that holds checkpoints, removing them")
    add_device(p, default=None)
    p.add_argument("--run-dir", metavar="DIR", help="run folder (default: OUTPUT_DIR/NAME from the config)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms where PyTorch has them (same as train.deterministic=true)")


def existing_data_root(root: str) -> str:
    if not Path(root).exists():
        raise OvenetError(f"--data-root {root} does not exist; give the folder that holds the dataset")
    return root


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    if args.data_root:
        overrides.append(f"data.root={existing_data_root(args.data_root)}")
    if args.deterministic:
        overrides.append("train.deterministic=true")
    if Path(args.config).is_dir():  # a run folder: it knows its config (`ovenet train RUN_DIR --resume auto`)
        folder = Path(args.config)
        if not (folder / "config.yaml").is_file():
            raise OvenetError(f"{folder} is a folder without config.yaml; give a config, or the folder of a run "
                              "that `ovenet train` wrote")
        args.config = str(folder / "config.yaml")
        args.run_dir = args.run_dir or folder
    cfg = load_config(args.config, overrides)
    args.loaded_config = cfg  # for the out-of-memory message
    configure_threads(resolve_device(cfg.device), args.threads)
    if args.resume and args.resume != "auto":
        require_file(args.resume)
    if args.run_dir:
        check_output_folder(args.run_dir, "--run-dir", "checkpoints")
    from ovenet.engine.train import train

    train(cfg, resume=args.resume, run_dir=args.run_dir, overwrite=args.overwrite)
    return 0  # the engine's log has said how the run ended and where its files are


def _split_eval_paths(paths: list[str]) -> tuple[str | None, str, list[str]]:
    overrides = [p for p in paths if is_override(p)]
    files = [p for p in paths if not is_override(p)]
    if len(files) == 1:
        return None, files[0], overrides
    if len(files) == 2:
        return files[0], files[1], overrides
    raise OvenetError(f"eval takes [CONFIG] CHECKPOINT [key=value ...], got {len(files)} paths: {' '.join(files)}")


def add_eval_parser(command: AddCommand) -> None:
    p = command(
        "eval", "evaluate a checkpoint (mIoU, boundary mIoU, per class)",
        "Evaluate CHECKPOINT on the validation split: mIoU, pixel and class accuracy, boundary mIoU, per-class\n"
        "tables (and the Cityscapes benchmark figures on Cityscapes). CONFIG is optional: without it the\n"
        "checkpoint's own config is used (point it at your data with --data-root). CONFIG and overrides give\n"
        "the data and eval settings; the network always comes from the checkpoint. Flags win over overrides,\n"
        "which win over the config.",
        "  ovenet eval cityscapes_hrnetv2_w48_ocr_ovenet runs/cs/best.pth\n"
        "  ovenet eval runs/cs/best.pth --data-root data/cityscapes --paper-scales\n"
        "  ovenet eval converted.pth --data-root data/cityscapes eval.mode=slide eval.crop_size=[512,1024]\n"
        "  ovenet eval camvid_hrnetv2_w18s_ovenet runs/camvid/best.pth --split val --out results/ --overwrite",
        usage="ovenet eval [CONFIG] CHECKPOINT [key.sub=value ...] [options]",
    )
    p.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT [key.sub=value ...]",
                   help="optional config, the checkpoint, then optional overrides")
    p.add_argument("--split", help="dataset split (default: the config's data.val_split)")
    add_inference_options(p)
    add_data_root(p)
    p.add_argument("--out", metavar="DIR",
                   help="where to write eval_SPLIT.json and eval_SPLIT.md (default: the checkpoint's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results in --out")
    add_precision(p, default="fp32")
    add_device(p, default=None)


def cmd_eval(args: argparse.Namespace) -> int:
    config_path, checkpoint, overrides = _split_eval_paths(args.paths)
    require_file(checkpoint)
    if args.out:
        check_output_folder(args.out, "--out")
    overrides += inference_overrides(args)
    if args.data_root:
        overrides.append(f"data.root={existing_data_root(args.data_root)}")
    if args.device:
        overrides.append(f"device={args.device}")
    # The network comes from the checkpoint; model.* overrides change its inference options (e.g.
    # model.offset.sampling=exact to evaluate a converted official checkpoint in the other convention).
    model_overrides = [o for o in overrides if o.startswith("model.")]
    cfg = load_config(config_path, overrides) if config_path else config_from_checkpoint(checkpoint, overrides)
    args.loaded_config = cfg
    device = resolve_device(cfg.device)
    configure_threads(device, args.threads)
    from ovenet.engine.evaluate import evaluate, result_paths

    result = evaluate(cfg, checkpoint, out_dir=args.out, split=args.split, overwrite=args.overwrite,
                      device=device, precision=args.precision, progress=True,
                      model_overrides=model_overrides)
    json_path, md_path = result_paths(args.out or Path(checkpoint).parent, result.get("split", args.split))
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        print_metrics(result)
        print(f"wrote {json_path} and {md_path}")
    print(shown.getvalue(), end="")
    log = json_path.with_suffix(".log")  # what eval printed, beside its results
    write_text(log, f"ovenet eval {' '.join(args.paths)}\n{shown.getvalue()}")
    if cfg.train.report and result.get("split", args.split) == "val":
        from ovenet.report import report_if_possible

        run_dir = Path(checkpoint).parent  # the curves are the training run's; the figures this evaluation's
        print(report_if_possible(run_dir, out_dir=json_path.parent / "report", metrics_path=json_path,
                                 data_root=args.data_root, device=str(device)))
    return 0


# When ONNX Runtime pays, in pixels to segment (W18 OVeNet, 1 thread, whole `ovenet predict` processes, 360x480
# images: benchmarks/predict_runtime.py): a first export costs ~5.5 s, which 20 images (3.5 Mpx) did not yet pay
# (1.06x PyTorch's time) and 40 did (0.89x); with the export cached, starting the session (~0.4 s) outweighs the
# saving on 1 image (1.1x) and is paid from a few (10 images: 0.77x). The saving grows with the pixels, so the
# rule counts pixels, not images (the figures are 32 and 4 such images).
ORT_EXPORT_PAYS_MPX = 5.5
ORT_SESSION_PAYS_MPX = 0.7


def _predict_runtime(requested: str, device: Any, precision: str | None, model: Any, megapixels: float
                     ) -> tuple[str, str]:
    """The runtime for ``--runtime requested`` and why. ``auto``: ONNX Runtime for fp32 on the CPU when it is
    installed and the ``megapixels`` to segment pay for it: for the session when this checkpoint's export is
    cached, for the export too otherwise; else PyTorch (never slower than ``--runtime torch``)."""
    if requested != "auto":
        if requested == "onnxruntime" and (str(device) != "cpu" or (precision or "fp32") != "fp32"):
            raise OvenetError("--runtime onnxruntime runs fp32 on the CPU; use --device cpu without --precision, "
                              "or --runtime torch")
        return requested, f"--runtime {requested}"
    if str(device) != "cpu" or (precision or "fp32") != "fp32":
        return "torch", f"ONNX Runtime is used for fp32 on the CPU only (device {device})"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch", f"onnxruntime is not installed ({install_command('export')}: 1.5x faster per image on the CPU)"
    from ovenet.export import cached_onnx_path

    cached = cached_onnx_path(model).is_file()
    needed = ORT_SESSION_PAYS_MPX if cached else ORT_EXPORT_PAYS_MPX
    if megapixels >= needed:
        return "onnxruntime", (f"{_megapixels_text(megapixels)} to segment pay for "
                               + ("the cached ONNX export's session" if cached
                                  else "the one-time ONNX export (then cached)") + "; --runtime torch to use PyTorch")
    return "torch", (f"{_megapixels_text(megapixels)} to segment: ONNX Runtime pays from {needed} Mpx "
                     + ("(export cached)" if cached else "with its one-time export") + "; --runtime onnxruntime "
                     "to use it anyway")


def _megapixels(plan: list[tuple[Path, Path, bool]]) -> float:
    """Pixels to segment, from the image headers and the video containers (nothing decoded); infinite for a video
    whose container does not state its frame count (a video is then taken as enough for any runtime)."""
    from PIL import Image

    total = 0.0
    for source, _, is_video in plan:
        if is_video:
            frames, size = _video_extent(source)
            total += frames * size / 1e6 if frames else float("inf")
            continue
        try:
            with Image.open(source) as image:
                total += image.width * image.height / 1e6
        except OSError:
            pass  # unreadable: predict names it (or skips it with --skip-bad)
    return total


def _megapixels_text(megapixels: float) -> str:
    return f"{megapixels:.1f} Mpx" if math.isfinite(megapixels) else "a video of unknown length (no frame count)"


def _video_extent(path: Path) -> tuple[int, int]:
    """(frame count, pixels per frame) from a video's container header; 0 frames when it does not say."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return int(stream.frames or 0), int(stream.width or 0) * int(stream.height or 0)
    except Exception:  # noqa: BLE001 (no PyAV, or an unreadable file: predict reports it)
        return 0, 0


def add_predict_parser(command: AddCommand) -> None:
    p = command(
        "predict", "segment images (label PNGs, colour, offsets, confidence)",
        "Run CHECKPOINT on images, folders of images or videos and write, per image, a colour rendering, an\n"
        "overlay, the label-index PNG (raw), Cityscapes label ids (labelids) and, for OVeNet models, the offset\n"
        "field (optical-flow colour wheel) and the confidence map. Extra key=value words are model.* overrides.\n"
        "Images are run as `ovenet eval` runs this checkpoint (its eval mode, scales, flip and test-time resize),\n"
        "so the labels written are the ones eval scores; flags change that, --native-size skips the resize.\n"
        "Whole-mode images beyond 2048x2048 pixels run in overlapping 1024x1024 windows, in bounded memory; a\n"
        "warning says when an image is far larger than the model's training images (--max-size shrinks it).",
        "  ovenet predict runs/cs/best.pth street.jpg --out preds/\n"
        "  ovenet predict runs/cs/best.pth frames/ --out preds/ --flip --scales 0.75 1.0 1.25 --device cuda\n"
        "  ovenet predict converted.pth img.png --out preds/ model.offset.sampling=exact\n"
        "  ovenet predict runs/cs/best.pth frames/ --out preds/ --skip-bad\n"
        "  ovenet predict runs/ade/best.pth photo.jpg --out preds/ --native-size   # no resize to short side 520\n"
        "  ovenet predict runs/camvid/best.pth big_photo.jpg --out preds/ --max-size 480\n"
        "\n"
        "Rerunning into the same --out continues where the last run stopped: inputs whose outputs are already done\n"
        "are kept and skipped (outputs are written whole or not at all); --overwrite redoes them. Outputs made\n"
        "with another checkpoint or other settings are never mixed in: that rerun is refused without --overwrite.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="ovenet checkpoint (.pth), or an .onnx file `ovenet export` wrote")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (overrides key=value too)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_inference_options(p)
    p.add_argument("--native-size", action="store_true",
                   help="run each image at its own size (default: resize it as `ovenet eval` does for this "
                        "checkpoint, data.eval_resize_short and, in the official mode, scales of data.base_size, "
                        "so the labels are the ones eval scores); outputs are at the input's size either way")
    p.add_argument("--max-size", type=int, metavar="N",
                   help="shrink images whose long side is longer than N pixels to N before inference, as eval "
                        "resizes (bilinear); outputs are at the input's size. For photos far larger than the "
                        "training images: the model segments best near the scale it was trained at")
    p.add_argument("--save", type=save_kinds, metavar="KIND[,KIND...]",
                   help=f"what to write, comma-separated: {', '.join(SAVE_KINDS)} (default: all that apply to the "
                        "model: labelids for Cityscapes/ACDC, offsets and confidence for OVeNet)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every input (default: keep the outputs already done and predict the rest)")
    p.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the network: auto = ONNX Runtime for fp32 on the CPU when onnxruntime is "
                        "installed and the images are enough to pay for it (their pixels: from "
                        f"{ORT_SESSION_PAYS_MPX} Mpx when this checkpoint's export is cached, {ORT_EXPORT_PAYS_MPX} "
                        "Mpx otherwise; faster per image, same labels; the export is cached), else PyTorch")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images or videos and list them at the end (exit code 2 if any)")
    add_precision(p)
    add_device(p)


def cmd_predict(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        return _predict(args, stack)


def _predict(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    overrides = [p for p in args.inputs if is_override(p)]
    inputs = [Path(p) for p in args.inputs if not is_override(p)]
    if not inputs:
        raise OvenetError("predict needs at least one INPUT image or folder")
    require_file(args.checkpoint)
    for p in inputs:
        if not p.exists():
            raise DataError(f"input '{p}' does not exist")
    check_output_folder(args.out, "--out", "predictions")
    device = resolve_device(args.device)
    configure_threads(device, args.threads)
    from ovenet import checkpoint
    from ovenet.data import class_info
    from ovenet.engine.predict import plan_inputs, predict_files

    if Path(args.checkpoint).suffix == ".onnx":  # an export alone: its metadata is the config
        explicit_device = args.device not in (None, "auto", "cpu")
        if overrides or explicit_device or args.runtime == "torch" or (args.precision or "fp32") != "fp32":
            raise OvenetError("an .onnx file runs as exported, fp32 on the CPU by ONNX Runtime: drop model.* "
                              "overrides, --device, --precision and --runtime torch, or predict with the .pth")
        from ovenet.export import OnnxFileModel

        device = resolve_device("cpu")
        model, runtime, why = OnnxFileModel(args.checkpoint), "onnxruntime", "an ONNX file"
    else:
        model = checkpoint.load(args.checkpoint, device, overrides=overrides or None)
        megapixels = _megapixels(plan_inputs(inputs, Path(args.out))) if args.runtime == "auto" else 0.0
        runtime, why = _predict_runtime(args.runtime, device, args.precision, model, megapixels)
    cfg: Config = model.config
    if runtime == "onnxruntime" and not hasattr(model, "session"):
        from ovenet.export import OnnxRuntimeModel, cache_dir

        try:
            model = OnnxRuntimeModel(model)
        except OSError:  # an unwritable cache: export into a temporary folder for this run only
            onnx_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ovenet_onnx_"))
            model = OnnxRuntimeModel(model, onnx_dir)
            why += f" (the cache {cache_dir()} is not writable: exported for this run only)"
    print(f"runtime: {runtime} on {device} ({why})")
    _, _, palette = class_info(cfg.data, cfg.model.num_classes)
    # Unset options (None) are the checkpoint's eval settings: predict writes the labels eval scores.
    options: dict[str, Any] = {
        "overwrite": args.overwrite,
        "skip_bad": args.skip_bad,
        "scales": list(PAPER_SCALES) if args.paper_scales else args.scales,
        "flip": True if (args.flip or args.paper_scales) else None,
        "mode": args.mode,
        "native_size": args.native_size,
        "max_size": args.max_size,
        "device": device,
        "progress": True,  # a bar on a terminal, a line every few seconds otherwise
    }
    if args.save:
        options["save"] = args.save
    if args.precision:
        options["precision"] = args.precision
    written = predict_files(model, inputs, Path(args.out), palette, cfg.data.name, **options)
    if written.already_done:
        print(f"kept the outputs of {written.already_done} image(s) already done in {args.out}; pass --overwrite "
              "to redo them")
    print(f"wrote {len(written)} file(s) to {args.out}")
    for source, reason in written.skipped:
        print(f"skipped unreadable input {source}: {reason}")
    if written.skipped:
        raise DataError(f"{len(written.skipped)} input(s) could not be read and were skipped (listed above); fix or "
                        "remove them and rerun the same command to finish")
    return 0


def add_export_parser(command: AddCommand) -> None:
    p = command(
        "export", "export a checkpoint to ONNX",
        "Export CHECKPOINT's network to ONNX (needs the optional `onnx` package). The graph takes an\n"
        "float32 Bx3xHxW RGB image (B, H, W dynamic), normalised as the checkpoint was trained (the metadata's\n"
        "mean and std), and returns the final logits and, for OVeNet, the offsets and the confidence, at 1/4 of\n"
        "the input size unless --full-resolution.",
        "  ovenet export runs/cs/best.pth --format onnx\n"
        "  ovenet export runs/cs/best.pth --out model.onnx --opset 17 --height 1024 --width 2048",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="ovenet checkpoint (.pth)")
    p.add_argument("--format", choices=("onnx", "torch-export"), default="onnx",
                   help="onnx, or torch-export (a torch.export .pt2 program for PyTorch runtimes)")
    p.add_argument("--out", metavar="PATH", help="output file (default: CHECKPOINT with .onnx or .pt2 suffix)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--height", type=int, help="example input height; H and W stay dynamic (default: training crop)")
    p.add_argument("--width", type=int, help="example input width (default: the training crop)")
    p.add_argument("--outputs", nargs="+", choices=("logits", "offsets", "confidence"),
                   help="graph outputs (default: logits, plus offsets and confidence for OVeNet)")
    p.add_argument("--full-resolution", action="store_true",
                   help="upsample the outputs to the input size inside the graph (default: 1/4 resolution)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def cmd_export(args: argparse.Namespace) -> int:
    checkpoint = require_file(args.checkpoint)
    if (args.height is None) != (args.width is None):
        raise OvenetError("give both --height and --width, or neither")
    out = Path(args.out) if args.out else checkpoint.with_suffix(".pt2" if args.format == "torch-export" else ".onnx")
    from ovenet.checkpoint import read
    from ovenet.export import export_onnx, export_program

    if args.format == "torch-export":
        path = export_program(checkpoint, out, outputs=args.outputs, full_resolution=args.full_resolution,
                              overwrite=args.overwrite)
        print(f"wrote {path}")
        return 0

    if args.height is None:
        args.height, args.width = read(checkpoint)["config"].get("data", {}).get("crop_size", [512, 1024])
    path = export_onnx(checkpoint, out, opset=args.opset, height=int(args.height), width=int(args.width),
                       outputs=args.outputs, full_resolution=args.full_resolution, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def add_convert_official_parser(command: AddCommand) -> None:
    p = command(
        "convert-official", "convert an official OVeNet checkpoint",
        "Convert a checkpoint of the official OVeNet code (final_state.pth / best.pth / checkpoint.pth.tar)\n"
        "and its experiment YAML into one ovenet checkpoint, usable by eval, predict, export and info.\n"
        "\n"
        "--sampling chooses how the seed logits are resampled at zero offset:\n"
        "  official  what the official code computes on PyTorch >= 1.3 (grid built for align_corners=True,\n"
        "            sampled with align_corners=False: zero offset reads up to half a pixel outwards). The\n"
        "            shared reference fixture was recorded this way.\n"
        "  exact     zero offset samples the pixel itself, as the authors' PyTorch 1.1 did at training time.\n"
        "            Pick exact for checkpoints trained under PyTorch 1.1 (the released ones probably were).\n"
        "If unsure, convert both ways and compare the val mIoU of the two checkpoints.",
        "  ovenet convert-official seg_offset_hrnet_ocr_w48_cityscapes.yaml final_state.pth ovenet_cs.pth\n"
        "  ovenet convert-official cfg.yaml final_state.pth ovenet_cs_exact.pth --sampling exact\n"
        "  ovenet eval ovenet_cs.pth --data-root data/cityscapes; ovenet eval ovenet_cs_exact.pth --data-root ...",
    )
    p.add_argument("official_yaml", metavar="OFFICIAL.yaml", help="the official experiment YAML")
    p.add_argument("state", metavar="final_state.pth", help="the official checkpoint")
    p.add_argument("out", metavar="OUT", help="ovenet checkpoint to write")
    p.add_argument("--sampling", choices=("official", "exact"), default="official",
                   help="seed resampling convention (see above)")


def cmd_convert_official(args: argparse.Namespace) -> int:
    from ovenet.official import convert_official

    out = convert_official(args.official_yaml, args.state, args.out, sampling=args.sampling)
    other = "exact" if args.sampling == "official" else "official"
    print(f"wrote {out} (sampling={args.sampling}); to compare, evaluate it with model.offset.sampling={other} too")
    return 0


def add_check_data_parser(command: AddCommand) -> None:
    p = command(
        "check-data", "check every sample of a dataset",
        "Read every image and label of the config's dataset and list all problems at once (missing or\n"
        "unreadable files, size mismatches, label values outside the class range, validation images that are\n"
        "also training images); the same problem in many files is one line with their count. Exit code 2 if any.",
        "  ovenet check-data cityscapes_hrnetv2_w48_ovenet data.root=data/cityscapes\n"
        "  ovenet check-data my_config.yaml --split val\n"
        "  ovenet check-data own_data_lite0_ovenet --data-root data/own data.num_classes=11",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config path or shipped config name")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    add_data_root(p)
    p.add_argument("--split", choices=("train", "val", "both"), default="both", help="which split to check")


def cmd_check_data(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides)
                      + ([f"data.root={existing_data_root(args.data_root)}"] if args.data_root else []))
    from ovenet.data import build_dataset
    from ovenet.data.base import collect_problems, listing_every_problem

    splits = {"train": [cfg.data.train_split], "val": [cfg.data.val_split],
              "both": [cfg.data.train_split, cfg.data.val_split]}[args.split]
    problems_total, datasets = 0, {}
    for split in dict.fromkeys(splits):  # train_split == val_split checks once
        try:
            with listing_every_problem():  # a missing label is listed with the rest, when its sample is read
                dataset = datasets[split] = build_dataset(cfg.data, split, train=False)
        except DataError as e:
            print(f"[{split}] {e}")
            problems_total += 1
            continue
        problems = collect_problems(dataset, progress=sys.stderr.isatty())
        for line, _ in problems:
            print(f"[{split}] {line}")
        files = sum(count for _, count in problems)
        problems_total += files
        status = "OK" if not problems else f"{files} problem(s)"
        print(f"[{split}] {len(dataset)} samples of {cfg.data.name} at {cfg.data.root}: {status}")
    if args.split == "both" and len(datasets) == len(set(splits)):
        problems_total += _check_splits_apart(cfg, datasets)
    if problems_total:
        raise DataError(f"check-data found {problems_total} problem(s); see the list above")
    return 0


def _check_splits_apart(cfg: Config, datasets: dict) -> int:
    """Training refuses a validation split that shares images with the training split: say so here first."""
    from ovenet.data import check_splits_apart

    train_set, val_set = datasets[cfg.data.train_split], datasets[cfg.data.val_split]
    try:
        overlap = check_splits_apart(cfg.data, train_set, val_set)
    except OvenetError as e:
        print(f"[train/val] {e}")
        return 1
    if overlap:  # allowed by data.allow_val_overlap: not a problem, but said
        print(f"[train/val] {overlap}")
    return 0


def add_convert_labels_parser(command: AddCommand) -> None:
    p = command(
        "convert-labels", "turn colour-coded label masks into id PNGs",
        "Convert colour masks (RGB PNGs: files, or folders searched recursively) into the label PNGs ovenet\n"
        "trains on: palette PNGs whose pixel values are the class ids (class k = the palette's k-th colour, 255 =\n"
        "void) and whose palette is the colours, so they still look like the masks. A colour that is neither in\n"
        "the palette nor given with --void is refused, naming the file, the colour and its pixel count; nothing\n"
        "is written then. Existing outputs are kept unless --overwrite.",
        "  ovenet convert-labels masks/ labels/ --palette camvid --void 0,0,0\n"
        "  ovenet convert-labels masks/train labels/train --palette my_colours.json   # [[r, g, b], ...]\n"
        "  ovenet convert-labels masks/ labels/ --palette my_data.yaml   # a config's data.palette",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="colour mask files or folders")
    p.add_argument("out", metavar="OUT", help="output folder (a folder's files keep their relative paths)")
    p.add_argument("--palette", required=True, metavar="NAME|FILE",
                   help="class colours: a dataset (camvid, cityscapes, ade20k, acdc), a JSON/YAML list of [r, g, b] "
                        "in class order, or a config with data.palette")
    p.add_argument("--void", action="append", metavar="R,G,B",
                   help="a colour of void/unlabelled pixels, written as 255 (ignored in training); repeat for more")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def cmd_convert_labels(args: argparse.Namespace) -> int:
    from ovenet.data.convert import convert_labels, load_palette, parse_colour

    palette = load_palette(args.palette)
    void = [parse_colour(text) for text in args.void or ()]
    check_output_folder(args.out, "OUT", "id PNGs")
    written = convert_labels(args.sources, args.out, palette, void, overwrite=args.overwrite)
    print(f"wrote {len(written)} id PNG(s) with {len(palette)} classes to {args.out}"
          + (f" ({len(void)} void colour(s) as 255)" if void else ""))
    return 0


def shipped_configs() -> list[Path]:
    """Shipped config files meant to be used directly (``_base_*`` files are building blocks)."""
    return sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("_"))


def _description(path: Path) -> str:
    """A recipe's description: the comment lines it starts with, joined into one paragraph."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(filter(None, lines))


def _described(name: str, description: str, name_width: int) -> list[str]:
    """``name`` and its whole description wrapped to the terminal beside it; on a narrow terminal the
    description goes under the name."""
    columns = shutil.get_terminal_size().columns
    indent = 2 + name_width + 2
    wrap = {"break_on_hyphens": False, "break_long_words": False}  # paths and names stay whole
    if columns - indent < 40:  # too narrow beside the names: under them, indented
        return [f"  {name}", *textwrap.wrap(description, columns - 1, initial_indent=" " * 6,
                                             subsequent_indent=" " * 6, **wrap)]
    lines = textwrap.wrap(description, columns - 1 - indent, **wrap) or [""]
    return [f"  {name:<{name_width}}  {lines[0]}".rstrip(), *(" " * indent + line for line in lines[1:])]


def add_configs_parser(command: AddCommand) -> None:
    p = command(
        "configs", "list the shipped configs, or print one fully resolved",
        "Without NAME: list the shipped configs by dataset. With NAME (a shipped name or a path): print the\n"
        "config with its _base_ chain and overrides applied, as the trainer will see it.",
        "  ovenet configs\n"
        "  ovenet configs cityscapes_hrnetv2_w48_ocr_ovenet\n"
        "  ovenet configs camvid_hrnetv2_w18s_ovenet model.offset.tau=0.2",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="config to print")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def cmd_configs(args: argparse.Namespace) -> int:
    if args.name:
        cfg = load_config(args.name, args.overrides)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.overrides:
        raise OvenetError("overrides need a config NAME: ovenet configs NAME key=value ...")
    groups: dict[str, list[Path]] = {}
    for p in shipped_configs():
        group = p.parent.name if p.parent != CONFIG_DIR else "general"
        groups.setdefault(group, []).append(p)
    width = max(len(p.stem) for ps in groups.values() for p in ps)
    for group, paths in groups.items():
        print(f"{group}:")
        for p in paths:
            print("\n".join(_described(p.stem, _description(p), width)))
    print(f"\nfiles under {CONFIG_DIR}; `ovenet configs NAME` prints one fully resolved")
    return 0


def add_info_parser(command: AddCommand) -> None:
    p = command(
        "info", "describe a checkpoint",
        "Print a checkpoint's architecture, offset head settings, classes, parameter count and training state;\n"
        "for an ONNX file, the metadata `ovenet export` wrote into it (normalisation, classes, palette, tau, outputs).",
        "  ovenet info runs/cs/best.pth\n  ovenet info runs/cs/best.onnx",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="ovenet checkpoint (.pth), or an ONNX file it exported")


def cmd_info(args: argparse.Namespace) -> int:
    checkpoint = require_file(args.checkpoint)
    if Path(checkpoint).suffix == ".onnx":  # an export: what it carries for programs that use it on their own
        from ovenet.export import read_onnx_metadata

        meta = read_onnx_metadata(checkpoint)
        if meta.get("producer") != "ovenet":
            raise OvenetError(f"{checkpoint} carries no ovenet metadata (exported elsewhere, or by an older ovenet); "
                              "export it again with `ovenet export`")
        for key, value in meta.items():
            print(f"{key}: {'the training config, as JSON' if key == 'config' else value}")
        return 0
    from ovenet import checkpoint as ckpt_io
    from ovenet.data import class_info

    raw = ckpt_io.read(checkpoint)
    model = ckpt_io.load(checkpoint, "cpu")
    cfg: Config = model.config
    m, off = cfg.model, cfg.model.offset
    arch = "custom stages" if m.stages else m.arch
    head = {"ocr": "OCR", "fcn": "FCN", "coarse": "coarse (stride-32)"}[m.head]
    if off.enabled:
        kind = (f"OVeNet (offset branch at stage {off.branch_stage}, tau {off.tau}, fusion {off.fusion}, "
                f"sampling {off.sampling})")
        if off.content_free:
            kind = f"OVeNet, content-free control (offsets from pixel coordinates only, tau {off.tau})"
        if off.zero_offsets:
            kind += ", zero-offset control (offsets fixed at 0)"
    else:
        kind = "baseline (no offset head)"
    total = sum(p.numel() for p in model.parameters())
    branch = sum(p.numel() for part in (model.offset_branch, model.offset_head) if part is not None
                 for p in part.parameters())
    try:
        _, names, _ = class_info(cfg.data, m.num_classes)
    except OvenetError:
        names = []
    rows = [
        ("checkpoint", f"{checkpoint} ({checkpoint.stat().st_size / 2**20:.1f} MiB)"),
        ("name", cfg.name),
        ("model", f"{'HRNetV2 ' + arch if m.backbone == 'hrnetv2' else m.backbone} + {head} head, {kind}"),
        ("classes", f"{m.num_classes} ({cfg.data.name})" + _class_list(names, m.num_classes)),
        ("input", f"(pixel - mean) / std, mean {[float(f'{v:g}') for v in m.input_mean]}, std "
                  f"{[float(f'{v:g}') for v in m.input_std]} (0-255 pixel units)"
                  + (f"; {m.encoder_padding} padding" if m.backbone == "efficientnet_lite0" else "")),
        ("parameters", f"{total / 1e6:.2f} M" + (f" (offset branch + head {branch / 1e6:.2f} M)" if branch else "")),
    ]
    state = {k: v for k, v in raw.items() if k not in ("format", "version", "config", "model")
             and isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if state:
        rows.append(("training", ", ".join(_format_state(k, v) for k, v in state.items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _class_list(names: list[str], num_classes: int) -> str:
    if len(names) != num_classes:
        return f", the dataset has {len(names)}" if names else ""
    return f": {', '.join(names)}" if num_classes <= 40 else ""


def _format_state(key: str, value: Any) -> str:
    """``best_miou 51.54 %``: fractions in percent, as everywhere else ovenet prints figures."""
    if key.endswith(("miou", "acc")) and isinstance(value, float):
        return f"{key} {percent(value)} %"
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


def add_quickstart_parser(command: AddCommand) -> None:
    p = command(
        "quickstart", "train, evaluate and run a tiny OVeNet on synthetic scenes",
        "No dataset needed: trains a small OVeNet on procedural SyntheticScenes (about 3 minutes on 2 CPU\n"
        "cores), evaluates it (mIoU, boundary mIoU) and writes predictions with offset and confidence images\n"
        "for a few validation scenes, using the same code as train/eval/predict.",
        "  ovenet quickstart\n"
        "  ovenet quickstart --out /tmp/qs --minutes 1\n"
        "  ovenet quickstart --iters 50 data.num_samples=64     # a smoke test",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="changes to the quickstart config, e.g. data.num_samples=128")
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="output folder")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=3.0, help="approximate total time budget")
    budget.add_argument("--iters", type=int, help="training iterations (instead of --minutes)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous quickstart in --out")
    add_device(p, default="cpu")


def cmd_quickstart(args: argparse.Namespace) -> int:
    from ovenet.quickstart import run_quickstart

    device = str(resolve_device(args.device))  # the quickstart records it in its JSON summary
    run_quickstart(args.out, minutes=args.minutes, iters=args.iters, device=device, overwrite=args.overwrite,
                   overrides=args.overrides, threads=args.threads)
    return 0


def add_report_parser(command: AddCommand) -> None:
    p = command(
        "report", "an HTML page of a run: curves, per-class IoU, confusion matrix, val gallery",
        "Write RUN_DIR/report/index.html and its PNGs: what the run is (model, data, val set size, iterations,\n"
        "best and last val mIoU), every loss term and val mIoU of train.log, the learning rate of every iteration\n"
        "(the run's schedule); per-class IoU (beside --compare's run); the row-normalised confusion matrix\n"
        "(eval_val.json when `ovenet eval` wrote one there, else the last validation of training); val images\n"
        "spread over the val set with ground truth, prediction, offsets and confidence. data.json holds every\n"
        "number plotted. Needs matplotlib (ovenet's report extra). train and eval write it at their end\n"
        "when matplotlib is installed.",
        "  ovenet report runs/camvid_ovenet\n  ovenet report runs/camvid_ovenet --compare runs/camvid_baseline",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a folder `ovenet train` wrote")
    p.add_argument("--compare", type=Path, metavar="RUN_DIR",
                   help="a second run: its curves overlaid, its per-class IoUs beside; warns when its val set differs")
    p.add_argument("--gallery", type=int, default=4, metavar="N", help="val images in the gallery (0: none)")
    p.add_argument("--data-root", help="where the val data is, if not where the run's config says")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/report)")
    add_device(p)


def cmd_report(args: argparse.Namespace) -> int:
    from ovenet.report import build_report

    page = build_report(args.run_dir, args.out, compare=args.compare, gallery=args.gallery,
                        data_root=args.data_root, device=str(resolve_device(args.device)),
                        warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    print(f"wrote {page}")
    return 0
