"""Image folders in the official layout: which files are images, and where each image's mask goes.

`<images>/<wnid>/<name>.JPEG` has its mask at `<masks>/<wnid>/<name>.png`; the official validation masks lie in
`<root>/validation-segmentation` beside `<root>/validation`. Predictions, submissions and pictures all read folders
through these functions (this module imports nothing else of the package's evaluation).
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def scan_image_folder(images_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(images, others): the paths relative to `images_dir` of its image files (by extension) and of its other
    files, both sorted; hidden files are in neither."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    images, others = [], []
    for path in root.rglob("*"):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
            kind = images if path.suffix.lower() in IMAGE_EXTENSIONS else others
            kind.append(path.relative_to(root).as_posix())
    return sorted(images), sorted(others)


def list_images(images_dir: str | os.PathLike) -> list[str]:
    """Image paths relative to `images_dir` ("wnid/name.JPEG", or "name.JPEG" at the top), sorted."""
    found = scan_image_folder(images_dir)[0]
    if not found:
        raise FileNotFoundError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return found


def prediction_path(relative_image_path: str) -> str:
    """The mask file name for an image: same folder, extension .png."""
    return os.path.splitext(relative_image_path)[0] + ".png"


def default_masks_dir(images_dir: str | os.PathLike) -> Path | None:
    """`<root>/validation-segmentation` beside `<root>/validation` (the official layout), if it exists."""
    images_dir = Path(images_dir).resolve()
    candidate = images_dir.with_name(images_dir.name + "-segmentation")
    return candidate if candidate.is_dir() else None
