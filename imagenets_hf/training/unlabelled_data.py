"""The unlabelled stream of semi-supervised training: image folders indexed without reading them, and endless,
seeded, process-sharded batches of a weak view, two strong views and their CutMix boxes (UniMatch V2's
`dataset/semi.py`), made in DataLoader workers.

The pool. `index_image_files` lists the image files under one or more folders (recursively, `os.scandir`, no file is
opened) and keeps them sorted, as UTF-8 bytes in one flat array with offsets (`ImageFileIndex`): ImageNet-S's 1.2
million train paths take about 45 MB, moved into shared memory once so that each DataLoader worker reads the same
pages instead of unpickling its own copy. Images of train-semi whose masks a label budget drops
(`label_budget.apply_label_budget`) join the pool after the files, read from the Arrow cache (`UnlabelledPool`).

The stream. As the labelled one (`imagenets_hf.training.data`): position p is the (p mod n)-th entry of the
permutation of epoch p // n, process r of P takes positions r, r + P, ...; so iteration t of any run trains on
unlabelled positions [t * Bu, (t + 1) * Bu) with Bu the unlabelled global batch, whatever the process count, and
each image comes once per epoch of the stream. Its seeds are derived from the recipe's seed but differ from the
labelled stream's (`unlabelled_seeds`). Every random number of position p comes from counter-based draws keyed by
(seed, p) (`augment.sample_uniforms`), so a sample is the same in any worker, process or resumed run.

One sample (`make_unlabelled_sample`):
- geometry: the labelled mmseg pipeline's resize (`resize_scale` x U(`ratio_range`)), random crop, flip and padding
  (`augment.draw_params`, the same code), without what needs labels (no `cat_max_ratio` test) and without the
  photometric distortion: this crop, normalised, is the weak view (UniMatch V2's weak view is resize, crop, flip);
- two strong views of the same crop, each independently as UniMatch V2: colour jitter (brightness, contrast,
  saturation, hue = `strong_color_jitter`, in a random order, as torchvision's ColorJitter) with
  p = `strong_color_jitter_prob`, grayscale with p = `strong_grayscale_prob`, Gaussian blur with sigma ~
  U(`strong_blur_sigma`) with p = `strong_blur_prob` (torchvision v2's formulas on the uint8 crop, computed with
  OpenCV: `strong_view`);
- a CutMix box for each strong view with p = `cutmix_prob` (`cutmix_box`: UniMatch V2's `obtain_cutmix_box` law);
- `ignore_mask` 255 on the padding (no image there), 0 elsewhere;
- `image_class`: the image's class id when the pool knows it (`UnlabelledPool.classes`: a file whose first folder
  under its root is a class's wnid, as ImageNet-S's `train/<wnid>/`, or a train-semi image's label), else -1; read
  by the pseudo-labels only with `pseudo_label_classes: image_class` (`semi.pseudo_label`).

Where this departs from UniMatch V2, and why: its resize draws the long side in [0.5, 2] x the image's own (here
the recipe's mmseg resize, as the labelled stream, so the two streams see objects at the same scales); it pads the
image with 0 before normalising and before the strong augmentation (here the colour ops see the image part only,
and the padding is 0 after normalising, as the labelled batches); its blur is PIL's (here a 13-tap Gaussian
kernel, torchvision's, as the imagenetsegmodel pipeline). The mixing itself (CutMix of images, pseudo-labels,
confidences and ignore masks with the batch flipped) is the training loop's.

Bad input: a file of the index that cannot be decoded stops the run with one line naming it and the flag
`skip_bad_unlabelled`; with it set, the sample is served fully ignored (images 0, `ignore_mask` 255, no CutMix box:
it adds nothing to the loss), the batches keep their size and positions, and `UnlabelledBatches` counts and names
the skipped files.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing.forkserver
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imagenets_hf.data.augment import (
    _EXIF_ORIENTATION,
    AugmentConfig,
    _encoded_bytes,
    crop_pixels,
    decode_image_bgr,
    draw_params,
    normalise_into,
    sample_uniforms,
)
from imagenets_hf.runtime import bounded_batches, worker_context
from imagenets_hf.training.data import InfiniteShardedSampler, sample_seed, sharded_dataloader

# What the index takes for an image (lower case); anything else in the folders is passed over and counted.
UNLABELLED_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IGNORE_VALUE = 255
BATCH_KEYS = (
    "image_weak",
    "image_strong1",
    "image_strong2",
    "ignore_mask",
    "cutmix_box1",
    "cutmix_box2",
    "image_class",
)
UNKNOWN_CLASS = -1  # `image_class` of an image whose folder names no class
SKIPPED_KEY = "skipped_files"  # a worker's batch names its skipped files here; `UnlabelledBatches` takes it out
BLUR_KERNEL = 13  # taps: 3 sigma on each side at sigma 2 (as `transforms.imagenetsegmodel_train_transform`)
# UniMatch V2's `obtain_cutmix_box` defaults: box area in [0.02, 0.4] of the crop, aspect ratio in [0.3, 1 / 0.3].
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_RATIO = (0.3, 1 / 0.3)
CUTMIX_TRIES_PER_DRAW = 32  # rejection-sampling tries drawn at once (the loop draws more until one fits)
# Stream positions never reach 2**40: `sample_seed(seed, _DERIVED + k)` gives seeds no position of a stream uses.
_DERIVED = 1 << 40
_JITTER_COLUMNS = 9  # on, brightness, contrast, saturation, hue, and the 4 keys ordering them
_STRONG_COLUMNS = _JITTER_COLUMNS + 3  # then grayscale, blur on, blur sigma


class BadUnlabelledImageError(ValueError):
    """An unlabelled file that cannot be decoded; the message names it and the `skip_bad_unlabelled` flag."""


# -- the index of image files ----------------------------------------------------------------------------------------


_EXTENSION_BYTES = tuple(extension.encode() for extension in UNLABELLED_IMAGE_EXTENSIONS)


def _scan_folder(root: str) -> tuple[list[bytes], int]:
    """(relative paths of the image files under `root`, as file-system bytes; number of other files), hidden entries
    left out. Symbolic links to folders are followed; a folder reached twice (a link cycle) is listed once. Bytes
    throughout: a str copy of 1.2 million paths would cost another 100 MB at the peak."""
    found: list[bytes] = []
    others = 0
    info = os.stat(root)
    seen: set[tuple[int, int]] = {(info.st_dev, info.st_ino)}
    pending = [b""]
    base = os.fsencode(root)
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(base, relative) if relative else base) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(b"."):
                    continue
                path = relative + b"/" + name if relative else name
                if entry.is_dir():  # d_type from the listing; one stat a folder (not a file) for the cycle check
                    info = entry.stat()
                    if (info.st_dev, info.st_ino) in seen:
                        continue
                    seen.add((info.st_dev, info.st_ino))
                    pending.append(path)
                elif os.path.splitext(name)[1].lower() in _EXTENSION_BYTES:
                    found.append(path)
                else:
                    others += 1
    return found, others


@dataclass
class ImageFileIndex:
    """The image files under some folders, sorted (folder by folder, then by relative path): the same list on every
    process. Paths are UTF-8 bytes (file-system encoding) one after another in `names`; file i is
    `roots[r] / names[offsets[i]:offsets[i + 1]]` with r its folder (`root_starts`)."""

    roots: list[str]
    names: np.ndarray  # uint8
    offsets: np.ndarray  # (N + 1,) int64
    root_starts: np.ndarray  # (len(roots) + 1,) int64: the files of roots[r] are root_starts[r] .. root_starts[r + 1]
    other_files: int = 0  # files passed over (not an image by their extension)
    _tensors: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.names.nbytes + self.offsets.nbytes + self.root_starts.nbytes

    def fingerprint(self) -> str:
        """A digest of the listing (folders and paths, in order): equal on two processes iff they index the same."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update("\0".join(self.roots).encode())
        for array in (self.root_starts, self.offsets, self.names):
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    def path(self, index: int) -> str:
        root = int(np.searchsorted(self.root_starts, index, side="right")) - 1
        relative = os.fsdecode(self.names[self.offsets[index] : self.offsets[index + 1]].tobytes())
        return os.path.join(self.roots[root], relative)

    def share_memory(self) -> ImageFileIndex:
        """Move the arrays into shared memory (torch tensors viewed as numpy arrays); pickling it afterwards (a
        worker's start) sends handles to the same pages, not the bytes (as `PackedMasks.share_memory`)."""
        if self._tensors is None:
            tensors = {name: torch.from_numpy(getattr(self, name)).share_memory_() for name in _INDEX_ARRAYS}
            for name, tensor in tensors.items():
                setattr(self, name, tensor.numpy())
            self._tensors = tensors
        return self

    def __reduce__(self):
        if self._tensors is None:
            return (_index_from_arrays, (self.roots, {name: getattr(self, name) for name in _INDEX_ARRAYS}))
        return (_index_from_tensors, (self.roots, self._tensors, self.other_files))


_INDEX_ARRAYS = ("names", "offsets", "root_starts")


def _index_from_arrays(roots: list[str], arrays: dict[str, np.ndarray]) -> ImageFileIndex:
    return ImageFileIndex(roots, **arrays)


def _index_from_tensors(roots: list[str], tensors: dict[str, torch.Tensor], other_files: int) -> ImageFileIndex:
    index = ImageFileIndex(roots, other_files=other_files, **{name: t.numpy() for name, t in tensors.items()})
    index._tensors = tensors
    return index


def index_image_files(folders: Sequence[str | os.PathLike], what: str = "unlabelled_dirs") -> ImageFileIndex:
    """`ImageFileIndex` of the image files (by extension: `UNLABELLED_IMAGE_EXTENSIONS`) under `folders`. A folder
    that is missing, or that holds no image, raises FileNotFoundError naming it and `what` (the setting that named
    it). No file is opened: 1.2 million files take seconds (see docs/data.md)."""
    roots, encoded, starts, others = [], [], [0], 0
    for folder in folders:
        root = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"unlabelled image folder {root} does not exist ({what}); pass existing folders")
        found, skipped = _scan_folder(root)
        if not found:
            raise FileNotFoundError(
                f"unlabelled image folder {root} holds no image file ({'/'.join(UNLABELLED_IMAGE_EXTENSIONS)}; {what})"
            )
        found.sort()  # bytes order: UTF-8 names sort as their code points do
        roots.append(root)
        encoded += found
        starts.append(starts[-1] + len(found))
        others += skipped
    lengths = np.fromiter((len(name) for name in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    names = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return ImageFileIndex(roots, names, offsets, np.asarray(starts, dtype=np.int64), other_files=others)


class UnlabelledPool:
    """The unlabelled images: the files of an `ImageFileIndex`, then (optionally) `extra` rows of a `datasets`
    split (train-semi images whose masks a label budget dropped), read as encoded bytes. `classes` (wnid -> class
    id, optional): a file whose first folder under its root is one of these wnids has that class (ImageNet-S's
    `train/<wnid>/`), an extra row its `label`; without it, or for other files, the class is `UNKNOWN_CLASS`."""

    def __init__(self, files: ImageFileIndex | None, extra: Any = None, classes: dict[str, int] | None = None):
        if extra is not None and isinstance(extra, datasets.Dataset):
            extra = extra.select_columns([n for n in ("image", "image_id", "label") if n in extra.column_names])
            extra = extra.cast_column("image", datasets.Image(decode=False))
        self.files = files
        self.extra = extra
        self.classes = {os.fsencode(wnid): label for wnid, label in (classes or {}).items()}
        self.num_files = 0 if files is None else len(files)
        if len(self) == 0:
            raise ValueError("the unlabelled pool is empty: no image folder and no train-semi image without its mask")

    def __len__(self) -> int:
        return self.num_files + (0 if self.extra is None else len(self.extra))

    def item(self, index: int) -> tuple[str, Any, int]:
        """(name for messages, encoded image: a path or a `datasets` value, class id or `UNKNOWN_CLASS`) of pool
        entry `index`."""
        if index < self.num_files:
            path = self.files.path(index)
            return path, path, self._file_class(index)
        row = self.extra[index - self.num_files]
        label = row.get("label") if self.classes else None
        name = f"train-semi image {row.get('image_id', index - self.num_files)}"
        return name, row["image"], UNKNOWN_CLASS if label is None else int(label)

    def count_known_classes(self) -> int:
        """How many entries have a class (not `UNKNOWN_CLASS`)."""
        if not self.classes:
            return 0
        extra = 0 if self.extra is None else len(self.extra)
        return sum(self._file_class(i) != UNKNOWN_CLASS for i in range(self.num_files)) + extra

    def _file_class(self, index: int) -> int:
        if not self.classes:
            return UNKNOWN_CLASS
        files = self.files
        folder, slash, _ = files.names[files.offsets[index] : files.offsets[index + 1]].tobytes().partition(b"/")
        return self.classes.get(folder, UNKNOWN_CLASS) if slash else UNKNOWN_CLASS

    def share_memory(self) -> UnlabelledPool:
        if self.files is not None:
            self.files.share_memory()
        return self


# -- one unlabelled sample -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrongConfig:
    """The strong views' photometric augmentation and CutMix (UniMatch V2's values by default)."""

    color_jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25)  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix_prob: float = 0.5

    @classmethod
    def from_recipe(cls, recipe: Any) -> StrongConfig:
        return cls(
            color_jitter=tuple(float(v) for v in recipe.strong_color_jitter),
            color_jitter_prob=float(recipe.strong_color_jitter_prob),
            grayscale_prob=float(recipe.strong_grayscale_prob),
            blur_prob=float(recipe.strong_blur_prob),
            blur_sigma=(float(recipe.strong_blur_sigma[0]), float(recipe.strong_blur_sigma[1])),
            cutmix_prob=float(recipe.cutmix_prob),
        )


def weak_config(config: AugmentConfig) -> AugmentConfig:
    """The labelled pipeline's geometry without what needs labels (the crop test) and without photometric
    distortion: the weak view's."""
    return AugmentConfig(
        crop_size=config.crop_size,
        resize_scale=config.resize_scale,
        ratio_range=config.ratio_range,
        cat_max_ratio=1.0,
        flip_prob=config.flip_prob,
        photometric_distortion=False,
        mean=config.mean,
        std=config.std,
    )


@dataclass(frozen=True)
class UnlabelledSeeds:
    """The unlabelled stream's seeds, all derived from the recipe's seed, none equal to the labelled stream's."""

    order: int  # the sampler's epoch permutations (31 bits: `InfiniteShardedSampler` multiplies it)
    geometry: int
    strong: int
    cutmix: int


def unlabelled_seeds(seed: int) -> UnlabelledSeeds:
    return UnlabelledSeeds(
        order=sample_seed(seed, _DERIVED) >> 32,
        geometry=sample_seed(seed, _DERIVED + 1),
        strong=sample_seed(seed, _DERIVED + 2),
        cutmix=sample_seed(seed, _DERIVED + 3),
    )


def cutmix_box(seed: int, position: int, view: int, crop: int, prob: float) -> tuple[int, int, int, int] | None:
    """UniMatch V2's `obtain_cutmix_box` drawn from (seed, position, view): with probability `prob`, a box of area
    U(0.02, 0.4) x crop^2 and aspect ratio h / w ~ U(0.3, 1 / 0.3) (w = int(sqrt(area / ratio)), h =
    int(sqrt(area x ratio))) at a corner (y, x) uniform in 0..crop - 1, ratio and corner redrawn until the box fits
    in the crop; (y, x, h, w), or None when no CutMix is drawn. The redraws come in blocks of
    `CUTMIX_TRIES_PER_DRAW`, each block a counter of its own, so the law is UniMatch's exactly (no cap on tries)."""
    u = sample_uniforms(seed, np.array([position]), 4)[0]
    if not u[2 * view] < prob:  # UniMatch: `if random.random() > p: return mask` (no box)
        return None
    area = (u[2 * view + 1] * (CUTMIX_AREA[1] - CUTMIX_AREA[0]) + CUTMIX_AREA[0]) * crop * crop
    block = 0
    while True:
        block += 1
        block_seed = sample_seed(seed, _DERIVED + 16 * block + view)
        tries = sample_uniforms(block_seed, np.array([position]), 3 * CUTMIX_TRIES_PER_DRAW)[0].reshape(-1, 3)
        for ratio_u, x_u, y_u in tries:
            ratio = ratio_u * (CUTMIX_RATIO[1] - CUTMIX_RATIO[0]) + CUTMIX_RATIO[0]
            width, height = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
            x, y = int(x_u * crop), int(y_u * crop)
            if x + width <= crop and y + height <= crop:
                return y, x, height, width


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """torchvision's grayscale of an (h, w, 3) uint8 RGB image, in float32 (0.2989 R + 0.587 G + 0.114 B)."""
    planes = rgb.astype(np.float32)
    return planes[..., 0] * np.float32(0.2989) + planes[..., 1] * np.float32(0.587) + planes[..., 2] * np.float32(0.114)


def _blend(rgb: np.ndarray, other: np.ndarray | float, ratio: float) -> np.ndarray:
    """torchvision's `_blend` on uint8: rgb x ratio + other x (1 - ratio), clamped to 0..255 and truncated."""
    ratio = np.float32(ratio)
    blended = rgb.astype(np.float32) * ratio + np.asarray(other, dtype=np.float32) * (np.float32(1) - ratio)
    return np.clip(blended, 0, 255).astype(np.uint8)


def _table(values: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    return cv2.LUT(rgb, values)


def adjust_brightness(rgb: np.ndarray, factor: float) -> np.ndarray:
    return _table(_blend(np.arange(256, dtype=np.uint8), 0.0, factor), rgb)


def adjust_contrast(rgb: np.ndarray, factor: float) -> np.ndarray:
    mean = np.floor(_luminance(rgb)).mean(dtype=np.float64)
    return _table(_blend(np.arange(256, dtype=np.uint8), mean, factor), rgb)


def adjust_saturation(rgb: np.ndarray, factor: float) -> np.ndarray:
    return _blend(rgb, np.floor(_luminance(rgb))[..., None], factor)


def adjust_hue(rgb: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's adjust_hue: the hue turned by `factor` of a turn in float HSV, back to uint8 by x 255.999."""
    hsv = cv2.cvtColor(rgb.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2HSV)  # hue in degrees
    hsv[..., 0] = np.remainder(hsv[..., 0] + np.float32(360 * factor), np.float32(360))
    back = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(back * np.float32(255.999), 0, 255).astype(np.uint8)


def grayscale(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(_luminance(rgb).astype(np.uint8)[..., None], 3, axis=2)


def gaussian_blur(rgb: np.ndarray, sigma: float, kernel: int = BLUR_KERNEL) -> np.ndarray:
    """torchvision's gaussian_blur (a `kernel`-tap Gaussian of std `sigma`, reflected borders, rounded), separably."""
    half = (kernel - 1) / 2
    taps = np.exp(-0.5 * (np.linspace(-half, half, kernel) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    blurred = cv2.sepFilter2D(rgb.astype(np.float32), -1, taps, taps, borderType=cv2.BORDER_REFLECT_101)
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def strong_view(rgb: np.ndarray, u: np.ndarray, config: StrongConfig) -> np.ndarray:
    """One strong view of an (h, w, 3) uint8 RGB crop from its row of uniforms `u` (`_STRONG_COLUMNS` of them):
    colour jitter with p = color_jitter_prob (torchvision's ColorJitter: its four factors, in a random order),
    grayscale with p = grayscale_prob, Gaussian blur with p = blur_prob. The ops follow torchvision v2's formulas
    on uint8 images, computed with OpenCV and NumPy on the crop (torchvision's tensor kernels took 35 ms a sample
    on one thread, ten times the whole weak view; tests/test_data_unlabelled.py holds the two within 1 level)."""
    strengths = config.color_jitter
    if u[0] < config.color_jitter_prob:
        factors = [u[1 + k] * 2 * strengths[k] + 1 - strengths[k] for k in range(3)]
        factors.append(u[4] * 2 * strengths[3] - strengths[3])
        for op in np.argsort(u[5:9], kind="stable"):
            if strengths[op] > 0:
                rgb = _JITTER_OPS[op](rgb, float(factors[op]))
    if u[9] < config.grayscale_prob:
        rgb = grayscale(rgb)
    if u[10] < config.blur_prob:
        sigma = float(u[11] * (config.blur_sigma[1] - config.blur_sigma[0]) + config.blur_sigma[0])
        rgb = gaussian_blur(rgb, sigma)
    return rgb


def oriented_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image as it is shown (EXIF orientation applied), from its header only."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # a quarter turn (transposed)
            width, height = height, width
    return height, width


def make_unlabelled_batch(
    pool: UnlabelledPool,
    indices: Sequence[int],
    positions: Sequence[int],
    config: AugmentConfig,
    strong: StrongConfig,
    seed: int,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """The batch of pool entries `indices` at stream `positions` (see the module docstring): the `BATCH_KEYS`
    tensors, and `SKIPPED_KEY`: the names of the entries skipped as undecodable (`skip_bad`; otherwise such an entry
    raises `BadUnlabelledImageError`)."""
    weak = weak_config(config)
    seeds = unlabelled_seeds(seed)
    crop = weak.crop_size
    count = len(indices)
    positions = np.asarray(positions, dtype=np.int64)
    encoded: list[bytes | None] = []
    sizes = np.ones((count, 2), dtype=np.int64)
    skipped: list[str] = []
    names = []
    image_class = np.full(count, UNKNOWN_CLASS, dtype=np.int64)

    def bad(name: str, err: Exception) -> None:
        if not skip_bad:
            raise BadUnlabelledImageError(
                f"unlabelled image {name}: cannot be decoded ({type(err).__name__}: {' '.join(str(err).split())}); "
                "remove or replace it, or set skip_bad_unlabelled (--skip-bad-unlabelled true) to skip such files "
                "with a count"
            ) from err
        skipped.append(name)

    for i, index in enumerate(indices):
        name, value, image_class[i] = pool.item(int(index))
        names.append(name)
        try:
            data = _encoded_bytes(value)
            sizes[i] = oriented_size(data)
            encoded.append(data)
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, UnidentifiedImageError, ...)
            if isinstance(err, OSError) and not isinstance(err, Image.UnidentifiedImageError) and err.filename:
                raise  # a file that cannot be read (gone, no permission): not bad content
            bad(name, err)
            encoded.append(None)
    params = draw_params(weak, seeds.geometry, positions, sizes[:, 0], sizes[:, 1])
    params.chosen = np.zeros(count, dtype=np.int64)  # no crop test: the first draw
    strong_u = sample_uniforms(seeds.strong, positions, 2 * _STRONG_COLUMNS)
    views = np.zeros((3, count, 3, crop, crop), dtype=np.float32)  # padding 0 after normalising, as mmseg
    ignore = np.full((count, crop, crop), IGNORE_VALUE, dtype=np.uint8)
    boxes = np.zeros((2, count, crop, crop), dtype=np.uint8)
    for i in range(count):
        if encoded[i] is None:
            continue
        target = (int(params.resized_height[i]), int(params.resized_width[i]))
        try:
            bgr = decode_image_bgr(encoded[i], (int(sizes[i, 0]), int(sizes[i, 1])), target)
        except Exception as err:
            bad(names[i], err)
            continue
        pixels = crop_pixels(params, i, bgr)
        height, width = pixels.shape[:2]
        rgb = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        normalise_into(weak, cv2.split(rgb), views[0, i])
        for view in (1, 2):
            u = strong_u[i, (view - 1) * _STRONG_COLUMNS : view * _STRONG_COLUMNS]
            normalise_into(weak, cv2.split(strong_view(rgb, u, strong)), views[view, i])
            box = cutmix_box(seeds.cutmix, int(positions[i]), view - 1, crop, strong.cutmix_prob)
            if box is not None:
                top, left, box_height, box_width = box
                boxes[view - 1, i, top : top + box_height, left : left + box_width] = 1
        ignore[i, :height, :width] = 0
    return {
        "image_weak": torch.from_numpy(views[0]),
        "image_strong1": torch.from_numpy(views[1]),
        "image_strong2": torch.from_numpy(views[2]),
        "ignore_mask": torch.from_numpy(ignore),
        "cutmix_box1": torch.from_numpy(boxes[0]),
        "cutmix_box2": torch.from_numpy(boxes[1]),
        "image_class": torch.from_numpy(image_class),
        SKIPPED_KEY: skipped,
    }


class UnlabelledDataset(Dataset):
    """An `UnlabelledPool` -> unlabelled batches (`make_unlabelled_batch`), keyed by `(index, position)` pairs from
    `InfiniteShardedSampler` (a plain int key uses position = index); `__getitems__` makes a whole batch."""

    def __init__(
        self, pool: UnlabelledPool, config: AugmentConfig, strong: StrongConfig, seed: int, skip_bad: bool = False
    ):
        self.pool = pool
        self.config = config
        self.strong = strong
        self.seed = seed
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        batch = self.__getitems__([key])
        return {name: value[0] if name != SKIPPED_KEY else value for name, value in batch.items()}

    def __getitems__(self, keys: list[int | tuple[int, int]]) -> dict[str, Any]:
        pairs = [(key, key) if isinstance(key, int) else key for key in keys]
        return make_unlabelled_batch(
            self.pool,
            [int(index) for index, _ in pairs],
            [int(position) for _, position in pairs],
            self.config,
            self.strong,
            self.seed,
            self.skip_bad,
        )


def build_unlabelled_dataloader(
    pool: UnlabelledPool,
    config: AugmentConfig,
    strong: StrongConfig,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    timeout: float = 300.0,
    pin_memory: bool = False,
    skip_bad: bool = False,
) -> DataLoader:
    """An endless DataLoader of unlabelled batches for process `rank` of `world_size` (`batch_size` a process and
    micro-batch), made in worker processes started by the fork server (`runtime.worker_context`), as
    `data.build_train_dataloader`; the pool's index reaches them through shared memory."""
    context = worker_context() if num_workers > 0 else None
    if context is not None:
        multiprocessing.forkserver.ensure_running()
        pool.share_memory()
    dataset = UnlabelledDataset(pool, config, strong, seed, skip_bad)
    sampler = InfiniteShardedSampler(len(pool), seed=unlabelled_seeds(seed).order, rank=rank, world_size=world_size)
    return sharded_dataloader(dataset, sampler, batch_size, num_workers, seed + rank, context, timeout, pin_memory)


class UnlabelledBatches:
    """Iterator of unlabelled batches (dicts of the `BATCH_KEYS` tensors) that counts the files skipped as
    undecodable (`skipped`, their names in `skipped_names`) and says so through `log` when one is met."""

    def __init__(self, batches: Iterator[dict[str, Any]], log: Callable[[str], Any] | None = None):
        self.batches = iter(batches)
        self.log = log
        self.skipped = 0
        self.skipped_names: list[str] = []

    def __iter__(self) -> UnlabelledBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.batches)
        names = batch.pop(SKIPPED_KEY, None) or []
        for name in names:
            self.skipped += 1
            if len(self.skipped_names) < 1000:
                self.skipped_names.append(name)
            if self.log is not None:
                self.log(
                    f"note: skipped unlabelled image {name}: cannot be decoded (skip_bad_unlabelled); "
                    f"{self.skipped} skipped so far by this process"
                )
        return batch


def unlabelled_folders(recipe: Any) -> list[Path]:
    """The recipe's unlabelled image folders: `unlabelled_dirs`, or `<data_dir>/train` (ImageNet-S's unlabelled
    split) when it names none."""
    if recipe.unlabelled_dirs:
        return [Path(folder) for folder in recipe.unlabelled_dirs]
    return [Path(recipe.data_dir) / "train"]


def unlabelled_batch_size(recipe: Any, num_processes: int) -> int:
    """Unlabelled images a process and micro-batch: `unlabelled_global_batch_size` // (processes x accumulation),
    which must divide (RecipeError naming the field otherwise)."""
    from imagenets_hf.training.recipes import RecipeError

    accumulation = recipe.gradient_accumulation_steps(num_processes)
    per_step = num_processes * accumulation
    if recipe.unlabelled_global_batch_size % per_step:
        raise RecipeError(
            f"recipe {recipe.name!r}: unlabelled_global_batch_size {recipe.unlabelled_global_batch_size} is not a "
            f"multiple of {num_processes} process(es) x {accumulation} accumulation step(s) = {per_step}; change "
            "--unlabelled-global-batch-size (or the processes, or global_batch_size / per_device_batch_size)"
        )
    return recipe.unlabelled_global_batch_size // per_step


def check_same_index(files: ImageFileIndex) -> None:
    """Under several processes (a torch.distributed group), check that every process indexed the same files: each
    scans the folders itself, and a listing that differs (a copy of the folder not yet in sync on another node) would
    map one stream position to different images. ValueError naming the counts otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    mine = (len(files), files.fingerprint())
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    if any(other != everyone[0] for other in everyone):
        counts = ", ".join(f"process {rank}: {count} files" for rank, (count, _) in enumerate(everyone))
        raise ValueError(
            f"the processes indexed different unlabelled files ({counts}; the same count means other names): every "
            "process must see the same unlabelled folders (unlabelled_dirs)"
        )


def build_unlabelled_batches(
    recipe: Any, accelerator: Any, skip: int, extra_pool: Any = None, log: Callable[[str], Any] | None = None
) -> UnlabelledBatches:
    """This process's endless stream of unlabelled batches for `recipe` (see the module docstring), the first `skip`
    micro-batches (what a resumed run consumed: iteration x accumulation) skipped by index.

    The pool: the image files under `unlabelled_folders(recipe)`, then `extra_pool` (rows of train-semi whose masks
    a label budget dropped, `LabelBudget.unlabelled`), if any. A batch is a dict of "image_weak", "image_strong1",
    "image_strong2" (float32 (B, 3, C, C), normalised as the labelled pixel_values), "ignore_mask" (uint8 (B, C, C),
    255 on padding), "cutmix_box1", "cutmix_box2" (uint8 (B, C, C), 1 inside the box), "image_class" (int64 (B,):
    with `pseudo_label_classes: image_class`, the class of an image whose first folder is a wnid of the data's classes,
    or a train-semi image's label; else -1), B =
    `unlabelled_batch_size(recipe, processes)`, C = crop_size. Workers: `recipe.num_workers` (0: in this process);
    a batch that takes over `recipe.worker_timeout` ends the run in one line. `log` (default `accelerator.print`)
    hears the index's size and time and each skipped file."""
    log = log or accelerator.print
    started = time.perf_counter()
    folders = unlabelled_folders(recipe)
    what = "unlabelled_dirs" if recipe.unlabelled_dirs else f"unlabelled_dirs empty: {recipe.data_dir}/train"
    files = index_image_files(folders, what=what)
    check_same_index(files)
    classes = None
    if recipe.pseudo_label_classes == "image_class":
        from imagenets_hf.data.imagenets import list_classes

        classes = {wnid: index + 1 for index, wnid in enumerate(list_classes(recipe.data_dir))}
    pool = UnlabelledPool(files, extra_pool, classes)
    batch_size = unlabelled_batch_size(recipe, accelerator.num_processes)
    if classes is not None:
        known = pool.count_known_classes()
        log(
            f"pseudo_label_classes image_class: {known} of {len(pool)} unlabelled images have a class from their folder"
        )
        if known == 0:
            raise ValueError(
                f"pseudo_label_classes is image_class but no unlabelled image is in a folder named after a class of "
                f"{recipe.data_dir} (train/<wnid>/...): use such folders, or pseudo_label_classes all"
            )
    log(
        f"Indexed {len(files)} unlabelled image files in {', '.join(map(str, folders))} "
        f"({files.nbytes / 2**20:.1f} MiB index, {files.other_files} other files passed over) in "
        f"{time.perf_counter() - started:.1f} s"
        + (
            f"; {len(pool) - len(files)} train-semi images without their masks join them"
            if extra_pool is not None
            else ""
        )
        + f"; {batch_size} a process and micro-batch"
    )
    loader = build_unlabelled_dataloader(
        pool,
        AugmentConfig.from_recipe(recipe),
        StrongConfig.from_recipe(recipe),
        batch_size,
        seed=recipe.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=recipe.num_workers,
        timeout=recipe.worker_timeout,
        pin_memory=accelerator.device.type == "cuda",
        skip_bad=recipe.skip_bad_unlabelled,
    )
    hint = "if a batch can take that long, raise worker_timeout (--worker-timeout)"
    batches = bounded_batches(
        accelerator.skip_first_batches(loader, skip), recipe.worker_timeout, "unlabelled data", hint
    )
    return UnlabelledBatches(batches, log)
