"""The inference-mode benchmark behind `scripts/bench_modes.py`: a saved model's mIoU and prediction speed on a
split under each inference mode (`imagenets_hf.evaluation.modes`).

The images and masks are decoded once beforehand; the time is the prediction's alone (forward passes and the class
maps, as `evaluate_model` runs them, batch by batch), after one untimed image per mode; the mIoU is the official one
(`SegmentationEvaluator`) of the same maps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from imagenets_hf.evaluation.modes import MMSEG_SCALES, InferenceMode

# The modes the benchmark knows by name: the official protocol, sliding windows (the recipe's crop), flip,
# mmsegmentation's usual scales, both, and both over sliding windows.
NAMED_MODES = {
    "whole": InferenceMode(),
    "slide": InferenceMode("slide"),
    "flip": InferenceMode(flip=True),
    "ms": InferenceMode(scales=MMSEG_SCALES),
    "ms+flip": InferenceMode(scales=MMSEG_SCALES, flip=True),
    "slide+ms+flip": InferenceMode("slide", scales=MMSEG_SCALES, flip=True),
}


def run_modes_benchmark(
    model_name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    modes: Sequence[str] = tuple(NAMED_MODES),
    split: str = "validation",
    images: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, Any]:
    """{"modes": {name: {"mode": ..., "mIoU": ..., "images_per_second": ..., "seconds": ...}}, ...} for each
    named mode (`NAMED_MODES`) on the first `images` rows of `split` (all when None)."""
    unknown = [name for name in modes if name not in NAMED_MODES]
    if unknown:
        raise ValueError(f"unknown mode name(s) {', '.join(unknown)}; expected some of {', '.join(NAMED_MODES)}")
    from imagenets_hf.data.imagenets import load_imagenets
    from imagenets_hf.data.masks import decode_mask
    from imagenets_hf.evaluation.inference import predict_segmentation_tensors
    from imagenets_hf.evaluation.loading import dataset_class_names, load_model_and_processor, resolve_mode
    from imagenets_hf.evaluation.metrics import SegmentationEvaluator
    from imagenets_hf.runtime import describe_machine, resolve_device

    resolved = {name: resolve_mode(NAMED_MODES[name], model_name_or_path) for name in modes}
    device = resolve_device(device or "auto")
    model, processor = load_model_and_processor(model_name_or_path, device, names=dataset_class_names(data_dir))
    rows = load_imagenets(data_dir, split=split)
    rows = rows.select(range(min(images, len(rows)))) if images is not None else rows
    decoded = [(row["image"].convert("RGB"), decode_mask(row["annotation"])) for row in rows]
    pictures = [image for image, _ in decoded]
    results = {}
    for name, mode in resolved.items():
        predict_segmentation_tensors(model, processor, pictures[:1], device, None, batch_size, mode)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        maps = []
        for first in range(0, len(pictures), batch_size):
            maps += predict_segmentation_tensors(
                model, processor, pictures[first : first + batch_size], device, None, batch_size, mode
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        evaluator = SegmentationEvaluator(model.config.num_labels, device=device)
        for prediction, (_, annotation) in zip(maps, decoded):
            evaluator.update(prediction, torch.from_numpy(annotation))
        results[name] = {
            "mode": mode.to_dict(),
            "describe": mode.describe(),
            "mIoU": round(evaluator.compute()["mIoU"], 2),
            "images_per_second": round(len(pictures) / seconds, 2),
            "seconds": round(seconds, 3),
        }
    return {
        "benchmark": "modes",
        "model": os.fspath(model_name_or_path),
        "data_dir": os.fspath(data_dir),
        "split": split,
        "images": len(pictures),
        "batch_size": batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": describe_machine(device),
        "modes": results,
    }


def format_modes_table(result: dict[str, Any]) -> str:
    """The Markdown table of `run_modes_benchmark`'s result."""
    lines = ["| mode | mIoU | images/s |", "|---|---|---|"]
    for name, row in result["modes"].items():
        lines.append(f"| `{name}`: {row['describe']} | {row['mIoU']:.2f} | {row['images_per_second']:.2f} |")
    return "\n".join(lines)
