"""The command line's texts and shape: every `--help` page equals the recorded one (tests/data/cli_help.txt, at
120 columns), and no function in src/ is longer than 100 lines (each subcommand's parser is built next to its
command, ovenet.cli.commands)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ovenet
from ovenet.cli.main import build_parser

RECORDED = Path(__file__).parent / "data" / "cli_help.txt"
MAX_FUNCTION_LINES = 100


def help_pages() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    pages = ["== ovenet ==", parser.format_help()]
    for name, p in sub.choices.items():
        pages += [f"== {name} ==", p.format_help()]
    return "\n".join(pages)


def test_every_help_page_is_the_recorded_one(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal's width
    # To accept an intended change: python -c "from tests.test_cli_help import help_pages; print(help_pages(), end='')"
    # with COLUMNS=120 > tests/data/cli_help.txt, and review the diff.
    assert help_pages() == RECORDED.read_text()


def test_subcommands_are_listed_in_order():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert list(sub.choices) == ["train", "eval", "predict", "export", "convert-official", "convert-labels",
                                 "check-data", "configs", "info", "report", "quickstart"]


@pytest.mark.parametrize("path", sorted(Path(ovenet.__file__).parent.rglob("*.py")), ids=lambda p: p.name)
def test_no_function_is_longer_than_100_lines(path):
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"{path}: split " + ", ".join(long)
