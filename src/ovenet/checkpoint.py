"""Checkpoints: ovenet's own format, atomic writes, clear errors for files that are not one.

An ovenet checkpoint is a ``torch.save``'d dict read back with ``weights_only=True``::

    {"format": "ovenet", "version": 1, "config": <Config as a dict>, "model": <state dict>,
     ... training state (optimizer, scheduler, scaler, iteration, rng, ...) for run checkpoints}

so every checkpoint, a converted official one or a training run's ``last``/``best``, loads with :func:`load`.
A run that trained a network of the user's own (``ovenet.train(..., model=...)``) adds ``"network": "custom"`` and
``"network_class": "package.module.ClassName"``: its config's model section does not build that network, so
:func:`load` needs the module (``load(path, model=MyNet(...))``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config, ModelConfig, apply_overrides, from_dict, parse_override, saved_config
from .device import resolve_device
from .errors import CheckpointError, ConfigError
from .files import replaced
from .models import build_model

FORMAT = "ovenet"
VERSION = 1
NORMALISATION_KEYS = ("model.input_mean", "model.input_std")  # a checkpoint's own, never overridden
CUSTOM_NETWORK = "custom"  # the "network" of a checkpoint whose weights belong to a network the config cannot build


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or kill at any moment leaves either the previous file or the new one, never a torn file. The file
    gets the mode of any other new file (the umask's), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(OSError):  # a file system without modes (FAT, some SMB mounts) keeps its own
                os.chmod(tmp, new_file_mode())
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask.

    The umask is read from /proc/self/status (Linux 4.7+): the portable way, setting it and setting it back, would
    change it for a moment for every thread of the process (data-loader threads, the report writer), and a file
    one of them created meanwhile would get the wrong mode.
    """
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def save(path: str | Path, model: nn.Module, cfg: Config, **extra: Any) -> Path:
    """Write an ovenet checkpoint (config + weights [+ training state in ``extra``]) atomically."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "model": state, **extra},
                       path)


def read(path: str | Path) -> dict:
    """Read an ovenet checkpoint dict (weights only, on the CPU) with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    ckpt = load_file(path, f"checkpoint '{path}'")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and any(str(k).startswith("model.") for k in ckpt):
            hint = "; it looks like an official OVeNet checkpoint: run `ovenet convert-official CONFIG.yaml " \
                   f"{path.name} OUT.pth` first"
        raise CheckpointError(f"checkpoint '{path}' is not an ovenet checkpoint{hint}")
    return ckpt


def load_file(path: Path, what: str) -> Any:
    """``torch.load`` (weights only, on the CPU) of an existing file, its checksums verified; a
    :class:`CheckpointError` saying why ``what`` (e.g. "model.init_from 'x.pth'") cannot be read otherwise."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"{what} {unreadable_reason(path, e)}") from None
    damaged = damaged_record(path)
    if damaged:
        raise CheckpointError(f"{what} is damaged: its record {damaged} fails its CRC-32 checksum (a bit changed on "
                              "disk or in a copy); copy it again or use another checkpoint")
    return obj


def damaged_record(path: Path) -> str | None:
    """The first record of a ``torch.save`` zip archive whose bytes do not match their stored CRC-32, else None.

    ``torch.load`` does not check these checksums: a flipped bit in a tensor loads silently as a wrong weight.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except zipfile.BadZipFile:
        return None  # a legacy (non-zip) torch file: it has no checksums to test


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in words a user can act on (torch's own message blames the
    ``weights_only`` default for any file that is not a PyTorch file)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK", b"\x80")):  # neither torch's zip archive nor a legacy pickle
        return "is not a checkpoint (not a file written by torch.save); give a .pth from ovenet train or convert-official"
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        return ("holds pickled Python objects besides tensors (e.g. a whole saved model); ovenet reads only "
                "weight files: save model.state_dict() instead, or use a checkpoint from ovenet train")
    return ("is a damaged or incomplete PyTorch file (the copy or download was cut short?); copy it again or use "
            "another checkpoint")


def class_path(model: nn.Module) -> str:
    """``package.module.ClassName`` of a module (under any DDP or torch.compile wrapper)."""
    model = getattr(model, "module", model)
    cls = type(getattr(model, "_orig_mod", model))
    return f"{cls.__module__}.{cls.__qualname__}"


def custom_network_marks(model: nn.Module) -> dict[str, str]:
    """What a checkpoint of a user's own ``model`` records besides its weights: that the config does not build it,
    and its class (for the messages that say how to load it)."""
    return {"network": CUSTOM_NETWORK, "network_class": class_path(model)}


def custom_network(ckpt: dict) -> str | None:
    """The class path of the user's network a checkpoint holds, or None for a network its config builds."""
    if ckpt.get("network") != CUSTOM_NETWORK:
        return None
    return str(ckpt.get("network_class") or "unknown class")


def custom_network_message(path: str | Path, class_path: str) -> str:
    """The one line for a custom network's checkpoint used where ovenet would build the network itself."""
    name = class_path.rsplit(".", 1)[-1]
    return (f"checkpoint {path} holds weights of a custom network ({class_path}); load it in Python: "
            f"ovenet.load({str(path)!r}, model={name}(...))")


def load_state(model: nn.Module, state: dict, source: str = "checkpoint",
               fix: str = "check that the config's architecture, head, offset branch and num_classes match the "
                          "checkpoint") -> None:
    """``load_state_dict(strict=True)`` whose error names the missing/unexpected/mis-shaped keys (then ``fix``)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}; {fix}")
    model.load_state_dict(state)


def load(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None,
         model: nn.Module | None = None) -> nn.Module:
    """The model of any ovenet checkpoint, in eval mode, on ``device``.

    ``overrides`` (dotted ``model.*`` keys) may change inference-only options such as ``model.offset.sampling``.
    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a ``torch.device``).

    ``model``: a module you built to receive the weights (strictly: every key and shape must match), needed for
    the checkpoint of a network of your own (``ovenet.train(..., model=...)``). It is returned itself, in eval mode,
    with what ovenet's own networks carry when the module lacks it: ``config`` (the run's config: ``predict`` runs
    the image as validation did), ``num_classes``, ``align_corners``, ``is_ovenet`` and a ``predict`` method
    (:func:`ovenet.inference.predict`).
    """
    device = resolve_device(device)  # before reading: a missing GPU is the first thing to tell
    ckpt = read(path)
    custom = custom_network(ckpt)
    if custom is not None and model is None:
        raise CheckpointError(custom_network_message(path, custom))
    if model is not None and overrides:
        raise CheckpointError("load(model=...) takes the module as you built it: model.* overrides change only "
                              "the networks ovenet builds; build your module with the options you want instead")
    _refuse_normalisation_overrides(path, ckpt["config"], overrides or [])
    try:
        cfg = from_dict(apply_overrides(saved_config(ckpt["config"]), overrides or []))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{path}' holds an invalid config: {e}") from None
    cfg.model.pretrained = None
    cfg.model.init_from = None  # the weights are this checkpoint's
    cfg.model.freeze_main = False
    if model is None:
        model = build_model(cfg.model)
        load_state(model, ckpt["model"], f"checkpoint '{path}'")
    else:
        fix = (f"build the module as it was trained ({custom})" if custom else
               "the checkpoint holds ovenet's own network: load it without model=, or build the same network")
        load_state(model, ckpt["model"], f"checkpoint '{path}'", fix)
        _add_model_facts(model, cfg)
    model.config = cfg
    return model.to(device).eval()


def _refuse_normalisation_overrides(path: str | Path, config: dict, overrides: list[str]) -> None:
    """The weights were trained on one input normalisation; run with another, every number would be off."""
    for override in overrides:
        key = ".".join(parse_override(override)[0])
        if key in NORMALISATION_KEYS:
            trained = config.get("model", {}).get(key.removeprefix("model."), getattr(ModelConfig(), key[6:]))
            raise CheckpointError(f"{key} of checkpoint '{path}' is the normalisation its weights were trained with "
                                  f"({trained}); a checkpoint always runs with its own: drop the {key} override")


def _add_model_facts(model: nn.Module, cfg: Config) -> None:
    """Give a user's module what ovenet's inference reads from its own networks, where the module lacks it:
    the values its training used (``ovenet.train`` recorded them in the config)."""
    facts = {"num_classes": cfg.model.num_classes, "align_corners": cfg.model.align_corners,
             "is_ovenet": cfg.model.offset.enabled}
    for name, value in facts.items():
        if not hasattr(model, name):
            setattr(model, name, value)
    if not hasattr(model, "predict"):
        from .inference import predict

        model.predict = functools.partial(predict, model)


# --- training state: RNG streams, resuming -------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )


HISTORY = re.compile(r"iter_(\d+)\.pth")


def history(run_dir: Path) -> list[Path]:
    """The run's earlier checkpoints (``iter_N.pth``, kept by ``train.keep_checkpoints``), newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("iter_*.pth") if (m := HISTORY.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def keep_history(run_dir: Path, saved_iteration: int | None, iteration: int, keep: int) -> None:
    """Before ``last.pth`` is replaced by the checkpoint of ``iteration``: keep the one it holds (of
    ``saved_iteration``) as ``iter_N.pth`` (a hard link, no copy: the new ``last.pth`` is a new file) and delete
    all but the newest ``keep - 1`` of them."""
    last = run_dir / "last.pth"
    if keep > 1 and saved_iteration is not None and saved_iteration != iteration and last.is_file():
        target = run_dir / f"iter_{saved_iteration:08d}.pth"
        if not target.exists():
            try:
                os.link(last, target)
            except OSError:  # a file system without hard links: copy, through a temporary file (never a torn one)
                with replaced(target) as partial:
                    shutil.copyfile(last, partial)
    for old in history(run_dir)[max(keep - 1, 0):]:
        old.unlink(missing_ok=True)


def read_resume(resume: str | Path | None, run_dir: Path) -> dict | None:
    """The checkpoint dict to resume from (with its ``path``), or None to start fresh.

    ``"auto"``: ``run_dir/last.pth``, or, if it is damaged, the newest intact ``iter_N.pth``; the dict's
    ``fallback`` lists what was skipped and why. A run folder whose every checkpoint is damaged is an error,
    never a silent fresh start.
    """
    if resume is None:
        return None
    if str(resume) != "auto":
        return _training_state(read(Path(resume)), Path(resume))
    candidates = [p for p in [run_dir / "last.pth", *history(run_dir)] if p.is_file()]
    skipped = []
    for path in candidates:
        try:
            ckpt = _training_state(read(path), path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        ckpt["fallback"] = skipped
        return ckpt
    if skipped:
        raise CheckpointError(f"--resume auto: no intact checkpoint in {run_dir}: {'; '.join(skipped)}; start the "
                              "run again with --overwrite")
    return None


def _training_state(ckpt: dict, path: Path) -> dict:
    missing = [k for k in ("optimizer", "scheduler", "iteration", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no training state ({', '.join(missing)} missing): it holds "
            "weights only; use it as model.pretrained or for evaluation, not for --resume"
        )
    ckpt["path"] = path
    return ckpt


def weights_digest(model: nn.Module) -> str:
    """A short fingerprint of ``model``'s weights (16 hex digits): the same for the same weights wherever they run,
    so ``predict`` records it, and ONNX exports carry it for ONNX Runtime to report."""
    digest = hashlib.sha256()
    # A strided sample of every tensor identifies the weights (any two trained checkpoints differ nearly
    # everywhere) at a small fraction of the cost of hashing them all.
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 256)].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]
