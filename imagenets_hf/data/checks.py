"""File-level checks of ImageNet-S images and masks: every problem names the file and what is wrong."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask, ids_to_annotation


class ImageNetSDataError(ValueError):
    """A file or folder that is not valid ImageNet-S input; the message names the path and the problem."""


def check_image_bytes(data: bytes, path: str | os.PathLike) -> tuple[int, int]:
    """Fully decode an image (``load()``, which catches truncation that ``verify()`` misses); return (width, height)."""
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as image:
            image.load()
            return image.size
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, UnidentifiedImageError, ...)
        # PIL names the file it was given: here the buffer (`<_io.BytesIO object at 0x...>`), so say the path
        message = str(err).replace(repr(buffer), os.fspath(path))
        raise ImageNetSDataError(
            f"{os.fspath(path)}: corrupt or truncated image ({type(err).__name__}: {message})"
        ) from err


def read_mask_ids(
    mask_path: str | os.PathLike, num_classes: int, image_size: tuple[int, int], image_path: str | os.PathLike
) -> np.ndarray:
    """Decode an ImageNet-S mask to uint16 class ids, checking its size against its image and its ids.

    Valid ids are 0 ("other"), 1..num_classes and 1000 (ignore).
    """
    mask_name = os.fspath(mask_path)
    try:
        ids = decode_mask(mask_name)
    except ValueError as err:
        message = str(err)
        if not message.startswith(mask_name):
            message = f"{mask_name}: {message}"
        raise ImageNetSDataError(message) from err
    width, height = image_size
    if ids.shape != (height, width):
        raise ImageNetSDataError(
            f"{mask_name}: mask is {ids.shape[1]}x{ids.shape[0]} (WxH) but its image {os.fspath(image_path)} "
            f"is {width}x{height}"
        )
    bad = (ids < 0) | ((ids > num_classes) & (ids != IGNORE_INDEX))
    if bad.any():
        values = np.unique(ids[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise ImageNetSDataError(
            f"{mask_name}: mask has class ids outside 0..{num_classes} and {IGNORE_INDEX}: {shown} "
            f"({int(bad.sum())} pixels)"
        )
    return ids.astype(np.uint16)


def annotation_png_bytes(ids: np.ndarray) -> bytes:
    """Class ids as 16-bit single-channel PNG bytes (datasets would store a uint16 array as TIFF)."""
    buffer = io.BytesIO()
    ids_to_annotation(ids).save(buffer, format="PNG")
    return buffer.getvalue()
