"""The metric core against hand-computed cases, torchmetrics, HF mean_iou's formulas and a port of the official code;
the evaluate module against the core."""

import math

import evaluate
import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from imagenets_hf.evaluation import METRIC_PATH, SegmentationEvaluator
from imagenets_hf.evaluation.imagenets_mean_iou import imagenets_mean_iou as module_file
from imagenets_hf.evaluation.metrics import boundary_dilation, boundary_pixels

IGNORE = 1000
# Tolerances: every metric is float64 arithmetic on integer pixel counts, so two computations of the same quantity
# agree to a few float64 roundings (~1e-15 relative) on any CPU and thread count; the tolerances below (1e-15 to 1e-9)
# hold that with margin, while one pixel counted in the wrong class moves an IoU of these small maps by >= 1e-4.


def blocky_maps(rng, num_labels, height, width, block=6, ignore_fraction=0.1):
    """A ground truth of class blocks with ignored patches, and a prediction that is partly right."""
    coarse = rng.integers(0, num_labels, (height // block + 1, width // block + 1))
    target = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]
    target = np.where(rng.random((height, width)) < ignore_fraction, IGNORE, target)
    noise = rng.integers(0, num_labels, (height, width))
    prediction = np.where(rng.random((height, width)) < 0.6, np.where(target == IGNORE, noise, target), noise)
    return prediction, target


def test_hand_computed_case():
    # 3 classes; ignore pixel (1000) dropped; prediction 7 is out of range (counts only in the ground-truth area).
    prediction = np.array([[0, 0, 1], [1, 2, 7], [2, 2, 0]])
    target = np.array([[0, 1, 1], [1, 2, 2], [1000, 2, 0]])
    evaluator = SegmentationEvaluator(3, extended=False)
    evaluator.update(prediction, target)
    # class 0: TP 2 (0,0),(2,2); pred area 3 (incl. (0,1)); gt area 2 -> IoU 2/3
    # class 1: TP 2; pred 2; gt 3 -> 2/3
    # class 2: TP 2 (1,1),(2,1); pred 2 (ignored (2,0) dropped); gt 3 ((1,2) predicted 7) -> 2/3
    expected = np.array([2 / 3, 2 / 3, 2 / 3])
    results = evaluator.compute()
    # one float64 division of integers each (correctly rounded: exact to the last bit); 1e-15 is ~9 ulps of 2/3
    np.testing.assert_allclose(results["per_category_iou"], expected, rtol=0, atol=1e-15)
    # TP / (T + P - TP + 1e-10) * 100 against 100 * 2 / (3 + 1e-10): another order of 3 roundings (measured 2e-16)
    np.testing.assert_allclose(results["per_class_iou"], 100 * 2 / (3 + 1e-10), rtol=1e-15)
    np.testing.assert_allclose(results["per_category_accuracy"], [1.0, 2 / 3, 2 / 3])  # default rtol 1e-7
    assert results["overall_accuracy"] == pytest.approx(6 / 8, abs=1e-15)  # 6 / 8 is exact in binary
    assert evaluator.confusion_matrix.tolist() == [[2, 0, 0], [1, 2, 0], [0, 0, 2]]
    assert results["num_images"] == 1


def test_core_equals_torchmetrics_jaccard():
    rng = np.random.default_rng(0)
    num_labels = 7
    evaluator = SegmentationEvaluator(num_labels, extended=False)
    jaccard = MulticlassJaccardIndex(num_classes=num_labels, average="none", ignore_index=IGNORE)
    for height, width in [(31, 40), (17, 23), (64, 48)]:
        prediction, target = blocky_maps(rng, num_labels, height, width)
        evaluator.update(torch.from_numpy(prediction), torch.from_numpy(target))
        jaccard.update(torch.from_numpy(prediction)[None], torch.from_numpy(target)[None])
    reference = jaccard.compute().double().numpy()
    results = evaluator.compute()
    # torchmetrics divides the same integer counts in float32: a few float32 roundings (measured 4e-8 relative)
    np.testing.assert_allclose(results["per_category_iou"], reference, rtol=1e-6)
    np.testing.assert_allclose(np.array(results["per_class_iou"]) / 100, reference, rtol=1e-6)


def test_official_mean_and_nanmean_differ_exactly_when_a_class_is_absent():
    rng = np.random.default_rng(1)
    prediction, target = blocky_maps(rng, 4, 30, 30)  # classes 0..3 only
    evaluator = SegmentationEvaluator(5, extended=False)  # class 4 absent from both
    evaluator.update(prediction, target)
    results = evaluator.compute()
    assert results["per_class_iou"][4] == 0.0
    assert math.isnan(results["per_category_iou"][4])
    present = np.array(results["per_category_iou"][:4])
    # float64 means of the same four values (see the note on tolerances at the top)
    assert results["mean_iou"] == pytest.approx(present.mean(), abs=1e-15)
    assert results["mIoU"] == pytest.approx(100 * present.sum() / 5, rel=1e-9)
    assert results["mIoU"] < 100 * results["mean_iou"] - 1  # the two means differ by a whole class's share

    all_present = SegmentationEvaluator(4, extended=False)
    all_present.update(prediction, target)
    results = all_present.compute()
    assert results["mIoU"] == pytest.approx(100 * results["mean_iou"], rel=1e-9)  # differ only by the 1e-10 epsilon


def hf_mean_iou(predictions, references, num_labels, ignore_index, label_map=None, reduce_labels=False):
    """HF evaluate's mean_iou (metrics/mean_iou/mean_iou.py) formulas, restated with np.histogram."""
    totals = np.zeros((4, num_labels))
    for pred, label in zip(predictions, references):
        pred, label = np.array(pred), np.array(label)
        if label_map is not None:
            original = label.copy()
            for old, new in label_map.items():
                label[original == old] = new
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        hist = [np.histogram(x, bins=num_labels, range=(0, num_labels - 1))[0] for x in (intersect, pred, label)]
        totals += [hist[0], hist[1] + hist[2] - hist[0], hist[1], hist[2]]
    inter, union, _, label_area = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        iou, acc = inter / union, inter / label_area
    return {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(acc),
        "overall_accuracy": inter.sum() / label_area.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }


@pytest.fixture(scope="module")
def random_maps():
    rng = np.random.default_rng(2)
    pairs = [blocky_maps(rng, 9, h, w) for h, w in [(20, 30), (33, 17), (40, 40), (8, 50), (25, 25)]]
    pairs[0][0][0, :5] = 4000  # out-of-range predictions
    return [p for p, _ in pairs], [t for _, t in pairs]


def test_evaluate_module_equals_core_and_hf_formulas(random_maps):
    predictions, references = random_maps
    num_labels = 10  # class 9 never occurs: NaN in mean_iou's per-category values
    metric = evaluate.load(METRIC_PATH)
    metric.add_batch(predictions=predictions[:2], references=references[:2])
    metric.add(prediction=torch.from_numpy(predictions[2]), reference=references[2])
    results = metric.compute(predictions=predictions[3:], references=references[3:], num_labels=num_labels)

    evaluator = SegmentationEvaluator(num_labels)
    for prediction, reference in zip(predictions, references):
        evaluator.update(prediction, reference)
    core = evaluator.compute()
    # the same integer counts through two float64 implementations (NumPy, torch): measured 7e-15 on values <= 53
    for key in ("mIoU", "per_class_iou", "mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou"):
        np.testing.assert_allclose(results[key], core[key], rtol=0, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(results["per_category_accuracy"], core["per_category_accuracy"], atol=1e-9)
    assert results["num_images"] == core["num_images"] == 5

    reference = hf_mean_iou(predictions, references, num_labels, IGNORE)
    for key, value in reference.items():  # fractions <= 1 from the same counts in float64 (measured equal)
        np.testing.assert_allclose(results[key], value, rtol=0, atol=1e-12, err_msg=key)


def test_evaluate_module_options_follow_mean_iou(random_maps):
    predictions, references = random_maps
    metric = evaluate.load(METRIC_PATH)
    label_map = {3: 5, 5: 3}
    results = metric.compute(
        predictions=predictions,
        references=references,
        num_labels=10,
        ignore_index=255,
        label_map=label_map,
        reduce_labels=True,
        nan_to_num=-1,
    )
    reference = hf_mean_iou(predictions, references, 10, 255, label_map=label_map, reduce_labels=True)
    for key, value in reference.items():  # as above: float64 fractions of the same counts
        np.testing.assert_allclose(results[key], np.nan_to_num(value, nan=-1), atol=1e-12, err_msg=key)


def test_module_copy_of_the_core_agrees_with_the_core():
    rng = np.random.default_rng(3)
    num_labels = 13
    evaluator = SegmentationEvaluator(num_labels, extended=False)
    triples = []
    for _ in range(6):
        height, width = rng.integers(5, 60, 2)
        prediction = rng.integers(0, num_labels + 3, (height, width))  # some out of range
        target = np.where(rng.random((height, width)) < 0.2, IGNORE, rng.integers(0, num_labels + 2, (height, width)))
        evaluator.update(prediction, target)
        triples.append(module_file.pixel_pairs(prediction, target))
    flat = [np.concatenate([t[i] for t in triples]) for i in range(3)]
    confusion = module_file.pair_confusion(*flat, num_labels, IGNORE)
    assert np.array_equal(confusion[:num_labels, :num_labels], evaluator.confusion_matrix.numpy())  # integer counts
    module_results = module_file.confusion_metrics(confusion, num_labels)
    core = evaluator.compute()
    for key in ("mIoU", "per_class_iou", "mean_iou", "per_category_accuracy"):  # float64 from equal counts
        np.testing.assert_allclose(module_results[key], core[key], atol=1e-9, err_msg=key)


# ---- extended metrics against a direct port of the official evaluator (LUSSeg/PASS evaluator.py, metric.py) ----


def official_boundary(ids, ratio=0.03):
    """Per class: mask - erode(zero-padded mask, 3x3, iterations=d), summed as (id + 1) * boundary."""
    ndimage = pytest.importorskip("scipy.ndimage")
    height, width = ids.shape
    dilation = max(1, int(round(ratio * np.sqrt(height**2 + width**2))))
    shifted = ids + 1
    boundary = np.zeros_like(shifted)
    for value in np.unique(shifted):
        mask = np.pad(shifted == value, 1)
        eroded = ndimage.binary_erosion(mask, np.ones((3, 3), bool), iterations=dilation, border_value=1)
        boundary += ((shifted == value) & ~eroded[1:-1, 1:-1]) * value
    return boundary


def histc(values, bins):
    values = values[(values >= 0) & (values <= bins - 1)]
    return np.bincount(values, minlength=bins)[:bins].astype(np.float64)


def official_reference(pairs, num_labels):
    K = num_labels
    T, P, TP = np.zeros(K), np.zeros(K), np.zeros(K)
    BT, BP, BTP = np.zeros(K), np.zeros(K), np.zeros(K)
    Ts, Ps, TPs = np.zeros((4, K)), np.zeros((4, K)), np.zeros((4, K))
    BTs, BPs, BTPs = np.zeros((4, K)), np.zeros((4, K)), np.zeros((4, K))
    fmeasure = acc = 0.0
    for predict_full, gt_full in pairs:
        boundary_gt, boundary_predict = official_boundary(gt_full), official_boundary(predict_full)
        keep = gt_full.ravel() != IGNORE
        gt, predict = gt_full.ravel()[keep], predict_full.ravel()[keep]
        bgt, bpredict = boundary_gt.ravel()[keep], boundary_predict.ravel()[keep]

        def areas(p, g, bins):
            return histc(p[p == g], bins), histc(p, bins), histc(g, bins)

        inter, out, tgt = areas(predict, gt, K)
        binter, bout, btgt = areas(bpredict, bgt, K + 1)
        T, P, TP = T + out, P + tgt, TP + inter
        BT, BP, BTP = BT + bout[1:], BP + btgt[1:], BTP + binter[1:]
        t, p = (gt > 0).sum(), (predict > 0).sum()
        tp = float(((gt > 0) & (predict > 0)).sum())
        recall, precision = tp / (t + 1e-20), tp / (p + 1e-20)
        fmeasure += 1.3 * precision * recall / (0.3 * precision + recall + 1e-20)
        label = int(np.argmax(out[1:])) + 1
        acc += float(tgt[label] > 0 and out[label] > 0)
        counts = np.bincount(gt)
        buckets = [[], [], [], []]
        for c in np.unique(gt):
            if c == 0:
                continue
            size = math.ceil(100.0 * counts[c] / counts.sum())
            buckets[0 if size <= 5 else 1 if size <= 25 else 2 if size <= 50 else 3].append(c)
        for i, classes in enumerate(buckets):
            if classes:
                sel = np.isin(gt, [0, *classes])
                inter, out, tgt = areas(predict[sel], gt[sel], K)
                Ts[i], Ps[i], TPs[i] = Ts[i] + out, Ps[i] + tgt, TPs[i] + inter
                binter, bout, btgt = areas(bpredict[sel], bgt[sel], K + 1)
                BTs[i], BPs[i], BTPs[i] = BTs[i] + bout[1:], BPs[i] + btgt[1:], BTPs[i] + binter[1:]
    n = len(pairs)
    result = {
        "mIoU": np.mean(TP / (T + P - TP + 1e-10)) * 100,
        "mBIoU": np.mean(BTP / (BT + BP - BTP + 1e-10)) * 100,
        "f_measure": fmeasure / n * 100,
        "image_accuracy": acc / n * 100,
    }
    for i, name in enumerate(("S", "MS", "ML", "L")):
        for prefix, (t_, p_, tp_) in (("mIoU", (Ts[i], Ps[i], TPs[i])), ("mBIoU", (BTs[i], BPs[i], BTPs[i]))):
            values = (tp_ / (t_ + p_ - tp_ + 1e-10))[p_ > 0]
            result[f"{prefix}_{name}"] = values.mean() * 100 if values.size else float("nan")
    return result


def test_extended_metrics_equal_a_port_of_the_official_evaluator():
    rng = np.random.default_rng(4)
    num_labels = 6
    pairs = []
    for index, (height, width) in enumerate([(40, 60), (64, 64), (30, 90), (80, 50), (45, 45), (70, 33)]):
        target = np.zeros((height, width), dtype=np.int64)
        # objects of several sizes on background, plus ignored bands
        for _ in range(index % 3 + 1):
            c = int(rng.integers(1, num_labels))
            y0, x0 = rng.integers(0, height - 4), rng.integers(0, width - 4)
            y1, x1 = y0 + rng.integers(3, height - y0 + 1), x0 + rng.integers(3, width - x0 + 1)
            target[y0:y1, x0:x1] = c
        target[rng.random((height, width)) < 0.05] = IGNORE
        prediction = np.where(rng.random((height, width)) < 0.85, np.where(target == IGNORE, 0, target), 0)
        prediction[: height // 4, : width // 4] = rng.integers(0, num_labels)
        pairs.append((prediction, target))
    evaluator = SegmentationEvaluator(num_labels)
    for prediction, target in pairs:
        evaluator.update(prediction, target)
    results = evaluator.compute()
    reference = official_reference(pairs, num_labels)
    for key, value in reference.items():
        if math.isnan(value):
            assert math.isnan(results[key]), key
        else:  # float64 means of per-image and per-class ratios of integer counts, summed in another order
            assert results[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_boundary_pixels_equal_per_class_erosion():
    rng = np.random.default_rng(5)
    ids = np.kron(rng.integers(0, 4, (9, 12)), np.ones((5, 5), dtype=np.int64))
    ids[3:7, 10:30] = IGNORE
    for dilation in (1, 2, 3, 7):
        ratio = dilation / np.sqrt(ids.shape[0] ** 2 + ids.shape[1] ** 2)
        assert boundary_dilation(*ids.shape, ratio=ratio) == dilation
        expected = official_boundary(ids, ratio=ratio) > 0
        assert np.array_equal(boundary_pixels(torch.from_numpy(ids), dilation).numpy(), expected), dilation


def test_bad_input_is_refused():
    evaluator = SegmentationEvaluator(3)
    with pytest.raises(ValueError, match="differs from target shape"):
        evaluator.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(TypeError, match="integer class ids"):
        evaluator.update(np.zeros((2, 2), float), np.zeros((2, 2), int))


def test_predicting_other_everywhere_on_the_mini_validation_split_as_the_docs_say(mini_dir):
    """docs/training.md gives the all-"other" baseline of the demo's data: the evaluator's figure, and by hand the
    share of "other" pixels (its IoU; every object class's is 0) over the 11 classes."""
    from pathlib import Path

    from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask

    evaluator = SegmentationEvaluator(11, extended=False)
    other = labelled = 0
    for mask in sorted((mini_dir / "validation-segmentation").rglob("*.png")):
        ids = decode_mask(mask)
        evaluator.update(np.zeros_like(ids), ids)
        other, labelled = other + int((ids == 0).sum()), labelled + int((ids != IGNORE_INDEX).sum())
    miou = evaluator.compute()["mIoU"]
    assert miou == pytest.approx(100 * other / labelled / 11, rel=1e-12)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert f'predicting "other" everywhere gives {miou:.2f}:' in docs
    assert f"covers {100 * other / labelled:.1f} % of the labelled" in " ".join(docs.split())
