"""ImageNet-S mask encoding: RGB PNG with class id = R + 256 * G (B = 0), and the one rule for reading masks.

Id 0 is "other" (background, a real class), ids 1..N the classes in category order, 1000 is "ignore".
`mask_to_ids` is the decoding rule (which inputs are ids, which are RGB, which are refused); `decode_mask` applies it
to files too.
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

PathOrImage = str | os.PathLike | Image.Image | np.ndarray  # or a torch tensor (see mask_to_ids)


def num_labels(subset: str | int) -> int:
    """Number of labels of a subset, "other" included (50 -> 51, 300 -> 301, 919 -> 920)."""
    key = str(subset)
    if key not in SUBSET_NUM_CLASSES:
        raise ValueError(f"unknown ImageNet-S subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    return SUBSET_NUM_CLASSES[key] + 1


def mask_to_ids(mask) -> np.ndarray:
    """Class ids (int64, HxW) of a mask held in memory: the one rule every mask reader of this project follows.

    - PIL "RGB", or an HxWx3 integer array with values 0..255: id = R + 256 * G (the ImageNet-S encoding; B is not
      read, as in the official evaluator).
    - PIL "RGBA", or HxWx4: the same when every pixel is opaque (alpha 255). A transparent pixel is refused: it has
      no id (such files are overlays or edits, not masks).
    - PIL "L", "I", "I;16" (any byte order), or an HxW integer array (any width, signed or not): the values are the
      ids. A channel axis of size 1 (HxWx1, 1xHxW) is dropped; a last axis of 3 or 4 means colour (1x1xC and
      1xWxC, which could be either, are refused).
    - PIL "P" is refused: its values are palette indices, which are not ImageNet-S ids.
    - Anything else is refused: other PIL modes, float or bool arrays, other shapes.

    Torch tensors are read as arrays. Raises ``ValueError`` saying what was given and what is accepted. The image
    processor and the evaluate module carry copies of this function (they must stand alone);
    tests/test_data_mask_decoding.py holds the copies equal.
    """
    if hasattr(mask, "getbands"):  # a PIL image, recognised without importing PIL (the copies stand alone)
        if mask.mode == "P":
            raise ValueError(
                "palette image (PIL mode 'P'): its values are palette indices, not class ids; save the mask as RGB "
                "(ImageNet-S encoding, id = R + 256 * G) or as 8/16-bit single-channel ids"
            )
        if mask.mode not in ("RGB", "RGBA", "L", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise ValueError(
                f"PIL mode {mask.mode!r} is not a mask: expected RGB or RGBA (id = R + 256 * G) or single-channel "
                "ids (L, I, I;16)"
            )
        array = np.asarray(mask)
    elif hasattr(mask, "detach"):  # a torch tensor, recognised without importing torch
        array = mask.detach().cpu().numpy()
    else:
        array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[0] == 1:
        if array.shape[-1] in (3, 4):  # 1xHxW ids of width 3 or 4, or a 1-pixel-high colour mask: no safe guess
            raise ValueError(f"ambiguous mask shape {array.shape}: pass HxW ids or HxWx3 RGB")
        array = array[0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        channels = "RGB" if array.shape[-1] == 3 else "RGBA"
        if array.dtype.kind not in "iu":
            raise ValueError(
                f"an HxWx{array.shape[-1]} {channels} mask holds integer channels, got dtype {array.dtype}"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"an HxWx{array.shape[-1]} {channels} mask holds 8-bit channels (0..255), got values "
                f"{array.min()}..{array.max()}"
            )
        if channels == "RGBA" and (array[..., 3] != 255).any():
            raise ValueError(
                f"RGBA mask with {int((array[..., 3] != 255).sum())} transparent pixel(s) (alpha < 255): they have "
                "no class id; save the mask as RGB (id = R + 256 * G)"
            )
        # Widen before multiplying: uint8 * 256 overflows (NumPy 2 raises).
        return array[..., 0].astype(np.int64) + 256 * array[..., 1].astype(np.int64)
    if array.ndim != 2:
        raise ValueError(f"a mask is HxW class ids, HxWx3 RGB or HxWx4 RGBA; got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"class ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def decode_mask(mask: PathOrImage) -> np.ndarray:
    """Class ids (int64, HxW) of a mask file (path) or in-memory mask, by the rule of `mask_to_ids`.

    A file that cannot be decoded or a mask the rule refuses raises ``ValueError``; for a file, the message starts
    with its path.
    """
    if not isinstance(mask, (str, os.PathLike)):
        return mask_to_ids(mask)
    name = os.fspath(mask)
    try:
        with Image.open(name) as image:
            image.load()
            loaded = image.copy()
    except Exception as err:  # PIL raises several types for broken files
        raise ValueError(f"{name}: cannot decode mask PNG ({err})") from err
    try:
        return mask_to_ids(loaded)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


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
