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
from ovenet.cli.options import THREADS_HELP, Formatter, thread_count
from ovenet.config import is_override
from ovenet.errors import OvenetError
from ovenet.files import disk_full_message, is_disk_full

PROG = "ovenet"
COMMANDS_TAKING_OVERRIDES = ("train", "eval", "predict", "check-data", "configs", "quickstart")
# Each subcommand's parser is built next to its command in ovenet.cli.commands.
SUBCOMMANDS = (commands.add_train_parser, commands.add_eval_parser, commands.add_predict_parser,
               commands.add_export_parser, commands.add_convert_official_parser, commands.add_convert_labels_parser,
               commands.add_check_data_parser,
               commands.add_configs_parser, commands.add_info_parser, commands.add_report_parser,
               commands.add_quickstart_parser)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ovenet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from ovenet import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=Formatter,
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
    parser.add_argument("--threads", type=thread_count, metavar="N", help=THREADS_HELP)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # --debug is accepted after the command too; SUPPRESS keeps it from overwriting the global value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    common.add_argument("--threads", type=thread_count, default=argparse.SUPPRESS, metavar="N", help=THREADS_HELP)

    def command(name: str, help: str, description: str, epilog: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, epilog="examples:\n" + epilog,
                           parents=[common], formatter_class=Formatter, **kw)
        p.set_defaults(func=getattr(commands, "cmd_" + name.replace("-", "_")))
        return p

    for add_parser in SUBCOMMANDS:  # in the order `ovenet --help` lists them
        add_parser(command)
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


def _disk_full_message(args: argparse.Namespace, error: OSError) -> str:
    """The folder that filled and where to write instead."""
    if args.command == "train":
        from ovenet.engine.guards import DISK_FULL_FIX

        return disk_full_message(error, DISK_FULL_FIX)
    fix = f"free space there or choose another {'OUT' if args.command == 'convert-official' else '--out'}"
    return disk_full_message(error, fix + ("; rerunning the same command continues" if args.command == "predict"
                                           else ""))


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
    except KeyboardInterrupt as e:  # e.g. predict's PredictionInterrupted: how far it got, how to continue
        if e.args:
            print(f"{PROG}: {e.args[0]}", file=sys.stderr)
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
    except OSError as e:
        if not is_disk_full(e):
            raise
        if args.debug:
            traceback.print_exc()
        return _error(_disk_full_message(args, e))
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
