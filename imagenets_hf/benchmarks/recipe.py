"""The recipe benchmark behind `scripts/bench_recipe.py`: a published recipe's real model and settings for a few
iterations on whatever device is there, giving the figures the seed table leaves empty ("Mem (GB)", "Inf time
(fps)") and what they imply for a full run.

Per recipe: the model as fine-tuning builds it (`finetune.build_model`, random init, 920 labels; its optimizer and
schedule by `finetune.build_optimizer_and_schedule`), the loss through the model's forward with labels, the recipe's
precision (fp16 = autocast + GradScaler on CUDA; accelerate, and so `finetune`, trains fp16 only on GPUs, so on a CPU
an fp16 recipe runs in float32 and says so), optionally `torch.compile` (inductor, as `--compile true`). It reports
training samples/s on device-resident batches, MFU (FLOPs from torch.utils.flop_counter over a matmul peak measured
in the same dtype), peak training memory, evaluation fps by the official protocol (one image at a time, short side
`eval_short_side`, through `predict_segmentation_tensors`, uncompiled and in the dtype `evaluate_model` uses, as
`finetune` evaluates), the data path's samples/s per DataLoader worker (`measure_data_path`) and the projected wall
time of the full recipe. The measuring tools (matmul peak, FLOP counter, memory) are `imagenets_hf.benchmarks.model`'s.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from imagenets_hf.benchmarks.data import measure_device_path, realistic_samples
from imagenets_hf.benchmarks.model import (
    PeakMemory,
    count_flops,
    measure_matmul_peak,
    resolve_device,
    synchronize,
    tensor_bytes,
)
from imagenets_hf.data.augment import AugmentConfig
from imagenets_hf.data.masks import IGNORE_INDEX
from imagenets_hf.data.transforms import train_augmentation_from_recipe
from imagenets_hf.evaluation.inference import predict_segmentation_tensors
from imagenets_hf.runtime import describe_machine
from imagenets_hf.training.data import AugmentedSegmentationDataset, pack_train_masks
from imagenets_hf.training.finetune import build_image_processor, build_model, build_optimizer_and_schedule
from imagenets_hf.training.recipes import Recipe, load_recipe

PUBLISHED_RECIPES = ("mae-base-pretrained", "mae-base-finetuned", "sere-small-pretrained", "sere-small-finetuned")

# `--toy`: the same recipes shrunk for a CPU (CI): a 2-block ViT 32 wide (patch 16 as published), 64 px crops and an
# evaluation short side of 64, batch 2. Everything else (920 labels, head, optimiser, precision) stays the recipe's.
TOY_OVERRIDES: dict[str, Any] = {
    "encoder_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64},
    "crop_size": 64,
    "resize_scale": [256, 64],
    "eval_short_side": 64,
    "eval_max_long_side": 256,
}
TOY_BATCH_SIZE = 2

# The data path's and the evaluation's image: a typical ImageNet photo size (width x height). The toy evaluates a
# smaller one: post-processing resizes 920 logit maps to the image size, seconds per 500x375 image on a CPU.
IMAGENET_IMAGE_SIZE = (500, 375)
TOY_EVAL_IMAGE_SIZE = (128, 96)


@dataclass(frozen=True)
class Precision:
    """How a recipe's `mixed_precision` runs on a device: `name` ("fp16", "bf16", "fp32"), the autocast dtype
    (None: none), whether a GradScaler scales the loss, and a note on any change from the recipe."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool
    note: str = ""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in (and the matmul peak is measured in)."""
        return self.autocast_dtype or torch.float32


def resolve_precision(mixed_precision: str, device: torch.device) -> Precision:
    """The recipe's `mixed_precision` ("no", "fp16", "bf16") as `finetune` runs it on `device`."""
    if mixed_precision == "fp16":
        if device.type == "cuda":
            return Precision("fp16", torch.float16, True, "fp16 autocast + GradScaler")
        return Precision(
            "fp32",
            None,
            False,
            f"recipe fp16 -> fp32 on {device.type}: accelerate (so finetune) uses fp16 only on GPUs",
        )
    if mixed_precision == "bf16":
        return Precision("bf16", torch.bfloat16, False, "bf16 autocast")
    if mixed_precision in ("no", "fp32"):
        return Precision("fp32", None, False, "float32")
    raise ValueError(f"unknown mixed precision {mixed_precision!r}: expected no, fp16 or bf16")


def evaluation_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `evaluate_model` uses under `finetune`: the training one on CUDA, full precision else."""
    return precision.autocast_dtype if device.type == "cuda" else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    precision: Precision,
    device: torch.device,
    grad_clip: float | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training iteration as `finetune.train_step` runs it with one micro-batch (what accelerate does for it:
    autocast around the forward, GradScaler for fp16): returns the detached loss."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)

    def step(pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _autocast(device, precision.autocast_dtype):
            loss = model(pixel_values=pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_data_path(
    recipe: Recipe, num_images: int = 8, passes: int = 2, seed: int = 0, device: str | torch.device = "auto"
) -> dict[str, float]:
    """Samples/s of the recipe's training data paths on `num_images` realistic 500x375 / 375x500 images
    (`benchmarks.data.realistic_samples`), best of `passes` timed passes after an untimed one, one thread:
    `worker_samples_per_s` (one DataLoader worker: decode + `AugmentedSegmentationDataset`, a batch at a time, the
    masks packed once first as training does) and,
    for the published pipeline, `device_samples_per_s` (the device path on the device that trains, store decoded
    once, on `device`: the one the recipe is benchmarked on)."""
    rows = realistic_samples(num_images, recipe.num_labels or 920, seed=seed)
    augmentation = train_augmentation_from_recipe(recipe)
    masks = pack_train_masks(rows) if isinstance(augmentation, AugmentConfig) else None  # as training does
    dataset = AugmentedSegmentationDataset(rows, augmentation, seed=seed, masks=masks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        keys = list(zip(range(num_images), range(num_images)))
        dataset.__getitems__(keys)
        best = float("inf")
        for repeat in range(passes):
            shifted = [(index, position + (repeat + 1) * num_images) for index, position in keys]
            started = time.perf_counter()
            dataset.__getitems__(shifted)
            best = min(best, time.perf_counter() - started)
        rates = {"worker_samples_per_s": num_images / best}
        if recipe.pipeline == "mmseg":
            device = resolve_device(device)
            config = AugmentConfig.from_recipe(recipe)
            rates["device_samples_per_s"] = measure_device_path(config, rows, device, len(rows), passes)
    finally:
        torch.set_num_threads(threads)
    return rates


def _timed(step: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds for `iters` calls of `step`, queued device work included."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return time.perf_counter() - started


def bench_recipe(
    recipe: Recipe,
    *,
    device: torch.device,
    precision: Precision,
    batch_size: int,
    iters: int,
    warmup: int,
    eval_iters: int,
    eval_image_size: tuple[int, int],
    compile: bool,
    peak_flops: float,
    data_rates: dict[str, float],
    data_workers: int,
) -> dict[str, Any]:
    """One recipe's row (see `run_recipe_benchmark` for the fields)."""
    torch.manual_seed(recipe.seed)
    num_labels = recipe.num_labels or 920
    model = build_model(recipe, [f"class_{i}" for i in range(num_labels)]).to(device)
    model.train()
    crop = recipe.crop_size
    pixel_values = torch.randn(batch_size, 3, crop, crop, device=device)
    labels = torch.randint(0, num_labels, (batch_size, crop, crop), device=device)
    labels[:, : crop // 8] = IGNORE_INDEX  # some ignore, as the padded crops have

    # FLOPs of one sample, eager (the counter does not see inside compiled graphs; the work is the same).
    train_flops = count_flops(lambda: model(pixel_values=pixel_values[:1], labels=labels[:1]).loss.backward(), device)
    model.zero_grad(set_to_none=True)

    optimizer, scheduler = build_optimizer_and_schedule(model, recipe)  # as training builds them
    train_model = torch.compile(model) if compile else model  # accelerate's dynamo_backend="inductor" does this
    step = make_train_step(train_model, optimizer, scheduler, precision, device, recipe.grad_clip)
    losses = []
    first_step_s = _timed(lambda: losses.append(step(pixel_values, labels)), 1, device)  # compiles, if compiling
    _timed(lambda: losses.append(step(pixel_values, labels)), max(warmup - 1, 0), device)
    train_s = _timed(lambda: losses.append(step(pixel_values, labels)), iters, device)
    if not all(math.isfinite(loss.item()) for loss in losses):
        raise FloatingPointError(f"{recipe.name}: non-finite training loss {[loss.item() for loss in losses]}")
    resident = tensor_bytes(model.parameters()) + tensor_bytes(
        v for state in optimizer.state.values() for v in state.values()
    )
    with PeakMemory(device, resident_bytes=resident) as memory:  # one more step, apart from the timing
        step(pixel_values, labels)
    train_samples_per_s = batch_size * iters / train_s

    # Evaluation as finetune runs it: the uncompiled model, one image at a time, in evaluate_model's dtype.
    model.eval()
    image_processor = build_image_processor(recipe)
    eval_dtype = evaluation_dtype(precision, device)
    rng = np.random.default_rng(0)
    width, height = eval_image_size
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    eval_input = tuple(image_processor.model_input_size(image.height, image.width))
    eval_pixels = torch.randn(1, 3, *eval_input, device=device)

    def predict():
        predict_segmentation_tensors(model, image_processor, [image], device, eval_dtype)

    def forward():
        with torch.no_grad(), _autocast(device, eval_dtype):
            model(pixel_values=eval_pixels)

    with torch.no_grad():
        eval_flops = count_flops(forward, device)
    for _ in range(max(warmup, 1)):
        predict()
    eval_s = _timed(predict, eval_iters, device)
    forward_s = _timed(forward, eval_iters, device)

    worker_rate = data_rates["worker_samples_per_s"]
    total_samples = recipe.max_iters * recipe.global_batch_size
    row = {
        "recipe": recipe.name,
        "encoder": recipe.encoder_name,
        "encoder_kwargs": dict(recipe.encoder_kwargs),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "num_labels": num_labels,
        "crop_size": crop,
        "batch_size": batch_size,
        "precision": precision.name,
        "precision_note": precision.note,
        "grad_scaler": precision.grad_scaler,
        "compile": compile,
        "first_step_s": round(first_step_s, 3),
        "train_samples_per_s": round(train_samples_per_s, 3),
        "train_gflops_per_sample": round(train_flops / 1e9, 3),
        "matmul_peak_tflops": round(peak_flops / 1e12, 4),
        "mfu": round(train_samples_per_s * train_flops / peak_flops, 5),
        "train_peak_mem_gib": round(memory.peak_bytes / 2**30, 4),
        "eval_image_wh": [width, height],
        "eval_input_hw": list(eval_input),
        "eval_dtype": str(eval_dtype or torch.float32).removeprefix("torch."),
        "eval_fps": round(eval_iters / eval_s, 3),
        "eval_forward_fps": round(eval_iters / forward_s, 3),
        "eval_gflops_per_image": round(eval_flops / 1e9, 3),
        "data_worker_samples_per_s": round(worker_rate, 2),
        "data_workers": data_workers,
        "data_samples_per_s": round(worker_rate * data_workers, 2),
        "data_workers_needed": math.ceil(train_samples_per_s / worker_rate),
        "max_iters": recipe.max_iters,
        "global_batch_size": recipe.global_batch_size,
        "recipe_devices": recipe.global_batch_size // recipe.per_device_batch_size,
        "projected_train_s": round(total_samples / train_samples_per_s, 1),
        "projected_data_bound_s": round(total_samples / (worker_rate * data_workers), 1),
    }
    if "device_samples_per_s" in data_rates:  # --augment-on-device: no workers, the device makes the batches
        device_rate = data_rates["device_samples_per_s"]
        row["data_device_samples_per_s"] = round(device_rate, 2)
        row["projected_device_data_s"] = round(total_samples / device_rate, 1)
    return row


def release_memory(device: torch.device) -> None:
    """Free what the last recipe held (compiled graphs keep its weights), so the next one's memory is its own."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_recipe_table(summary: dict[str, Any]) -> list[str]:
    """The human-readable table of a `run_recipe_benchmark` result, with a legend."""
    header = (
        f"{'recipe':<22}{'prec':>5}{'train img/s':>12}{'MFU':>7}{'mem GiB':>9}{'eval fps':>10}{'fwd fps':>9}"
        f"{'data/worker':>12}{'workers':>8}{'wall h (1 dev)':>15}{'(n dev)':>10}{'data-bound h':>13}"
    )
    lines = [header, "-" * len(header)]
    for row in summary["results"]:
        devices = row["recipe_devices"]
        lines.append(
            f"{row['recipe']:<22}{row['precision']:>5}{row['train_samples_per_s']:>12.2f}{100 * row['mfu']:>6.1f}%"
            f"{row['train_peak_mem_gib']:>9.3f}{row['eval_fps']:>10.2f}{row['eval_forward_fps']:>9.2f}"
            f"{row['data_worker_samples_per_s']:>12.1f}{row['data_workers']:>8}{row['projected_train_s'] / 3600:>15.2f}"
            f"{row['projected_train_s'] / 3600 / devices:>7.2f} x{devices}{row['projected_data_bound_s'] / 3600:>13.2f}"
        )
    lines.append(f"device {summary['device']} ({summary['machine']}); mem: {summary['memory']}")
    if summary["results"]:
        first = summary["results"][0]
        width, height = first["eval_image_wh"]
        lines.append(
            f"eval fps: a {width}x{height} image at a time ({'x'.join(map(str, first['eval_input_hw']))} model input, "
            f"{first['eval_dtype']}): processor + forward + post-processing; fwd fps: the forward alone"
        )
    lines.append(
        "wall h: max_iters x global batch / train img/s on one device; (n dev): on the recipe's n devices, ideal "
        "scaling; data-bound h: the same samples through `workers` DataLoader workers"
    )
    return lines + [f"precision: {note}" for note in sorted({row["precision_note"] for row in summary["results"]})]


def run_recipe_benchmark(
    recipes: str | Sequence[str] = PUBLISHED_RECIPES,
    *,
    iters: int = 10,
    warmup: int = 2,
    batch_size: int | None = None,
    device: str = "auto",
    mixed_precision: str | None = None,
    compile: bool = False,
    toy: bool = False,
    overrides: dict[str, Any] | None = None,
    eval_iters: int = 10,
    data_images: int = 8,
    data_workers: int | None = None,
    matmul_size: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark each recipe (names or YAML files; a list or a comma-separated string); returns the summary dict (the
    script's JSON line).

    Args:
        iters, warmup: timed and untimed training iterations (the first warm-up iteration compiles, if compiling).
        batch_size: per device (default: the recipe's per_device_batch_size, 32; `toy`: 2).
        mixed_precision: "no", "fp16", "bf16"; default the recipe's (see `resolve_precision` for CPUs).
        toy: apply TOY_OVERRIDES (a tiny encoder at 64 px, for CPUs and CI; batch 2, a 128x96 evaluation image);
            `overrides` (recipe fields) come after.
        eval_iters: images timed one at a time for the evaluation fps.
        data_images, data_workers: images of the data-path measurement; DataLoader workers the data-bound time
            assumes (default the recipe's num_workers).
        matmul_size: side of the peak matmul (0: 8192 on CUDA, 2048 on CPU; 512 with `toy`, as bf16 matmuls are
            emulated, slowly, on CPUs without bf16 units).

    Summary fields: benchmark, device, machine, threads, cpu_count, torch, timm, toy, iters, warmup, eval_iters,
    compile, memory (how peak memory is measured), results (one row per recipe). Row fields: recipe, encoder,
    encoder_kwargs, params_m (millions), num_labels, crop_size, batch_size (per device), precision (what ran:
    fp16/bf16/fp32), precision_note, grad_scaler, compile, first_step_s (the first iteration: compile time when
    compiling), train_samples_per_s, train_gflops_per_sample (forward + backward, flop_counter),
    matmul_peak_tflops (measured, in the training compute dtype), mfu (train_samples_per_s x FLOPs / peak),
    train_peak_mem_gib (CUDA max_memory_allocated in one step; CPU: weights + optimiser state + sampled RSS rise),
    eval_image_wh, eval_input_hw (model input after the processor), eval_dtype, eval_fps (processor + forward +
    post-processing, one image at a time), eval_forward_fps (forward alone), eval_gflops_per_image,
    data_worker_samples_per_s (`measure_data_path`), data_workers, data_samples_per_s (x workers),
    data_workers_needed (to keep up with training), max_iters, global_batch_size, recipe_devices (global / per-device
    batch of the recipe), projected_train_s (max_iters x global batch / train_samples_per_s, one device),
    projected_data_bound_s (the same samples / data_samples_per_s); for the mmseg pipeline also
    data_device_samples_per_s (the device path on this device, `--augment-on-device true`) and
    projected_device_data_s (the recipe's samples / that rate).
    """
    if isinstance(recipes, str):
        recipes = recipes.split(",")
    recipes = [name.strip() for name in recipes if name.strip()]
    log = log or (lambda line: None)
    torch_device = resolve_device(device)
    batch_size = batch_size or (TOY_BATCH_SIZE if toy else None)
    matmul_size = matmul_size or (8192 if torch_device.type == "cuda" else 512 if toy else 2048)
    machine = describe_machine(torch_device)
    log(f"device {torch_device} ({machine}), {torch.get_num_threads()} threads")

    peaks: dict[torch.dtype, float] = {}
    rows = []
    for name in recipes:
        recipe = load_recipe(name, {**(TOY_OVERRIDES if toy else {}), **(overrides or {})})
        precision = resolve_precision(mixed_precision or recipe.mixed_precision, torch_device)
        # the machine may be shared: measure the peak next to each recipe and keep the best seen
        dtype = precision.compute_dtype
        peaks[dtype] = max(peaks.get(dtype, 0.0), measure_matmul_peak(torch_device, dtype, matmul_size))
        data_rates = measure_data_path(recipe, num_images=data_images, device=torch_device)
        row = bench_recipe(
            recipe,
            device=torch_device,
            precision=precision,
            batch_size=batch_size or recipe.per_device_batch_size,
            iters=iters,
            warmup=warmup,
            eval_iters=eval_iters,
            eval_image_size=TOY_EVAL_IMAGE_SIZE if toy else IMAGENET_IMAGE_SIZE,
            compile=compile,
            peak_flops=peaks[dtype],
            data_rates=data_rates,
            data_workers=data_workers or recipe.num_workers,
        )
        release_memory(torch_device)
        rows.append(row)
        log(
            f"{row['recipe']}: {row['train_samples_per_s']:.2f} img/s train ({row['precision']}), "
            f"MFU {100 * row['mfu']:.1f}%, {row['train_peak_mem_gib']:.2f} GiB, eval {row['eval_fps']:.2f} fps"
        )
    return {
        "benchmark": "bench_recipe",
        "device": str(torch_device),
        "machine": machine,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "toy": toy,
        "iters": iters,
        "warmup": warmup,
        "eval_iters": eval_iters,
        "compile": compile,
        "memory": "cuda max_memory_allocated"
        if torch_device.type == "cuda"
        else "cpu: weights + optimiser state + sampled RSS rise in one step",
        "results": rows,
    }
