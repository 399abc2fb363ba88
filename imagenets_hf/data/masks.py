"""ImageNet-S mask encoding: RGB PNG with class id = R + 256 * G (B = 0).

Id 0 is "other" (background, a real class), ids 1..N the classes in category order, 1000 is "ignore".
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IGNORE_INDEX = 1000
OTHER_ID = 0
OTHER_NAME = "other"
SUBSETS = ("50", "300", "919")
SUBSET_NUM_CLASSES = {"50": 50, "300": 300, "919": 919}

PathOrImage = str | os.PathLike | Image.Image | np.ndarray


def num_labels(subset: str | int) -> int:
    """Number of labels of a subset, "other" included (50 -> 51, 300 -> 301, 919 -> 920)."""
    key = str(subset)
    if key not in SUBSET_NUM_CLASSES:
        raise ValueError(f"unknown ImageNet-S subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    return SUBSET_NUM_CLASSES[key] + 1


def decode_mask(mask: PathOrImage) -> np.ndarray:
    """Decode an ImageNet-S mask (path, PIL image or HxWx3 uint8 array) to an int32 HxW array of class ids.

    A single-channel image (16-bit or 8-bit, e.g. the `annotation` feature of the datasets builder) already holds
    ids and is returned as int32.
    """
    name = None
    if isinstance(mask, (str, os.PathLike)):
        name = os.fspath(mask)
        try:
            with Image.open(name) as img:
                img.load()
                mask = img.copy()
        except Exception as err:  # PIL raises several types for broken files
            raise ValueError(f"{name}: cannot decode mask PNG ({err})") from err
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGB", "RGBA"):
            array = np.asarray(mask.convert("RGB"))
        elif mask.mode in ("I;16", "I;16B", "I;16L", "I", "L", "P"):
            if mask.mode == "P":
                raise ValueError(f"{name or 'mask'}: palette PNG is not an ImageNet-S mask (expected RGB)")
            return np.asarray(mask).astype(np.int32)
        else:
            raise ValueError(f"{name or 'mask'}: unsupported mask mode {mask.mode!r} (expected RGB)")
    else:
        array = np.asarray(mask)
        if array.ndim == 2:
            return array.astype(np.int32)
    if array.ndim != 3 or array.shape[2] < 2:
        raise ValueError(f"{name or 'mask'}: expected an HxWx3 RGB mask, got shape {array.shape}")
    # Widen before multiplying: uint8 * 256 overflows (NumPy 2 raises).
    return array[..., 0].astype(np.int32) + 256 * array[..., 1].astype(np.int32)


def encode_mask(ids: np.ndarray) -> Image.Image:
    """Encode an HxW array of class ids (0..65535) as an ImageNet-S RGB mask image."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"expected an HxW array of class ids, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError(f"class ids must lie in 0..65535, got {ids.min()}..{ids.max()}")
    ids = ids.astype(np.int64)
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    rgb[..., 0] = ids % 256
    rgb[..., 1] = ids // 256
    return Image.fromarray(rgb, mode="RGB")


def ids_to_annotation(ids: np.ndarray) -> Image.Image:
    """Class ids as a single-channel 16-bit image (the builder's `annotation` feature)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError(f"class ids must lie in 0..65535, got {ids.min()}..{ids.max()}")
    return Image.fromarray(ids.astype(np.uint16))
