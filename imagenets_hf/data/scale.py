"""A full-size synthetic ImageNet-S: the official layout with a real subset's counts and image sizes, for measuring
how the pipeline scales (`scripts/make_mini_dataset.py --scale 919`, `scripts/bench_scale.py`).

Unlike the mini dataset (`imagenets_hf.data.mini`), nothing here is meant to be learnt: drawing is as cheap as
possible so that the 49,032 labelled and test images of ImageNet-S919 are written in minutes. What matches the real
data is what costs time and memory downstream:

- the counts per split (`SUBSET_COUNTS`: train-semi 10 a class; validation and test spread unevenly over classes),
  file names (`<wnid>_<k>.JPEG`, `ILSVRC2012_val_XXXXXXXX.JPEG`) and the `LOC_synset_mapping.txt` file;
- the image sizes: 300-500 px a side (most 500 x 375 or 375 x 500), `LARGE_FRACTION` (2%) of the images above
  1000 x 1000 pixels (they take the evaluation's large-image path); JPEGs of about 100 KB at 375 x 500 (textured
  backgrounds, quality 90);
- the masks: "other", one or two classes (ellipses and polygons) and an ignore band along every outline.

The unlabelled train split (1.2M images on 919) is not written in full: `train_per_class` images a class (1 by
default, so the folder has the layout; the benchmarks do not read it).

Images are drawn in a process pool (`workers`, default every core); the same seed gives byte-identical files,
whatever the number of workers.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imagenets_hf.data.masks import IGNORE_INDEX, OTHER_ID, SUBSET_NUM_CLASSES, encode_mask
from imagenets_hf.data.mini import JPEG_QUALITY, SYNSET_FILE_NAME, _label_edges, clear_dataset_folder

GENERATOR_VERSION = 1
MARKER_NAME = ".scale_complete"
# Labelled and test images of the official subsets (IMAGENETS.md); train-semi is 10 a class.
SUBSET_COUNTS = {
    "50": {"train-semi": 500, "validation": 752, "test": 1682},
    "300": {"train-semi": 3000, "validation": 4097, "test": 9088},
    "919": {"train-semi": 9190, "validation": 12419, "test": 27423},
}
MASK_DIRS = {"train-semi": "train-semi-segmentation", "validation": "validation-segmentation"}
SPLITS = ("train", "train-semi", "validation", "test")
LARGE_FRACTION = 0.02
LARGE_SIDES = (1010, 1400)  # both sides in this range: above 1000 x 1000 pixels
SECOND_CLASS_PROBABILITY = 0.3
TEXTURE_SIZE = 1400  # every image is a crop of one of the worker's textures (large images included)
TEXTURES = 8
NOISE_AMPLITUDE = 34  # per-pixel noise of the textures: about 100 KB a 375 x 500 JPEG at quality 90
IMAGES_PER_TASK = 200


def scale_counts(subset: str | int) -> dict[str, int]:
    """Images per split of a full-size subset ("50", "300", "919"), or of any other class count N (a toy scale for
    tests): 10 N train-semi and validation / test in ImageNet-S919's proportions (at least one a class)."""
    key = str(subset)
    if key in SUBSET_COUNTS:
        return dict(SUBSET_COUNTS[key])
    if not key.isdigit() or int(key) < 1:
        raise ValueError(f"scale must be 50, 300, 919 or a positive class count, got {subset!r}")
    n = int(key)
    full = SUBSET_COUNTS["919"]
    return {
        "train-semi": 10 * n,
        "validation": max(n, round(n * full["validation"] / 919)),
        "test": max(n, round(n * full["test"] / 919)),
    }


def scale_wnids(num_classes: int) -> list[str]:
    """Sorted wnid-like folder names (n########) of the synthetic classes."""
    return [f"n{80000001 + index:08d}" for index in range(num_classes)]


def _per_class(total: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """`total` images spread over the classes: at least one each, the rest unevenly (as real validation sets)."""
    weights = rng.uniform(0.5, 1.5, num_classes)
    extra = total - num_classes
    counts = np.floor(weights / weights.sum() * extra).astype(int)
    counts[rng.choice(num_classes, extra - int(counts.sum()), replace=False)] += 1
    return (counts + 1).tolist()


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of one image: mostly 375 x 500 or 500 x 375, else 300-500 a side; LARGE_FRACTION larger."""
    if rng.random() < LARGE_FRACTION:
        return int(rng.integers(*LARGE_SIDES)), int(rng.integers(*LARGE_SIDES))
    if rng.random() < 0.6:
        long, short = 500, 375
    else:
        long, short = int(rng.integers(400, 501)), int(rng.integers(300, 400))
    return (short, long) if rng.random() < 0.75 else (long, short)


@cache
def _textures(seed: int) -> tuple[np.ndarray, ...]:
    """Textured backgrounds (smooth colour blotches plus noise), drawn once per worker process."""
    rng = np.random.default_rng([seed, 4242])
    textures = []
    for _ in range(TEXTURES):
        coarse = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((TEXTURE_SIZE, TEXTURE_SIZE), Image.Resampling.BICUBIC))
        noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, smooth.shape, dtype=np.int16)
        textures.append(np.clip(smooth.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return tuple(textures)


def _colour(cls: int) -> np.ndarray:
    """A class's colour (a fixed hash of its index)."""
    return np.array([(cls * 67 + 40) % 256, (cls * 151 + 90) % 256, (cls * 211 + 170) % 256], dtype=np.int16)


def _draw_object(draw: ImageDraw.ImageDraw, height: int, width: int, rng: np.random.Generator, scale: float) -> None:
    """One filled ellipse or polygon of about `scale` of the image's short side, at a random place."""
    radius = scale * min(height, width) / 2
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    if rng.random() < 0.5:
        rx, ry = radius * rng.uniform(0.7, 1.0), radius * rng.uniform(0.7, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        corners = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
        radii = radius * rng.uniform(0.6, 1.0, corners)
        draw.polygon(list(zip((cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist())), fill=1)


def render_image(
    cls: int, num_classes: int, height: int, width: int, rng: np.random.Generator, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image of class `cls` (1-based id; sometimes with a smaller object of another class) and its ids."""
    texture = _textures(seed)[int(rng.integers(TEXTURES))]
    top, left = int(rng.integers(0, TEXTURE_SIZE - height + 1)), int(rng.integers(0, TEXTURE_SIZE - width + 1))
    image = texture[top : top + height, left : left + width].astype(np.int16)
    classes = [cls]
    if num_classes > 1 and rng.random() < SECOND_CLASS_PROBABILITY:
        classes.append(int(rng.choice([c for c in range(1, num_classes + 1) if c != cls])))
    ids = np.full((height, width), OTHER_ID, dtype=np.int32)
    for position, object_cls in enumerate(classes):
        canvas = Image.new("L", (width, height), 0)
        _draw_object(ImageDraw.Draw(canvas), height, width, rng, rng.uniform(0.5, 0.9) if position == 0 else 0.35)
        inside = np.asarray(canvas, dtype=bool)
        image[inside] = (image[inside] + _colour(object_cls)) // 2
        ids[inside] = object_cls
    ids[_label_edges(ids)] = IGNORE_INDEX
    return image.astype(np.uint8), ids


@dataclass(frozen=True)
class _Task:
    """Images of one split and class to write: (index in the class, file stem) each."""

    root: str
    split: str
    cls: int  # 1-based
    wnid: str
    items: tuple[tuple[int, str], ...]
    num_classes: int
    seed: int


def _write_task(task: _Task) -> int:
    split_index = SPLITS.index(task.split)
    image_dir = Path(task.root) / task.split / task.wnid
    mask_dir = Path(task.root) / MASK_DIRS[task.split] / task.wnid if task.split in MASK_DIRS else None
    for index, stem in task.items:
        rng = np.random.default_rng([task.seed, split_index, task.cls, index])
        height, width = image_size(rng)
        image, ids = render_image(task.cls, task.num_classes, height, width, rng, task.seed)
        Image.fromarray(image, mode="RGB").save(image_dir / f"{stem}.JPEG", format="JPEG", quality=JPEG_QUALITY)
        if mask_dir is not None:
            encode_mask(ids).save(mask_dir / f"{stem}.png", format="PNG", compress_level=1)
    return len(task.items)


def _tasks(root: Path, counts: dict[str, int], wnids: list[str], seed: int) -> list[_Task]:
    """The work, in chunks of at most IMAGES_PER_TASK images of one split and class, with the file names."""
    num_classes = len(wnids)
    rng = np.random.default_rng([seed, 7919])
    val_names = rng.choice(np.arange(1, 100_000_000), counts["validation"] + counts["test"], replace=False)
    val_names = iter(val_names.tolist())
    tasks = []
    for split in SPLITS:
        if split == "train-semi" or split == "train":
            per_class = [counts[split] // num_classes] * num_classes
        else:
            per_class = _per_class(counts[split], num_classes, rng)
        for cls, (wnid, n) in enumerate(zip(wnids, per_class), start=1):
            if split in ("train", "train-semi"):
                stems = [f"{wnid}_{k}" for k in sorted(rng.choice(np.arange(1, 15000), n, replace=False).tolist())]
            else:
                stems = sorted(f"ILSVRC2012_val_{next(val_names):08d}" for _ in range(n))
            items = tuple(enumerate(stems))
            for start in range(0, n, IMAGES_PER_TASK):
                tasks.append(
                    _Task(str(root), split, cls, wnid, items[start : start + IMAGES_PER_TASK], num_classes, seed)
                )
    return tasks


def make_scale_dataset(
    out_dir: str | os.PathLike,
    scale: str | int = "919",
    seed: int = 0,
    train_per_class: int = 1,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a full-size synthetic ImageNet-S into `out_dir` (see the module's notes) and return it.

    Args:
        scale: "50", "300", "919" (the official counts, `SUBSET_COUNTS`), or another class count (`scale_counts`).
        train_per_class: unlabelled train images a class (the real 919 has about 1,290).
        workers: drawing processes (default: every core, `os.cpu_count()`).
        overwrite: replace the dataset's own folders if `out_dir` holds them (else FileExistsError).
        progress: a tqdm bar over the images.
    """
    counts = scale_counts(scale)
    num_classes = SUBSET_NUM_CLASSES.get(str(scale)) or int(str(scale))
    counts["train"] = train_per_class * num_classes
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = clear_dataset_folder(out_dir, overwrite, "the dataset's", MARKER_NAME)
    wnids = scale_wnids(num_classes)
    for split in SPLITS:
        if counts[split] == 0:
            continue
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            if split in MASK_DIRS:
                (root / MASK_DIRS[split] / wnid).mkdir(parents=True, exist_ok=True)
    tasks = _tasks(root, counts, wnids, seed)
    workers = workers or os.cpu_count() or 1
    from tqdm.auto import tqdm

    with tqdm(total=sum(len(t.items) for t in tasks), desc="images", disable=not progress, unit="img") as bar:
        if workers == 1:
            for task in tasks:
                bar.update(_write_task(task))
        else:
            # Spawned: drawing needs NumPy and PIL only (the DataLoaders' fork server preloads torch in each worker).
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for done in pool.map(_write_task, tasks):
                    bar.update(done)
    (root / SYNSET_FILE_NAME).write_text(
        "".join(f"{wnid} synthetic class {i}, s{i}\n" for i, wnid in enumerate(wnids, 1))
    )
    marker = {"generator": "imagenets_hf.data.scale", "version": GENERATOR_VERSION, "seed": seed, "counts": counts}
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")  # last: the folder is complete
    return root
