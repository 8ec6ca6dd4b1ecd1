"""Training memory, planned before a run: the peak of one training step, estimated without a GPU.

:func:`estimate_training_memory` builds the model, the loss and the optimizer of a config under PyTorch's
``FakeTensorMode`` (tensors with shapes and dtypes but no data) and runs the real
:func:`ovenet.engine.step.train_step` on a fake batch -- forward, loss, backward, optimizer step -- while
:class:`LiveMemory` counts the bytes of every tensor storage alive at each operator. No data is read and nothing
is computed, so a 512x1024 batch of 8 for HRNetV2-W48+OCR takes seconds on a CPU.

What the figure is: the most tensor bytes alive at once during the step (parameters, optimizer state,
gradients, the batch, the activations saved for backward and the temporaries of backward), each storage rounded
up to the CUDA caching allocator's 512-byte blocks. What it leaves out: the CUDA context, cuDNN/cuBLAS
workspaces and the caching allocator's fragmentation (together typically 1-3 GiB on a large GPU), DDP's gradient
buckets (``ddp=True`` adds one copy of the gradients for them) and kernel-internal scratch memory.

bf16/fp16 on a CUDA device follows CUDA autocast's casting rules, not the CPU's: the fake run happens on the CPU,
whose autocast runs convolutions and matmuls in bf16 exactly as CUDA's does but keeps bilinear upsampling,
softmax, exp and log in bf16, where CUDA autocast computes them in fp32 (``AT_FORALL_FP32`` and
``AT_FORALL_FP32_SET_OPT_DTYPE`` in PyTorch's aten/src/ATen/autocast_mode.h). That matters here: HRNet's fuse
layers and ``concat_resolutions`` upsample, so on a GPU their sums come out in fp32. :func:`cuda_autocast_rules`
gives the CPU autocast those ops' CUDA policy for the duration of the estimate.

PyTorch ships a general tracker, ``torch.distributed._tools.mem_tracker.MemTracker``, which gives the same peak
(checked: 33.0 GiB for the W48+OCR OVeNet step at batch 8, 512x1024, fp32) but snapshots every module at every
operator (~70 s for that step). :class:`LiveMemory` keeps one running total per model part instead (~10 s).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from ..config import Config
from ..device import PRECISIONS

GiB = 2**30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this (c10/cuda/CUDACachingAllocator.cpp)
HEADROOM = 0.9  # warn above this share of the device memory: the CUDA context, workspaces and fragmentation need the rest

# Kinds of memory besides the activations of each model part.
PARAMETERS, BUFFERS, OPTIMIZER, GRADIENTS, BATCH = "parameters", "buffers", "optimizer state", "gradients", "batch"
BACKWARD, STEP, DDP_BUCKETS = "backward temporaries", "optimizer step", "DDP gradient buckets"
NOT_ACTIVATIONS = (PARAMETERS, BUFFERS, OPTIMIZER, GRADIENTS, BATCH, BACKWARD, STEP, DDP_BUCKETS)

# Parts of the OVeNet model, by the first components of a module's qualified name (``ovenet.models.ovenet``).
_BACKBONE_PARTS = {"transition1": "stage 2", "stage2": "stage 2", "transition2": "stage 3", "stage3": "stage 3",
                   "transition3": "stage 4", "stage4": "stage 4"}
_TOP_PARTS = {"decode_head": "decode head", "offset_branch": "offset branch", "offset_head": "offset head",
              "loss": "losses"}
MODEL_LEVEL = "concat, sampling, fusion"  # code of OVeNet.forward itself: resolution concat, seed sampling, fusion


def model_part(name: str) -> str:
    """The part of OVeNet a module belongs to, from its qualified name (``""``: the model's own forward)."""
    top, _, rest = name.partition(".")
    if top == "backbone":
        return _BACKBONE_PARTS.get(rest.partition(".")[0], "stem + layer1")
    return _TOP_PARTS.get(top, MODEL_LEVEL if top == "" else top)


class LiveMemory(TorchDispatchMode):
    """Bytes of the tensor storages alive, in total and per tag, and their peak, as operators run.

    Every storage an operator returns is counted once (views share it) until it is freed; tensors that existed
    before (parameters, optimizer state, the batch) are added with :meth:`track`. ``tag()`` names what a new
    storage is for (:func:`estimate_training_memory` passes the model part running, or the backward/optimizer
    phase). Works on real tensors as on fake ones: it only reads storage sizes.
    """

    def __init__(self, tag: Callable[[], str] = lambda: "other", block: int = 1):
        super().__init__()
        self.tag = tag
        self.block = block
        self.live: dict[str, int] = defaultdict(int)
        self.total = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [tag, bytes, weakref]

    def _size(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block

    def track(self, tensor: Tensor, tag: str) -> None:
        """Count ``tensor``'s storage under ``tag``; a storage counted already is moved to ``tag``."""
        storage = tensor.untyped_storage()
        entry = self._entries.get(storage)
        if entry is not None:
            self.live[entry[0]] -= entry[1]
            entry[0] = tag
            self.live[tag] += entry[1]
            return
        size = self._size(storage.nbytes())
        entry = [tag, size, None]
        # The callback runs when the storage is freed; the entry holds the weakref so that it outlives the key.
        entry[2] = weakref.ref(storage, lambda _ref, entry=entry: self._free(entry))
        self._entries[storage] = entry
        self.live[tag] += size
        self.total += size
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.live)

    def _free(self, entry: list) -> None:
        self.live[entry[0]] -= entry[1]
        self.total -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tag = None
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage() not in self._entries:
                tag = tag or self.tag()
                self.track(t, tag)
        return out


# --- CUDA autocast's casting rules on a CPU run ------------------------------------------------------------

# Ops the model and losses use whose CUDA autocast policy differs from the CPU's (see the module docstring).
_CUDA_FP32 = ("upsample_bilinear2d.vec", "upsample_bilinear2d", "upsample_nearest2d.vec", "upsample_nearest2d",
              "exp", "log", "pow.Tensor_Scalar")
_CUDA_FP32_SET_OPT_DTYPE = ("softmax.int", "log_softmax.int")


def _aten(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _below_autocast() -> contextlib.AbstractContextManager:
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def _fp32_kernel(op):
    def kernel(*args, **kwargs):
        # Cast floating inputs to fp32 above autograd, as autocast does, so that backward sees (and saves) fp32.
        args, kwargs = tree_map_only(
            Tensor, lambda t: t.float() if t.is_floating_point() and t.dtype != torch.float64 else t, (args, kwargs)
        )
        with _below_autocast():
            return op(*args, **kwargs)

    return kernel


def _fp32_out_kernel(op):
    def kernel(x, dim, dtype=None):
        if dtype is None and x.is_floating_point() and x.dtype != torch.float64:
            dtype = torch.float32
        with _below_autocast():
            return op(x, dim, dtype)

    return kernel


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """While open, CPU autocast casts like CUDA autocast for the ops of :data:`_CUDA_FP32` and
    :data:`_CUDA_FP32_SET_OPT_DTYPE` (the ops where the two differ that ovenet's training step uses)."""
    library = torch.library.Library("aten", "IMPL")
    try:
        for name in _CUDA_FP32:
            library.impl(name, _fp32_kernel(_aten(name)), "AutocastCPU")
        for name in _CUDA_FP32_SET_OPT_DTYPE:
            library.impl(name, _fp32_out_kernel(_aten(name)), "AutocastCPU")
        yield
    finally:
        library._destroy()


# --- the estimate -------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Peak tensor memory of one training step (bytes) and what is alive at that moment, by kind and model part.

    ``saved``: the activations kept for backward when backward starts, by model part (what activation
    checkpointing and the chunked loss reduce).
    """

    config: str
    batch_size: int
    crop: tuple[int, int]
    amp: str
    activation_checkpointing: bool
    loss_chunked: bool
    peak: int
    at_peak: dict[str, int]
    saved: dict[str, int]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    @property
    def saved_total(self) -> int:
        return sum(self.saved.values())

    def summary(self) -> str:
        """One line: the peak and its largest parts."""
        parts = sorted(((v, k) for k, v in self.at_peak.items() if v > 0), reverse=True)
        shown = ", ".join(f"{k} {v / GiB:.1f}" for v, k in parts[:6])
        return (f"{self.config}: batch {self.batch_size}, {self.crop[0]}x{self.crop[1]}, {self.amp}: "
                f"peak {self.peak_gib:.1f} GiB ({shown} GiB)")


def _part_tagger(model: nn.Module, criterion: nn.Module, phase: dict) -> tuple[Callable[[], str], list]:
    """A tag function naming the model part (or phase) that is running, and the hooks that follow it."""
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(m): f"loss.{n}".rstrip(".") for n, m in criterion.named_modules()})
    stack: list[str] = []

    def pre(module: nn.Module, _args: object) -> None:
        stack.append(names.get(id(module), stack[-1] if stack else "other"))

    def post(module: nn.Module, _args: object, _out: object) -> None:
        if stack:
            stack.pop()

    def tag() -> str:
        if phase["step"]:
            return STEP
        if torch._C._current_graph_task_id() != -1:  # inside autograd's backward pass (recomputation included)
            return BACKWARD
        return model_part(stack[-1]) if stack else "other"

    hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
             nn.modules.module.register_module_forward_hook(post, always_call=True)]
    return tag, hooks


def estimate_training_memory(
    cfg: Config,
    batch_size: int | None = None,
    crop: tuple[int, int] | list[int] | None = None,
    amp: str | None = None,
    activation_checkpointing: bool | None = None,
    loss_chunked: bool | None = None,
    device_type: str = "cuda",
    ddp: bool = False,
    block: int = CUDA_BLOCK,
) -> MemoryEstimate:
    """Peak memory of one :func:`~ovenet.engine.step.train_step` of ``cfg``'s model, loss and optimizer.

    Arguments left None come from the config (``train.batch_size``, ``data.crop_size``, ``train.amp``,
    ``train.activation_checkpointing``, ``loss.chunked``). ``device_type`` "cuda" casts under bf16/fp16 as CUDA
    autocast does; "cpu" as CPU autocast. ``block``: allocation granularity in bytes (1 for exact byte counts).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..losses import build_loss
    from ..models import build_model
    from .optim import build_optimizer
    from .step import train_step

    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = None
    cfg.model.init_from = None
    if batch_size is not None:
        cfg.train.batch_size = batch_size
    if amp is not None:
        cfg.train.amp = amp
    if activation_checkpointing is not None:
        cfg.train.activation_checkpointing = activation_checkpointing
    if loss_chunked is not None:
        cfg.loss.chunked = loss_chunked
    if crop is None:
        crop = cfg.data.crop_size or cfg.data.image_size
    if crop is None:
        raise ValueError("estimate_training_memory needs a crop: data.crop_size is null")
    h, w = (int(c) for c in crop)
    b = cfg.train.batch_size
    amp_dtype = PRECISIONS[cfg.train.amp]
    start = time.perf_counter()
    phase = {"step": False}
    with FakeTensorMode():
        model = build_model(cfg.model)
        model.train()
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        criterion = build_loss(cfg.loss, cfg.model.num_classes, 255, cfg.model.align_corners,
                               cfg.model.offset.sampling)
        optimizer = build_optimizer(model, cfg.train)
        batch = {"image": torch.empty(b, 3, h, w), "label": torch.zeros(b, h, w, dtype=torch.int64)}
        tag, hooks = _part_tagger(model, criterion, phase)
        tracker = LiveMemory(tag, block)
        for p in model.parameters():
            tracker.track(p, PARAMETERS)
        for t in list(model.buffers()) + list(criterion.buffers()):
            tracker.track(t, BUFFERS)
        for state in optimizer.state.values():
            for t in state.values():
                if isinstance(t, Tensor):
                    tracker.track(t, OPTIMIZER)
        for t in batch.values():
            tracker.track(t, BATCH)
        if ddp:
            for p in model.parameters():
                if p.requires_grad:
                    tracker.track(torch.empty_like(p), DDP_BUCKETS)
        saved: dict[str, int] = {}

        def first_backward_op() -> str:
            # The activations alive when backward starts are what the forward pass saved for it.
            if not saved and torch._C._current_graph_task_id() != -1:
                saved.update({k: v for k, v in tracker.live.items() if k not in NOT_ACTIVATIONS and v > 0})
            return tag()

        tracker.tag = first_backward_op
        handles = [p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, GRADIENTS))
                   for p in model.parameters() if p.requires_grad]
        handles.append(register_optimizer_step_pre_hook(
            lambda *_: phase.update(step=True)))
        handles.append(register_optimizer_step_post_hook(
            lambda *_: phase.update(step=False)))
        rules = cuda_autocast_rules() if device_type == "cuda" and amp_dtype is not None else contextlib.nullcontext()
        try:
            with rules, tracker:
                train_step(model, criterion, optimizer, batch, None, cfg.train.amp, cfg.train.grad_clip)
        finally:
            for handle in hooks + handles:
                handle.remove()
    notes = []
    if cfg.train.amp == "fp16":
        notes.append("fp16: GradScaler's unscale temporaries are not counted")
    return MemoryEstimate(
        config=cfg.name, batch_size=b, crop=(h, w), amp=cfg.train.amp,
        activation_checkpointing=cfg.train.activation_checkpointing, loss_chunked=cfg.loss.chunked,
        peak=tracker.peak, at_peak={k: v for k, v in tracker.at_peak.items() if v > 0}, saved=saved,
        seconds=time.perf_counter() - start, notes=notes,
    )


MEMORY_LEVERS = ("train.activation_checkpointing=true", "train.amp=bf16", "loss.chunked=true",
                 "a smaller train.batch_size or data.crop_size")


def warn_if_over_memory(
    model: nn.Module, cfg: Config, device: torch.device, log: logging.Logger, total_memory: int | None = None,
    ddp: bool = False,
) -> MemoryEstimate | None:
    """Before training on a GPU: estimate the step's peak memory and log a warning naming the levers when it
    exceeds :data:`HEADROOM` of the device's memory. Returns the estimate (None when not on CUDA and no
    ``total_memory`` is given, or when the estimate itself fails: it must never stop a run).

    ``model`` is the model about to train; its activation-checkpointing switch is the one estimated.
    """
    if total_memory is None:
        if device.type != "cuda":
            return None
        total_memory = torch.cuda.get_device_properties(device).total_memory
    try:
        estimate = estimate_training_memory(
            cfg, activation_checkpointing=bool(getattr(model, "activation_checkpointing", False)),
            device_type=device.type, ddp=ddp,
        )
    except Exception as exc:  # noqa: BLE001 -- an estimate is advice; a failure in it must not stop training
        log.info(f"training memory estimate unavailable: {type(exc).__name__}: {exc}")
        return None
    if estimate.peak > HEADROOM * total_memory:
        levers = [lever for lever in MEMORY_LEVERS
                  if not (lever.startswith("train.activation_checkpointing") and estimate.activation_checkpointing)
                  and not (lever.startswith("loss.chunked") and estimate.loss_chunked)
                  and not (lever.startswith("train.amp") and estimate.amp != "fp32")]
        log.warning(
            f"this step needs about {estimate.peak_gib:.1f} GiB of tensor memory (estimate) but {device} has "
            f"{total_memory / GiB:.1f} GiB; it will likely run out of memory. Levers: {', '.join(levers)} "
            "(python benchmarks/memory.py CONFIG compares them)"
        )
    else:
        log.info(f"training memory estimate: {estimate.summary()}")
    return estimate
