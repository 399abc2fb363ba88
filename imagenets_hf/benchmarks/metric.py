"""The metric benchmark behind `scripts/bench_metric.py`: the core vs torchmetrics vs the evaluate module."""

from __future__ import annotations

import gc
import os
import tempfile
import time
import tracemalloc
from typing import Any

import numpy as np
import torch

from imagenets_hf.evaluation.metrics import SegmentationEvaluator
from imagenets_hf.runtime import RssPeak, describe_machine

IGNORE = 1000


def benchmark_maps(num_images: int, height: int, width: int, num_labels: int, seed: int = 0):
    """Random 16-pixel blocks of classes with 5% ignored pixels; predictions right on 70% of the pixels."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(num_images):
        coarse = rng.integers(0, num_labels, (height // 16 + 1, width // 16 + 1))
        target = np.kron(coarse, np.ones((16, 16), dtype=np.int64))[:height, :width]
        noise = rng.integers(0, num_labels, (height, width))
        prediction = np.where(rng.random((height, width)) < 0.7, target, noise)
        target = np.where(rng.random((height, width)) < 0.05, IGNORE, target)
        maps.append((prediction.astype(np.int64), target.astype(np.int64)))
    return maps


def _measure(run) -> tuple[Any, dict[str, float]]:
    """Time a run on its own (tracemalloc slows Python-heavy code), then run it again under tracemalloc and the RSS
    sampler for the memory numbers."""
    gc.collect()
    start = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - start
    gc.collect()
    with RssPeak() as rss:  # torch allocations are invisible to tracemalloc
        tracemalloc.start()
        run()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return value, {"seconds": seconds, "peak_heap_mb": peak / 2**20, "rss_growth_mb": rss.growth_bytes / 2**20}


def run_metric_benchmark(num_images=200, height=375, width=500, num_labels=920, seed=0) -> dict[str, Any]:
    """Seconds, memory growth and max |per-class IoU difference| of each contender on the same maps."""
    import evaluate
    from torchmetrics.classification import MulticlassJaccardIndex

    from imagenets_hf.evaluation import METRIC_PATH

    maps = benchmark_maps(num_images, height, width, num_labels, seed)
    tensors = [(torch.from_numpy(p), torch.from_numpy(t)) for p, t in maps]

    def core(extended):
        def run():
            evaluator = SegmentationEvaluator(num_labels, extended=extended)
            for prediction, target in tensors:
                evaluator.update(prediction, target)
            return np.array(evaluator.compute()["per_category_iou"])

        return run

    def torchmetrics_run():
        metric = MulticlassJaccardIndex(num_classes=num_labels, average="none", ignore_index=IGNORE)
        for prediction, target in tensors:
            metric.update(prediction[None], target[None])
        return metric.compute().double().numpy()

    with tempfile.TemporaryDirectory() as cache_dir:
        module = evaluate.load(METRIC_PATH, cache_dir=cache_dir)

        def evaluate_run():
            for prediction, target in maps:
                module.add(prediction=prediction, reference=target)
            return np.asarray(module.compute(num_labels=num_labels, ignore_index=IGNORE)["per_category_iou"])

        contenders = {}
        reference = None
        for name, run in (
            ("core", core(False)),
            ("core_extended", core(True)),
            ("torchmetrics", torchmetrics_run),
            ("evaluate_module", evaluate_run),
        ):
            values, row = _measure(run)
            if reference is None:
                reference = values
            # torchmetrics gives 0 where the union is empty; compare where both are defined
            both = ~np.isnan(values) & ~np.isnan(reference)
            row["max_abs_diff"] = float(np.max(np.abs(values[both] - reference[both]))) if both.any() else 0.0
            contenders[name] = {key: round(value, 6) for key, value in row.items()}
    return {
        "benchmark": "metric",
        "images": num_images,
        "size": [height, width],
        "num_labels": num_labels,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": describe_machine(torch.device("cpu")),
        "contenders": contenders,
    }
