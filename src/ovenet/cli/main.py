"""The ``ovenet`` command line: argument parsing, dispatch and the mapping of errors to one-line messages.

Every subcommand is a ``cmd_*`` function of :mod:`ovenet.cli.commands` (set as the parser's ``func``), which
imports the heavy parts of the engine only when it runs. commands never imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ovenet.cli import commands
from ovenet.config import is_override
from ovenet.engine.predict import SAVE_KINDS
from ovenet.errors import OvenetError
from ovenet.inference import PAPER_SCALES

PROG = "ovenet"
COMMANDS_TAKING_OVERRIDES = ("train", "eval", "predict", "check-data", "configs", "quickstart")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made line breaks of descriptions/epilogs; show defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, metavar="DEV",
                   help="auto (GPU when present), cpu, cuda or cuda:N")


def _add_data_root(p: argparse.ArgumentParser) -> None:
    """Every command that reads a dataset takes --data-root (the same as the override data.root=DIR)."""
    p.add_argument("--data-root", metavar="DIR", help="the dataset's folder (sets data.root)")


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    scales = p.add_mutually_exclusive_group()
    scales.add_argument("--scales", type=float, nargs="+", metavar="S",
                        help="test scales, e.g. 0.75 1.0 1.25 (default: the config's eval.scales)")
    scales.add_argument("--paper-scales", action="store_true",
                        help=f"the paper's test protocol: scales {' '.join(map(str, PAPER_SCALES))} plus flipping")
    p.add_argument("--flip", action="store_true", default=None, help="also average the horizontally flipped image")
    p.add_argument("--mode", choices=("whole", "slide", "official"),
                   help="whole: each scaled image in one pass, probabilities averaged over scales and flips; "
                        "slide: windows of eval.crop_size (stride eval.stride, default 2/3 of the crop), a scaled "
                        "image smaller than the crop padded up to it (which changes OCR's global context and the "
                        "offsets' normalisation); official: the authors' test, scales <= 1 whole, scales > 1 in "
                        "unpadded windows of eval.crop_size with stride = crop, logits averaged with the flip, "
                        "then exp(logits) summed over scales (default: the config's eval.mode)")


THREADS_HELP = ("CPU threads for train, eval, predict and quickstart (default: one core left free and none the "
                "load average shows busy, so 1 on 2 cores; OMP_NUM_THREADS when set; PyTorch's own on CUDA)")


def _thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got '{text}'")
    return int(text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ovenet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from ovenet import __version__

        return __version__


def _save_kinds(text: str) -> list[str]:
    """``--save color,labels``: one argument, so it cannot swallow the input paths that follow it."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SAVE_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(SAVE_KINDS)}, comma-separated")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description="OVeNet (offset vector network) semantic segmentation on HRNetV2 / HRNetV2+OCR.",
        epilog=(
            "first steps:\n"
            "  ovenet quickstart                  # train + evaluate a tiny OVeNet on synthetic scenes (CPU, ~3 min)\n"
            "  ovenet configs                     # the shipped training recipes\n"
            "  ovenet train camvid_hrnetv2_w18s_ovenet data.root=path/to/CamVid\n"
            "\n"
            "Run `ovenet COMMAND --help` for the options and examples of each command.\n"
            "Config values are changed on the command line with dotted overrides: train.lr=0.02 model.offset.tau=0.2"
        ),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--threads", type=_thread_count, metavar="N", help=THREADS_HELP)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # --debug is accepted after the command too; SUPPRESS keeps it from overwriting the global value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    common.add_argument("--threads", type=_thread_count, default=argparse.SUPPRESS, metavar="N", help=THREADS_HELP)

    def command(name: str, help: str, description: str, epilog: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, epilog="examples:\n" + epilog,
                           parents=[common], formatter_class=_Formatter, **kw)
        p.set_defaults(func=getattr(commands, "cmd_" + name.replace("-", "_")))
        return p

    # -- train -------------------------------------------------------------------------------------------------
    p = command(
        "train", "train a model from a config",
        "Train from a YAML config (a path or a shipped config name, see `ovenet configs`), with optional\n"
        "dotted overrides. Writes checkpoints (last, best), the resolved config and logs to the run folder.\n"
        "Under torchrun every process runs this same command; the engine reads the distributed environment.",
        "  ovenet train camvid_hrnetv2_w18s_ovenet data.root=data/CamVid\n"
        "  ovenet train cityscapes_hrnetv2_w48_ocr_ovenet train.batch_size=2 model.offset.tau=0.2\n"
        "  ovenet train my_config.yaml --resume auto            # continue the run's last checkpoint\n"
        "  ovenet train my_config.yaml --resume auto train.iters=120000   # train a finished run longer\n"
        "  torchrun --nproc_per_node 4 -m ovenet.cli train cityscapes_hrnetv2_w48_ovenet\n"
        "\n"
        "train refuses a run folder that holds checkpoints (last.pth, best.pth): continue that run with --resume\n"
        "auto, start it again with --overwrite (its checkpoints are removed), or pick another --run-dir. A resume\n"
        "may change only train.iters/epochs, logging, checkpoint and validation intervals, device, data.num_workers\n"
        "and eval settings (logged, and recorded in config.yaml); a change to the model, data, loss or optimiser is\n"
        "refused. A resume with no iterations left says so and trains nothing (exit 0).",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config path or shipped config name")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    _add_data_root(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="PATH|auto",
                       help="checkpoint to resume from, or 'auto' for the run folder's last checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="start again in a run folder that holds checkpoints, removing them")
    _add_device(p, default=None)
    p.add_argument("--run-dir", metavar="DIR", help="run folder (default: OUTPUT_DIR/NAME from the config)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms where PyTorch has them (same as train.deterministic=true)")

    # -- eval --------------------------------------------------------------------------------------------------
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
        usage=f"{PROG} eval [CONFIG] CHECKPOINT [key.sub=value ...] [options]",
    )
    p.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT [key.sub=value ...]",
                   help="optional config, the checkpoint, then optional overrides")
    p.add_argument("--split", help="dataset split (default: the config's data.val_split)")
    _add_inference_options(p)
    _add_data_root(p)
    p.add_argument("--out", metavar="DIR",
                   help="where to write eval_SPLIT.json and eval_SPLIT.md (default: the checkpoint's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results in --out")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="inference precision (autocast; bf16/fp16 are fast on GPUs, bf16 also runs on CPUs)")
    _add_device(p, default=None)

    # -- predict -----------------------------------------------------------------------------------------------
    p = command(
        "predict", "segment images (label PNGs, colour, offsets, confidence)",
        "Run CHECKPOINT on images, folders of images or videos and write, per image, a colour rendering, an\n"
        "overlay, the label-index PNG (raw), Cityscapes label ids (labelids) and, for OVeNet models, the offset\n"
        "field (optical-flow colour wheel) and the confidence map. Extra key=value words are model.* overrides.",
        "  ovenet predict runs/cs/best.pth street.jpg --out preds/\n"
        "  ovenet predict runs/cs/best.pth frames/ --out preds/ --flip --scales 0.75 1.0 1.25 --device cuda\n"
        "  ovenet predict converted.pth img.png --out preds/ model.offset.sampling=exact\n"
        "  ovenet predict runs/cs/best.pth frames/ --out preds/ --skip-bad\n"
        "\n"
        "Rerunning into the same --out continues where the last run stopped: inputs whose outputs are already done\n"
        "are kept and skipped (outputs are written whole or not at all); --overwrite redoes them. Outputs made\n"
        "with another checkpoint or other settings are never mixed in: that rerun is refused without --overwrite.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="ovenet checkpoint (.pth)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (overrides key=value too)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_inference_options(p)
    p.add_argument("--save", type=_save_kinds, metavar="KIND[,KIND...]",
                   help=f"what to write, comma-separated: {', '.join(SAVE_KINDS)} (default: all that apply to the "
                        "model: labelids for Cityscapes/ACDC, offsets and confidence for OVeNet)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every input (default: keep the outputs already done and predict the rest)")
    p.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the network: auto = ONNX Runtime for fp32 on the CPU when onnxruntime is "
                        "installed (1.75x faster there, same labels), else PyTorch")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images or videos and list them at the end (exit code 2 if any)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="inference precision (autocast; bf16/fp16 are fast on GPUs, bf16 also runs on CPUs)")
    _add_device(p)

    # -- export ------------------------------------------------------------------------------------------------
    p = command(
        "export", "export a checkpoint to ONNX",
        "Export CHECKPOINT's network to ONNX (needs the optional `onnx` package). The graph takes an\n"
        "ImageNet-normalised float32 Bx3xHxW RGB image (B, H, W dynamic) and returns the final logits and, for\n"
        "OVeNet, the offsets and the confidence, at 1/4 of the input size unless --full-resolution.",
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

    # -- convert-official --------------------------------------------------------------------------------------
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

    # -- check-data --------------------------------------------------------------------------------------------
    p = command(
        "check-data", "check every sample of a dataset",
        "Read every image and label of the config's dataset and list all problems at once (missing or\n"
        "unreadable files, size mismatches, label values outside the class range). Exit code 2 if any.",
        "  ovenet check-data cityscapes_hrnetv2_w48_ovenet data.root=data/cityscapes\n"
        "  ovenet check-data my_config.yaml --split val",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config path or shipped config name")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    _add_data_root(p)
    p.add_argument("--split", choices=("train", "val", "both"), default="both", help="which split to check")

    # -- configs, info -----------------------------------------------------------------------------------------
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

    p = command(
        "info", "describe a checkpoint",
        "Print a checkpoint's architecture, offset head settings, classes, parameter count and training state.",
        "  ovenet info runs/cs/best.pth",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="ovenet checkpoint (.pth)")

    # -- quickstart --------------------------------------------------------------------------------------------
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
    _add_device(p, default="cpu")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """parse_known_args, then accept leftover ``key=value`` words as overrides wherever they appear
    (argparse alone rejects positionals given after an option)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if is_override(e)]
    rest = [e for e in extra if not is_override(e)]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if overrides:
        if args.command not in COMMANDS_TAKING_OVERRIDES:
            parser.error(f"'{args.command}' takes no config overrides: {' '.join(overrides)}")
        if args.command == "eval":
            args.paths += overrides
        elif args.command == "predict":
            args.inputs += overrides
        else:
            args.overrides += overrides
    return args


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _oom_message(args: argparse.Namespace) -> str:
    cfg = getattr(args, "loaded_config", None)
    if args.command == "train" and cfg is not None:
        b = cfg.train.batch_size
        h, w = cfg.data.crop_size
        return (f"CUDA out of memory at batch size {b}, crop {h}x{w}: lower train.batch_size or data.crop_size "
                f"(e.g. train.batch_size={max(1, b // 2)} or data.crop_size=[{h // 2},{w // 2}]), or enable "
                "train.amp=bf16")
    if args.command in ("eval", "predict", "quickstart"):
        return ("CUDA out of memory during inference: use --mode slide, fewer --scales, --precision bf16 "
                "or --device cpu")
    return "CUDA out of memory: free GPU memory or use --device cpu"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ovenet`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare `ovenet` asks what it can do: the help, not a usage error
        parser.print_help()
        return 0
    try:
        args = _parse(parser, argv)
    except SystemExit as e:  # --help, usage errors: keep argparse's messages, return its code in-process
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # TrainingInterrupted (SIGINT/SIGTERM): the engine has already said where last.pth is
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BrokenPipeError:  # `ovenet configs | head`: the reader left, nothing to report
        try:  # point stdout at /dev/null so the interpreter's final flush does not complain again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    except OvenetError as e:
        if args.debug:
            traceback.print_exc()
        return _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if args.debug:
            traceback.print_exc()
        where = f"'{e.filename}'" if e.filename else "a file"
        return _error(f"cannot open {where}: {e.strerror or e}")
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError" and "torch" in type(e).__module__:
            if args.debug:
                traceback.print_exc()
            return _error(_oom_message(args))
        raise
    finally:  # the thread count a command chose ends with it (tests and notebooks call main() in-process)
        from ovenet.threads import restore_threads

        restore_threads()


if __name__ == "__main__":
    sys.exit(main())
