"""Inference modes (`imagenets_hf/evaluation/modes.py`): mmsegmentation's window placement against hand-worked
examples, every pixel covered, slide and multi-scale + flip TTA against literal transcriptions of mmsegmentation's
`slide_inference` and `SegTTAModel.merge_preds`, the special cases that must equal the official protocol, bounded
(chunked) TTA equal to all classes at once, and the options' one-line errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from script_runner import run_script
from test_eval_inference import in_float64

from imagenets_hf.evaluation.inference import _predict_views, predict_segmentation
from imagenets_hf.evaluation.modes import (
    MMSEG_SCALES,
    InferenceMode,
    View,
    combine_views,
    default_stride,
    slide_windows,
)
from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

NUM_LABELS = 5


@pytest.fixture(scope="module")
def tiny():
    """A tiny random ViT + FCN (patch 8) in float64 (exact comparisons across batch sizes: see `in_float64`) and a
    processor at short side 32, long side at most 64."""
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        num_labels=NUM_LABELS,
        drop_path_rate=0.0,
        encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    )
    model = in_float64(ViTFCNForSemanticSegmentation(config).eval())
    return model, ViTFCNImageProcessor(short_side=32, max_long_side=64)


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def bilinear(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def mmseg_slide_logits(model, inputs, crop_size, stride):
    """mmsegmentation's `EncoderDecoder.slide_inference` transcribed (one window per forward; the decode head's
    resize of a window's logits to the window, as its `predict` does)."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop_size
    batch_size, _, h_img, w_img = inputs.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((batch_size, NUM_LABELS, h_img, w_img))
    count_mat = inputs.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = inputs[:, :, y1:y2, x1:x2]
            with torch.no_grad():
                crop_seg_logit = bilinear(model(pixel_values=crop_img).logits.float(), crop_img.shape[2:])
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


# -- window placement ----------------------------------------------------------------------------------------------


def test_window_placement_matches_hand_worked_examples():
    # 10 x 7, windows 4 every 3: rows at 0, 3, 6 (3 divides 10 - 4), columns at 0 and 3 (the last one ends at 7).
    assert slide_windows(10, 7, (4, 4), (3, 3)) == [
        (0, 4, 0, 4),
        (0, 4, 3, 7),
        (3, 7, 0, 4),
        (3, 7, 3, 7),
        (6, 10, 0, 4),
        (6, 10, 3, 7),
    ]
    # 11 rows: (11 - 4 + 2) // 3 + 1 = 4 rows of windows; the last starts at 9, ends past 11 and is shifted back
    # to 7..11. 4 columns: one window.
    assert slide_windows(11, 4, (4, 4), (3, 3)) == [(0, 4, 0, 4), (3, 7, 0, 4), (6, 10, 0, 4), (7, 11, 0, 4)]
    # Smaller than the window in height (3 < 4): one row, clipped to the image, not padded; 5 columns: 2 windows.
    assert slide_windows(3, 5, (4, 4), (3, 3)) == [(0, 3, 0, 4), (0, 3, 1, 5)]
    # Smaller than the window both ways: one window, the image.
    assert slide_windows(2, 3, (4, 4), (2, 2)) == [(0, 2, 0, 3)]
    # Height and width apart: 6 x 9, windows 4 x 5 every 2 x 3.
    assert slide_windows(6, 9, (4, 5), (2, 3)) == [
        (0, 4, 0, 5),
        (0, 4, 3, 8),
        (0, 4, 4, 9),
        (2, 6, 0, 5),
        (2, 6, 3, 8),
        (2, 6, 4, 9),
    ]
    assert default_stride((96, 224)) == (64, 149)  # two thirds, rounded down (mmseg: crop 512, stride 341)


def test_windows_cover_every_pixel_inside_the_image():
    for height in (1, 2, 3, 5, 8, 13, 16, 17, 31):
        for width in (1, 4, 7, 16, 23):
            for crop in (1, 3, 4, 8, 16):
                for stride in sorted({1, max(1, crop // 2), max(1, 2 * crop // 3), crop}):
                    windows = slide_windows(height, width, (crop, crop), (stride, stride))
                    count = np.zeros((height, width), dtype=int)
                    for top, bottom, left, right in windows:
                        assert 0 <= top < bottom <= height and 0 <= left < right <= width
                        # every window has the crop's size, or the image's where the image is smaller
                        assert (bottom - top, right - left) == (min(crop, height), min(crop, width))
                        count[top:bottom, left:right] += 1
                    assert count.min() >= 1, (height, width, crop, stride)
                    assert len(set(windows)) == len(windows)


# -- the options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "slide", "crop_size": 96, "stride": 128}, "stride 128x128 is larger than the window 96x96"),
        ({"mode": "slide", "crop_size": (96, 64), "stride": (64, 65)}, "stride 64x65 is larger than the window 96x64"),
        ({"mode": "slide", "crop_size": 0}, "crop_size must be at least 1 pixel"),
        ({"mode": "slide", "crop_size": 2.5}, "crop_size must be a whole number"),
        ({"mode": "whole", "stride": 8}, "crop_size and stride are for mode 'slide'"),
        ({"mode": "tiles"}, "unknown inference mode 'tiles'"),
        ({"scales": ()}, "scales is empty"),
        ({"scales": (1.0, 0.0)}, "every scale must be a number above 0, got 0.0"),
        ({"scales": (-0.5,)}, "every scale must be a number above 0, got -0.5"),
        ({"scales": (math.nan,)}, "every scale must be a number above 0, got nan"),
        ({"scales": (1.0, 1.0)}, "name a scale twice"),
    ],
)
def test_bad_modes_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        InferenceMode(**kwargs)
    assert "\n" not in str(error.value)


def test_a_slide_mode_takes_its_window_from_the_recipe_and_records_itself():
    mode = InferenceMode("slide", scales=MMSEG_SCALES, flip=True)
    with pytest.raises(ValueError, match="slide inference needs a window size"):
        mode.with_crop_size(None)
    resolved = mode.with_crop_size(96)
    assert (resolved.crop_size, resolved.stride) == ((96, 96), (64, 64))
    assert resolved.to_dict() == {
        "mode": "slide",
        "crop_size": [96, 96],
        "stride": [64, 64],
        "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
        "flip": True,
    }
    assert resolved.describe() == "slide 96x96 every 64x64, scales 0.5, 0.75, 1, 1.25, 1.5, 1.75 + flip"
    assert InferenceMode().official and InferenceMode().describe() == "whole (official protocol)"
    import imagenets_hf

    assert imagenets_hf.InferenceMode is InferenceMode  # importable from the package, as predict_segmentation
    assert not InferenceMode(flip=True).official and not InferenceMode(scales=(0.5,)).official


# -- slide ---------------------------------------------------------------------------------------------------------

# Processed sizes (short side 32, long side <= 64): 40x60 -> 32x48, 50x30 -> 53x32, 20x20 -> 32x32, 30x90 -> 21x64.
SIZES = [(40, 60), (50, 30), (20, 20), (30, 90)]


def test_slide_with_one_window_equals_whole(tiny):
    model, processor = tiny
    images = random_images(SIZES)
    for height, width in SIZES:
        processed = processor.model_input_size(height, width)
        assert slide_windows(*processed, (64, 64), (48, 48)) == [(0, processed[0], 0, processed[1])]
    whole = predict_segmentation(model, processor, images)
    slide = predict_segmentation(model, processor, images, mode=InferenceMode("slide", 64, 48))
    for a, b in zip(whole, slide):
        assert np.array_equal(a, b)


def test_slide_equals_mmsegmentations_slide_inference(tiny):
    """Windows 24 x 16 every 16 x 10 (sizes the stride does not divide; the 21-pixel-high image is smaller than the
    window in height), batched up to 3 windows a forward, against the transcription one window at a time."""
    model, processor = tiny
    images = random_images(SIZES, seed=1)
    mode = InferenceMode("slide", (24, 16), (16, 10))
    predictions = predict_segmentation(model, processor, images, mode=mode, batch_size=3)
    for image, prediction in zip(images, predictions):
        inputs = processor(image, return_tensors="pt")["pixel_values"]
        logits = mmseg_slide_logits(model, inputs, (24, 16), (16, 10))
        expected = bilinear(logits, (image.height, image.width)).argmax(dim=1)[0]
        assert prediction.shape == (image.height, image.width)
        assert np.array_equal(prediction, expected.numpy())
    # the windows change the prediction (the test above would not notice a mode that ran whole)
    whole = predict_segmentation(model, processor, images)
    assert any(not np.array_equal(a, b) for a, b in zip(whole, predictions))


# -- test-time augmentation -------------------------------------------------------------------------------------


def test_scale_list_one_equals_whole(tiny):
    """Scales [1.0] without flip is the official protocol; also through the views' code (which the official mode
    does not take), for a large image too (predicted at long side 30, then nearest up)."""
    model, _ = tiny
    processor = ViTFCNImageProcessor(short_side=32, max_long_side=64, max_pixels=2000, large_image_long_side=30)
    images = random_images([*SIZES, (45, 60)], seed=2)  # 45 x 60 is over max_pixels
    whole = predict_segmentation(model, processor, images)
    assert np.array_equal(predict_segmentation(model, processor, images, mode=InferenceMode(scales=[1.0]))[0], whole[0])
    views = _predict_views(model, processor, images, InferenceMode(scales=(1.0,)), torch.device("cpu"), None, 8)
    for prediction, expected in zip(views, whole):
        assert np.array_equal(prediction.numpy(), expected)


def test_scales_feed_the_processors_sizes_times_the_scale(tiny):
    """mmsegmentation 0.x's MultiScaleFlipAug: short and long side times the scale, truncated, then the keep-ratio
    resize; the flipped view is the mirror image of its scale's input. Same-size inputs share a forward."""
    model, processor = tiny
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].clone()), with_kwargs=True
    )
    try:
        predict_segmentation(
            model, processor, random_images([(40, 60)]), mode=InferenceMode(scales=(0.5, 1.5), flip=True)
        )
    finally:
        hook.remove()
    # 0.5: short 16, long 32 -> min(32/60, 16/40) = 0.4 -> 16 x 24; 1.5: short 48, long 96 -> 1.2 -> 48 x 72.
    assert [tuple(x.shape) for x in seen] == [(2, 3, 16, 24), (2, 3, 48, 72)]
    for batch in seen:
        assert torch.equal(batch[1], batch[0].flip(-1))


def mirror_symmetric_model(asymmetric=False):
    """Logits from each pixel's colour alone, elementwise (no reduction whose rounding could depend on the position),
    at stride 1: mirroring the image mirrors the logits exactly. `asymmetric` adds a term growing with the column."""

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.weight = torch.nn.Parameter(torch.randn(3, NUM_LABELS, generator=generator))

        def forward(self, pixel_values):
            logits = sum(pixel_values[:, c, None] * self.weight[c, :, None, None] for c in range(3))
            if asymmetric:
                columns = torch.arange(pixel_values.shape[-1], dtype=logits.dtype)
                logits = logits + columns * torch.linspace(-0.2, 0.2, NUM_LABELS)[:, None, None]
            return type("Output", (), {"logits": logits})()

    return Pointwise().eval()


def test_flip_of_a_mirror_symmetric_model_equals_no_flip():
    processor = ViTFCNImageProcessor(short_side=32, max_long_side=64)
    images = random_images(SIZES, seed=3)
    for mode in (InferenceMode(flip=True), InferenceMode("slide", (24, 16), (16, 10), flip=True)):
        model = mirror_symmetric_model()
        unflipped = InferenceMode("slide", (24, 16), (16, 10)) if mode.mode == "slide" else InferenceMode()
        for a, b in zip(
            predict_segmentation(model, processor, images, mode=mode),
            predict_segmentation(model, processor, images, mode=unflipped),
        ):
            assert np.array_equal(a, b)
        # not by accident: a model that is not mirror-symmetric predicts otherwise with flip
        model = mirror_symmetric_model(asymmetric=True)
        flipped = predict_segmentation(model, processor, images, mode=mode)
        plain = predict_segmentation(model, processor, images, mode=unflipped)
        assert any(not np.array_equal(a, b) for a, b in zip(flipped, plain))


def test_tta_equals_mmsegmentations_seg_tta(tiny):
    """Scales 0.5, 1.0, 1.5 with flip, whole and slide, against SegTTAModel.merge_preds over views made as
    MultiScaleFlipAug makes them (each view's logits at the image, mirrored back, softmax, mean, argmax)."""
    model, processor = tiny
    images = random_images(SIZES[:3], seed=4)
    scales = (0.5, 1.0, 1.5)
    for mode in (InferenceMode(scales=scales, flip=True), InferenceMode("slide", 24, 16, scales, True)):
        predictions = predict_segmentation(model, processor, images, mode=mode)
        for image, prediction in zip(images, predictions):
            size = (image.height, image.width)
            probabilities = []
            for scale in scales:
                scaled = ViTFCNImageProcessor(short_side=int(32 * scale), max_long_side=int(64 * scale))
                inputs = scaled(image, return_tensors="pt")["pixel_values"]
                for flip in (False, True):
                    view = inputs.flip(-1) if flip else inputs
                    if mode.mode == "slide" and len(slide_windows(*view.shape[-2:], (24, 24), (16, 16))) > 1:
                        logits = mmseg_slide_logits(model, view, (24, 24), (16, 16))
                    else:  # whole, or a single window: the logits resized to the image in one step (see modes.py)
                        with torch.no_grad():
                            logits = model(pixel_values=view).logits.float()
                    logits = bilinear(logits, size)[0]
                    probabilities.append((logits.flip(-1) if flip else logits).softmax(dim=0))
            expected = (sum(probabilities) / len(probabilities)).argmax(dim=0)
            assert np.array_equal(prediction, expected.numpy())


def random_views(rng, num_classes, sizes_and_windows):
    views = []
    for (height, width), windows, flipped in sizes_and_windows:
        logits = [torch.from_numpy(rng.normal(size=(num_classes, 3, 4)).astype(np.float32)) for _ in windows]
        views.append(View((height, width), windows, flipped, logits))
    return views


def test_views_in_chunks_of_classes_equal_all_classes_at_once():
    """combine_views with chunks of 3 of 13 classes (the bounded path at 920 classes) against the literal
    computation over all classes: softmax mean for TTA, argmax of the averaged logits for one slide view."""
    rng = np.random.default_rng(5)
    size = (37, 29)
    chunk_elements = 3 * size[0] * size[1]
    tta = random_views(
        rng,
        13,
        [
            ((24, 20), [(0, 24, 0, 20)], False),
            ((24, 20), [(0, 24, 0, 20)], True),
            ((36, 30), slide_windows(36, 30, (24, 24), (16, 16)), False),
            ((36, 30), slide_windows(36, 30, (24, 24), (16, 16)), True),
        ],
    )
    full = [view.scores(0, 13, size) for view in tta]
    expected = (sum(scores.softmax(dim=0) for scores in full) / len(full)).argmax(dim=0)
    assert torch.equal(combine_views(tta, size, chunk_elements), expected)
    assert torch.equal(combine_views(tta, size), expected)
    # a chunk's scores are the same classes' scores of all classes at once
    for view, scores in zip(tta, full):
        assert torch.allclose(view.scores(3, 6, size), scores[3:6], atol=1e-6)
    single = tta[2:3]
    assert torch.equal(combine_views(single, size, chunk_elements), full[2].argmax(dim=0))


# -- the scripts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--mode", "slide", "--crop-size", "96", "--stride", "128"],
            "stride 128x128 is larger than the window 96x96: pixels between windows would get no prediction; give a "
            "stride of at most the crop size",
        ),
        (["--scales", "1.0", "0"], "every scale must be a number above 0, got 0.0"),
        (["--scales", "big"], "--scales: expected numbers (or 'mmseg'), got 'big'"),
        (["--mode", "slide", "--crop-size", "0"], "argument --crop-size: expected sizes of at least 1 pixel, got '0'"),
        (
            ["--mode", "slide", "--crop-size", "9x"],
            "argument --crop-size: expected N or HxW pixels (e.g. 224 or 224x320)",
        ),
        (["--stride", "8"], "crop_size and stride are for mode 'slide' (--mode slide); leave them out for whole"),
    ],
)
@pytest.mark.parametrize("script", ["evaluate", "predict"])
def test_bad_mode_options_are_one_line_usage_errors(script, options, message, tmp_path, monkeypatch, capsys):
    where = ["--data-dir", tmp_path] if script == "evaluate" else ["--images", tmp_path, "--out", tmp_path / "out"]
    status, lines = run_script(script, "--model", tmp_path, *where, *options, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"{script}.py: error: {message}") and lines[0].endswith("(see --help)")


@pytest.fixture
def saved_tiny_model(tiny, mini_dir, tmp_path):
    """The tiny model with the mini dataset's 11 labels, saved with its processor (no recipe.yaml)."""
    from imagenets_hf.data.imagenets import class_names

    names = class_names(mini_dir, synset_words=mini_dir / "LOC_synset_mapping.txt")
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        drop_path_rate=0.0,
        encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    )
    folder = tmp_path / "model"
    ViTFCNForSemanticSegmentation(config).save_pretrained(folder)
    tiny[1].save_pretrained(folder)
    return folder


def test_slide_needs_a_window_when_the_model_has_no_recipe(saved_tiny_model, mini_dir, tmp_path, monkeypatch, capsys):
    status, lines = run_script(
        "predict",
        *("--model", saved_tiny_model, "--images", mini_dir / "validation", "--out", tmp_path / "out"),
        *("--mode", "slide", "--no-progress"),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert (status, lines) == (
        1,
        [
            f"predict.py: error: {saved_tiny_model}: no recipe.yaml beside the model to take slide's window from "
            "(its crop_size); pass --crop-size"
        ],
    )
    assert not (tmp_path / "out").exists()


def test_evaluate_takes_the_recipes_crop_and_records_the_mode(
    saved_tiny_model, mini_dir, tmp_path, monkeypatch, capsys
):
    """`evaluate.py --mode slide --flip` on 4 validation images: the window is the recipe's crop_size (stride two
    thirds of it), the JSON records the mode, and its mIoU is `evaluate_model`'s under that mode."""
    import imagenets_hf.evaluation.inference as inference
    from imagenets_hf.data.imagenets import load_imagenets

    (saved_tiny_model / "recipe.yaml").write_text("crop_size: 24\n", encoding="utf-8")
    rows = list(load_imagenets(mini_dir, split="validation"))[:4]
    evaluate_model = inference.evaluate_model
    seen = []

    def on_four_rows(model, processor, dataset, **kwargs):
        seen.append(kwargs["mode"])
        return evaluate_model(model, processor, rows, **kwargs)

    monkeypatch.setattr(inference, "evaluate_model", on_four_rows)
    output = tmp_path / "metrics.json"
    status, lines = run_script(
        "evaluate",
        *("--model", saved_tiny_model, "--data-dir", mini_dir, "--output", output),
        *("--mode", "slide", "--flip", "--no-extended", "--num-workers", "0", "--no-progress"),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 0, lines
    expected_mode = {"mode": "slide", "crop_size": [24, 24], "stride": [16, 16], "scales": [1.0], "flip": True}
    assert [mode.to_dict() for mode in seen] == [expected_mode]
    assert "inference: slide 24x24 every 16x16 + flip" in lines
    written = json.loads(output.read_text())
    assert written["inference"] == expected_mode
    from imagenets_hf.evaluation.loading import load_model_and_processor

    model, processor = load_model_and_processor(saved_tiny_model)
    direct = evaluate_model(model, processor, rows, num_workers=0, progress=False, mode=seen[0])
    assert written["mIoU"] == pytest.approx(direct["mIoU"], abs=1e-9)
