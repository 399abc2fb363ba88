"""The evaluation-at-scale benchmark behind `scripts/bench_eval_scale.py`: prediction at ImageNet-S919's 920 classes
with the demo recipe's tiny model (random weights): the post-processing's two exact methods (`resized_argmax`'s
"bounds", the CPU default, and "chunks", the GPU default) against the former step (all classes resized at once, then
the argmax; kept here as the reference only), on the same logits.

Reported per path: seconds an image (forward + post-processing) and the process's peak RSS; whether the class maps
are equal to the former's; and the cost of the metric's per-image statistics (`SegmentationEvaluator.update`, plain
and extended: boundary IoU, size buckets, F-measure) on the predicted maps.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imagenets_hf.benchmarks.metric import benchmark_maps
from imagenets_hf.evaluation.inference import image_size
from imagenets_hf.evaluation.metrics import SegmentationEvaluator
from imagenets_hf.model.image_processing_vit_fcn import resized_argmax
from imagenets_hf.runtime import RssPeak, describe_machine, resolve_device

NUM_LABELS = 920  # ImageNet-S919's classes + "other"


def full_resize_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The former post-processing's step (the reference): all classes resized at once, then the argmax."""
    return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False).argmax(dim=1)[0]


def post_process_with(
    image_processor: Any,
    logits: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]],
    resize_argmax: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] = full_resize_argmax,
) -> list[torch.Tensor]:
    """`post_process_semantic_segmentation` with another resize + argmax step (by default the former one): each
    image's map at its working size, then nearest up for images above `max_pixels`."""
    results = []
    for image_logits, (height, width) in zip(logits, target_sizes):
        working = image_processor.working_size(height, width)
        prediction = resize_argmax(image_logits, working)
        if working != (height, width):
            prediction = F.interpolate(prediction[None, None].float(), size=(height, width), mode="nearest")[0, 0]
            prediction = prediction.long()
        results.append(prediction)
    return results


def synthetic_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """RGB images of the given (height, width): smooth colour gradients plus noise (the model's input statistics do
    not matter to the post-processing's cost)."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        base = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
        noise = rng.integers(-20, 21, (height, width, 3))
        images.append(Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)))
    return images


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict_maps(
    model: torch.nn.Module,
    image_processor: Any,
    images: Sequence[Image.Image],
    device: torch.device,
    batch_size: int,
    post_process: Callable[..., list[torch.Tensor]],
) -> list[torch.Tensor]:
    """`predict_segmentation_tensors`'s loop (same-size images share a forward, `batch_size` at most) with the given
    post-processing; the maps go to the CPU one batch at a time, as the evaluator's counts would."""
    sizes = [image_size(image) for image in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (height, width) in enumerate(sizes):
        groups.setdefault(tuple(image_processor.model_input_size(height, width)), []).append(index)
    results: list[torch.Tensor | None] = [None] * len(images)
    with torch.no_grad():
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                part = indices[start : start + batch_size]
                pixel_values = image_processor([images[i] for i in part], return_tensors="pt")["pixel_values"]
                logits = model(pixel_values=pixel_values.to(device)).logits
                for i, prediction in zip(part, post_process(logits, [sizes[i] for i in part])):
                    results[i] = prediction.cpu()
                del logits, pixel_values
    return results


def _measured(device: torch.device, run: Callable[..., Any], *args: Any) -> tuple[Any, float, int]:
    """(value, seconds, peak RSS bytes) of `run(*args)`; on CUDA also resets the allocator's peak first."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    with RssPeak() as rss:
        start = time.perf_counter()
        value = run(*args)
        _synchronize(device)
        seconds = time.perf_counter() - start
    return value, seconds, rss.peak_bytes


def run_eval_scale_benchmark(
    num_images: int = 16,
    height: int = 375,
    width: int = 500,
    large_images: int = 2,
    large_size: tuple[int, int] = (1000, 1000),
    batch_size: int = 8,
    num_labels: int = NUM_LABELS,
    device: str | torch.device = "cpu",
    reference: bool = True,
    metric_images: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Time and peak memory of prediction with today's post-processing and, with `reference`, the former one.

    Images: `num_images` of `height` x `width` and `large_images` of `large_size` (1000 x 1000 is the largest the
    protocol resizes to directly: 3.4 GiB of float32 logits at 920 classes in the former path). The model: the demo
    recipe's (`finetune.build_model`, random init, `num_labels` labels), in float32, batches of `batch_size`.

    Returns a dict: `machine`, `device`, `threads`, the sizes, and per path (`bounds`, `chunks`, `former`)
    `s_per_image` (all images, forward included), `s_per_image_main` (the `height` x `width` images alone),
    `s_per_image_large` and `peak_rss_gb` (the process's, model and images included; on CUDA also `cuda_peak_gb`);
    `forward_s_per_image`; `maps_equal` and `pixels_differing` (per method against former, or bounds against
    chunks without the reference, every image); `speedup` (former's time over each method's);
    `metric_ms_per_image` (`plain`, `extended`) on the first `metric_images` main maps against targets of random
    16-pixel class blocks.
    """
    from imagenets_hf.training.finetune import build_image_processor, build_model
    from imagenets_hf.training.recipes import load_recipe

    device = resolve_device(device)
    recipe = load_recipe("demo")
    torch.manual_seed(seed)
    model = build_model(recipe, [f"class_{i}" for i in range(num_labels)]).to(device).eval()
    image_processor = build_image_processor(recipe)
    main = synthetic_images([(height, width)] * num_images, seed)
    large = synthetic_images([tuple(large_size)] * large_images, seed + 1)

    def method(name):
        return lambda logits, sizes: post_process_with(
            image_processor, logits, sizes, lambda x, size: resized_argmax(x, size, method=name)
        )

    def forward_only(logits, sizes):
        return [torch.zeros(1, dtype=torch.int64)] * len(sizes)

    paths = {"bounds": method("bounds"), "chunks": method("chunks")}
    if reference:
        paths["former"] = lambda logits, sizes: post_process_with(image_processor, logits, sizes)
    predict_maps(model, image_processor, main[:1], device, batch_size, paths["chunks"])  # warm-up (first calls)
    _, forward_s, _ = _measured(device, predict_maps, model, image_processor, main, device, batch_size, forward_only)
    rows: dict[str, dict[str, float]] = {}
    maps: dict[str, list[torch.Tensor]] = {}
    for name, post_process in paths.items():
        main_maps, main_s, main_peak = _measured(
            device, predict_maps, model, image_processor, main, device, batch_size, post_process
        )
        large_maps, large_s, large_peak = _measured(
            device, predict_maps, model, image_processor, large, device, batch_size, post_process
        )
        maps[name] = main_maps + large_maps
        row = {
            "s_per_image": round((main_s + large_s) / max(1, num_images + large_images), 4),
            "s_per_image_main": round(main_s / max(1, num_images), 4),
            "s_per_image_large": round(large_s / large_images, 4) if large_images else None,
            "peak_rss_gb": round(max(main_peak, large_peak) / 1e9, 3),
        }
        if device.type == "cuda":
            row["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
        rows[name] = row
        gc.collect()
    result: dict[str, Any] = {
        "benchmark": "eval_scale",
        "machine": describe_machine(device),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "num_labels": num_labels,
        "images": num_images,
        "size": [height, width],
        "large_images": large_images,
        "large_size": list(large_size),
        "batch_size": batch_size,
        "default_method": "bounds" if device.type == "cpu" else "chunks",  # resized_argmax's "auto"
        "forward_s_per_image": round(forward_s / max(1, num_images), 4),
        **rows,
    }
    reference_maps = maps["former"] if reference else maps["chunks"]
    differing = {
        name: sum(int((a != b).sum()) for a, b in zip(maps[name], reference_maps)) for name in ("bounds", "chunks")
    }
    result["maps_equal"] = not any(differing.values())
    result["pixels_differing"] = differing
    if reference:
        result["speedup"] = {
            name: round(rows["former"]["s_per_image"] / rows[name]["s_per_image"], 2) for name in ("bounds", "chunks")
        }
    result["metric_ms_per_image"] = metric_cost(maps["bounds"][: min(metric_images, num_images)], num_labels, seed)
    return result


def metric_cost(predictions: Sequence[torch.Tensor], num_labels: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds an image of `SegmentationEvaluator.update`, plain and extended, on these maps (`compute`, once
    per evaluation, is not counted)."""
    if not predictions:
        return {}
    height, width = predictions[0].shape
    targets = [torch.from_numpy(t) for _, t in benchmark_maps(len(predictions), height, width, num_labels, seed)]
    costs = {}
    for name, extended in (("plain", False), ("extended", True)):
        evaluator = SegmentationEvaluator(num_labels, extended=extended)
        start = time.perf_counter()
        for prediction, target in zip(predictions, targets):
            evaluator.update(prediction, target)
        costs[name] = round(1000 * (time.perf_counter() - start) / len(predictions), 2)
    return costs
