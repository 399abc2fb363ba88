"""Running the model on images: the official ImageNet-S inference protocol, the other inference modes
(`modes.py`: sliding windows, multi-scale + flip), and the evaluation loop.

Protocol (the model's `ViTFCNImageProcessor` does the resizing): short side 256, long side at most 1024, keep ratio,
whole image in one forward; logits bilinear to the original size; argmax; images above 1000 x 1000 pixels at long side
1000, then nearest up. A ViT attends globally, so padding images to a common size would change their predictions:
a batch is split into groups of images with the same processed size instead. Under another mode, the views and
windows of the images that share a size are batched together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask
from imagenets_hf.evaluation.metrics import SIZE_BUCKET_NAMES, SegmentationEvaluator
from imagenets_hf.evaluation.modes import InferenceMode, View, combine_views, scaled_processor, slide_windows
from imagenets_hf.runtime import autocast_dtype, bounded_batches, resolve_dtype, worker_context


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an HxW / HxWxC array."""
    if hasattr(image, "height") and hasattr(image, "width"):
        return int(image.height), int(image.width)
    shape = np.shape(image)
    if len(shape) not in (2, 3):
        raise ValueError(f"an image must be a PIL image or an HxW(xC) array, got shape {shape}")
    return int(shape[0]), int(shape[1])


def unwrap_model(model: torch.nn.Module, accelerator: Any = None) -> torch.nn.Module:
    """The bare model behind an Accelerate-prepared, DDP or DataParallel wrapper."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_segmentation_tensors(
    model: torch.nn.Module,
    image_processor: Any,
    images: Sequence[Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int | None = None,
    mode: InferenceMode | None = None,
) -> list[torch.Tensor]:
    """Like `predict_segmentation`, but int64 tensors left on the model's device (for the evaluator)."""
    images = list(images)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = resolve_dtype(dtype)
    if mode is not None and not mode.official:
        return _predict_views(model, image_processor, images, mode, device, dtype, batch_size)
    sizes = [image_size(image) for image in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (height, width) in enumerate(sizes):
        groups.setdefault(tuple(image_processor.model_input_size(height, width)), []).append(index)
    results: list[torch.Tensor | None] = [None] * len(images)
    chunk = batch_size or len(images) or 1
    for indices in groups.values():
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            pixel_values = image_processor([images[i] for i in part], return_tensors="pt")["pixel_values"]
            with _autocast(device, dtype):
                logits = model(pixel_values=pixel_values.to(device)).logits
            maps = image_processor.post_process_semantic_segmentation(logits.float(), [sizes[i] for i in part])
            for i, prediction in zip(part, maps):
                results[i] = prediction
    return results


def _predict_views(
    model: torch.nn.Module,
    image_processor: Any,
    images: Sequence[Any],
    mode: InferenceMode,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int | None,
) -> list[torch.Tensor]:
    """Class maps under a mode other than the official one: each image's views (windows of the scaled, possibly
    mirrored image), inputs of the same size batched across the images (`batch_size` a forward at most), then
    `combine_views` image by image. The views' low-resolution logits of all `images` are held until then."""
    mode = mode.with_crop_size(None)  # slide: the default stride; without a window, a ValueError saying to give one
    views: list[list[View]] = []
    groups: dict[tuple[int, ...], list[tuple[View, int, torch.Tensor]]] = {}
    for image in images:
        views.append([])
        for scale, flipped in mode.views:
            pixel_values = scaled_processor(image_processor, scale)(image, return_tensors="pt")["pixel_values"][0]
            if flipped:
                pixel_values = pixel_values.flip(-1)
            size = tuple(pixel_values.shape[-2:])
            whole = [(0, size[0], 0, size[1])]
            windows = slide_windows(*size, mode.crop_size, mode.stride) if mode.mode == "slide" else whole
            view = View(size, windows, flipped, [None] * len(windows))
            views[-1].append(view)
            for i, (top, bottom, left, right) in enumerate(windows):
                window = pixel_values[:, top:bottom, left:right]
                groups.setdefault(tuple(window.shape), []).append((view, i, window))
    for group in groups.values():
        chunk = batch_size or len(group)
        for start in range(0, len(group), chunk):
            part = group[start : start + chunk]
            with _autocast(device, dtype):
                logits = model(pixel_values=torch.stack([x for _, _, x in part]).to(device)).logits
            for (view, i, _), window_logits in zip(part, logits.float()):
                view.logits[i] = window_logits
    results = []
    for image, image_views in zip(images, views):
        height, width = image_size(image)
        working = image_processor.working_size(height, width)
        prediction = combine_views(image_views, working)
        if working != (height, width):  # a large image: predicted at its working size, then nearest up (the protocol's)
            prediction = torch.nn.functional.interpolate(
                prediction[None, None].float(), size=(height, width), mode="nearest"
            )[0, 0].long()
        results.append(prediction)
    return results


def predict_segmentation(
    model: torch.nn.Module,
    image_processor: Any,
    images: Sequence[Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int | None = None,
    mode: InferenceMode | None = None,
) -> list[np.ndarray]:
    """Class-id maps (int32 NumPy arrays at each image's original size) by the official protocol, or another
    inference mode.

    Args:
        model: a semantic-segmentation model returning `.logits` (e.g. `ViTFCNForSemanticSegmentation`), in eval mode.
        image_processor: its `ViTFCNImageProcessor` (preprocessing and post-processing).
        images: PIL images (RGB or convertible) or HxWx3 arrays, of any sizes.
        device: where to run; default the model's device.
        dtype: autocast dtype ("bf16", "fp16", a torch dtype); None or "fp32" runs in full precision.
        batch_size: most images (or windows and views of one image, under another mode) per forward; images of the
            same processed size are batched together.
        mode: an `InferenceMode` (`imagenets_hf.evaluation.modes`): sliding windows, multi-scale + flip; default
            the official protocol. A slide mode needs its `crop_size` (`mode.with_crop_size(recipe crop)`).
    """
    maps = predict_segmentation_tensors(model, image_processor, images, device, dtype, batch_size, mode)
    return [prediction.cpu().numpy().astype(np.int32) for prediction in maps]


def compact_ids(ids: np.ndarray) -> np.ndarray:
    """An id map as uint16 when its ids fit (ImageNet-S's all do: R + 256 * G), else unchanged: a quarter of the
    int64 bytes that each mask in flight between the workers and the evaluation would otherwise take."""
    if ids.size and ids.dtype != np.uint16 and 0 <= ids.min() and ids.max() <= np.iinfo(np.uint16).max:
        return ids.astype(np.uint16)
    return ids


def _collate_rows(rows: list[dict]) -> list[tuple[Any, np.ndarray | None, str | None]]:
    """DataLoader collate (runs in the workers): decoded RGB image, ground-truth ids (`compact_ids`), image id."""
    batch = []
    for row in rows:
        annotation = row.get("annotation")
        batch.append(
            (
                row["image"].convert("RGB"),
                None if annotation is None else compact_ids(decode_mask(annotation)),
                row.get("image_id"),
            )
        )
    return batch


def _process_info(accelerator: Any) -> tuple[int, int]:
    if accelerator is not None and accelerator.num_processes > 1:
        return accelerator.process_index, accelerator.num_processes
    # Also without an accelerator, or with one that sees a single process although torch.distributed runs several.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_dataset(dataset: Any, rank: int, world_size: int) -> Any:
    """This process's share of the dataset: every `world_size`-th row from `rank`, each row exactly once across
    processes (no padding or repetition, unlike a prepared DataLoader's `even_batches`)."""
    if world_size == 1:
        return dataset
    if not hasattr(dataset, "__len__"):  # a datasets.IterableDataset
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    indices = range(rank, len(dataset), world_size)
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return Subset(dataset, list(indices))


def evaluate_model(
    model: torch.nn.Module,
    image_processor: Any,
    dataset: Any,
    accelerator: Any = None,
    batch_size: int = 8,
    extended: bool = False,
    progress: bool = True,
    dtype: torch.dtype | str | None = None,
    num_workers: int = 2,
    num_labels: int | None = None,
    ignore_index: int | None = None,
    timeout: float = 300.0,
    mode: InferenceMode | None = None,
) -> dict[str, Any]:
    """Evaluate a segmentation model on rows with `image` and `annotation` by the official protocol (or `mode`).

    Works in one process, under `accelerate launch` (pass the `accelerator`; the model may be prepared or not) and
    under `torchrun` without an accelerator: each process evaluates its own shard of the rows (each row exactly once)
    and the confusion counts are summed exactly. Every process gets the same result.

    Args:
        model, image_processor: as `predict_segmentation`.
        dataset: a `datasets.Dataset` (e.g. `load_imagenets(dir, "validation")`), IterableDataset or any indexable of
            such rows.
        accelerator: an `accelerate.Accelerator`, or None.
        batch_size: images per DataLoader batch (same-size images share a forward).
        extended: also compute the per-image official metrics (image accuracy, boundary IoU, size mIoU, F-measure).
        progress: show a tqdm bar on the main process.
        dtype: autocast dtype; by default the accelerator's mixed precision on CUDA, else full precision.
        num_workers: DataLoader workers decoding images and masks (started by a fork server:
            `runtime.worker_context`).
        num_labels, ignore_index: default to the model config's.
        timeout: seconds a batch from the workers may take before the evaluation stops with one line.
        mode: an `InferenceMode` (as `predict_segmentation`); default the official protocol.

    Returns:
        `SegmentationEvaluator.compute()`'s dict ("mIoU", "per_class_iou", the HF mean_iou keys, ...).
    """
    from tqdm.auto import tqdm

    bare_model = unwrap_model(model, accelerator)
    config = getattr(bare_model, "config", None)
    num_labels = num_labels if num_labels is not None else config.num_labels
    ignore_index = ignore_index if ignore_index is not None else getattr(config, "ignore_index", IGNORE_INDEX)
    device = next(bare_model.parameters()).device
    if dtype is None and accelerator is not None and device.type == "cuda":
        dtype = autocast_dtype(accelerator.mixed_precision)
    rank, world_size = _process_info(accelerator)
    shard = shard_dataset(dataset, rank, world_size)
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_rows,
        shuffle=False,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        timeout=timeout if num_workers > 0 else 0,
        # One batch ahead a worker (torch's default is 2): the decoded images and masks in flight are what grows
        # with the batch size (docs/benchmarks.md, scale benchmark).
        prefetch_factor=1 if num_workers > 0 else None,
    )
    batches = bounded_batches(loader, timeout, "evaluation data", "pass a longer timeout (worker_timeout in training)")
    evaluator = SegmentationEvaluator(num_labels, ignore_index=ignore_index, device=device, extended=extended)
    was_training = bare_model.training
    bare_model.eval()
    try:
        total = len(loader) if hasattr(shard, "__len__") else None
        for batch in tqdm(batches, total=total, disable=not progress or rank != 0, desc="evaluate"):
            images = [image for image, _, _ in batch]
            predictions = predict_segmentation_tensors(
                bare_model, image_processor, images, device, dtype, batch_size, mode
            )
            for prediction, (_, annotation, image_id) in zip(predictions, batch):
                if annotation is None:
                    raise ValueError(f"row {image_id!r} has no annotation: this split cannot be evaluated")
                evaluator.update(prediction, annotation)
    finally:
        bare_model.train(was_training)
    return evaluator.sync(accelerator).compute()


def format_summary(metrics: dict[str, Any]) -> str:
    """The summary lines: official mIoU first, then the HF mean_iou numbers and the extended official metrics."""
    lines = [f"images: {metrics.get('num_images', '?')}   classes: {metrics.get('num_labels', '?')}"]
    lines.append(f"mIoU (official, mean over all classes): {metrics['mIoU']:.2f}")
    lines.append(
        f"mean_iou (nanmean): {100 * metrics['mean_iou']:.2f}   mean_accuracy: {100 * metrics['mean_accuracy']:.2f}"
        f"   overall_accuracy: {100 * metrics['overall_accuracy']:.2f}"
    )
    if "mBIoU" in metrics:
        lines.append(
            f"mBIoU: {metrics['mBIoU']:.2f}   image accuracy: {metrics['image_accuracy']:.2f}"
            f"   F-measure: {metrics['f_measure']:.2f}"
        )
        by_size = "   ".join(f"{name}: {metrics[f'mIoU_{name}']:.2f}" for name in SIZE_BUCKET_NAMES)
        boundary_by_size = "   ".join(f"B{name}: {metrics[f'mBIoU_{name}']:.2f}" for name in SIZE_BUCKET_NAMES)
        lines.append(f"mIoU by object size   {by_size}")
        lines.append(f"mBIoU by object size  {boundary_by_size}")
    return "\n".join(lines)


def format_iou_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU (official, percent) sorted from best to worst, then the summary, as plain text."""
    ious = metrics["per_class_iou"]
    if class_names is None:
        class_names = [str(i) for i in range(len(ious))]
    if len(class_names) != len(ious):
        raise ValueError(f"{len(class_names)} class names for {len(ious)} classes")
    boundary = metrics.get("per_class_boundary_iou")
    accuracy = metrics.get("per_category_accuracy")
    width = max([len("class")] + [len(name) for name in class_names])
    header = f"{'rank':>4}  {'id':>4}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}"
    header += f"  {'BIoU':>6}" if boundary is not None else ""
    lines = [header, "-" * len(header)]
    order = sorted(range(len(ious)), key=lambda i: (-ious[i], i))
    for rank, i in enumerate(order, 1):
        acc = accuracy[i] if accuracy is not None else float("nan")
        line = f"{rank:>4}  {i:>4}  {class_names[i]:<{width}}  {ious[i]:6.2f}  {100 * acc:6.2f}"
        line += f"  {boundary[i]:6.2f}" if boundary is not None else ""
        lines.append(line)
    lines += ["", format_summary(metrics)]
    return "\n".join(lines)
