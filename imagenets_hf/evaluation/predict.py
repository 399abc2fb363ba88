"""Predict a folder of images by the official protocol and write the masks in the official encoding.

`<images>/<wnid>/<name>.JPEG` becomes `<out>/<wnid>/<name>.png`: an RGB PNG at the original image size with
id = R + 256 * G (what the official evaluator and the test server read). Optional overlays show
image | ground truth (when a mask is found) | prediction, with a legend of the classes shown (`overlays.py`).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask, encode_mask
from imagenets_hf.evaluation.folders import (  # noqa: F401 (also importable from here, as before)
    IMAGE_EXTENSIONS,
    default_masks_dir,
    list_images,
    prediction_path,
    scan_image_folder,
)
from imagenets_hf.evaluation.inference import predict_segmentation, unwrap_model
from imagenets_hf.evaluation.modes import InferenceMode
from imagenets_hf.evaluation.overlays import colorize, label_palette, make_overlay  # noqa: F401 (re-exported)
from imagenets_hf.runtime import bounded_batches, worker_context

# Smaller than one 16-pixel ViT patch on a side: predicted (the processor upsamples it) but the result means little.
MIN_IMAGE_SIDE = 16
# Where predict.py --skip-bad lists the images it skipped (beside the masks; a submission zip takes only .png files).
SKIPPED_FILE_NAME = "skipped_images.txt"


def read_image(path: str | os.PathLike) -> tuple[Image.Image, list[str]]:
    """An image file decoded to RGB, and the warnings to show about it (one line each, naming the file): an image
    under MIN_IMAGE_SIDE pixels on a side, one over PIL's decompression-bomb limit (PIL's own warning, which
    names neither the file nor the size, is replaced). Raises ValueError naming the file when it cannot be read."""
    path = os.fspath(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except Image.DecompressionBombError as err:
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            size = f"{int(pixels.group(1)) / 1e6:.0f} megapixels" if pixels else "too large"
            raise ValueError(
                f"{path}: cannot read image: {size}, over twice PIL's decompression-bomb limit "
                f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,} pixels); downscale it"
            ) from err
        except Exception as err:  # PIL raises several types for broken files
            raise ValueError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    notes = []
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            width, height = rgb.size
            notes.append(
                f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} megapixels) is over PIL's "
                f"decompression-bomb limit ({Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels): predicted anyway, in "
                "much memory"
            )
        else:  # not ours to hide
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if min(rgb.size) < MIN_IMAGE_SIDE:
        notes.append(
            f"{path}: {rgb.width}x{rgb.height} pixels, under {MIN_IMAGE_SIDE} on a side: its prediction means little"
        )
    return rgb, notes


@dataclass
class _Item:
    relative: str
    image: Image.Image | None
    notes: list[str]
    error: str | None  # why the image could not be read


class _ImageFolder(Dataset):
    def __init__(self, root: Path, relative_paths: Sequence[str]):
        self.root, self.relative_paths = root, list(relative_paths)

    def __len__(self) -> int:
        return len(self.relative_paths)

    def __getitem__(self, index: int) -> _Item:
        relative = self.relative_paths[index]
        try:  # the error travels to the main process, which stops or skips (a worker's raise would end the loader)
            image, notes = read_image(self.root / relative)
        except ValueError as err:
            return _Item(relative, None, [], str(err))
        return _Item(relative, image, notes, None)


def _collate(items):
    return items


@dataclass
class FolderPrediction:
    """What `predict_folder` did: the masks written and the unreadable images skipped ("path: why")."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


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
    skip_bad: bool = False,
    timeout: float = 300.0,
    mode: InferenceMode | None = None,
) -> FolderPrediction:
    """Predict every image under `images_dir` and write `<out_dir>/<wnid>/<name>.png` (official encoding).

    Args:
        model, image_processor: as `predict_segmentation` (a wrapped model is unwrapped).
        images_dir: `<wnid>/<name>.JPEG` files (e.g. `<root>/test`).
        out_dir: where the masks go (folders created).
        batch_size: images per DataLoader batch; same-size images share a forward.
        dtype: autocast dtype ("bf16", "fp16") or None for full precision.
        overlay_dir: also write `<overlay_dir>/<wnid>/<name>.jpg` overlays (image | ground truth | prediction).
        masks_dir: ground-truth masks for the overlays (default: `<images_dir>-segmentation` when it exists).
        num_workers: DataLoader workers decoding images (started by a fork server: `runtime.worker_context`).
        rank, world_size: this process's share (every world_size-th image), for multi-process prediction.
        skip_bad: skip images that cannot be read (listed in the result) instead of raising ValueError naming the
            first one.
        timeout: seconds a batch from the workers may take before the prediction stops with one line.
        mode: an `InferenceMode` (sliding windows, multi-scale + flip); default the official protocol.

    Warnings about an image (too small, very large: see `read_image`) are printed to stderr as it is predicted.

    Returns:
        The written mask paths and the skipped images.
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
        _ImageFolder(images_root, relative_paths),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        timeout=timeout if num_workers > 0 else 0,
    )
    batches = bounded_batches(loader, timeout, "prediction images", "pass a longer timeout")
    result = FolderPrediction()
    try:
        for batch in tqdm(batches, total=len(loader), disable=not progress or rank != 0, desc="predict"):
            for item in batch:
                for note in item.notes:
                    tqdm.write(f"warning: {note}", file=sys.stderr)
                if item.error is not None:
                    if not skip_bad:
                        raise ValueError(f"{item.error} (--skip-bad skips unreadable images)")
                    result.skipped.append(item.error)
            batch = [item for item in batch if item.image is not None]
            if not batch:
                continue
            images = [item.image for item in batch]
            predictions = predict_segmentation(
                model, image_processor, images, dtype=dtype, batch_size=batch_size, mode=mode
            )
            for item, prediction in zip(batch, predictions):
                target = out_root / prediction_path(item.relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                encode_mask(prediction).save(target)
                result.written.append(target)
                if overlay_dir is not None:
                    ground_truth = None
                    if masks_dir is not None and (Path(masks_dir) / prediction_path(item.relative)).is_file():
                        ground_truth = decode_mask(Path(masks_dir) / prediction_path(item.relative))
                    overlay_path = Path(overlay_dir) / (os.path.splitext(item.relative)[0] + ".jpg")
                    overlay_path.parent.mkdir(parents=True, exist_ok=True)
                    make_overlay(item.image, prediction, ground_truth, id2label).save(overlay_path, quality=90)
    finally:
        model.train(was_training)
    return result


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
