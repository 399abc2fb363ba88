"""The inference protocol: mixed-size batches equal one image at a time, original sizes, the evaluation loop, and
predictions written then read back."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from imagenets_hf.data.masks import decode_mask, ids_to_annotation
from imagenets_hf.evaluation import SegmentationEvaluator
from imagenets_hf.evaluation.inference import evaluate_model, format_iou_table, predict_segmentation
from imagenets_hf.evaluation.predict import evaluate_prediction_folder, make_overlay, predict_folder

NUM_LABELS = 4


def in_float64(model):
    """The model in float64, its float32 inputs cast on the way in.

    The tests below compare predictions made in different batches (and evaluation sums built from them) exactly. In
    float32 a batch of 2 and a batch of 1 give logits that differ by ~1e-6 of their scale (measured; other thread
    counts and CPU kernels likewise), and the closest top-2 logits of these images are 4e-5 of the scale apart: a
    near-tie could flip on some CPU. In float64 the rounding is ~1e-15 of the scale, so the argmax is the same
    everywhere and the exact comparisons hold. (Padding images of two sizes together, the error these tests look
    for, changes a large share of the pixels.)
    """

    def cast_inputs(module, args, kwargs):
        kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        return tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args), kwargs

    model.double().register_forward_pre_hook(cast_inputs, with_kwargs=True)
    return model


@pytest.fixture(scope="module")
def tiny_model_float32():
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        num_labels=NUM_LABELS,
        drop_path_rate=0.0,
        encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    )
    return ViTFCNForSemanticSegmentation(config).eval(), ViTFCNImageProcessor(short_side=32, max_long_side=64)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_float32):
    model, processor = tiny_model_float32
    return in_float64(copy.deepcopy(model)), processor


def random_image(rng, height, width):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_mixed_size_batch_equals_one_at_a_time(tiny_model):
    model, processor = tiny_model
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (48, 32), (40, 56), (33, 70), (48, 32), (60, 60)]
    images = [random_image(rng, h, w) for h, w in sizes]
    batched = predict_segmentation(model, processor, images)
    one_by_one = [predict_segmentation(model, processor, [image])[0] for image in images]
    for (height, width), together, alone in zip(sizes, batched, one_by_one):
        assert together.shape == (height, width) and together.dtype == np.int32
        assert np.array_equal(together, alone)  # exact: float64 model (see in_float64)
    # same-size images really share a forward with a small batch size as well
    chunked = predict_segmentation(model, processor, images, batch_size=1)
    assert all(np.array_equal(a, b) for a, b in zip(chunked, batched))


def test_prediction_follows_the_processor_protocol(tiny_model):
    model, processor = tiny_model
    rng = np.random.default_rng(1)
    image = random_image(rng, 36, 50)
    prediction = predict_segmentation(model, processor, [image])[0]
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    logits = torch.nn.functional.interpolate(logits, size=(36, 50), mode="bilinear", align_corners=False)
    assert np.array_equal(prediction, logits.argmax(1)[0].numpy())  # the same single-image forward: exact


def test_large_image_comes_back_at_original_size(tiny_model):
    model, processor = tiny_model
    image = Image.new("RGB", (1010, 1000), (120, 30, 200))  # H * W > 1000^2
    prediction = predict_segmentation(model, processor, [image])[0]
    assert prediction.shape == (1000, 1010)


def test_bf16_autocast_runs(tiny_model_float32):
    model, processor = tiny_model_float32  # autocast leaves float64 alone
    image = random_image(np.random.default_rng(2), 32, 40)
    prediction = predict_segmentation(model, processor, [image], dtype="bf16")[0]
    assert prediction.shape == (32, 40) and prediction.max() < NUM_LABELS


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """<root>/validation/<wnid>/x.JPEG and <root>/validation-segmentation/<wnid>/x.png, plus the same as rows."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("labelled")
    rows = []
    for i, (height, width) in enumerate([(40, 56), (48, 32), (40, 56), (50, 45), (33, 64)]):
        wnid = f"n0000000{i % 2 + 1}"
        image = random_image(rng, height, width)
        ids = rng.integers(0, NUM_LABELS, (height, width))
        ids[:4] = 1000
        for folder, suffix, data in (("validation", ".png", image), ("validation-segmentation", ".png", None)):
            path = root / folder / wnid / f"ILSVRC2012_val_{i:08d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if data is not None:
                data.save(path)  # lossless, so the rows and the folder hold the same pixels
            else:
                from imagenets_hf.data.masks import encode_mask

                encode_mask(ids).save(path)
        rows.append({"image": image, "annotation": ids_to_annotation(ids), "image_id": f"{wnid}/{i}"})
    return root, rows


def test_evaluate_model_equals_the_evaluator_on_predictions(tiny_model, labelled_folder):
    model, processor = tiny_model
    _, rows = labelled_folder
    results = evaluate_model(model, processor, rows, batch_size=2, extended=True, progress=False, num_workers=0)
    evaluator = SegmentationEvaluator(NUM_LABELS)
    predictions = predict_segmentation(model, processor, [row["image"] for row in rows])
    for prediction, row in zip(predictions, rows):
        evaluator.update(prediction, decode_mask(row["annotation"]))
    expected = evaluator.compute()
    # batches of 2 against predict_segmentation's own batching: the same predictions (float64 model, see in_float64),
    # so the same counts and bitwise the same metrics
    assert results["per_class_iou"] == expected["per_class_iou"]
    assert results["mBIoU"] == expected["mBIoU"] and results["num_images"] == 5
    assert model.training is False


def test_masks_in_flight_are_compact_and_keep_their_ids():
    """The workers send masks as uint16 where the ids fit (ImageNet-S's: at most 255 + 256 * 255), else as they are."""
    from imagenets_hf.evaluation.inference import _collate_rows, compact_ids

    ids = np.array([[0, 1000], [919, 65535]], dtype=np.int64)
    compact = compact_ids(ids)
    assert compact.dtype == np.uint16 and np.array_equal(compact, ids)
    for wide in (np.array([[0, 65536]]), np.array([[-1, 3]])):
        assert compact_ids(wide) is wide
    row = {"image": Image.new("L", (2, 2)), "annotation": ids_to_annotation(ids[:, :1].repeat(2, 1)), "image_id": "a"}
    image, mask, image_id = _collate_rows([row])[0]
    assert image.mode == "RGB" and mask.dtype == np.uint16 and image_id == "a"
    assert np.array_equal(mask, decode_mask(row["annotation"]))


def test_predictions_written_and_read_back_give_the_same_metrics(tiny_model, labelled_folder, tmp_path):
    model, processor = tiny_model
    root, rows = labelled_folder
    written = predict_folder(
        model,
        processor,
        root / "validation",
        tmp_path / "pred",
        batch_size=2,
        num_workers=0,
        progress=False,
        overlay_dir=tmp_path / "overlays",
    ).written
    assert len(written) == 5 and all(path.suffix == ".png" for path in written)
    assert len(list((tmp_path / "overlays").rglob("*.jpg"))) == 5
    from_files = evaluate_prediction_folder(tmp_path / "pred", root / "validation-segmentation", NUM_LABELS)
    from_model = evaluate_model(model, processor, rows, extended=True, progress=False, num_workers=0)
    # the same predictions (float64 model), through PNG files or not: equal counts; rtol 1e-12 leaves the float64
    # sums of per-image values (F-measure) room for another order; one pixel moved changes a metric by ~1e-4
    for key in ("mIoU", "per_class_iou", "mBIoU", "image_accuracy", "f_measure", "mean_iou", "overall_accuracy"):
        np.testing.assert_allclose(from_files[key], from_model[key], rtol=1e-12, err_msg=key)


def test_overlay_has_three_panels_with_ground_truth():
    image = Image.new("RGB", (20, 10))
    ids = np.zeros((10, 20), dtype=np.int64)
    assert make_overlay(image, ids, ids).size == (3 * 20 + 2 * 4, 10)
    assert make_overlay(image, ids).size == (2 * 20 + 4, 10)


def test_format_iou_table_sorts_classes_by_iou():
    metrics = SegmentationEvaluator(3, extended=False)
    metrics.update(np.array([[0, 1, 1, 2]]), np.array([[0, 1, 2, 2]]))
    table = format_iou_table(metrics.compute(), ["other", "cat", "dog"])
    lines = table.splitlines()
    assert [line.split()[2] for line in lines[2:5]] == ["other", "cat", "dog"]
    assert "mIoU (official" in table
