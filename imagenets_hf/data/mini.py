"""A tiny synthetic ImageNet-S ("mini") written in the official layout, for demos and tests.

Ten classes, each a distinct shape, colour and texture (a red solid disc, a blue striped square, ...), drawn large on
muted backgrounds (gradients and smooth noise) so a tiny ViT trained from scratch on CPU learns them in minutes.
Masks use the official encoding (id = R + 256 * G): 0 "other" for the background, 1..10 the classes in sorted-wnid
order and 1000 "ignore" on a band along object outlines (real annotations have uncertain borders) and on occasional
small blobs. A few images hold a smaller second object of another class. Sizes and aspect ratios vary; one
validation image is larger than 1000x1000 pixels, one labelled image is a grayscale JPEG and one a CMYK JPEG, so the
loaders and the evaluation protocol meet the same cases as on the real data.

Everything is drawn from the seed: the same seed gives byte-identical files.

The semi-supervised variant (`unlabelled_per_class=N`) writes N unlabelled images a class into `train/` instead of 6:
the first 6 of each class are the default dataset's own files, the others are drawn the same way under new names,
and every other split stays byte-identical to the default dataset's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imagenets_hf.data.masks import IGNORE_INDEX, OTHER_ID, OTHER_NAME, encode_mask

GENERATOR_VERSION = 1
MINI_NUM_CLASSES = 10
MARKER_NAME = ".mini_complete"
SYNSET_FILE_NAME = "LOC_synset_mapping.txt"
JPEG_QUALITY = 90

# Images per class in each split; train-semi holds 10 a class as in the real benchmark.
MINI_IMAGES_PER_CLASS = {"train": 6, "train-semi": 10, "validation": 5, "test": 3}
# Splits that come with masks, and the folder holding them.
MINI_MASK_DIRS = {"train-semi": "train-semi-segmentation", "validation": "validation-segmentation"}
SPLIT_DIRS = ("train", "train-semi", "train-semi-segmentation", "validation", "validation-segmentation", "test")

# The odd images the loaders must cope with: (split, class index 0-based, image index within the class folder).
GRAYSCALE_IMAGE = ("train-semi", 2, 0)
CMYK_IMAGE = ("validation", 4, 0)
LARGE_IMAGE = ("validation", 0, 1)
LARGE_IMAGE_SIZE = (1100, 1250)  # (width, height): H * W > 1000^2 takes the evaluation's large-image path

SECOND_OBJECT_PROBABILITY = 0.25
IGNORE_BLOB_PROBABILITY = 0.15


@dataclass(frozen=True)
class MiniClass:
    """One synthetic class: what it looks like and the wnid-like folder name it lives under."""

    wnid: str
    shape: str
    colour_name: str
    colour: tuple[int, int, int]
    texture: str
    texture_adjective: str

    @property
    def name(self) -> str:
        return f"{self.colour_name} {self.texture_adjective} {self.shape}"


MINI_CLASSES = (
    MiniClass("n90000001", "disc", "red", (220, 30, 30), "solid", "solid"),
    MiniClass("n90000002", "square", "blue", (30, 70, 225), "horizontal_stripes", "striped"),
    MiniClass("n90000003", "triangle", "green", (30, 170, 50), "dots", "dotted"),
    MiniClass("n90000004", "star", "yellow", (240, 215, 30), "checker", "checkered"),
    MiniClass("n90000005", "ring", "magenta", (215, 40, 205), "spokes", "spoked"),
    MiniClass("n90000006", "cross", "cyan", (30, 210, 225), "grid", "gridded"),
    MiniClass("n90000007", "hexagon", "orange", (250, 130, 20), "diagonal_stripes", "diagonally striped"),
    MiniClass("n90000008", "crescent", "purple", (125, 40, 175), "speckle", "speckled"),
    MiniClass("n90000009", "diamond", "white", (240, 240, 240), "waves", "wavy"),
    MiniClass("n90000010", "arrow", "pink", (255, 140, 185), "rings", "ringed"),
)
MINI_WNIDS = tuple(c.wnid for c in MINI_CLASSES)
assert list(MINI_WNIDS) == sorted(MINI_WNIDS) and len(MINI_WNIDS) == MINI_NUM_CLASSES


def mini_class_names() -> list[str]:
    """Class names in label order, "other" first (index = mask id)."""
    return [OTHER_NAME] + [c.name for c in MINI_CLASSES]


# --- shapes -----------------------------------------------------------------------------------------------------------


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _circle(radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    return _regular_polygon(96, radius) + np.asarray(centre)


@cache
def _unit_shape(shape: str) -> tuple[tuple[np.ndarray, int], ...]:
    """Polygons (Nx2, unit coordinates, max radius 1) with their fill (1 = object, 0 = hole), drawn in order."""
    h = 0.33  # half-width of the cross arms and the arrow shaft
    parts: list[tuple[np.ndarray, int]]
    if shape == "disc":
        parts = [(_circle(), 1)]
    elif shape == "square":
        parts = [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / math.sqrt(2), 1)]
    elif shape == "triangle":
        parts = [(_regular_polygon(3), 1)]
    elif shape == "star":
        parts = [(_star(), 1)]
    elif shape == "ring":
        parts = [(_circle(), 1), (_circle(0.55), 0)]
    elif shape == "cross":
        cross = [
            (-h, -1),
            (h, -1),
            (h, -h),
            (1, -h),
            (1, h),
            (h, h),
            (h, 1),
            (-h, 1),
            (-h, h),
            (-1, h),
            (-1, -h),
            (-h, -h),
        ]
        parts = [(np.array(cross), 1)]
    elif shape == "hexagon":
        parts = [(_regular_polygon(6, phase=0.0), 1)]
    elif shape == "crescent":
        parts = [(_circle(), 1), (_circle(0.8, (0.45, -0.1)), 0)]
    elif shape == "diamond":
        parts = [(np.array([[0, -1], [0.55, 0], [0, 1], [-0.55, 0]]), 1)]
    elif shape == "arrow":
        arrow = [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)]
        parts = [(np.array(arrow), 1)]
    else:
        raise ValueError(f"unknown mini shape {shape!r}")
    radius = max(float(np.hypot(*poly.T).max()) for poly, fill in parts if fill)
    return tuple((poly.astype(np.float64) / radius, fill) for poly, fill in parts)


@cache
def _unit_area(shape: str) -> float:
    """Area of the unit shape (radius 1), measured by drawing it, so the target object size is met."""
    size = 400
    mask = _draw_shape(shape, (size, size), (size / 2, size / 2), size / 2, 0.0, (1.0, 1.0))
    return float(mask.sum()) / (size / 2) ** 2


def _draw_shape(
    shape: str,
    size: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    angle: float,
    stretch: tuple[float, float],
) -> np.ndarray:
    """Boolean HxW mask of a shape stretched per axis, rotated by `angle` radians, scaled and centred."""
    width, height = size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cos, sin = math.cos(angle), math.sin(angle)
    for poly, fill in _unit_shape(shape):
        x = poly[:, 0] * stretch[0] * radius
        y = poly[:, 1] * stretch[1] * radius
        xs = centre[0] + cos * x - sin * y
        ys = centre[1] + sin * x + cos * y
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255 * fill)
    return np.asarray(canvas) > 0


# --- textures and colours ---------------------------------------------------------------------------------------------


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pattern in [0, 1] (1 = the class colour, 0 = its dark shade) over object-local coordinates (radius 1).

    Periods are fixed in object units, so the texture scales with the object and survives resizing.
    """
    if texture == "solid":
        return np.ones_like(u)
    if texture == "horizontal_stripes":
        return (np.floor(v * 4) % 2 == 0).astype(np.float32)
    if texture == "dots":
        du, dv = (u / 0.4) % 1 - 0.5, (v / 0.4) % 1 - 0.5
        return (np.hypot(du, dv) > 0.25).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u * 3) + np.floor(v * 3)) % 2 == 0).astype(np.float32)
    if texture == "spokes":
        return (np.sin(8 * np.arctan2(v, u)) > 0).astype(np.float32)
    if texture == "grid":
        return ~(((u * 3) % 1 < 0.22) | ((v * 3) % 1 < 0.22)) * np.float32(1)
    if texture == "diagonal_stripes":
        return (np.floor((u + v) * 3) % 2 == 0).astype(np.float32)
    if texture == "speckle":
        cells = rng.random((12, 12)) > 0.45
        iu = np.clip(((u + 1) * 6).astype(np.int64), 0, 11)
        iv = np.clip(((v + 1) * 6).astype(np.int64), 0, 11)
        return cells[iv, iu].astype(np.float32)
    if texture == "waves":
        return (np.sin(2 * math.pi * (2 * v + 0.3 * np.sin(2 * math.pi * u))) > 0).astype(np.float32)
    if texture == "rings":
        return (np.floor(np.hypot(u, v) * 5) % 2 == 0).astype(np.float32)
    raise ValueError(f"unknown mini texture {texture!r}")


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Muted HxWx3 float background: a low-saturation colour, a gradient and smooth noise (no shapes, no patterns)."""
    start = (rng.uniform(60, 190) + rng.normal(0, 14, 3)).astype(np.float32)
    end = (rng.uniform(60, 190) + rng.normal(0, 14, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    # A linear ramp from one corner to the opposite one, 0..1, along a random direction.
    xs = np.arange(width, dtype=np.float32) * np.float32(math.cos(angle))
    ys = np.arange(height, dtype=np.float32) * np.float32(math.sin(angle))
    ramp = ys[:, None] + xs[None, :]
    ramp -= ramp.min()
    ramp /= max(float(ramp.max()), 1.0)
    ramp *= np.float32(rng.uniform(0.0, 1.0))
    image = start + ramp[..., None] * (end - start)
    # Smooth noise: a coarse random grid upsampled; blotchy but never a regular texture.
    coarse_h, coarse_w = int(rng.integers(3, 10)), int(rng.integers(3, 10))
    amplitude = rng.uniform(5, 25)
    for channel in range(3):
        coarse = rng.normal(0, amplitude, (coarse_h, coarse_w)).astype(np.float32)
        smooth = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        image[..., channel] += np.asarray(smooth)
    return image


# --- one scene --------------------------------------------------------------------------------------------------------


@dataclass
class _Object:
    cls: int  # 0-based class index
    mask: np.ndarray
    centre: tuple[float, float]
    radius: float
    angle: float
    stretch: tuple[float, float]


def _place_object(cls: int, height: int, width: int, area_fraction: float, rng: np.random.Generator) -> _Object:
    shape = MINI_CLASSES[cls].shape
    stretch = (float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15)))
    reach = max(stretch)  # the object stays within `radius * reach` of its centre, whatever the rotation
    radius = math.sqrt(area_fraction * height * width / (_unit_area(shape) * stretch[0] * stretch[1]))
    radius = min(radius, 0.47 * min(height, width) / reach)
    extent = radius * reach
    centre = (float(rng.uniform(extent, width - extent)), float(rng.uniform(extent, height - extent)))
    # Small rotations only: a square turned 45 degrees would become a diamond.
    angle = float(rng.uniform(-0.35, 0.35)) if shape != "disc" else 0.0
    mask = _draw_shape(shape, (width, height), centre, radius, angle, stretch)
    return _Object(cls, mask, centre, radius, angle, stretch)


def _paint(image: np.ndarray, obj: _Object, rng: np.random.Generator) -> None:
    """Paint the object's colour and texture into `image` (float HxWx3) where its mask is set."""
    spec = MINI_CLASSES[obj.cls]
    ys, xs = np.nonzero(obj.mask)
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    dx, dy = xs - obj.centre[0], ys - obj.centre[1]
    u = (cos * dx + sin * dy) / (obj.radius * obj.stretch[0])
    v = (-sin * dx + cos * dy) / (obj.radius * obj.stretch[1])
    pattern = _texture(spec.texture, u.astype(np.float32), v.astype(np.float32), rng)
    colour = np.clip(np.asarray(spec.colour, np.float32) * rng.uniform(0.85, 1.08) + rng.normal(0, 10, 3), 0, 255)
    shade = colour * rng.uniform(0.25, 0.4)
    # A gentle light gradient across the object so it is not flat.
    light = 1.0 + 0.08 * (u * math.cos(obj.angle) + v * math.sin(obj.angle))
    pixels = (pattern[:, None] * colour + (1 - pattern[:, None]) * shade) * light[:, None]
    image[ys, xs] = pixels


def _render_scene(
    cls: int, height: int, width: int, rng: np.random.Generator, allow_second: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image with one object of class `cls` (sometimes a smaller second one) and its int32 id map."""
    image = _background(height, width, rng)
    objects = [_place_object(cls, height, width, float(rng.uniform(0.15, 0.5)), rng)]
    if allow_second and rng.random() < SECOND_OBJECT_PROBABILITY:
        other = int(rng.choice([c for c in range(MINI_NUM_CLASSES) if c != cls]))
        for _ in range(10):
            candidate = _place_object(other, height, width, float(rng.uniform(0.04, 0.1)), rng)
            # Keep the folder's class clearly visible: the second object may hide at most a fifth of it.
            if (candidate.mask & objects[0].mask).sum() <= 0.2 * objects[0].mask.sum():
                objects.append(candidate)
                break
    ids = np.full((height, width), OTHER_ID, dtype=np.int32)
    for obj in objects:
        _paint(image, obj, rng)
        ids[obj.mask] = obj.cls + 1
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
    image = np.clip(image, 0, 255, out=image).round().astype(np.uint8)

    # Ignore band along every outline (real annotations have uncertain borders).
    ids[_label_edges(ids)] = IGNORE_INDEX
    if rng.random() < IGNORE_BLOB_PROBABILITY:
        blob_radius = rng.uniform(0.03, 0.07) * min(height, width)
        blob = _draw_shape(
            "disc", (width, height), (rng.uniform(0, width), rng.uniform(0, height)), blob_radius, 0.0, (1.0, 1.0)
        )
        ids[blob] = IGNORE_INDEX
    if not ((ids == OTHER_ID).any() and (ids == cls + 1).any()):
        raise RuntimeError(f"mini generator bug: scene of class {cls + 1} lacks background or its object")
    return image, ids


def _label_edges(ids: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds another label: a 2 px band along every outline."""
    edges = np.zeros(ids.shape, dtype=bool)
    for a, b in (
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),
        ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),
    ):
        differ = ids[a] != ids[b]
        edges[a] |= differ
        edges[b] |= differ
    return edges


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width): short side 96-400 px, aspect ratio 0.5-2 (log-uniform)."""
    short = int(rng.integers(96, 401))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    long = int(round(short * max(aspect, 1 / aspect)))
    return (short, long) if aspect >= 1 else (long, short)


# --- the dataset ------------------------------------------------------------------------------------------------------


def _file_stems(seed: int, unlabelled_per_class: int | None = None) -> dict[str, list[list[str]]]:
    """File stems per split and class: `<wnid>_<k>` for train/train-semi, ILSVRC val names (unique) for val/test.
    `unlabelled_per_class` > 6 adds train stems after the default ones, drawn from numbers no other file uses."""
    rng = np.random.default_rng([seed, 7919])
    stems: dict[str, list[list[str]]] = {split: [] for split in MINI_IMAGES_PER_CLASS}
    n_train, n_semi = MINI_IMAGES_PER_CLASS["train"], MINI_IMAGES_PER_CLASS["train-semi"]
    for wnid in MINI_WNIDS:
        numbers = rng.choice(np.arange(1, 15000), size=n_train + n_semi, replace=False)
        stems["train"].append([f"{wnid}_{k}" for k in sorted(numbers[:n_train].tolist())])
        stems["train-semi"].append([f"{wnid}_{k}" for k in sorted(numbers[n_train:].tolist())])
    n_val, n_test = MINI_IMAGES_PER_CLASS["validation"], MINI_IMAGES_PER_CLASS["test"]
    numbers = rng.choice(np.arange(1, 50001), size=MINI_NUM_CLASSES * (n_val + n_test), replace=False).tolist()
    for cls in range(MINI_NUM_CLASSES):
        start = cls * (n_val + n_test)
        stems["validation"].append([f"ILSVRC2012_val_{k:08d}" for k in sorted(numbers[start : start + n_val])])
        stems["test"].append(
            [f"ILSVRC2012_val_{k:08d}" for k in sorted(numbers[start + n_val : start + n_val + n_test])]
        )
    extra = 0 if unlabelled_per_class is None else unlabelled_per_class - n_train
    if extra < 0:
        for names in stems["train"]:
            del names[unlabelled_per_class:]
    elif extra > 0:
        extra_rng = np.random.default_rng([seed, 7919, extra])
        for cls, wnid in enumerate(MINI_WNIDS):
            taken = {int(name.rsplit("_", 1)[1]) for split in ("train", "train-semi") for name in stems[split][cls]}
            free = np.setdiff1d(np.arange(1, max(15000, 2 * unlabelled_per_class + 100)), list(taken))
            numbers = extra_rng.choice(free, size=extra, replace=False)
            # appended: the default files keep their place, hence their render
            stems["train"][cls] += [f"{wnid}_{k}" for k in numbers.tolist()]
    return stems


def _relative_image_path(stems: dict[str, list[list[str]]], where: tuple[str, int, int]) -> str:
    split, cls, index = where
    return f"{split}/{MINI_WNIDS[cls]}/{stems[split][cls][index]}.JPEG"


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def images_per_class(unlabelled_per_class: int | None = None) -> dict[str, int]:
    """Images a class in each split: `MINI_IMAGES_PER_CLASS`, with `unlabelled_per_class` in train when given."""
    counts = dict(MINI_IMAGES_PER_CLASS)
    if unlabelled_per_class is not None:
        counts["train"] = unlabelled_per_class
    return counts


def is_mini_dataset_complete(
    out_dir: str | os.PathLike, seed: int = 0, unlabelled_per_class: int | None = None
) -> bool:
    """Whether `out_dir` holds a finished mini dataset of this generator version, seed and number of unlabelled
    (train) images a class (its marker is written last)."""
    marker = _read_marker(Path(out_dir))
    return (
        bool(marker)
        and marker.get("version") == GENERATOR_VERSION
        and marker.get("seed") == seed
        and marker.get("images_per_class", {}).get("train") == images_per_class(unlabelled_per_class)["train"]
    )


def clear_dataset_folder(out_dir: str | os.PathLike, overwrite: bool, whose: str, marker: str = MARKER_NAME) -> Path:
    """Make way for a generated dataset in `out_dir`: FileExistsError when it already holds one of a dataset's files
    or folders and `overwrite` is False; with `overwrite`, only those are removed (the marker first, so an interrupted
    rewrite never looks complete). `whose` names them in the message ("the mini dataset's"); `marker`: the
    generator's completion marker."""
    root = Path(out_dir)
    owned = [root / name for name in (marker, SYNSET_FILE_NAME, *SPLIT_DIRS)]
    present = [p for p in owned if p.exists()]
    if present and not overwrite:
        raise FileExistsError(
            f"{root} already holds {present[0].name}: pass overwrite=True (--overwrite) to delete {whose} "
            "folders there and write it again, or choose another folder"
        )
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return root


def make_mini_dataset(
    out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False, unlabelled_per_class: int | None = None
) -> Path:
    """Write the mini ImageNet-S (official layout, 10 classes, `LOC_synset_mapping.txt`) into `out_dir`.

    Returns the dataset root (`out_dir`). Raises FileExistsError when `out_dir` already holds dataset folders and
    `overwrite` is False; with `overwrite` only the dataset's own folders and files are removed first.
    Takes a few seconds; the same seed gives byte-identical files. `unlabelled_per_class`: unlabelled images a class
    in `train/` (None: the default 6; the semi-supervised variant, see the module docstring).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"mini dataset seed must be a non-negative integer, got {seed!r}")
    if unlabelled_per_class is not None and (
        isinstance(unlabelled_per_class, bool) or not isinstance(unlabelled_per_class, int) or unlabelled_per_class < 1
    ):
        raise ValueError(f"unlabelled images per class must be a positive integer, got {unlabelled_per_class!r}")
    root = clear_dataset_folder(out_dir, overwrite, "the mini dataset's")
    root.mkdir(parents=True, exist_ok=True)

    stems = _file_stems(seed, unlabelled_per_class)
    counts = images_per_class(unlabelled_per_class)
    special = {"grayscale": GRAYSCALE_IMAGE, "cmyk": CMYK_IMAGE, "large": LARGE_IMAGE}
    for split_index, (split, per_class) in enumerate(counts.items()):
        for cls, wnid in enumerate(MINI_WNIDS):
            image_dir = root / split / wnid
            image_dir.mkdir(parents=True)
            mask_dir = root / MINI_MASK_DIRS[split] / wnid if split in MINI_MASK_DIRS else None
            if mask_dir is not None:
                mask_dir.mkdir(parents=True)
            for index in range(per_class):
                where = (split, cls, index)
                rng = np.random.default_rng([seed, split_index, cls, index])
                if where == LARGE_IMAGE:
                    height, width = LARGE_IMAGE_SIZE[1], LARGE_IMAGE_SIZE[0]
                else:
                    height, width = _image_size(rng)
                image, ids = _render_scene(cls, height, width, rng)
                picture = Image.fromarray(image, mode="RGB")
                if where == GRAYSCALE_IMAGE:
                    picture = picture.convert("L")
                elif where == CMYK_IMAGE:
                    picture = picture.convert("CMYK")
                stem = stems[split][cls][index]
                picture.save(image_dir / f"{stem}.JPEG", format="JPEG", quality=JPEG_QUALITY)
                if mask_dir is not None:
                    encode_mask(ids).save(mask_dir / f"{stem}.png", format="PNG")

    synsets = "".join(f"{c.wnid} {c.name}, {c.shape}\n" for c in MINI_CLASSES)
    (root / SYNSET_FILE_NAME).write_text(synsets)
    marker = {
        "generator": "imagenets_hf.data.mini",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "images_per_class": counts,
        "special_images": {name: _relative_image_path(stems, where) for name, where in special.items()},
    }
    # Written last: its presence means every file above is complete.
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
    return root


def ensure_mini_dataset(out_dir: str | os.PathLike, seed: int = 0, unlabelled_per_class: int | None = None) -> Path:
    """Return `out_dir` holding the mini dataset, making it unless a complete one with this seed (and number of
    unlabelled images a class) is already there."""
    if is_mini_dataset_complete(out_dir, seed, unlabelled_per_class):
        return Path(out_dir)
    return make_mini_dataset(out_dir, seed=seed, overwrite=True, unlabelled_per_class=unlabelled_per_class)


def mini_special_images(out_dir: str | os.PathLike) -> dict[str, str]:
    """Paths (relative to the root) of the grayscale, CMYK and large (>1000x1000) images of a finished mini dataset."""
    marker = _read_marker(Path(out_dir))
    if not marker or "special_images" not in marker:
        raise FileNotFoundError(
            f"{Path(out_dir) / MARKER_NAME}: missing or unreadable; is this a finished mini dataset?"
        )
    return dict(marker["special_images"])


def count_mini_files(root: str | os.PathLike) -> dict[str, int]:
    """Number of files in each split folder of a dataset root (images for image folders, PNGs for mask folders)."""
    root = Path(root)
    return {name: sum(1 for p in (root / name).glob("*/*") if p.is_file()) for name in SPLIT_DIRS}
