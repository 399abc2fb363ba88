"""Training data: an endless, seeded, process-sharded stream of augmented train-semi batches, made either in
DataLoader workers (`build_train_dataloader`) or on the training device (`DeviceBatchStream`).

The stream is a sequence of global positions 0, 1, 2, ...: position p is the (p mod n)-th entry of the permutation
of epoch p // n (a `torch.randperm` seeded by (seed, epoch)), and its augmentation is drawn from (seed, p)
(`imagenets_hf.data.augment.draw_params`; torch's generator seeded by (seed, p) for the torchvision pipeline).
Process r of P takes positions r, r + P, r + 2P, ...; so iteration t of any run always trains on positions
[t * B, (t + 1) * B) with B the global batch, whatever the process count, the accumulation, the number of DataLoader
workers or where the augmentation runs, and a resumed run (which skips the batches already used, by index) sees
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import datasets
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from imagenets_hf.data.augment import (
    AugmentConfig,
    augment_encoded_samples,
    decode_annotation,
    decode_image_bgr,
    draw_params,
    open_image,
)
from imagenets_hf.data.augment_device import HostStaging, PixelStore, augment_batch
from imagenets_hf.data.imagenets import available_cores
from imagenets_hf.data.packed_masks import PackedMasks, run_length_encode
from imagenets_hf.data.transforms import to_tv_tensors
from imagenets_hf.runtime import worker_context

# Large odd constants mixing (seed, position) into one 63-bit generator seed (splitmix-like, no collisions in
# practice for the ranges used here).
_MIX_A = 0x9E3779B97F4A7C15
_MIX_B = 0xBF58476D1CE4E5B9


def sample_seed(seed: int, position: int) -> int:
    """torch generator seed of the torchvision pipeline's augmentation of stream position `position`."""
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
        self._orders: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of epoch `epoch`, in stream order."""
        if epoch not in self._orders:
            if not self.shuffle:
                order = torch.arange(self.dataset_size)
            else:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.dataset_size, generator=generator)
            self._orders = {epoch: order.numpy()}  # epochs are visited in order: keep one
        return self._orders[epoch]

    def positions(self, first_draw: int, count: int) -> np.ndarray:
        """The global positions of this process's draws first_draw .. first_draw + count - 1."""
        return self.rank + self.world_size * np.arange(first_draw, first_draw + count, dtype=np.int64)

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """The dataset index at each global position."""
        epochs = positions // self.dataset_size
        indices = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            indices[selected] = self.epoch_order(int(epoch))[positions[selected] % self.dataset_size]
        return indices

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = 0
        while True:
            positions = self.positions(draw, self.dataset_size)
            yield from zip(self.indices(positions).tolist(), positions.tolist())
            draw += self.dataset_size


def encoded_rows(rows: Any) -> Any:
    """A `datasets.Dataset` of train-semi rows whose image and annotation come as encoded bytes (decoded by the
    augmentation itself: a JPEG can then be decoded at a reduced scale); other row containers unchanged."""
    if isinstance(rows, datasets.Dataset):
        for column in ("image", "annotation"):
            rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows


class AugmentedSegmentationDataset(Dataset):
    """Rows with `image` and `annotation` -> augmented {"pixel_values", "labels"}, a batch at a time.

    Keyed by `(index, position)` pairs from `InfiniteShardedSampler` (a plain int key uses position = index);
    `__getitems__` makes a whole batch (what the DataLoader asks for), `__getitem__` one sample. `augmentation` is an
    `AugmentConfig` (the published pipeline, draws from (seed, position)) or a torchvision transform (seeded by
    `sample_seed(seed, position)`: the CPU generator only, inside `torch.random.fork_rng`, so the caller's random state,
    CUDA generators included, is untouched).
    `masks`: the rows' masks decoded once (`pack_train_masks`), used by the published pipeline instead of decoding
    each sample's annotation.
    """

    def __init__(
        self,
        rows: Any,
        augmentation: AugmentConfig | Callable,
        seed: int = 0,
        allow_draft: bool = True,
        masks: PackedMasks | None = None,
    ):
        self.rows = encoded_rows(rows)
        if masks is not None and len(masks) != len(self.rows):
            raise ValueError(f"{len(masks)} packed masks for {len(self.rows)} rows")
        if masks is not None and isinstance(self.rows, datasets.Dataset) and "annotation" in self.rows.column_names:
            self.rows = self.rows.remove_columns("annotation")  # not read again
        self.augmentation = augmentation
        self.seed = seed
        self.allow_draft = allow_draft
        self.masks = masks

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([key])
        return {name: value[0] for name, value in batch.items()}

    def __getitems__(self, keys: list[int | tuple[int, int]]) -> dict[str, torch.Tensor]:
        pairs = [(key, key) if isinstance(key, int) else key for key in keys]
        indices = [int(index) for index, _ in pairs]
        positions = [int(position) for _, position in pairs]
        rows = [self.rows[index] for index in indices]
        if self.masks is not None:
            annotations = [self.masks[index] for index in indices]
        else:
            annotations = [training_annotation(row, index) for row, index in zip(rows, indices)]
        try:
            if isinstance(self.augmentation, AugmentConfig):
                return augment_encoded_samples(
                    self.augmentation,
                    self.seed,
                    positions,
                    [row["image"] for row in rows],
                    annotations,
                    allow_draft=self.allow_draft,
                )
            samples = [self._torchvision_sample(row, position) for row, position in zip(rows, positions)]
        except ValueError as err:
            names = ", ".join(repr(row.get("image_id", index)) for row, index in zip(rows, indices))
            raise ValueError(f"training samples {names}: {err}") from err
        return {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}

    def _torchvision_sample(self, row: dict[str, Any], position: int) -> dict[str, torch.Tensor]:
        image, mask = to_tv_tensors(open_image(row["image"]), open_image(row["annotation"]))
        # The CPU generator only: `torch.manual_seed` would also seed every CUDA device, whose state `fork_rng`
        # (devices=[]) does not restore, so a num_workers=0 run's drop-path masks would follow the samples.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, position))
            image, mask = self.augmentation(image, mask)
        return {
            "pixel_values": image.as_subclass(torch.Tensor).contiguous(),
            "labels": mask.as_subclass(torch.Tensor).long().contiguous(),
        }


def training_annotation(row: dict[str, Any], index: int) -> Any:
    """The annotation of training row `index`; ValueError naming the sample when it has none."""
    if row.get("annotation") is None:
        raise ValueError(f"training sample {row.get('image_id', index)!r} has no annotation")
    return row["annotation"]


def _keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn: `__getitems__` already made the batch."""
    return batch


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: one OpenCV thread (a worker works a sample at a time; torch's own threads are
    already 1 there), and numpy and python `random` seeded from the worker's torch seed (distinct per worker)."""
    import random

    cv2.setNumThreads(1)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_train_dataloader(
    rows: Any,
    augmentation: AugmentConfig | Callable,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    log: Callable[[str], Any] | None = None,
    timeout: float = 300.0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader of augmented batches for process `rank` of `world_size`, made in worker processes.

    For the published pipeline the masks are decoded once first (`pack_train_masks`; `log` hears how many, how big
    and how long). The DataLoader has its own generator, so creating its iterator does not consume the global torch
    random state (which a resumed run restores from the checkpoint). The workers are started by a fork server
    (`runtime.worker_context`), never forked from this multi-threaded process; the packed masks reach them through
    shared memory. `timeout`: seconds a worker batch may take (see `runtime.bounded_batches`); `pin_memory`:
    page-locked batches, for asynchronous copies to a GPU.
    """
    context = worker_context() if num_workers > 0 else None
    if context is not None:
        # Start the fork server now: its imports (seconds) overlap the mask decoding, not delay the first batch.
        multiprocessing.forkserver.ensure_running()
    masks = None
    if isinstance(augmentation, AugmentConfig):
        started = time.perf_counter()
        masks = pack_train_masks(rows)
        if num_workers > 0:
            masks.share_memory()
        if log is not None:
            log(
                f"Decoded {len(masks)} train-semi masks once into {masks.nbytes / 2**20:.1f} MiB of runs in "
                f"{time.perf_counter() - started:.1f} s; {num_workers} DataLoader worker(s) decode the images"
            )
    dataset = AugmentedSegmentationDataset(rows, augmentation, seed=seed, masks=masks)
    sampler = InfiniteShardedSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    return sharded_dataloader(dataset, sampler, batch_size, num_workers, seed + rank, context, timeout, pin_memory)


def sharded_dataloader(
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int,
    num_workers: int,
    generator_seed: int,
    context: Any,
    timeout: float,
    pin_memory: bool,
) -> DataLoader:
    """The endless DataLoader of a training stream (labelled or unlabelled): whole batches of `sampler`'s
    (index, position) keys made by the dataset's `__getitems__` in workers started from `context`; its own generator
    (`generator_seed`), so creating its iterator leaves the global torch random state alone."""
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=True),
        collate_fn=_keep_batch,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(generator_seed),
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        multiprocessing_context=context,
        timeout=timeout if num_workers > 0 else 0,
        pin_memory=pin_memory,
    )


def decode_threads(local_processes: int | None = None) -> int:
    """Threads with which each process decodes a split once (OpenCV and PIL decode without the GIL): the cores this
    process may run on, shared among the node's training processes (`local_processes`, default `LOCAL_WORLD_SIZE`,
    which torchrun and `accelerate launch` set), at least one, at most 16. (Eight processes on a 16-core node used
    to start 16 threads each.)"""
    if local_processes is None:
        try:
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
        except ValueError:
            local_processes = 1
    return max(1, min(16, available_cores() // max(1, local_processes)))


def pack_train_masks(rows: Any, threads: int | None = None) -> PackedMasks:
    """Decode every row's mask once (a thread pool: OpenCV decodes without the GIL) into `PackedMasks`. A row without
    an annotation, or with a mask that cannot be decoded, raises ValueError naming it."""
    rows = encoded_rows(rows)
    if isinstance(rows, datasets.Dataset):  # read the masks (and names), not every image's bytes
        rows = rows.select_columns([name for name in ("annotation", "image_id") if name in rows.column_names])
    threads = threads or decode_threads()

    def encode(index: int) -> tuple[tuple[np.ndarray, np.ndarray | None], tuple[int, int]]:
        row = rows[index]
        annotation = training_annotation(row, index)
        try:
            mask = decode_annotation(annotation)
        except ValueError as err:
            raise ValueError(f"training sample {row.get('image_id', index)!r}: {err}") from err
        return run_length_encode(mask), mask.shape

    with ThreadPoolExecutor(threads) as pool:
        encoded = list(pool.map(encode, range(len(rows))))
    return PackedMasks.from_encoded([runs for runs, _ in encoded], [shape for _, shape in encoded])


# -- the device path ------------------------------------------------------------------------------------------------


def decode_store(rows: Any, threads: int | None = None) -> PixelStore:
    """Decode every row's image (full size, RGB) and mask once into a host `PixelStore` (uint8 planes + int16 ids),
    with a thread pool (OpenCV and PIL decode without the GIL).

    The sizes come first, from the masks' headers (PIL reads only the header); the store is then allocated once and
    each thread decodes a sample straight into its place, so the peak is the store plus one decoded sample per
    thread (a list of decoded samples packed afterwards held the pixels twice). A row without an annotation, or
    whose files cannot be decoded or disagree in size, raises ValueError naming it."""
    rows = encoded_rows(rows)
    threads = threads or decode_threads()
    masks = rows
    if isinstance(rows, datasets.Dataset):  # the sizes pass reads the masks (and names), not every image's bytes
        masks = rows.select_columns([name for name in ("annotation", "image_id") if name in rows.column_names])

    def named(index: int, row: dict[str, Any], err: Exception) -> ValueError:
        return ValueError(f"training sample {row.get('image_id', index)!r}: {err}")

    def size(index: int) -> tuple[int, int]:
        row = masks[index]
        try:
            width, height = open_image(training_annotation(row, index)).size
        except (OSError, TypeError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise named(index, row, err) from err
        return height, width

    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(size, range(len(rows))))
        store = PixelStore.allocate(sizes, sizes)  # the image is decoded at its mask's size

        def decode(index: int) -> None:
            row = rows[index]
            try:
                mask = decode_annotation(training_annotation(row, index))
                store.put(index, decode_image_bgr(row["image"], mask.shape), mask, bgr=True)
            except ValueError as err:
                raise named(index, row, err) from err

        for _ in pool.map(decode, range(len(rows))):
            pass
    return store


def device_has_room(device: torch.device, nbytes: int, fraction: float = 0.5) -> bool:
    """Whether `nbytes` take at most `fraction` of `device`'s free memory now (always true off CUDA: the store is
    in the memory that device computes from). On CUDA, memory torch's caching allocator has reserved counts as used:
    measured after a training step, the step's own peak is already set aside."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


class DeviceBatchStream:
    """Endless augmented batches made on `device` from a decoded store (no DataLoader workers): the same stream
    positions as `build_train_dataloader` for the same (seed, rank, world_size, batch_size), the same draws.

    Where the store lives is decided once, after the first `place_after` batches (one optimizer step of a run: by
    then the model, the optimizer's state and a training step's peak are on the device; 0 decides at once): on
    `device` when it takes at most `max_device_fraction` of the free device memory then (`device_has_room`), else in
    host memory for the rest of the run, each batch's pixels gathered into a pinned staging buffer
    (`augment_device.HostStaging`) and copied from there asynchronously. The batches are the same either way.
    `skip(n)` skips the first n batches (what a resumed run consumed) without touching pixels.
    """

    def __init__(
        self,
        store: PixelStore,
        config: AugmentConfig,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        max_device_fraction: float = 0.5,
        place_after: int = 0,
        log: Callable[[str], Any] | None = None,
    ):
        self.config = config
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.sampler = InfiniteShardedSampler(len(store), seed=seed, rank=rank, world_size=world_size)
        self.batches_made = 0
        self.max_device_fraction = max_device_fraction
        self.place_after = place_after
        self.log = log
        self.store = store.to("cpu")
        self.on_device = False
        self.placed = False
        self.staging = HostStaging(pin=self.device.type == "cuda")
        self._served = 0
        if place_after <= 0:
            self.place()

    @property
    def where(self) -> str:
        if self.on_device:
            return f"on {self.device}"
        if not self.placed:
            return f"in host memory (placed after {self.place_after} batch(es), when a training step has run)"
        return "in host memory (each batch copied through a pinned staging buffer)"

    def place(self) -> None:
        """Move the store to the device if it has room now (`device_has_room`); otherwise keep it in host memory."""
        self.placed = True
        nbytes = self.store.nbytes
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        if device_has_room(self.device, nbytes, self.max_device_fraction):
            self.store = self.store.to(self.device)
            self.on_device, self.staging = True, None
        if self.log is not None and self.place_after > 0:
            self.log(
                f"Device-path store ({nbytes / 2**20:.1f} MiB) {self.where} after {self.place_after} batch(es)"
                + ("" if free is None else f", when {free / 2**20:.0f} MiB of {self.device} were free")
                + f" (it goes there when it takes at most {self.max_device_fraction:g} of the free memory)"
            )

    def skip(self, batches: int) -> DeviceBatchStream:
        self.batches_made += batches
        return self

    def __iter__(self) -> DeviceBatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.placed and self._served >= self.place_after:
            self.place()
        self._served += 1
        positions = self.sampler.positions(self.batches_made * self.batch_size, self.batch_size)
        indices = self.sampler.indices(positions)
        self.batches_made += 1
        batch = self.store.subset(indices)
        if not self.on_device:
            batch = batch.compact(self.device, self.staging)
        params = draw_params(self.config, self.seed, positions, batch.heights, batch.widths)
        return augment_batch(self.config, batch, params)


def build_device_stream(
    rows: Any,
    config: AugmentConfig,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device | str,
    log: Callable[[str], Any] = print,
    place_after: int = 1,
) -> DeviceBatchStream:
    """Decode train-semi into a host store and say how big; it moves to a GPU `device` after `place_after` batches
    (a run passes one optimizer step's micro-batches) if it has room then (see `DeviceBatchStream`)."""
    started = time.perf_counter()
    store = decode_store(rows)
    device = torch.device(device)
    place_after = place_after if device.type == "cuda" else 0  # off CUDA the store is already where it is used
    stream = DeviceBatchStream(
        store,
        config,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        device=device,
        place_after=place_after,
        log=log,
    )
    log(
        f"Decoded {len(store)} train-semi images into a {store.nbytes / 2**20:.1f} MiB uint8 store {stream.where} in "
        f"{time.perf_counter() - started:.1f} s with {decode_threads()} thread(s); augmenting batches on {device} "
        "(no DataLoader workers)"
    )
    return stream
