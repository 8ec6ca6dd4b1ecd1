"""Argument-parsing pieces shared by the subcommands' parser builders (:mod:`ovenet.cli.commands`) and the
top-level parser (:mod:`ovenet.cli.main`). Imports nothing heavy, so ``ovenet --help`` stays fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ovenet.engine.predict import SAVE_KINDS
from ovenet.inference import PAPER_SCALES

# command(name, help, description, epilog, **add_parser_kwargs) -> the subcommand's parser, its func set.
AddCommand = Callable[..., argparse.ArgumentParser]

THREADS_HELP = ("CPU threads for train, eval, predict and quickstart (default: one core left free and none the "
                "load average shows busy, so 1 on 2 cores; OMP_NUM_THREADS when set; PyTorch's own on CUDA)")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made line breaks of descriptions/epilogs; show defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, metavar="DEV",
                   help="auto (GPU when present), cpu, cuda or cuda:N")


def add_data_root(p: argparse.ArgumentParser) -> None:
    """Every command that reads a dataset takes --data-root (the same as the override data.root=DIR)."""
    p.add_argument("--data-root", metavar="DIR", help="the dataset's folder (sets data.root)")


def add_inference_options(p: argparse.ArgumentParser) -> None:
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


def add_precision(p: argparse.ArgumentParser, **kwargs: Any) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="inference precision (autocast; bf16/fp16 are fast on GPUs, bf16 also runs on CPUs)",
                   **kwargs)


def thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got '{text}'")
    return int(text)


def save_kinds(text: str) -> list[str]:
    """``--save color,labels``: one argument, so it cannot swallow the input paths that follow it."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SAVE_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(SAVE_KINDS)}, comma-separated")
    return kinds
