"""Train-semi's id masks decoded once and kept in memory, run-length packed, for the DataLoader workers.

The published recipes draw each train-semi image about a hundred times (919: 3,600 x 256 = 921,600 samples of 9,190
images), and decoding a 16-bit PNG mask is a third of a worker's time per sample (zlib inflates ~375 KB for a file
of a few KB). A mask is stored as its runs in row-major order (an id and a length each); expanding it (`np.repeat`)
costs about a fifth of the PNG decode, and the ids are the same. A mask with more runs than a third of its pixels
(noise-like) is stored as it is. Everything lives in a few flat arrays: DataLoader workers forked after packing share
them page for page (reading never copies them); for workers started by `forkserver` or `spawn`, `share_memory()`
moves them into shared memory once, and each worker's pickle then carries handles to the same pages (torch's
multiprocessing reductions of tensors), not the bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


def run_length_encode(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, lengths) of the runs of an (H, W) int16 mask in row-major order, or (the flat ids, None) when runs would
    take more room than the ids themselves."""
    flat = np.ascontiguousarray(mask, dtype=np.int16).reshape(-1)
    if flat.size == 0:
        return flat, None
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if 3 * (len(starts) + 1) > flat.size:  # 6 bytes a run against 2 a pixel
        return flat.copy(), None
    starts = np.concatenate([[0], starts])
    lengths = np.diff(np.append(starts, flat.size)).astype(np.int32)
    return flat[starts], lengths


@dataclass
class PackedMasks:
    """N masks' runs one after another (see the module docstring). `masks[i]` is mask i, (H, W) int16."""

    values: np.ndarray  # int16: each mask's run ids, or its raw ids
    lengths: np.ndarray  # int32: each run's length (none for a raw mask)
    value_offsets: np.ndarray  # (N + 1,) int64: mask i's values are values[value_offsets[i]:value_offsets[i + 1]]
    length_offsets: np.ndarray  # (N + 1,) int64: the same for lengths (an empty range: a raw mask)
    heights: np.ndarray  # (N,) int64
    widths: np.ndarray

    @classmethod
    def from_encoded(cls, encoded: list[tuple[np.ndarray, np.ndarray | None]], shapes: list[tuple[int, int]]):
        """Pack `run_length_encode` results of masks of `shapes`."""
        values = [value for value, _ in encoded]
        lengths = [length if length is not None else np.empty(0, np.int32) for _, length in encoded]
        return cls(
            values=np.concatenate(values) if values else np.empty(0, np.int16),
            lengths=np.concatenate(lengths) if lengths else np.empty(0, np.int32),
            value_offsets=np.cumsum([0] + [len(value) for value in values]).astype(np.int64),
            length_offsets=np.cumsum([0] + [len(length) for length in lengths]).astype(np.int64),
            heights=np.array([shape[0] for shape in shapes], dtype=np.int64),
            widths=np.array([shape[1] for shape in shapes], dtype=np.int64),
        )

    @classmethod
    def pack(cls, masks: list[np.ndarray]) -> PackedMasks:
        """Pack (H, W) int16 masks."""
        return cls.from_encoded([run_length_encode(mask) for mask in masks], [mask.shape for mask in masks])

    def __len__(self) -> int:
        return len(self.heights)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._arrays().values())

    def _arrays(self) -> dict[str, np.ndarray]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def share_memory(self) -> PackedMasks:
        """Move the arrays into shared memory (as torch tensors, viewed as numpy arrays); returns self. Pickling it
        afterwards (a worker's start) sends shared-memory handles through torch's multiprocessing reductions."""
        import torch

        if getattr(self, "_tensors", None) is None:
            tensors = {name: torch.from_numpy(array).share_memory_() for name, array in self._arrays().items()}
            for name, tensor in tensors.items():
                setattr(self, name, tensor.numpy())  # a view that keeps the tensor alive
            self._tensors = tensors
        return self

    def __reduce__(self):
        tensors = getattr(self, "_tensors", None)
        if tensors is None:
            return (_from_arrays, (self._arrays(),))
        return (_from_tensors, (tensors,))

    def __getitem__(self, index: int) -> np.ndarray:
        values = self.values[self.value_offsets[index] : self.value_offsets[index + 1]]
        first, last = self.length_offsets[index], self.length_offsets[index + 1]
        flat = np.repeat(values, self.lengths[first:last]) if last > first else values.copy()
        return flat.reshape(int(self.heights[index]), int(self.widths[index]))


def _from_arrays(arrays: dict[str, np.ndarray]) -> PackedMasks:
    return PackedMasks(**arrays)


def _from_tensors(tensors: dict) -> PackedMasks:
    """Unpickled in a worker: views of the shared-memory tensors (shared again if the worker pickles it)."""
    masks = PackedMasks(**{name: tensor.numpy() for name, tensor in tensors.items()})
    masks._tensors = tensors
    return masks
