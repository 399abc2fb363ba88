"""Predict a folder of images by the official protocol and write the masks in the official encoding.

`<images>/<wnid>/<name>.JPEG` becomes `<out>/<wnid>/<name>.png`: an RGB PNG at the original image size with
id = R + 256 * G (what the official evaluator and the test server read). Optional overlays show
image | ground truth (when a mask is found) | prediction, with a legend of the classes shown (`overlays.py`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask, encode_mask
from imagenets_hf.evaluation.inference import predict_segmentation, unwrap_model
from imagenets_hf.evaluation.overlays import colorize, label_palette, make_overlay  # noqa: F401 (re-exported)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def list_images(images_dir: str | os.PathLike) -> list[str]:
    """Image paths relative to `images_dir` ("wnid/name.JPEG", or "name.JPEG" at the top), sorted."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    found = [
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    ]
    if not found:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return sorted(found)


def prediction_path(relative_image_path: str) -> str:
    """The mask file name for an image: same folder, extension .png."""
    return os.path.splitext(relative_image_path)[0] + ".png"


class _ImageFolder(Dataset):
    def __init__(self, root: Path, relative_paths: Sequence[str]):
        self.root, self.relative_paths = root, list(relative_paths)

    def __len__(self) -> int:
        return len(self.relative_paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        relative = self.relative_paths[index]
        try:
            with Image.open(self.root / relative) as image:
                return image.convert("RGB"), relative
        except Exception as err:  # PIL raises several types for broken files
            raise ValueError(f"{self.root / relative}: cannot read image ({err})") from err


def _collate(items):
    return items


def default_masks_dir(images_dir: str | os.PathLike) -> Path | None:
    """`<root>/validation-segmentation` beside `<root>/validation` (the official layout), if it exists."""
    images_dir = Path(images_dir).resolve()
    candidate = images_dir.with_name(images_dir.name + "-segmentation")
    return candidate if candidate.is_dir() else None


def predict_folder(
    model: torch.nn.Module,
    image_processor: Any,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    dtype: torch.dtype | str | None = None,
    overlay_dir: str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
    num_workers: int = 2,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> list[Path]:
    """Predict every image under `images_dir` and write `<out_dir>/<wnid>/<name>.png` (official encoding).

    Args:
        model, image_processor: as `predict_segmentation` (a wrapped model is unwrapped).
        images_dir: `<wnid>/<name>.JPEG` files (e.g. `<root>/test`).
        out_dir: where the masks go (folders created).
        batch_size: images per DataLoader batch; same-size images share a forward.
        dtype: autocast dtype ("bf16", "fp16") or None for full precision.
        overlay_dir: also write `<overlay_dir>/<wnid>/<name>.jpg` overlays (image | ground truth | prediction).
        masks_dir: ground-truth masks for the overlays (default: `<images_dir>-segmentation` when it exists).
        num_workers: DataLoader workers decoding images.
        rank, world_size: this process's share (every world_size-th image), for multi-process prediction.

    Returns:
        The written mask paths.
    """
    from tqdm.auto import tqdm

    images_root, out_root = Path(images_dir), Path(out_dir)
    relative_paths = list_images(images_root)[rank::world_size]
    if overlay_dir is not None and masks_dir is None:
        masks_dir = default_masks_dir(images_root)
    model = unwrap_model(model)
    id2label = getattr(model.config, "id2label", None)  # names for the overlays' legend
    was_training = model.training
    model.eval()
    loader = DataLoader(
        _ImageFolder(images_root, relative_paths), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    written = []
    try:
        for batch in tqdm(loader, disable=not progress or rank != 0, desc="predict"):
            images = [image for image, _ in batch]
            predictions = predict_segmentation(model, image_processor, images, dtype=dtype, batch_size=batch_size)
            for (image, relative), prediction in zip(batch, predictions):
                target = out_root / prediction_path(relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                encode_mask(prediction).save(target)
                written.append(target)
                if overlay_dir is not None:
                    ground_truth = None
                    if masks_dir is not None and (Path(masks_dir) / prediction_path(relative)).is_file():
                        ground_truth = decode_mask(Path(masks_dir) / prediction_path(relative))
                    overlay_path = Path(overlay_dir) / (os.path.splitext(relative)[0] + ".jpg")
                    overlay_path.parent.mkdir(parents=True, exist_ok=True)
                    make_overlay(image, prediction, ground_truth, id2label).save(overlay_path, quality=90)
    finally:
        model.train(was_training)
    return written


def evaluate_prediction_folder(
    predictions_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    num_labels: int,
    ignore_index: int = IGNORE_INDEX,
    extended: bool = True,
) -> dict[str, Any]:
    """Score written predictions against ground-truth masks (`<wnid>/<name>.png` in both), as the official
    evaluator run on folders; every ground-truth mask needs its prediction."""
    from imagenets_hf.evaluation.metrics import SegmentationEvaluator

    masks_root, predictions_root = Path(masks_dir), Path(predictions_dir)
    evaluator = SegmentationEvaluator(num_labels, ignore_index=ignore_index, extended=extended)
    mask_paths = sorted(p.relative_to(masks_root).as_posix() for p in masks_root.rglob("*.png"))
    if not mask_paths:
        raise FileNotFoundError(f"{masks_root}: no .png masks found")
    for relative in mask_paths:
        prediction_file = predictions_root / relative
        if not prediction_file.is_file():
            raise FileNotFoundError(f"{prediction_file}: missing prediction for {masks_root / relative}")
        evaluator.update(decode_mask(prediction_file), decode_mask(masks_root / relative))
    return evaluator.compute()
