"""Training data: an endless, seeded, process-sharded stream of augmented train-semi samples.

The stream is a sequence of global positions 0, 1, 2, ...: position p is the (p mod n)-th entry of the permutation
of epoch p // n (a `torch.randperm` seeded by (seed, epoch)), and its augmentation is drawn from a generator seeded
by (seed, p). Process r of P takes positions r, r + P, r + 2P, ...; so iteration t of any run always trains on
positions [t * B, (t + 1) * B) with B the global batch, whatever the process count, the accumulation or the number of
DataLoader workers, and a resumed run (`accelerate.skip_first_batches`) sees exactly what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from imagenets_hf.data.transforms import to_tv_tensors

# Large odd constants mixing (seed, position) into one 63-bit generator seed (splitmix-like, no collisions in
# practice for the ranges used here).
_MIX_A = 0x9E3779B97F4A7C15
_MIX_B = 0xBF58476D1CE4E5B9


def sample_seed(seed: int, position: int) -> int:
    """Generator seed of the augmentation of global stream position `position`."""
    value = (seed * _MIX_A + position * _MIX_B + 0x94D049BB133111EB) & ((1 << 64) - 1)
    value ^= value >> 31
    return value & ((1 << 63) - 1)


class InfiniteShardedSampler(Sampler):
    """Endless sampler yielding `(dataset index, global position)` for one process (see the module docstring)."""

    def __init__(self, dataset_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if dataset_size < 1:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.rank
        epoch, order = 0, self._epoch_order(0)
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = self._epoch_order(epoch)
            yield int(order[position % self.dataset_size]), position
            position += self.world_size


class AugmentedSegmentationDataset(Dataset):
    """Rows with `image` and `annotation` (a `datasets.Dataset`) -> {"pixel_values", "labels"} after `transform`.

    Indexed by `(index, position)` from `InfiniteShardedSampler`: the augmentation of a sample is seeded by
    (seed, position) inside `torch.random.fork_rng`, so it does not depend on the worker and leaves the caller's
    random state untouched. A plain int index uses position = index.
    """

    def __init__(self, rows: Any, transform: Callable, seed: int = 0):
        self.rows = rows
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, position = (key, key) if isinstance(key, int) else key
        row = self.rows[int(index)]
        if row.get("annotation") is None:
            raise ValueError(f"training sample {row.get('image_id', index)!r} has no annotation")
        try:
            image, mask = to_tv_tensors(row["image"], row["annotation"])
        except ValueError as err:
            raise ValueError(f"training sample {row.get('image_id', index)!r}: {err}") from err
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, position))
            image, mask = self.transform(image, mask)
        return {
            "pixel_values": image.as_subclass(torch.Tensor).contiguous(),
            "labels": mask.as_subclass(torch.Tensor).long().contiguous(),
        }


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed numpy and python `random` from the worker's torch seed (distinct per worker)."""
    import random

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_train_dataloader(
    rows: Any,
    transform: Callable,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
) -> DataLoader:
    """An endless DataLoader of augmented samples for process `rank` of `world_size` (loaded in worker processes).

    It has its own generator, so creating its iterator does not consume the global torch random state (which a
    resumed run restores from the checkpoint).
    """
    dataset = AugmentedSegmentationDataset(rows, transform, seed=seed)
    sampler = InfiniteShardedSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed + rank),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        drop_last=True,
    )
