"""The training-data benchmark behind `scripts/bench_data.py`: decode + the published augmentation per DataLoader
worker, torchvision v2 (ours) vs a straightforward PIL + NumPy implementation (the peer, `PilPipeline`).

Both sides read the same train-semi rows of the mini dataset (made if absent), decode the JPEG and the mask, and run
the same steps (keep-ratio resize to (1024, 256) x U(0.5, 2), crop with cat_max_ratio 0.75, flip, photometric
distortion, normalise, pad) in one process with one thread, as one DataLoader worker does.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagenets_hf.data.imagenets import load_imagenets
from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask
from imagenets_hf.data.mini import ensure_mini_dataset
from imagenets_hf.data.transforms import IMAGENET_MEAN_255, IMAGENET_STD_255, mmseg_train_transform, to_tv_tensors


class PilPipeline:
    """The published training steps with PIL and NumPy (the peer)."""

    def __init__(self, crop=224, scale=(1024, 256), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, seed=0):
        self.crop, self.scale, self.ratio_range, self.cat_max_ratio = crop, scale, ratio_range, cat_max_ratio
        self.rng = np.random.default_rng(seed)
        self.mean = np.array(IMAGENET_MEAN_255, dtype=np.float32)
        self.std = np.array(IMAGENET_STD_255, dtype=np.float32)

    def _box(self, h, w):
        top = self.rng.integers(0, max(h - self.crop, 0) + 1)
        left = self.rng.integers(0, max(w - self.crop, 0) + 1)
        return top, left

    def __call__(self, image: Image.Image, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one decoded sample: (3, crop, crop) float32 normalised image, (crop, crop) int64 ids."""
        image = image.convert("RGB")
        w, h = image.size
        ratio = self.rng.uniform(*self.ratio_range)
        factor = min(int(self.scale[0] * ratio) / max(h, w), int(self.scale[1] * ratio) / min(h, w))
        size = (int(w * factor + 0.5), int(h * factor + 0.5))
        image = image.resize(size, Image.BILINEAR)
        mask = np.asarray(Image.fromarray(ids.astype(np.int32)).resize(size, Image.NEAREST))
        h, w = mask.shape
        top, left = self._box(h, w)
        for _ in range(10):
            crop = mask[top : top + self.crop, left : left + self.crop]
            counts = np.bincount(crop[crop != IGNORE_INDEX].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
            top, left = self._box(h, w)
        image = image.crop((left, top, min(left + self.crop, w), min(top + self.crop, h)))
        mask = mask[top : top + self.crop, left : left + self.crop]
        if self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            mask = mask[:, ::-1]
        img = np.asarray(image, dtype=np.float32)
        if self.rng.integers(2):
            img = np.clip(img + self.rng.uniform(-32, 32), 0, 255).astype(np.uint8).astype(np.float32)
        contrast_first = self.rng.integers(2)
        if contrast_first and self.rng.integers(2):
            img = np.clip(img * self.rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8).astype(np.float32)
        do_saturation, do_hue = self.rng.integers(2), self.rng.integers(2)
        if do_saturation or do_hue:
            hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV"), dtype=np.float32)
            if do_saturation:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.rng.uniform(0.5, 1.5), 0, 255)
            if do_hue:
                hsv[..., 0] = (hsv[..., 0] + self.rng.integers(-18, 18) * 256 / 180) % 256
            img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
        if not contrast_first and self.rng.integers(2):
            img = np.clip(img * self.rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8).astype(np.float32)
        img = (img - self.mean) / self.std
        out_img = np.zeros((self.crop, self.crop, 3), dtype=np.float32)
        out_mask = np.full((self.crop, self.crop), IGNORE_INDEX, dtype=np.int64)
        out_img[: img.shape[0], : img.shape[1]] = img
        out_mask[: mask.shape[0], : mask.shape[1]] = mask
        return torch.from_numpy(out_img).permute(2, 0, 1), torch.from_numpy(out_mask)


def measure_rate(rows, passes: int, step) -> tuple[float, int]:
    """Samples per second of `step(image, annotation)` over `passes` passes of `rows`, and the sample count."""
    count = 0
    started = time.perf_counter()
    for _ in range(passes):
        for index in range(len(rows)):
            row = rows[index]
            image, mask = step(row["image"], row["annotation"])
            assert image.shape[-2:] == mask.shape
            count += 1
    return count / (time.perf_counter() - started), count


def run_data_benchmark(data_dir: str = "data/mini", passes: int = 3, crop_size: int = 224) -> dict[str, Any]:
    """Samples/s of both pipelines over `passes` passes of the train-semi rows in `data_dir` (the mini dataset is made
    there if absent), after one untimed pass each; returns the summary dict (the script's JSON line).

    Sets torch to one thread for the rest of the process, as in one DataLoader worker.
    """
    torch.set_num_threads(1)  # one DataLoader worker
    ensure_mini_dataset(data_dir)
    rows = load_imagenets(data_dir, "train_semi")
    transform = mmseg_train_transform(crop_size=crop_size)
    torch.manual_seed(0)

    def torchvision_step(image, annotation):
        return transform(*to_tv_tensors(image, annotation))

    pil = PilPipeline(crop=crop_size)

    def pil_step(image, annotation):
        return pil(image, decode_mask(annotation))

    measure_rate(rows, 1, torchvision_step)  # warm-up (imports, caches)
    measure_rate(rows, 1, pil_step)
    tv_rate, count = measure_rate(rows, passes, torchvision_step)
    pil_rate, _ = measure_rate(rows, passes, pil_step)
    return {
        "benchmark": "bench_data",
        "data": data_dir,
        "samples": count,
        "crop_size": crop_size,
        "threads": 1,
        "torchvision_v2_samples_per_s": round(tv_rate, 1),
        "pil_samples_per_s": round(pil_rate, 1),
        "speedup_vs_pil": round(tv_rate / pil_rate, 3),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def format_data_table(result: dict[str, Any]) -> list[str]:
    """The printed table of a `run_data_benchmark` result."""
    return [
        f"{'pipeline':<28}{'samples/s per worker':>22}",
        f"{'torchvision v2 (ours)':<28}{result['torchvision_v2_samples_per_s']:>22.1f}",
        f"{'PIL + NumPy (peer)':<28}{result['pil_samples_per_s']:>22.1f}",
    ]
