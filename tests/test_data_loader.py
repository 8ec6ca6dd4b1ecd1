"""build_loader / collate: batching, reproducible seeding, distributed sampling."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ovenet.data import EvalTransform, SyntheticScenes, TrainTransform, build_loader, collate_samples
from ovenet.data.training import ResumableSampler
from ovenet.errors import ConfigError, DataError


def train_set(n: int = 6) -> SyntheticScenes:
    return SyntheticScenes(n, size=(24, 32), transform=TrainTransform((16, 16), scale_range=(0.5, 1.5)))


def test_collate_stacks_tensors_and_lists_strings():
    batch = collate_samples([{"image": torch.zeros(3, 2, 2), "label": torch.ones(2, 2), "name": "a"}] * 2)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["label"].shape == (2, 2, 2)
    assert batch["name"] == ["a", "a"]
    with pytest.raises(DataError, match="batch size 1"):
        collate_samples([{"image": torch.zeros(3, 2, 2)}, {"image": torch.zeros(3, 2, 3)}])


def test_train_loader_drops_last_and_shuffles():
    loader = build_loader(train_set(7), batch_size=2, train=True, num_workers=0, seed=1)
    batches = list(loader)
    assert len(batches) == 3
    assert batches[0]["image"].shape == (2, 3, 16, 16) and batches[0]["label"].shape == (2, 16, 16)
    names = [name for batch in batches for name in batch["name"]]
    assert len(set(names)) == 6 and names != sorted(names)


def test_eval_loader_keeps_order_and_every_sample():
    dataset = SyntheticScenes(3, size=(24, 32), transform=EvalTransform())
    names = [batch["name"][0] for batch in build_loader(dataset, 1, train=False, num_workers=0)]
    assert names == [s.name for s in dataset.samples]


def test_workers_are_seeded_from_the_loader_seed():
    def first_batches(seed: int) -> list[torch.Tensor]:
        loader = build_loader(train_set(), batch_size=2, train=True, num_workers=2, seed=seed)
        return [batch["image"] for batch in loader]

    run, rerun, other = first_batches(3), first_batches(3), first_batches(4)
    assert all(torch.equal(a, b) for a, b in zip(run, rerun))
    assert not all(torch.equal(a, b) for a, b in zip(run, other))


def test_too_small_training_set_and_bad_batch_size():
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(train_set(3), batch_size=4, train=True, num_workers=0)
    with pytest.raises(ConfigError, match="batch_size"):
        build_loader(train_set(3), batch_size=0, train=True, num_workers=0)


def test_distributed_requires_a_process_group():
    with pytest.raises(ConfigError, match="not initialised"):
        build_loader(train_set(), batch_size=2, train=True, num_workers=0, distributed=True)


def test_distributed_training_loader_is_the_trainers_resumable_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_loader(train_set(5), batch_size=2, train=True, num_workers=0, distributed=True, seed=9)
        assert isinstance(loader.sampler, ResumableSampler) and loader.sampler.seed == 9
        first = [name for batch in loader for name in batch["name"]]
        loader.sampler.set_epoch(1)
        second = [name for batch in loader for name in batch["name"]]
        assert len(first) == len(second) == 4 and first != second  # a new order each epoch
    finally:
        dist.destroy_process_group()


def test_default_workers_are_sized_to_the_machine(recwarn):
    import os

    cores = len(os.sched_getaffinity(0))
    loader = build_loader(train_set(), batch_size=2, train=True, num_workers=cores + 3, seed=0)
    assert loader.num_workers == cores
    eval_loader = build_loader(train_set(), batch_size=1, train=False, num_workers=cores + 3)
    assert eval_loader.num_workers == cores
    assert not [w for w in recwarn if "worker processes in total" in str(w.message)]
