"""DataLoader construction: sampling, batching and per-rank reproducible worker seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ovenet.data.training import ResumableSampler, TrainingSet
from ovenet.errors import ConfigError, DataError


def collate_samples(batch: list[dict]) -> dict:
    """Stack tensors (all samples must share a size) and keep strings as lists."""
    out: dict = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise DataError(
                    f"cannot batch '{key}' of different sizes {sorted(shapes)}; use batch size 1 for evaluation "
                    "of variable-size images, or a crop_size for training"
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def seed_worker(worker_id: int) -> None:
    """Derive numpy and ``random`` seeds from the per-worker torch seed (itself from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def usable_workers(requested: int) -> int:
    """Loader worker processes, at most one per CPU this process may use (more only queue behind each other,
    and PyTorch warns about them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(requested, cores))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 4,
    distributed: bool = False,
    seed: int = 0,
    pin_memory: bool | None = None,
    bad_sample: str = "stop",
) -> DataLoader:
    """A DataLoader for training or evaluation; the one way ovenet builds either.

    Training: :func:`ovenet.data.training.build_train_loader`, the loader the trainer uses (seeded per-sample
    augmentation, a (seed, epoch) permutation split across ranks, last partial batch dropped); call
    ``loader.sampler.set_epoch(epoch)`` for the next epoch's order. Evaluation: every sample once, in order,
    split across ranks with ``distributed``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = 0, 1
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError(
                "distributed=True but torch.distributed is not initialised; init the process group first"
            )
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    if train:
        return build_train_loader(dataset, batch_size, seed, bad_sample, num_workers, rank, world_size,
                                  pin_memory)[0]
    sampler = DistributedSampler(dataset, shuffle=False, drop_last=False) if distributed else None
    return _data_loader(dataset, batch_size, sampler, num_workers, pin_memory, drop_last=False, seed=seed + rank)


def _data_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, num_workers: int, pin_memory: bool,
                 drop_last: bool, seed: int) -> DataLoader:
    workers = usable_workers(num_workers)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_samples,
        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=workers > 0, worker_init_fn=seed_worker,
        # Own generator: creating loader iterators must not draw from the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def build_train_loader(dataset: Dataset, batch_size: int, seed: int, bad_sample: str = "stop",
                       num_workers: int = 0, rank: int = 0, world_size: int = 1, pin_memory: bool = False
                       ) -> tuple[DataLoader, ResumableSampler]:
    """The training loader (and its sampler, which the loop moves from epoch to epoch): this rank's share of a
    seeded permutation, in batches of ``batch_size`` (the last partial batch dropped)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    train_set = TrainingSet(dataset, seed, bad_sample)
    sampler = ResumableSampler(len(train_set), seed, rank, world_size)
    if sampler.per_rank < batch_size:
        raise DataError(
            f"the training set has {len(train_set)} samples, fewer than one batch ({batch_size} per GPU x "
            f"{world_size} processes); lower train.batch_size or add data"
        )
    loader = _data_loader(train_set, batch_size, sampler, num_workers, pin_memory, drop_last=True, seed=seed + rank)
    return loader, sampler


class SkipBadSamples(Dataset):
    """An evaluation set whose unreadable samples (:class:`DataError`) become ``{"skipped": message}``, so that
    validation during training goes on past them (``train.bad_sample=skip``) and reports them."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["dataset"], name)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except DataError as exc:
            return {"skipped": str(exc)}
