"""Whole files or none: results are written under a temporary name beside their final one and renamed into place,
so that a full disk, a crash or Ctrl-C never leaves a half-written file under a name a rerun would trust.

An ``OSError`` raised while writing carries the final file's name (``filename``) even when the failing call (a
``write`` into an open file, PIL's save) did not give it, so that the command line can say which folder filled
up (:func:`is_disk_full`, :func:`disk_full_message`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

# "No space left on device" and "Disk quota exceeded": either way the folder's filesystem took no more bytes.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def temporary_name(path: Path) -> Path:
    """The name a file is written under before it is complete: hidden, beside ``path`` (same filesystem)."""
    return path.with_name(f".{path.name}.part")


@contextlib.contextmanager
def replaced(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; renamed over ``path`` when the block ends, removed
    when it raises (a ``KeyboardInterrupt`` too). An ``OSError`` without a file name gets ``path``'s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def write_text(path: str | Path, text: str) -> Path:
    """``Path.write_text`` (UTF-8), whole or not at all."""
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def disk_full_message(error: OSError, fix: str) -> str:
    """One line for a full disk: the folder that filled (the writers above name their final file) and ``fix``."""
    folder = Path(error.filename).parent if error.filename else "the output folder"
    return f"disk full: no space left in {folder} ({error.strerror or error}); only whole files are kept; {fix}"
