"""DataLoader construction: sampling, batching and per-rank reproducible worker seeding."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 4,
    distributed: bool = False,
    seed: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader for training (shuffled, drop_last) or evaluation (in order, every sample once).

    With ``distributed`` a :class:`DistributedSampler` splits the data across ranks; the training loop must call
    ``loader.sampler.set_epoch(epoch)`` each epoch for a fresh shuffle. The generator is seeded with
    ``seed + rank`` so every rank gets its own, reproducible augmentation stream.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = 0, 1
    sampler = None
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError(
                "distributed=True but torch.distributed is not initialised; init the process group first"
            )
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # Same seed on every rank: the sampler's permutation must agree across ranks to partition the data.
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    if train and len(dataset) < batch_size * world_size:
        raise DataError(
            f"training set has {len(dataset)} samples, fewer than one batch ({batch_size} x {world_size} ranks); "
            "lower the batch size or add data"
        )
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )
