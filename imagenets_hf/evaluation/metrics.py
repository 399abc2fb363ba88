"""One metric core for ImageNet-S: a confusion matrix accumulated on the predictions' device, from which every number
of the official evaluator (LUSSeg/ImageNet-S `evaluation/`, LUSSeg/PASS `evaluator.py`) and of HF evaluate's
`mean_iou` is derived.

Definitions, as the official code has them:

- Per image, ground-truth pixels equal to `ignore_index` (1000) are dropped; ids outside 0..num_labels-1 are not
  counted in any class (the official `torch.histc` drops them), but a pixel whose ground truth is in range and whose
  prediction is not still counts in that class's ground-truth area. The confusion matrix therefore has one extra
  "out of range" row and column internally; `confusion_matrix` is the num_labels x num_labels part.
- IoU_c = TP_c / (T_c + P_c - TP_c + 1e-10) * 100; mIoU is the plain mean over all num_labels classes (a class absent
  from both prediction and ground truth counts as 0). HF `mean_iou` uses TP / union without epsilon and nanmean.
- Image-level accuracy: the non-background class with the largest predicted area (first on ties) is present in both
  the prediction and the ground truth.
- F-measure: foreground (id > 0) against background per image, F = (1 + b) P R / (b P + R) with b = 0.3 used as
  beta squared (the code multiplies precision by 0.3 directly), eps 1e-20, averaged over images.
- Boundary IoU: a pixel of class c is a boundary pixel when a pixel of another class, or the image border, lies within
  d = max(1, round(0.03 * image diagonal)) pixels (chessboard distance: d iterations of a 3x3 erosion of the
  zero-padded class mask). Boundaries are found on the whole map (the ignore region is a region of its own), then
  ignored pixels are dropped; per class, BIoU = |B_pred & B_gt & same class| / union; mBIoU over all classes.
- mIoU by object size: each non-background ground-truth class of an image is bucketed by ceil(100 * area / valid
  pixels): <= 5 S, <= 25 MS, <= 50 ML, else L. A bucket's counts use the background pixels plus the pixels of its
  classes; its mIoU is the mean over classes whose ground-truth area in that bucket is > 0 (NaN if none).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagenets_hf.data.masks import IGNORE_INDEX
from imagenets_hf.runtime import one_thread

IOU_EPSILON = 1e-10
FMEASURE_BETA_SQUARED = 0.3
FMEASURE_EPSILON = 1e-20
BOUNDARY_DILATION_RATIO = 0.03
# Object-size buckets: upper bounds (percent of the valid pixels, rounded up) of S, MS, ML; the rest is L.
SIZE_BUCKET_NAMES = ("S", "MS", "ML", "L")
SIZE_BUCKET_UPPER_PERCENT = (5, 25, 50)


def as_label_tensor(array: Any, device: torch.device | str | None = None, name: str = "map") -> torch.Tensor:
    """An HxW id map (tensor, NumPy array or PIL image) as an int64 tensor, on `device` if given."""
    if isinstance(array, torch.Tensor):
        tensor = array
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"{name}: expected integer class ids, got dtype {tensor.dtype}")
    else:
        array = np.asarray(array)
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise TypeError(f"{name}: expected integer class ids, got dtype {array.dtype}")
        tensor = torch.from_numpy(array.astype(np.int64, copy=False))
    if tensor.ndim != 2:
        raise ValueError(f"{name}: expected an HxW map of class ids, got shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.int64)


def boundary_dilation(height: int, width: int, ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary width in pixels: round(ratio * image diagonal), at least 1 (as the Boundary IoU reference code)."""
    return max(1, int(round(ratio * math.sqrt(height**2 + width**2))))


def _window_max(values: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Running max over `size` consecutive entries along `dim` (output shorter by size - 1), in O(log size) passes:
    maxima over power-of-two windows, then two overlapping ones cover the window."""
    span, result = 1, values
    while 2 * span <= size:
        length = result.shape[dim] - span
        result = torch.maximum(result.narrow(dim, 0, length), result.narrow(dim, span, length))
        span *= 2
    length = values.shape[dim] - size + 1
    return torch.maximum(result.narrow(dim, 0, length), result.narrow(dim, size - span, length))


def boundary_pixels(ids: torch.Tensor, dilation: int) -> torch.Tensor:
    """Bool HxW map: pixels whose (2*dilation+1)^2 window holds another id or leaves the image.

    Equal to the official per-class `mask - erode(zero-padded mask, 3x3, iterations=dilation)` summed over the
    classes, since the classes partition the image: a window max differing from its min means another id is near.
    """
    padded = F.pad(ids[None, None], (dilation,) * 4, value=-1)[0, 0]  # -1: outside the image is "another id"
    size = 2 * dilation + 1
    window_max = _window_max(_window_max(padded, size, 0), size, 1)
    window_min = -_window_max(_window_max(-padded, size, 0), size, 1)
    return window_max != window_min


class SegmentationEvaluator:
    """Accumulates ImageNet-S segmentation metrics image by image; exact across processes.

    Args:
        num_labels: number of classes, background ("other", id 0) included (e.g. 920 for ImageNetS919).
        ignore_index: ground-truth id excluded from every metric (1000).
        device: where the counts live; by default the device of the first prediction.
        extended: also accumulate the per-image official metrics (image-level accuracy, boundary IoU, mIoU by object
            size, F-measure). `False` is the fast path (confusion matrix only) for periodic validation.

    Example:
        >>> evaluator = SegmentationEvaluator(num_labels=3)
        >>> evaluator.update(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [2, 1000]]))
        >>> round(evaluator.compute()["mIoU"], 6)
        100.0
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
        extended: bool = True,
    ):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.device = torch.device(device) if device is not None else None
        self.extended = extended
        self.reset()

    # ---- state -------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything accumulated."""
        self._counts: torch.Tensor | None = None  # int64, all integer counters in one buffer (one all-reduce)
        self._sums: torch.Tensor | None = None  # float64: [F-measure sum]
        self._synced: tuple[torch.Tensor, torch.Tensor] | None = None

    def _layout(self) -> dict[str, tuple[int, ...]]:
        n = self.num_labels
        layout = {"pairs": (n + 1, n + 1), "num_images": (1,)}
        if self.extended:
            layout.update(
                image_correct=(1,),
                boundary=(3, n),  # rows: intersection, predicted, ground truth
                size=(4, 3, n),  # bucket x (intersection, predicted, ground truth) x class
                size_boundary=(4, 3, n),
            )
        return layout

    def _allocate(self, device: torch.device) -> None:
        total = sum(math.prod(shape) for shape in self._layout().values())
        self._counts = torch.zeros(total, dtype=torch.int64, device=device)
        self._sums = torch.zeros(1, dtype=torch.float64, device=device)

    def _views(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape in self._layout().items():
            size = math.prod(shape)
            views[name] = counts[offset : offset + size].view(shape)
            offset += size
        return views

    @property
    def num_images(self) -> int:
        """Images counted so far (all processes after `sync`)."""
        counts, _ = self._state()
        return int(self._views(counts)["num_images"].item())

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """num_labels x num_labels int64 counts, rows ground truth, columns prediction (ignored pixels dropped)."""
        counts, _ = self._state()
        n = self.num_labels
        return self._views(counts)["pairs"][:n, :n]

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._synced is not None:
            return self._synced
        if self._counts is None:
            self._allocate(self.device or torch.device("cpu"))
        return self._counts, self._sums

    # ---- accumulation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, prediction: Any, target: Any) -> None:
        """Add one image: `prediction` and `target` are HxW id maps at the original image size (a 3-D batch of
        same-size maps is added image by image)."""
        if isinstance(prediction, (torch.Tensor, np.ndarray)) and prediction.ndim == 3:
            if len(prediction) != len(target):
                raise ValueError(f"batch sizes differ: {len(prediction)} predictions, {len(target)} targets")
            for single_prediction, single_target in zip(prediction, target):
                self.update(single_prediction, single_target)
            return
        device = self.device
        if device is None:
            device = prediction.device if isinstance(prediction, torch.Tensor) else torch.device("cpu")
        # One image's statistics are many small ops: on the CPU, one thread is 5-30 times faster than two on a busy
        # 2-core machine (docs/benchmarks.md, evaluation at 920 classes).
        with one_thread() if torch.device(device).type == "cpu" else contextlib.nullcontext():
            self._update_one(prediction, target, device)

    def _update_one(self, prediction: Any, target: Any, device: torch.device) -> None:
        pred = as_label_tensor(prediction, device, "prediction")
        gt = as_label_tensor(target, device, "target")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(gt.shape)}")
        if self._counts is None:
            self._allocate(device)
        elif self._counts.device != device:
            pred, gt = pred.to(self._counts.device), gt.to(self._counts.device)
        self._synced = None
        views = self._views(self._counts)
        n = self.num_labels

        valid = gt != self.ignore_index
        pred_valid, gt_valid = pred[valid], gt[valid]
        # Out-of-range ids go to bin n: not counted in any class, as torch.histc in the official code.
        pred_bin = torch.where((pred_valid >= 0) & (pred_valid < n), pred_valid, n)
        gt_bin = torch.where((gt_valid >= 0) & (gt_valid < n), gt_valid, n)
        views["pairs"].view(-1).add_(torch.bincount(gt_bin * (n + 1) + pred_bin, minlength=(n + 1) ** 2))
        views["num_images"].add_(1)
        if self.extended:
            self._update_extended(views, pred, gt, valid, pred_valid, gt_valid, pred_bin, gt_bin)

    def _update_extended(self, views, pred, gt, valid, pred_valid, gt_valid, pred_bin, gt_bin) -> None:
        n = self.num_labels
        same = pred_bin == gt_bin  # both in range and equal, or both out of range (dropped below)

        def histogram(bins: torch.Tensor, mask: torch.Tensor | None = None, groups: torch.Tensor | None = None):
            if mask is not None:
                bins = bins[mask]
                groups = groups[mask] if groups is not None else None
            if groups is None:
                return torch.bincount(bins, minlength=n + 1)[:n]
            return torch.bincount(groups * (n + 1) + bins, minlength=4 * (n + 1)).view(4, n + 1)[:, :n]

        pred_area = histogram(pred_bin)
        gt_area = histogram(gt_bin)

        # Image-level accuracy: the non-background class with the largest predicted area.
        if n > 1:
            label = int(torch.argmax(pred_area[1:])) + 1
            views["image_correct"].add_(int(gt_area[label] > 0 and pred_area[label] > 0))

        # F-measure of foreground (id > 0) against background, on the raw ids as the official code.
        fg_gt, fg_pred = gt_valid > 0, pred_valid > 0
        t, p = fg_gt.sum().double(), fg_pred.sum().double()
        tp = (fg_gt & fg_pred).sum().double()
        recall, precision = tp / (t + FMEASURE_EPSILON), tp / (p + FMEASURE_EPSILON)
        beta2 = FMEASURE_BETA_SQUARED
        self._sums[0] += (1 + beta2) * precision * recall / (beta2 * precision + recall + FMEASURE_EPSILON)

        # Boundaries on the whole maps, then restricted to the valid pixels.
        dilation = boundary_dilation(*gt.shape)
        pred_edge = boundary_pixels(pred, dilation)[valid]
        gt_edge = boundary_pixels(gt, dilation)[valid]
        both_edge = pred_edge & gt_edge & same
        views["boundary"][0] += histogram(gt_bin, both_edge)
        views["boundary"][1] += histogram(pred_bin, pred_edge)
        views["boundary"][2] += histogram(gt_bin, gt_edge)

        # Object sizes: bucket every non-background ground-truth class of this image (exact integer ceil).
        num_valid = int(gt_bin.numel())
        if num_valid == 0:
            return
        class_counts = torch.bincount(gt_bin, minlength=n + 1)
        percent = (100 * class_counts + num_valid - 1) // num_valid
        bucket_of_class = torch.full_like(class_counts, -1)
        bucket_of_class[class_counts > 0] = 3
        for bucket, upper in reversed(list(enumerate(SIZE_BUCKET_UPPER_PERCENT))):
            bucket_of_class[(class_counts > 0) & (percent <= upper)] = bucket
        bucket_of_class[0] = -1
        present = torch.zeros(4, dtype=torch.bool, device=gt_bin.device)
        present[bucket_of_class[bucket_of_class >= 0]] = True

        pixel_bucket = bucket_of_class[gt_bin]
        foreground = pixel_bucket >= 0
        background = gt_bin == 0
        for name, pred_mask, gt_mask, both_mask in (
            ("size", None, None, same),
            ("size_boundary", pred_edge, gt_edge, both_edge),
        ):
            rows = []
            for bins, mask in ((gt_bin, both_mask), (pred_bin, pred_mask), (gt_bin, gt_mask)):
                fg_mask = foreground if mask is None else foreground & mask
                bg_mask = background if mask is None else background & mask
                grouped = histogram(bins, fg_mask, pixel_bucket)
                # Background pixels belong to every bucket that holds a class in this image.
                rows.append(grouped + present[:, None] * histogram(bins, bg_mask)[None])
            views[name] += torch.stack(rows, dim=1)

    # ---- across processes --------------------------------------------------------------------------------------
    def sync(self, accelerator: Any = None) -> SegmentationEvaluator:
        """Sum the counts of all processes (each process must have added distinct images). Idempotent: later calls
        recompute the total from this process's own counts. Collective: every process must call it."""
        counts, sums = self._counts, self._sums
        if counts is None:
            self._allocate(self.device or torch.device("cpu"))
            counts, sums = self._counts, self._sums
        if accelerator is not None and accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                device = counts.device
                if torch.distributed.get_backend() == "nccl":
                    device = torch.device("cuda", torch.cuda.current_device())
                counts, sums = counts.to(device, copy=True), sums.to(device, copy=True)
                torch.distributed.all_reduce(counts)
                torch.distributed.all_reduce(sums)
        self._synced = (counts.to(self._counts.device), sums.to(self._sums.device))
        return self

    # ---- results -----------------------------------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """All metrics as plain Python numbers and lists (JSON-ready; NaN where a mean has nothing to average).

        Keys: "mIoU", "per_class_iou" (official, percent); "mean_iou", "mean_accuracy", "overall_accuracy",
        "per_category_iou", "per_category_accuracy" (HF mean_iou, fractions); "num_images", "num_labels"; and with
        `extended`: "image_accuracy", "f_measure", "mBIoU", "per_class_boundary_iou", "mIoU_S", "mIoU_MS",
        "mIoU_ML", "mIoU_L", "mBIoU_S", ... (percent).
        """
        counts, sums = self._state()
        views = {name: view.cpu().to(torch.float64) for name, view in self._views(counts).items()}
        n = self.num_labels
        pairs = views["pairs"]
        intersection = torch.diagonal(pairs)[:n]
        gt_area = pairs[:n, :].sum(dim=1)  # includes pixels predicted out of range
        pred_area = pairs[:, :n].sum(dim=0)  # includes pixels whose ground truth is out of range
        union = gt_area + pred_area - intersection
        iou = official_iou(intersection, pred_area, gt_area)
        num_images = int(views["num_images"].item())
        with np.errstate(divide="ignore", invalid="ignore"):
            hf_iou = (intersection / union).numpy()
            hf_accuracy = (intersection / gt_area).numpy()
            results: dict[str, Any] = {
                "mIoU": float(iou.mean()),
                "per_class_iou": iou.tolist(),
                "mean_iou": _nanmean(hf_iou),
                "mean_accuracy": _nanmean(hf_accuracy),
                "overall_accuracy": float(intersection.sum() / gt_area.sum()),
                "per_category_iou": hf_iou.tolist(),
                "per_category_accuracy": hf_accuracy.tolist(),
                "num_images": num_images,
                "num_labels": n,
            }
        if not self.extended:
            return results
        images = max(num_images, 1)
        results["image_accuracy"] = float(views["image_correct"].item()) / images * 100
        results["f_measure"] = float(sums.cpu()[0].item()) / images * 100
        boundary = views["boundary"]
        boundary_iou = official_iou(boundary[0], boundary[1], boundary[2])
        results["mBIoU"] = float(boundary_iou.mean())
        results["per_class_boundary_iou"] = boundary_iou.tolist()
        for prefix, name in (("mIoU", "size"), ("mBIoU", "size_boundary")):
            for bucket, bucket_name in enumerate(SIZE_BUCKET_NAMES):
                inter, pred, gt = views[name][bucket]
                bucket_iou = official_iou(inter, pred, gt)[gt > 0]
                results[f"{prefix}_{bucket_name}"] = float(bucket_iou.mean()) if len(bucket_iou) else float("nan")
        return results


def official_iou(intersection: torch.Tensor, pred_area: torch.Tensor, gt_area: torch.Tensor) -> torch.Tensor:
    """Per-class IoU in percent, the official formula: TP / (T + P - TP + 1e-10) * 100 (absent classes give 0)."""
    return intersection / (pred_area + gt_area - intersection + IOU_EPSILON) * 100


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
