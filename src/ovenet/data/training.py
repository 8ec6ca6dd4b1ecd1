"""The training loader: seeded per-sample augmentation, the bad-sample policy and a resumable order.

Item ``(epoch, index)`` of :class:`TrainingSet` is sample ``index`` augmented with RNGs seeded from (seed, epoch,
index), and :class:`ResumableSampler`'s order depends only on (seed, epoch): a run resumed mid-epoch sees the same
remaining batches, augmented the same way, as the run that never stopped, whatever the worker count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ovenet.errors import DataError, OvenetError

_MAX_SKIPS_IN_A_ROW = 16


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainingSet(Dataset):
    """Wraps a dataset for training: item ``(epoch, index)`` is sample ``index`` augmented with RNGs seeded
    from (seed, epoch, index): augmentation does not depend on worker count, batch order or a resume point.

    ``bad_sample="skip"``: a sample that raises :class:`DataError` is replaced by the next index and the error
    text travels with the batch under ``"skipped"`` (so the main process can log it, whichever worker hit it).
    """

    def __init__(self, dataset: Dataset, seed: int, bad_sample: str = "stop"):
        self.dataset = dataset
        self.seed = seed
        self.bad_sample = bad_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        failures: list[str] = []
        for _ in range(_MAX_SKIPS_IN_A_ROW):
            try:
                sample = self._augmented(epoch, index)
                break
            except DataError as exc:
                if self.bad_sample == "stop":
                    raise
                failures.append(str(exc))
                index = (index + 1) % len(self.dataset)
        else:
            raise DataError(
                f"{len(failures)} training samples in a row could not be read (last: {failures[-1]}); "
                "the dataset looks broken, check it with `ovenet check-data`"
            )
        sample["skipped"] = "\n".join(failures)
        return sample

    def _augmented(self, epoch: int, index: int) -> dict:
        # Transforms draw from the global `random`/numpy RNGs; seed them for this sample and put the caller's
        # state back, so that loading data never disturbs the main process's RNG streams.
        py_state, np_state = random.getstate(), np.random.get_state()
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(Sampler):
    """``(epoch, index)`` keys of this rank's share of a seeded permutation, optionally starting mid-epoch.

    Like ``DistributedSampler(shuffle=True, drop_last=True)``: the permutation depends only on (seed, epoch)
    and is identical on all ranks, and rank r takes every world_size-th entry from r.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = num_samples // world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next pass yields epoch ``epoch``'s order from its ``start``-th entry on (mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[: self.per_rank * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        return iter([(self.epoch, index) for index in mine[self.start :]])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def epoch_batches(
    loader: DataLoader, sampler: ResumableSampler, iteration: int, iters_per_epoch: int
) -> Iterator[dict]:
    """Endless batches, epoch after epoch, starting at global ``iteration`` (mid-epoch if need be)."""
    while True:
        epoch, done = divmod(iteration, iters_per_epoch)
        sampler.set_epoch(epoch, start=done * loader.batch_size)
        for batch in loader:
            yield batch
            iteration += 1


def loader_error(exc: BaseException) -> OvenetError | None:
    """The user-facing error behind a DataLoader exception, or None if it is not one.

    A worker's exception is re-raised in the main process with the worker's whole traceback as its message;
    the original one-line message is the traceback's last line.
    """
    if not isinstance(exc, OvenetError):
        return None
    text = str(exc)
    if "\n" not in text:
        return exc
    for line in reversed(text.strip().splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == type(exc).__name__:
            return type(exc)(message)
    return type(exc)(text.strip().splitlines()[-1])
