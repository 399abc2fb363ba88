"""Training augmentation (imagenets_hf.data.transforms): ids preserved, crop rule, alignment, mmseg formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from imagenets_hf.data.masks import IGNORE_INDEX
from imagenets_hf.data.transforms import (
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    PadToSize,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RandomRatioResize,
    imagenetsegmodel_train_transform,
    mmseg_train_transform,
    to_tv_tensors,
)

# A block pattern: class id k occupies 40x40 blocks; the image colour encodes the id, so alignment can be read back.
PALETTE = {0: (20, 20, 20), 3: (230, 40, 40), 7: (40, 230, 40), 12: (40, 40, 230), IGNORE_INDEX: (128, 128, 128)}


def block_pattern(height: int = 200, width: int = 280) -> tuple[Image.Image, np.ndarray]:
    ids = np.zeros((height, width), dtype=np.int32)
    layout = [0, 3, 7, 12, IGNORE_INDEX]
    for by in range(0, height, 40):
        for bx in range(0, width, 40):
            ids[by : by + 40, bx : bx + 40] = layout[(by // 40 + bx // 40) % len(layout)]
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    for k, colour in PALETTE.items():
        rgb[ids == k] = colour
    return Image.fromarray(rgb), ids


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 5x5 neighbourhood holds a single id (away from block edges)."""
    m = mask.float()[None, None]
    pad = torch.nn.functional.pad(m, (2, 2, 2, 2), mode="replicate")
    high = torch.nn.functional.max_pool2d(pad, 5, stride=1)
    low = -torch.nn.functional.max_pool2d(-pad, 5, stride=1)
    return (high == low)[0, 0]


def test_to_tv_tensors_types_and_size_check():
    image, ids = block_pattern()
    img, mask = to_tv_tensors(image, ids)
    assert isinstance(img, tv_tensors.Image) and img.dtype == torch.uint8 and img.shape == (3, 200, 280)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (200, 280)
    with pytest.raises(ValueError, match="annotation size"):
        to_tv_tensors(image, ids[:100])


@pytest.mark.parametrize("seed", range(6))
def test_every_step_keeps_integer_ids_from_the_image_set(seed):
    image, ids = block_pattern()
    allowed = set(np.unique(ids).tolist()) | {IGNORE_INDEX}
    img, mask = to_tv_tensors(image, ids)
    torch.manual_seed(seed)
    for step in mmseg_train_transform(crop_size=224).transforms:
        img, mask = step(img, mask)
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64, type(step).__name__
        assert set(mask.unique().tolist()) <= allowed, type(step).__name__
    assert img.shape == (3, 224, 224) and mask.shape == (224, 224)
    img, mask = to_tv_tensors(image, ids)
    for step in imagenetsegmodel_train_transform(crop_size=96).transforms:
        img, mask = step(img, mask)
        assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= allowed, type(step).__name__


@pytest.mark.parametrize("seed", range(8))
def test_image_and_mask_stay_aligned(seed):
    """Geometric steps (resize, crop, flip, pad) move image and mask together: inside each block the (de-normalised)
    image colour is the colour of the mask's id."""
    image, ids = block_pattern()
    transform = mmseg_train_transform(crop_size=160, resize_scale=(560, 200), photometric_distortion=False)
    torch.manual_seed(seed)
    img, mask = transform(*to_tv_tensors(image, ids))
    rgb = img * torch.tensor(IMAGENET_STD_255)[:, None, None] + torch.tensor(IMAGENET_MEAN_255)[:, None, None]
    inside = interior(mask) & (mask != IGNORE_INDEX)
    assert inside.sum() > 1000
    expected = torch.stack([torch.tensor(PALETTE[int(k)], dtype=torch.float32) for k in mask[inside]], dim=1)
    assert torch.allclose(rgb[:, inside], expected, atol=1.0)


def test_resize_follows_mmcv_rescale_size():
    _, ids = block_pattern(height=300, width=500)
    mask = tv_tensors.Mask(torch.from_numpy(ids.astype(np.int64)))
    resize = RandomRatioResize(scale=(1024, 256), ratio_range=(0.5, 2.0))
    for seed in range(10):
        torch.manual_seed(seed)
        ratio = float(torch.rand(()) * 1.5 + 0.5)  # the same draw the transform makes
        long_edge, short_edge = int(1024 * ratio), int(256 * ratio)
        factor = min(long_edge / 500, short_edge / 300)
        expected = (int(300 * factor + 0.5), int(500 * factor + 0.5))
        torch.manual_seed(seed)
        assert tuple(resize(mask).shape) == expected


def test_cat_max_ratio_acceptance_ignores_1000():
    crop = RandomCropCatMax(4, cat_max_ratio=0.75)
    # 50% ignore, 40% class 1, 10% class 2: class 1 holds 80% of the counted pixels -> rejected (mmseg drops 1000).
    rejected = torch.tensor([1000] * 50 + [1] * 40 + [2] * 10)
    accepted = torch.tensor([1000] * 50 + [1] * 30 + [2] * 20)  # 60% -> accepted
    single = torch.tensor([1000] * 50 + [1] * 50)  # one class -> rejected
    assert not crop.accepts(rejected)
    assert crop.accepts(accepted)
    assert not crop.accepts(single)
    assert not crop.accepts(torch.full((10,), 1000))


def test_crop_retries_until_no_class_dominates():
    """Columns 0-299 are class 0 and 300-399 split between classes 1 and 2; a 100x100 crop passes when its left edge
    is in 226..300 (a quarter of the draws), so with 10 retries nearly every crop passes, and without them few."""
    ids = np.zeros((100, 400), dtype=np.int64)
    ids[:50, 300:] = 1
    ids[50:, 300:] = 2
    mask = tv_tensors.Mask(torch.from_numpy(ids))
    passed = {0.75: 0, 1.0: 0}
    for ratio in passed:
        crop = RandomCropCatMax(100, cat_max_ratio=ratio)
        for seed in range(60):
            torch.manual_seed(seed)
            out = crop(mask)
            assert out.shape == (100, 100)
            passed[ratio] += crop.accepts(out.reshape(-1), cat_max_ratio=0.75)
    assert passed[0.75] >= 54  # expected 60 x (1 - 0.75^11) = 57.5
    assert passed[1.0] <= 25  # expected 60 x 0.25 = 15


def test_crop_of_a_small_image_and_pad_to_size():
    image, ids = block_pattern(height=50, width=70)
    img, mask = to_tv_tensors(image, ids)
    img, mask = RandomCropCatMax(64)(img, mask)
    assert img.shape == (3, 50, 64) and mask.shape == (50, 64)
    img, mask = PadToSize(64, fill=0.0, mask_fill=IGNORE_INDEX)(img.float(), mask)
    assert img.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert (mask[50:] == IGNORE_INDEX).all() and (img[:, 50:] == 0).all()
    # the crop is a window of the original at some left offset in 0..6
    windows = [torch.from_numpy(ids[:, left : left + 64].astype(np.int64)) for left in range(7)]
    assert any(torch.equal(mask[:50], window) for window in windows)


def test_photometric_distortion_matches_mmseg_steps():
    """Brightness and contrast are mmcv's `clip(img * alpha + beta)` truncated to uint8; hue shifts by k in OpenCV
    units (2k degrees); masks pass through untouched."""
    img = tv_tensors.Image(torch.tensor([[[200]], [[100]], [[50]]], dtype=torch.uint8).expand(3, 2, 2).clone())
    mask = tv_tensors.Mask(torch.tensor([[0, 3], [1000, 3]]))
    distortion = PhotoMetricDistortion()
    out = distortion.transform(img, {"brightness": 30.7, "contrast_first": True, "contrast": 1.5})
    # (200 + 30.7) -> 230, (100 + 30.7) -> 130, (50 + 30.7) -> 80; then x1.5 -> 255 (clipped), 195, 120
    assert out[:, 0, 0].tolist() == [255, 195, 120]
    # hue of (200, 100, 50) is 20 degrees; +30 OpenCV units = +60 degrees -> 80 degrees: (150, 200, 50)
    out = distortion.transform(img, {"contrast_first": False, "hue": 30})
    assert out[:, 0, 0].tolist() == [150, 200, 50]
    # saturation x0.5 of (200, 100, 50): S 0.75 -> 0.375, so min = 200 x 0.625 = 125; hue 20 degrees keeps
    # (G - min) / (max - min) = 1/3: G = 125 + 75 / 3 = 150
    out = distortion.transform(img, {"contrast_first": False, "saturation": 0.5})
    assert out[:, 0, 0].tolist() == [200, 150, 125]
    torch.manual_seed(0)
    _, kept = distortion(img, mask)
    assert torch.equal(kept, mask)


def test_photometric_distortion_applies_each_step_about_half_the_time():
    distortion = PhotoMetricDistortion()
    torch.manual_seed(0)
    draws = [distortion.make_params([]) for _ in range(2000)]
    for key in ("brightness", "contrast", "saturation", "hue"):
        share = sum(key in d for d in draws) / len(draws)
        assert 0.45 < share < 0.55, key
    assert all(-32 <= d["brightness"] <= 32 for d in draws if "brightness" in d)
    assert all(0.5 <= d["contrast"] <= 1.5 for d in draws if "contrast" in d)
    assert {d["hue"] for d in draws if "hue" in d} == set(range(-18, 18))  # np.random.randint(-18, 18)
