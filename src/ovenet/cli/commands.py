"""The ``ovenet`` subcommands. Each ``cmd_*`` takes the parsed arguments and returns an exit code.

Heavy imports (torch, the engine) happen inside the commands so that ``ovenet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ovenet.config import CONFIG_DIR, Config, apply_overrides, from_dict, is_override, load_config
from ovenet.device import resolve_device
from ovenet.engine.evaluate import percent
from ovenet.errors import CheckpointError, DataError, OvenetError
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

    data = read(checkpoint)["config"]
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
    rows = [("mIoU", result.get("miou")), ("pixel accuracy", result.get("pixel_acc")),
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

def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.deterministic:
        overrides.append("train.deterministic=true")
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


def cmd_eval(args: argparse.Namespace) -> int:
    config_path, checkpoint, overrides = _split_eval_paths(args.paths)
    require_file(checkpoint)
    if args.out:
        check_output_folder(args.out, "--out")
    overrides += inference_overrides(args)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
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
    print_metrics(result)
    json_path, md_path = result_paths(args.out or Path(checkpoint).parent, result.get("split", args.split))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _predict_runtime(requested: str, device: Any, precision: str | None) -> str:
    """``auto``: ONNX Runtime for fp32 on the CPU when it is installed (1.75x eager PyTorch there, same labels:
    benchmarks/RESULTS.md), else PyTorch."""
    if requested != "auto":
        if requested == "onnxruntime" and (str(device) != "cpu" or (precision or "fp32") != "fp32"):
            raise OvenetError("--runtime onnxruntime runs fp32 on the CPU; use --device cpu without --precision, "
                              "or --runtime torch")
        return requested
    if str(device) != "cpu" or (precision or "fp32") != "fp32":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


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
    from ovenet.data import dataset_info
    from ovenet.engine.predict import predict_files

    model = checkpoint.load(args.checkpoint, device, overrides=overrides or None)
    cfg: Config = model.config
    runtime = _predict_runtime(args.runtime, device, args.precision)
    if runtime == "onnxruntime":
        from ovenet.export import OnnxRuntimeModel

        onnx_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ovenet_onnx_"))
        model = OnnxRuntimeModel(model, onnx_dir)
    print(f"runtime: {runtime} on {device}" + ("; --runtime torch to use PyTorch" if runtime == "onnxruntime" else ""))
    _, _, palette = dataset_info(cfg.data.name, cfg.data.num_classes or cfg.model.num_classes)
    scales = PAPER_SCALES if args.paper_scales else (args.scales or cfg.eval.scales)
    options: dict[str, Any] = {
        "overwrite": args.overwrite,
        "skip_bad": args.skip_bad,
        "scales": list(scales),
        "flip": bool(args.flip or args.paper_scales or cfg.eval.flip),
        "mode": args.mode or cfg.eval.mode,
        "crop_size": list(cfg.eval.crop_size),  # sliding-window size when mode is slide
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


def cmd_convert_official(args: argparse.Namespace) -> int:
    from ovenet.official import convert_official

    out = convert_official(args.official_yaml, args.state, args.out, sampling=args.sampling)
    other = "exact" if args.sampling == "official" else "official"
    print(f"wrote {out} (sampling={args.sampling}); to compare, evaluate it with model.offset.sampling={other} too")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else []))
    from ovenet.data import build_dataset, check_dataset

    splits = {"train": [cfg.data.train_split], "val": [cfg.data.val_split],
              "both": [cfg.data.train_split, cfg.data.val_split]}[args.split]
    problems_total = 0
    for split in dict.fromkeys(splits):  # train_split == val_split checks once
        try:
            dataset = build_dataset(cfg.data, split, train=False)
        except DataError as e:
            print(f"[{split}] {e}")
            problems_total += 1
            continue
        problems = check_dataset(dataset, progress=sys.stderr.isatty())
        for problem in problems:
            print(f"[{split}] {problem}")
        problems_total += len(problems)
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"[{split}] {len(dataset)} samples of {cfg.data.name} at {cfg.data.root}: {status}")
    if problems_total:
        raise DataError(f"check-data found {problems_total} problem(s); see the list above")
    return 0


def shipped_configs() -> list[Path]:
    """Shipped config files meant to be used directly (``_base_*`` files are building blocks)."""
    return sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("_"))


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


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
            print(f"  {p.stem:<{width}}  {_first_comment(p)}")
    print(f"\nfiles under {CONFIG_DIR}; `ovenet configs NAME` prints one fully resolved")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    checkpoint = require_file(args.checkpoint)
    from ovenet import checkpoint as ckpt_io
    from ovenet.data import dataset_info

    raw = ckpt_io.read(checkpoint)
    model = ckpt_io.load(checkpoint, "cpu")
    cfg: Config = model.config
    m, off = cfg.model, cfg.model.offset
    arch = "custom stages" if m.stages else m.arch
    head = "OCR" if m.head == "ocr" else "FCN"
    if off.enabled:
        kind = (f"OVeNet (offset branch at stage {off.branch_stage}, tau {off.tau}, fusion {off.fusion}, "
                f"sampling {off.sampling})")
    else:
        kind = "baseline (no offset head)"
    total = sum(p.numel() for p in model.parameters())
    branch = sum(p.numel() for part in (model.offset_branch, model.offset_head) if part is not None
                 for p in part.parameters())
    try:
        _, names, _ = dataset_info(cfg.data.name, cfg.data.num_classes or m.num_classes)
    except OvenetError:
        names = []
    rows = [
        ("checkpoint", f"{checkpoint} ({checkpoint.stat().st_size / 2**20:.1f} MiB)"),
        ("name", cfg.name),
        ("model", f"HRNetV2 {arch} + {head} head, {kind}"),
        ("classes", f"{m.num_classes} ({cfg.data.name})" + _class_list(names, m.num_classes)),
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


def cmd_quickstart(args: argparse.Namespace) -> int:
    from ovenet.quickstart import run_quickstart

    device = str(resolve_device(args.device))  # the quickstart records it in its JSON summary
    run_quickstart(args.out, minutes=args.minutes, iters=args.iters, device=device, overwrite=args.overwrite,
                   overrides=args.overrides, threads=args.threads)
    return 0
