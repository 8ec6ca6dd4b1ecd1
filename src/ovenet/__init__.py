"""ovenet: OVeNet (Offset Vector Network) semantic segmentation on HRNetV2 and HRNetV2+OCR.

    import ovenet
    model = ovenet.load("runs/camvid_ovenet/best.pth")        # nn.Module in eval mode
    result = model.predict("street.png")                      # labels, offsets, confidence at input size
    net = ovenet.build_model(ovenet.load_config("cityscapes_hrnetv2_w48_ocr_ovenet").model)
    run = ovenet.train("quickstart", "runs/mine", model=my_net)   # ovenet's training loop on your own network
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .checkpoint import load
from .config import Config, apply_overrides, from_dict, load_config
from .errors import OvenetError
from .models import OVeNet, SegOutput, build_model

__version__ = "0.1.0"

__all__ = ["Config", "OVeNet", "OvenetError", "SegOutput", "__version__", "build_model", "load", "load_config",
           "train"]


def train(config: Config | str | Path, run_dir: str | Path | None = None, model: nn.Module | None = None,
          overrides: Sequence[str] = (), resume: str | Path | None = None, overwrite: bool = False,
          device: str | None = None) -> Path:
    """Train as ``ovenet train`` does; returns the run folder (default ``output_dir/name``).

    ``config``: a :class:`Config`, a YAML path or a shipped config's name (``ovenet configs``); ``overrides``:
    dotted ``key=value`` strings as on the command line; ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    ``resume``: a checkpoint, or ``"auto"`` (the run folder's ``last.pth`` if there is one: exact resume);
    ``overwrite``: start over in a run folder that holds checkpoints.

    ``model``: a network of your own, trained instead of the one ``config.model`` describes: an
    :class:`~ovenet.models.OffsetSegmenter` or any ``nn.Module`` whose forward maps images ``[B, 3, H, W]`` to a
    :class:`SegOutput` (``logits_initial``/``logits_final``; with ``offsets``, ``confidence`` and ``logits_seed``
    the offset losses apply). It gets ovenet's whole loop: the losses of ``config.loss`` (OHEM, the confidence
    loss), SGD with the poly schedule of ``config.train``, checkpoints, validation and ``best.pth``, the report.
    The module is trained in place (it ends with the last iteration's weights). Of ``config.model`` only these
    still matter: ``num_classes``, ``align_corners`` and ``offset`` (the seed ``sampling`` convention the
    confidence loss reads labels with) are taken from the module where it has them (``num_classes`` from its
    logits, an OffsetSegmenter's own offset config), else from the config, and recorded in ``config.yaml``;
    ``init_from`` applies (tensors of the same name and shape); ``pretrained`` and ``freeze_main`` are refused.
    What the module lacks is named in one error before training starts. Its checkpoints load back with
    ``ovenet.load(path, model=MyNet(...))``; resume with the module passed again (``resume="auto"``).
    """
    if isinstance(config, Config):
        cfg = from_dict(apply_overrides(config.to_dict(), [*overrides, *([f"device={device}"] if device else [])]))
    else:
        cfg = load_config(config, [*overrides, *([f"device={device}"] if device else [])])
    from .engine.train import train as train_run

    return train_run(cfg, resume=resume, run_dir=Path(run_dir) if run_dir is not None else None,
                     overwrite=overwrite, model=model)
