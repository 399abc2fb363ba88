# Copyright 2025 The imagenets-hf authors. Licensed under the Apache License, Version 2.0.
"""ImageNet-S mean IoU: the official ImageNet-S mIoU and HF `mean_iou`'s outputs, with `mean_iou`'s call shape.

Self-contained (a Hub metric cannot import the imagenets_hf package): this file carries its own copy of the counting
core of `imagenets_hf.evaluation.metrics`, and a test checks that both agree.

Unlike `mean_iou`, which PNG-encodes every map into its Arrow cache and decodes them all at compute time, each added
(prediction, reference) pair is reduced at once to the few (reference id, predicted id, pixel count) triples it holds,
so the cache stays small (tens of numbers per image) and `compute` only sums them.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean Intersection-over-Union for ImageNet-S semantic segmentation. Returns the official ImageNet-S mIoU (the plain mean
over all num_labels classes of TP / (T + P - TP + 1e-10), absent classes counting 0, in percent) and per-class IoU,
together with the outputs of HF evaluate's `mean_iou` (nanmean IoU, mean and overall accuracy, per-category IoU and
accuracy). Ground-truth pixels equal to `ignore_index` are dropped; ids outside 0..num_labels-1 count in no class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted maps of class ids, each (height, width); sizes may differ between images.
        An (height, width, 3) uint8 array or RGB image is read as the ImageNet-S encoding (id = R + 256 * G).
    references (`List[ndarray]`): ground-truth maps, same shapes as the predictions.
    num_labels (`int`): number of classes, background included (51, 301 or 920 for ImageNet-S 50/300/919).
    ignore_index (`int`, defaults to 1000): ground-truth id excluded from evaluation.
    nan_to_num (`int`, *optional*): replace NaN values in the results by this number.
    label_map (`dict`, *optional*): old -> new ground-truth ids, all mappings use the original ids.
    reduce_labels (`bool`, defaults to `False`): as `mean_iou`: ground-truth 0 becomes 255, the rest is reduced by 1.

Returns:
    mIoU (`float`): official ImageNet-S mIoU in percent (mean over all classes, absent classes 0).
    per_class_iou (`ndarray`): official per-class IoU in percent.
    mean_iou (`float`): nanmean of per_category_iou (as `mean_iou`).
    mean_accuracy (`float`), overall_accuracy (`float`), per_category_iou (`ndarray`),
    per_category_accuracy (`ndarray`): as `mean_iou`.
    num_images (`int`): number of maps evaluated.

Examples:
    >>> metric = evaluate.load("path/to/imagenets_mean_iou")
    >>> metric.add_batch(predictions=[np.array([[0, 1], [2, 2]])], references=[np.array([[0, 1], [2, 1000]])])
    >>> results = metric.compute(num_labels=3, ignore_index=1000)
    >>> round(results["mIoU"], 4)
    100.0
"""

_CITATION = """\
@article{gao2022luss,
  title={Large-scale Unsupervised Semantic Segmentation},
  author={Gao, Shanghua and Li, Zhong-Yu and Yang, Ming-Hsuan and Cheng, Ming-Ming and Han, Junwei and Torr, Philip},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2022}
}
"""

IGNORE_INDEX = 1000
IOU_EPSILON = 1e-10
# Largest id range for which pairs are counted with one dense bincount; beyond it np.unique is used.
_DENSE_PAIR_LIMIT = 4096


def _as_id_map(mask, name):
    """Class ids (int64, HxW) of a prediction or reference, by `_mask_to_ids`; errors name which one it was."""
    try:
        return _mask_to_ids(mask)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _mask_to_ids(mask):
    """A copy of `imagenets_hf.data.masks.mask_to_ids`, the project's one mask rule (a Hub metric cannot import the
    package; tests/test_data_mask_decoding.py holds the copies equal). RGB / RGBA (opaque) images and HxWx3 / HxWx4
    arrays: id = R + 256 * G; L / I / I;16 images and HxW integer arrays: ids as they are; palette images, float
    arrays and anything else: ValueError."""
    if hasattr(mask, "getbands"):  # a PIL image, recognised without importing PIL (the copies stand alone)
        if mask.mode == "P":
            raise ValueError(
                "palette image (PIL mode 'P'): its values are palette indices, not class ids; save the mask as RGB "
                "(ImageNet-S encoding, id = R + 256 * G) or as 8/16-bit single-channel ids"
            )
        if mask.mode not in ("RGB", "RGBA", "L", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise ValueError(
                f"PIL mode {mask.mode!r} is not a mask: expected RGB or RGBA (id = R + 256 * G) or single-channel "
                "ids (L, I, I;16)"
            )
        array = np.asarray(mask)
    elif hasattr(mask, "detach"):  # a torch tensor, recognised without importing torch
        array = mask.detach().cpu().numpy()
    else:
        array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[0] == 1:
        if array.shape[-1] in (3, 4):  # 1xHxW ids of width 3 or 4, or a 1-pixel-high colour mask: no safe guess
            raise ValueError(f"ambiguous mask shape {array.shape}: pass HxW ids or HxWx3 RGB")
        array = array[0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        channels = "RGB" if array.shape[-1] == 3 else "RGBA"
        if array.dtype.kind not in "iu":
            raise ValueError(
                f"an HxWx{array.shape[-1]} {channels} mask holds integer channels, got dtype {array.dtype}"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"an HxWx{array.shape[-1]} {channels} mask holds 8-bit channels (0..255), got values "
                f"{array.min()}..{array.max()}"
            )
        if channels == "RGBA" and (array[..., 3] != 255).any():
            raise ValueError(
                f"RGBA mask with {int((array[..., 3] != 255).sum())} transparent pixel(s) (alpha < 255): they have "
                "no class id; save the mask as RGB (id = R + 256 * G)"
            )
        # Widen before multiplying: uint8 * 256 overflows (NumPy 2 raises).
        return array[..., 0].astype(np.int64) + 256 * array[..., 1].astype(np.int64)
    if array.ndim != 2:
        raise ValueError(f"a mask is HxW class ids, HxWx3 RGB or HxWx4 RGBA; got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"class ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def pixel_pairs(prediction, reference):
    """The distinct (reference id, predicted id) pairs of one image and how many pixels hold each."""
    prediction = _as_id_map(prediction, "prediction")
    reference = _as_id_map(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if prediction.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    low = min(int(prediction.min()), int(reference.min()))
    base = max(int(prediction.max()), int(reference.max())) + 1
    if low >= 0 and base <= _DENSE_PAIR_LIMIT:
        counts = np.bincount((reference * base + prediction).ravel())
        codes = np.flatnonzero(counts)
        return codes // base, codes % base, counts[codes]
    pairs, counts = np.unique(np.stack([reference.ravel(), prediction.ravel()]), axis=1, return_counts=True)
    return pairs[0], pairs[1], counts


def pair_confusion(references, predictions, counts, num_labels, ignore_index, label_map=None, reduce_labels=False):
    """(num_labels + 1)^2 pixel counts, rows ground truth; index num_labels collects ids out of range."""
    references = np.asarray(references, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if label_map is not None:
        original = references.copy()
        for old_id, new_id in label_map.items():
            references[original == old_id] = new_id
    if reduce_labels:
        references = np.where(references == 0, 255, references) - 1
        references[references == 254] = 255
    keep = references != ignore_index
    references, predictions, counts = references[keep], predictions[keep], counts[keep]
    n = num_labels
    ref_bin = np.where((references >= 0) & (references < n), references, n)
    pred_bin = np.where((predictions >= 0) & (predictions < n), predictions, n)
    # float64 weights are exact for counts below 2**53
    matrix = np.bincount(ref_bin * (n + 1) + pred_bin, weights=counts, minlength=(n + 1) ** 2)
    return matrix.round().astype(np.int64).reshape(n + 1, n + 1)


def confusion_metrics(confusion, num_labels):
    """Official and mean_iou metrics from the (num_labels + 1)^2 counts."""
    n = num_labels
    confusion = confusion.astype(np.float64)
    intersection = np.diagonal(confusion)[:n]
    gt_area = confusion[:n, :].sum(axis=1)
    pred_area = confusion[:, :n].sum(axis=0)
    union = gt_area + pred_area - intersection
    official = intersection / (pred_area + gt_area - intersection + IOU_EPSILON) * 100
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / gt_area
        overall = intersection.sum() / gt_area.sum()
    return {
        "mIoU": float(official.mean()),
        "per_class_iou": official,
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(accuracy),
        "overall_accuracy": float(overall),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


def _nanmean(values):
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ImageNetSMeanIoU(evaluate.Metric):
    """`mean_iou` for ImageNet-S, exact and with a small cache: see the module docstring."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # What the cache holds: one row per distinct (reference id, predicted id) pair of an image, not the maps;
            # `first_pair` is 1 on each image's first row (it counts the images).
            features=datasets.Features(
                {
                    "pair_references": datasets.Value("int64"),
                    "pair_predictions": datasets.Value("int64"),
                    "pair_counts": datasets.Value("int64"),
                    "first_pair": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://github.com/LUSSeg/ImageNet-S/tree/main/evaluation"],
            format="numpy",  # read the cache back as arrays, not Python lists of ints
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of (height, width) predicted and ground-truth maps."""
        if kwargs:
            raise ValueError(f"unexpected inputs {sorted(kwargs)}: pass predictions= and references=")
        if predictions is None or references is None:
            raise ValueError("add_batch needs both predictions= and references=")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        columns = {"pair_references": [], "pair_predictions": [], "pair_counts": [], "first_pair": []}
        for prediction, reference in zip(predictions, references):
            pair_references, pair_predictions, pair_counts = pixel_pairs(prediction, reference)
            if len(pair_counts) == 0:  # an empty map still counts as an image
                pair_references, pair_predictions, pair_counts = (np.array([-1]), np.array([-1]), np.array([0]))
            first_pair = np.zeros(len(pair_counts), dtype=np.int64)
            first_pair[0] = 1
            for name, values in zip(columns, (pair_references, pair_predictions, pair_counts, first_pair)):
                columns[name].append(values)
        super().add_batch(**{name: np.concatenate(values) for name, values in columns.items()})

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one (height, width) predicted map and its ground truth."""
        self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute over everything added (plus `predictions` / `references` if given); kwargs as `_compute`."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        return super().compute(**kwargs)

    def _compute(
        self,
        pair_references,
        pair_predictions,
        pair_counts,
        first_pair,
        num_labels,
        ignore_index=IGNORE_INDEX,
        nan_to_num=None,
        label_map=None,
        reduce_labels=False,
    ):
        if num_labels is None or int(num_labels) < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        num_images = int(np.sum(first_pair))
        confusion = pair_confusion(
            pair_references, pair_predictions, pair_counts, int(num_labels), ignore_index, label_map, reduce_labels
        )
        results = confusion_metrics(confusion, int(num_labels))
        if nan_to_num is not None:
            results = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in results.items()}
            results = {key: float(value) if np.ndim(value) == 0 else value for key, value in results.items()}
        results["num_images"] = num_images
        return results
