"""Device names users type (``auto``, ``cpu``, ``cuda``, ``cuda:N``) to a ``torch.device``, with one-line errors."""

from __future__ import annotations

import contextlib

import torch

from .errors import OvenetError

# The one precision vocabulary, for training (train.amp) and inference (--precision): autocast's dtype or None.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is visible, else the CPU. A CUDA device that is not there is an
    :class:`OvenetError` naming the PyTorch build and the fix, not PyTorch's ``AssertionError``."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "meta":  # shapes only: used to check code paths without data
        return torch.device("meta")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
            raise OvenetError(f"device '{name}' requested but no CUDA GPU is available (torch {torch.__version__}, "
                              f"{build}); use --device cpu (device='cpu' in Python) or auto")
        index = name.partition(":")[2]
        if not index:
            return torch.device(f"cuda:{local_rank}")
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise OvenetError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) visible "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device(name)
    raise OvenetError(f"device '{name}' is unknown; use auto, cpu, cuda or cuda:N")


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` ("fp32": no autocast) on ``device``'s type."""
    if precision not in PRECISIONS:
        raise OvenetError(f"precision '{precision}' is unknown; use one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
