"""The published training augmentation: its draws, its geometry against a full resize, its photometric steps against
mmsegmentation's own code on OpenCV, and the worker path against the device path."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagenets_hf.benchmarks.data import realistic_samples
from imagenets_hf.data.augment import (
    MAX_ID,
    AugmentConfig,
    _photometric_distortion,
    augment_encoded_samples,
    crop_accepted,
    decode_annotation,
    decode_image_bgr,
    draw_params,
    photometric_tables,
    sample_uniforms,
)
from imagenets_hf.data.augment_device import (
    HostStaging,
    PixelStore,
    augment_batch,
    choose_crops,
    hsv_to_rgb_8bit,
    photometric_distortion,
    rgb_to_hsv_8bit,
)
from imagenets_hf.data.masks import IGNORE_INDEX, ids_to_annotation
from imagenets_hf.training.data import DeviceBatchStream, build_train_dataloader, decode_store

NO_PHOTOMETRIC = AugmentConfig(photometric_distortion=False)


def encoded(image_rgb: np.ndarray, ids: np.ndarray, fmt: str = "PNG") -> dict:
    """A train-semi row (bytes values) of an RGB image (lossless PNG unless asked) and its ids."""
    ok, image = cv2.imencode(f".{fmt.lower()}", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    import io

    mask = io.BytesIO()
    ids_to_annotation(ids).save(mask, format="PNG")
    return {"image": {"bytes": image.tobytes(), "path": None}, "annotation": {"bytes": mask.getvalue(), "path": None}}


def store_of(rows: list[dict]) -> PixelStore:
    return decode_store(rows, threads=1)


def denormalise(pixel_values: torch.Tensor, config: AugmentConfig = NO_PHOTOMETRIC) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return pixel_values * std + mean


# -- the draws ----------------------------------------------------------------------------------------------------


def test_draws_depend_only_on_seed_and_position():
    batch = sample_uniforms(7, np.array([3, 5, 2**40 + 9]), 30)
    alone = sample_uniforms(7, np.array([5]), 30)
    assert np.array_equal(batch[1], alone[0])  # the batch a position is drawn in does not matter
    assert not np.array_equal(sample_uniforms(8, np.array([5]), 30), alone)
    assert batch.min() >= 0 and batch.max() < 1
    assert len(np.unique(batch)) == batch.size


def ks_statistic(values: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance between the sample and a continuous CDF."""
    values = np.sort(values)
    n = len(values)
    expected = cdf(values)
    return float(max(np.max(np.arange(1, n + 1) / n - expected), np.max(expected - np.arange(n) / n)))


def test_draws_follow_the_published_distributions():
    """4,000 draws. Bounds: a Kolmogorov-Smirnov distance under 1.63 / sqrt(n) (the 1% critical value) for the
    continuous draws, and frequencies within 5 standard deviations of p for the coins and the hue values; each
    fails with probability well under 1%, so the test is stable, yet an off-by-one range or a biased coin fails."""
    n = 4000
    positions = np.arange(10_000, 10_000 + n)
    heights, widths = np.full(n, 375), np.full(n, 500)
    config = AugmentConfig()
    params = draw_params(config, 3, positions, heights, widths)
    ks_bound = 1.63 / math.sqrt(n)
    assert ks_statistic(params.ratio, lambda x: (x - 0.5) / 1.5) < ks_bound
    assert params.ratio.min() >= 0.5 and params.ratio.max() < 2.0
    # mmcv rescale_size, computed here independently for each draw
    for ratio, h, w in zip(params.ratio[:200], params.resized_height[:200], params.resized_width[:200]):
        factor = min(int(1024 * ratio) / 500, int(256 * ratio) / 375)
        assert (h, w) == (int(375 * factor + 0.5), int(500 * factor + 0.5))

    def within(share: float, p: float = 0.5) -> bool:
        return abs(share - p) < 5 * math.sqrt(p * (1 - p) / n)

    for name in ("flip", "brightness_on", "contrast_on", "saturation_on", "hue_on", "contrast_first"):
        assert within(getattr(params, name).mean()), name
    on = params.brightness_on
    assert ks_statistic(params.brightness[on], lambda x: (x + 32) / 64) < 1.63 / math.sqrt(on.sum())
    for name in ("contrast", "saturation"):
        on = getattr(params, f"{name}_on")
        values = getattr(params, name)[on]
        assert ks_statistic(values, lambda x: x - 0.5) < 1.63 / math.sqrt(on.sum()), name
        assert (getattr(params, name)[~on] == 1).all()
    hues = params.hue[params.hue_on]
    assert set(hues.tolist()) == set(range(-18, 18))  # numpy's randint(-18, 18), as mmseg draws it
    counts = np.bincount(hues + 18, minlength=36)
    assert all(abs(c - len(hues) / 36) < 5 * math.sqrt(len(hues) / 36) for c in counts)
    # crop offsets: uniform over the margins (0..margin inclusive)
    margins = np.maximum(params.resized_height - 224, 0)
    big = margins > 100
    assert ks_statistic((params.tops[big, 0] + 0.5) / (margins[big] + 1), lambda x: x) < 1.63 / math.sqrt(big.sum())
    assert (params.tops[:, :] <= margins[:, None]).all() and (params.tops >= 0).all()


def test_photometric_off_draws_nothing_on():
    params = draw_params(NO_PHOTOMETRIC, 0, np.arange(100), np.full(100, 300), np.full(100, 400))
    for name in ("brightness_on", "contrast_on", "saturation_on", "hue_on"):
        assert not getattr(params, name).any()


# -- the crop test ------------------------------------------------------------------------------------------------


def counts_of(values: list[int]) -> np.ndarray:
    return np.bincount(values, minlength=MAX_ID + 1)[None]


def test_crop_test_ignores_1000_and_needs_two_classes():
    config = AugmentConfig()
    # 50% ignore, 40% class 1, 10% class 2: class 1 holds 80% of the counted pixels -> rejected (mmseg drops 1000).
    assert not crop_accepted(counts_of([1000] * 50 + [1] * 40 + [2] * 10), config)[0]
    assert crop_accepted(counts_of([1000] * 50 + [1] * 30 + [2] * 20), config)[0]  # 60%
    assert not crop_accepted(counts_of([1000] * 50 + [1] * 50), config)[0]  # one class
    assert not crop_accepted(counts_of([1000] * 10), config)[0]


def test_crop_retries_until_no_class_dominates_on_both_paths():
    """Columns 0-299 are class 0 and 300-399 split between classes 1 and 2; a 100x100 crop passes when its left edge
    is in 226..300 (a quarter of the draws), so with 10 retries nearly every crop passes, and without them few."""
    ids = np.zeros((100, 400), dtype=np.int64)
    ids[:50, 300:] = 1
    ids[50:, 300:] = 2
    row = encoded(np.zeros((100, 400, 3), np.uint8), ids)
    n = 60
    for ratio, check in ((0.75, lambda passed: passed >= 54), (1.0, lambda passed: passed <= 25)):
        # resize off (scale = the image's size, ratio 1): 54 is 60 x (1 - 0.75^11) = 57.5 less 2 sigma
        config = AugmentConfig(crop_size=100, resize_scale=(400, 100), ratio_range=(1.0, 1.0), cat_max_ratio=ratio)
        worker = augment_encoded_samples(config, 0, range(n), [row["image"]] * n, [row["annotation"]] * n)
        store = store_of([row]).subset(np.zeros(n, dtype=np.int64))
        device = augment_batch(config, store, draw_params(config, 0, np.arange(n), store.heights, store.widths))
        assert torch.equal(worker["labels"], device["labels"])
        passed = sum(
            bool(crop_accepted(counts_of(labels.ravel().tolist()), AugmentConfig())[0]) for labels in worker["labels"]
        )
        assert check(passed), (ratio, passed)


# -- geometry against a full resize -------------------------------------------------------------------------------


def full_resize_crop(image: np.ndarray, ids: np.ndarray, params, sample: int, crop: int):
    """The reference: interpolate the whole image (bilinear, no antialias, rounded) and mask (nearest) to the drawn
    size, crop the chosen window, flip."""
    h, w = int(params.resized_height[sample]), int(params.resized_width[sample])
    draw = params.chosen[sample]
    top, left = int(params.tops[sample, draw]), int(params.lefts[sample, draw])
    resized = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(h, w), mode="bilinear")
    resized = resized.round().clamp(0, 255)[0, :, top : top + crop, left : left + crop]
    labels = F.interpolate(torch.from_numpy(ids)[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    labels = labels[top : top + crop, left : left + crop]
    if params.flip[sample]:
        resized, labels = resized.flip(-1), labels.flip(-1)
    return resized, labels


@pytest.fixture(scope="module")
def noise_rows():
    """Random-noise images (the hardest case for interpolation) with blocky masks, both orientations; lossless."""
    rng = np.random.default_rng(0)
    rows, raw = [], []
    for index in range(6):
        h, w = (375, 500) if index % 2 else (500, 375)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ids = np.kron(rng.integers(0, 6, (h // 25 + 1, w // 25 + 1)), np.ones((25, 25), np.int64))[:h, :w]
        rows.append(encoded(image, ids))
        raw.append((image, ids))
    return rows, raw


def test_device_path_samples_the_crop_of_a_full_resize(noise_rows):
    """Only the crop is sampled, at the full resize's points: labels equal exactly; image values equal but where
    float rounding of the bilinear weights lands on the other side of .5 (at most 1 level, rarely)."""
    rows, raw = noise_rows
    config = AugmentConfig(photometric_distortion=False)
    store = store_of(rows)
    params = draw_params(config, 0, np.arange(len(rows)), store.heights, store.widths)
    out = augment_batch(config, store, params)
    for sample, (image, ids) in enumerate(raw):
        expected_image, expected_labels = full_resize_crop(image, ids, params, sample, 224)
        h, w = expected_labels.shape
        assert torch.equal(out["labels"][sample, :h, :w], expected_labels)
        diff = (denormalise(out["pixel_values"][sample])[:, :h, :w] - expected_image).abs()
        assert diff.max() <= 1.001 and (diff > 0.5).float().mean() < 1e-3


def test_worker_path_samples_the_crop_of_a_full_resize(noise_rows):
    """The worker path samples with OpenCV's warpAffine (fixed-point weights in 1/32 pixel steps, as OpenCV's resize
    uses 11-bit weights): labels equal exactly; on random noise (the worst case: neighbours differ by ~85 levels)
    image values within 1/32 of the neighbour difference, a few levels."""
    rows, raw = noise_rows
    config = AugmentConfig(photometric_distortion=False)
    out = augment_encoded_samples(
        config, 0, range(len(rows)), [r["image"] for r in rows], [r["annotation"] for r in rows], allow_draft=False
    )
    params = draw_params(config, 0, np.arange(len(rows)), [i.shape[0] for i, _ in raw], [i.shape[1] for i, _ in raw])
    store = store_of(rows)
    params.chosen = choose_crops(config, params, store)
    for sample, (image, ids) in enumerate(raw):
        expected_image, expected_labels = full_resize_crop(image, ids, params, sample, 224)
        h, w = expected_labels.shape
        assert torch.equal(out["labels"][sample, :h, :w], expected_labels)
        diff = (denormalise(out["pixel_values"][sample])[:, :h, :w] - expected_image).abs()
        assert diff.mean() < 1.0 and diff.max() <= 8.001


def test_with_resize_flip_and_photometric_off_the_paths_give_identical_crops(noise_rows):
    rows, _ = noise_rows
    landscape = rows[1::2]  # 375 x 500: scale (500, 375) at ratio 1 keeps the size
    config = AugmentConfig(resize_scale=(500, 375), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric_distortion=False)
    positions = np.arange(100, 100 + len(landscape))
    worker = augment_encoded_samples(
        config, 0, positions, [r["image"] for r in landscape], [r["annotation"] for r in landscape]
    )
    store = store_of(landscape)
    device = augment_batch(config, store, draw_params(config, 0, positions, store.heights, store.widths))
    assert torch.equal(worker["labels"], device["labels"])
    assert torch.equal(worker["pixel_values"], device["pixel_values"])


def test_small_images_are_padded_with_zero_and_ignore():
    ids = np.ones((60, 80), np.int64)
    ids[:, 40:] = 2
    row = encoded(np.full((60, 80, 3), 200, np.uint8), ids)
    config = AugmentConfig(crop_size=224, resize_scale=(80, 60), ratio_range=(1.0, 1.0), photometric_distortion=False)
    worker = augment_encoded_samples(config, 0, [0], [row["image"]], [row["annotation"]])
    store = store_of([row])
    device = augment_batch(config, store, draw_params(config, 0, np.array([0]), store.heights, store.widths))
    for out in (worker, device):
        assert out["pixel_values"].shape == (1, 3, 224, 224) and out["labels"].shape == (1, 224, 224)
        assert (out["labels"][0, 60:] == IGNORE_INDEX).all() and (out["labels"][0, :, 80:] == IGNORE_INDEX).all()
        assert (out["pixel_values"][0, :, 60:] == 0).all() and (out["pixel_values"][0, :, :, 80:] == 0).all()
        assert set(out["labels"][0, :60, :80].unique().tolist()) == {1, 2}
        assert torch.allclose(denormalise(out["pixel_values"][0])[:, :60, :80], torch.tensor(200.0), atol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_image_and_mask_stay_aligned_through_resize_crop_and_flip(seed):
    """Blocks of one colour per id: inside each block (away from edges) the de-normalised colour is the id's."""
    palette = {0: (20, 20, 20), 3: (230, 40, 40), 7: (40, 230, 40), 12: (40, 40, 230)}
    layout = list(palette)
    ids = np.zeros((200, 280), np.int64)
    for by in range(0, 200, 40):
        for bx in range(0, 280, 40):
            ids[by : by + 40, bx : bx + 40] = layout[(by // 40 + bx // 40) % len(layout)]
    image = np.zeros((200, 280, 3), np.uint8)
    for k, colour in palette.items():
        image[ids == k] = colour
    row = encoded(image, ids)
    colours = torch.zeros(MAX_ID + 1, 3)
    for k, colour in palette.items():
        colours[k] = torch.tensor(colour, dtype=torch.float32)
    config = AugmentConfig(crop_size=160, resize_scale=(560, 200), photometric_distortion=False, cat_max_ratio=1.0)
    positions = np.arange(seed * 8, seed * 8 + 8)
    worker = augment_encoded_samples(config, 0, positions, [row["image"]] * 8, [row["annotation"]] * 8)
    store = store_of([row]).subset(np.zeros(8, dtype=np.int64))
    device = augment_batch(config, store, draw_params(config, 0, positions, store.heights, store.widths))
    for out in (worker, device):
        for pixels, labels in zip(out["pixel_values"], out["labels"]):
            rgb = denormalise(pixels)
            m = labels[None, None].float()
            pad = F.pad(m, (2, 2, 2, 2), mode="replicate")
            interior = (F.max_pool2d(pad, 5, 1) == -F.max_pool2d(-pad, 5, 1))[0, 0] & (labels != IGNORE_INDEX)
            assert interior.sum() > 500
            expected = colours[labels[interior]].T
            assert (rgb[:, interior] - expected).abs().max() <= 1.001


# -- photometric distortion against mmsegmentation's code on OpenCV ------------------------------------------------


def mmseg_photometric(bgr: np.ndarray, params, sample: int) -> np.ndarray:
    """mmsegmentation's PhotoMetricDistortion.transform with the drawn values (its `convert`, `bgr2hsv`/`hsv2bgr`
    through cv2.cvtColor, and its order: brightness, contrast if mode 1, saturation, hue, contrast if mode 0)."""

    def convert(img, alpha=1.0, beta=0.0):
        img = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
        return np.clip(img, 0, 255).astype(np.uint8)

    img = bgr
    if params.brightness_on[sample]:
        img = convert(img, beta=params.brightness[sample])
    if params.contrast_first[sample] and params.contrast_on[sample]:
        img = convert(img, alpha=params.contrast[sample])
    if params.saturation_on[sample]:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=params.saturation[sample])
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if params.hue_on[sample]:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + params.hue[sample]) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not params.contrast_first[sample] and params.contrast_on[sample]:
        img = convert(img, alpha=params.contrast[sample])
    return img


def test_photometric_distortion_equals_mmsegs_on_both_paths():
    """64 x 64 crops (a multiple of OpenCV's vector block, so its scalar tail, which rounds, does not run): the
    worker path (OpenCV itself) and the device path (integer and float32 emulation) equal mmseg's result exactly."""
    rng = np.random.default_rng(1)
    n = 64
    crops_rgb = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    params = draw_params(AugmentConfig(), 5, np.arange(n), np.full(n, 300), np.full(n, 400))
    tables = photometric_tables(params)
    device = photometric_distortion(torch.from_numpy(crops_rgb).permute(3, 0, 1, 2), params).permute(1, 2, 3, 0)
    for sample in range(n):
        bgr = cv2.cvtColor(crops_rgb[sample], cv2.COLOR_RGB2BGR)
        expected = cv2.cvtColor(mmseg_photometric(bgr, params, sample), cv2.COLOR_BGR2RGB)
        worker = cv2.cvtColor(_photometric_distortion(bgr, tables, params, sample), cv2.COLOR_BGR2RGB)
        assert np.array_equal(worker, expected), sample
        assert np.array_equal(device[sample].numpy(), expected), sample


def test_hsv_conversions_equal_opencvs():
    """A million random colours plus the greys and the six pure hues, both directions, exactly."""
    rng = np.random.default_rng(2)
    special = [[v, v, v] for v in range(256)] + [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]]
    special += [[255, 0, 255]]
    colours = np.concatenate([rng.integers(0, 256, ((1 << 20) - len(special), 3)), special]).astype(np.uint8)
    image = colours.reshape(1024, 1024, 3)
    h, s, v = rgb_to_hsv_8bit(torch.from_numpy(image).permute(2, 0, 1))
    expected = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    assert np.array_equal(np.stack([h.numpy(), s.numpy(), v.numpy()], -1), expected)
    hsv = np.stack([rng.integers(0, 180, 1 << 20), rng.integers(0, 256, 1 << 20), rng.integers(0, 256, 1 << 20)], -1)
    hsv = hsv.astype(np.uint8).reshape(1024, 1024, 3)
    back = hsv_to_rgb_8bit(*torch.from_numpy(hsv.astype(np.int32)).unbind(-1)).permute(1, 2, 0).numpy()
    assert np.array_equal(back.astype(np.uint8), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


# -- the two paths on realistic images ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realistic():
    return realistic_samples(32, seed=3)


def test_the_paths_agree_on_realistic_images(realistic):
    """Same draws and the same masks: labels equal (and so every per-class pixel share). Images: the worker path
    samples with OpenCV's fixed-point weights (measured: mean absolute difference 0.004 levels of 255) and decodes a
    JPEG at a reduced scale when the draw shrinks it 2x or more (then 0.3 levels on average: the reduced decode
    averages where the full-size one aliases). Bounds: 0.05 and 1.0 levels, and per-channel batch means within 0.1
    level (measured under 0.01)."""
    config = AugmentConfig()
    positions = np.arange(len(realistic)) * 7 + 1000
    images, annotations = [r["image"] for r in realistic], [r["annotation"] for r in realistic]
    store = store_of(realistic)
    device = augment_batch(config, store, draw_params(config, 0, positions, store.heights, store.widths))
    b = denormalise(device["pixel_values"]).permute(1, 0, 2, 3)  # (3, B, H, W)
    for allow_draft, bound in ((False, 0.05), (True, 1.0)):
        worker = augment_encoded_samples(config, 0, positions, images, annotations, allow_draft=allow_draft)
        assert torch.equal(worker["labels"], device["labels"])
        a = denormalise(worker["pixel_values"]).permute(1, 0, 2, 3)
        assert (a - b).abs().mean() < bound, allow_draft
        assert (a.mean((1, 2, 3)) - b.mean((1, 2, 3))).abs().max() < 0.1, allow_draft


def test_device_stream_matches_the_dataloader_and_resumes_exactly(realistic):
    """The device stream visits the DataLoader's positions in its order (labels equal batch for batch), and a
    stream that skipped 3 batches gives the 4th batch of a fresh one, bit for bit."""
    config = AugmentConfig(crop_size=96, resize_scale=(384, 96))
    rows = realistic[:10]
    loader = iter(build_train_dataloader(rows, config, batch_size=4, seed=1, rank=1, world_size=2, num_workers=0))
    stream = DeviceBatchStream(store_of(rows), config, batch_size=4, seed=1, rank=1, world_size=2)
    batches = [next(stream) for _ in range(4)]
    for batch in batches:
        assert torch.equal(next(loader)["labels"], batch["labels"])
    resumed = DeviceBatchStream(store_of(rows), config, batch_size=4, seed=1, rank=1, world_size=2).skip(3)
    again = next(resumed)
    assert torch.equal(again["labels"], batches[3]["labels"])
    assert torch.equal(again["pixel_values"], batches[3]["pixel_values"])


def test_a_compacted_batch_augments_like_the_full_store(realistic):
    """What the device path does with a store in pinned host memory: copy only the batch's pixels, then augment."""
    config = AugmentConfig()
    store = store_of(realistic[:8])
    index = np.array([5, 2, 2, 7])
    params = draw_params(config, 0, np.arange(4), store.heights[index], store.widths[index])
    whole = augment_batch(config, store.subset(index), params)
    compact = store.subset(index).compact("cpu")
    assert compact.pixels.shape[1] < store.pixels.shape[1]
    again = augment_batch(config, compact, draw_params(config, 0, np.arange(4), compact.heights, compact.widths))
    assert torch.equal(whole["pixel_values"], again["pixel_values"]) and torch.equal(whole["labels"], again["labels"])


def test_a_host_store_batch_is_gathered_into_the_reused_staging_buffer(realistic):
    """A store kept in host memory gathers each batch straight into one reused staging buffer (pinned on a GPU, so
    the copy from it is asynchronous; `is_pinned` needs CUDA, see docs/training.md) and the device copy is made
    from that buffer: on the CPU the batch's tensors are the buffer itself. It used to concatenate the batch into a
    new pageable tensor, so the non_blocking copy from a pinned store was synchronous."""
    config = AugmentConfig()
    store = store_of(realistic[:8])
    staging = HostStaging()
    first = store.subset(np.array([5, 2, 2, 7])).compact("cpu", staging)
    assert first.pixels.data_ptr() == staging._pixels.data_ptr() and first.ids.data_ptr() == staging._ids.data_ptr()
    capacity = staging.nbytes
    whole = augment_batch(
        config, store.subset(np.array([1, 0])), draw_params(config, 0, np.arange(2), *hw(store, [1, 0]))
    )
    second = store.subset(np.array([1, 0])).compact("cpu", staging)
    assert second.pixels.data_ptr() == staging._pixels.data_ptr() and staging.nbytes == capacity  # reused
    again = augment_batch(config, second, draw_params(config, 0, np.arange(2), second.heights, second.widths))
    assert torch.equal(whole["pixel_values"], again["pixel_values"]) and torch.equal(whole["labels"], again["labels"])
    assert staging.gathers == 2 and staging._pixels.numel() & (staging._pixels.numel() - 1) == 0  # a power of two


def hw(store: PixelStore, index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return store.heights[index], store.widths[index]


def test_the_store_is_placed_after_the_first_step_and_batches_do_not_depend_on_it(realistic, monkeypatch):
    """The store's place is decided once, after `place_after` batches (a run's first optimizer step), not when the
    stream is made; a store kept in host memory (no room) and one moved gives the same batches as one on the
    device from the start."""
    config = AugmentConfig(crop_size=96, resize_scale=(384, 96))
    rows = realistic[:10]
    reference = DeviceBatchStream(store_of(rows), config, batch_size=3, seed=2)
    assert reference.on_device and reference.staging is None
    expected = [next(reference) for _ in range(4)]
    for room in (False, True):
        stream, asked, logged = placed_stream(monkeypatch, store_of(rows), config, room)
        assert not stream.on_device and not asked and "placed after 2 batch(es)" in stream.where
        for batch in expected:
            got = next(stream)
            assert torch.equal(got["labels"], batch["labels"]) and torch.equal(
                got["pixel_values"], batch["pixel_values"]
            )
        assert asked == [(2, stream.store.nbytes)]  # once, when 2 batches had been made
        assert stream.on_device == room and len(logged) == 1 and stream.where in logged[0]
        if not room:
            assert stream.staging.gathers == 4  # every batch through the staging buffer


def placed_stream(monkeypatch, store: PixelStore, config: AugmentConfig, room: bool):
    """A stream placed after 2 batches whose device has `room` or not; the (batches made, bytes) of each question
    and the log lines."""
    import imagenets_hf.training.data as data

    asked, logged = [], []
    stream = None

    def device_has_room(device, nbytes, fraction=0.5):
        asked.append((stream.batches_made, nbytes))
        return room

    monkeypatch.setattr(data, "device_has_room", device_has_room)
    stream = DeviceBatchStream(store, config, batch_size=3, seed=2, place_after=2, log=logged.append)
    return stream, asked, logged


def test_device_has_room_measures_free_memory_against_the_fraction(monkeypatch):
    from imagenets_hf.training.data import device_has_room

    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return 10 * 2**30, 24 * 2**30  # 10 GiB free of a 24 GB card

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    gpu = torch.device("cuda", 1)
    assert device_has_room(gpu, 5 * 2**30) and not device_has_room(gpu, 5 * 2**30 + 1)
    assert device_has_room(gpu, 8 * 2**30, fraction=0.8) and calls == [gpu] * 3
    assert device_has_room(torch.device("cpu"), 2**50) and len(calls) == 3  # off CUDA: no question asked


def test_a_cuda_stream_asks_the_free_memory_only_when_it_places_the_store(realistic, monkeypatch):
    """On a GPU the stream starts with the store in host memory and measures the free memory (mocked here: 24 GB
    card, 2x the store free after the first step) when it places it: the store needs at most half of that."""
    store = store_of(realistic[:4])
    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return 2 * store.nbytes - 1, 24 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    logged = []
    stream = DeviceBatchStream(store, AugmentConfig(), batch_size=2, device="cuda:1", place_after=1, log=logged.append)
    assert calls == [] and not stream.placed
    stream.place()
    assert calls and set(calls) == {torch.device("cuda", 1)} and not stream.on_device and stream.staging.pin
    assert f"when {(2 * store.nbytes - 1) / 2**20:.0f} MiB of cuda:1 were free" in logged[0]
    assert "in host memory (each batch copied through a pinned staging buffer)" in logged[0]


@pytest.mark.parametrize(
    ("cores", "local_processes", "threads"), [(16, None, 16), (16, "8", 2), (16, "32", 1), (64, "2", 16), (6, "4", 1)]
)
def test_decode_threads_share_the_cores_among_the_local_processes(monkeypatch, cores, local_processes, threads):
    """8 training processes on a 16-core node decode with 2 threads each (they used to start 16 each)."""
    import os

    from imagenets_hf.training import data
    from imagenets_hf.training.data import decode_threads

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    # And the name data.py calls, directly: in a full suite run this case once saw 2 cores on a 2-core machine.
    monkeypatch.setattr(data, "available_cores", lambda: cores)
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert decode_threads() == threads


def test_decode_store_holds_the_pixels_once_at_its_peak(realistic):
    """The store is allocated from the masks' headers and each sample decoded into its place: the peak of traced
    host memory (NumPy and OpenCV arrays) is the store plus one sample's decoding (one thread here: its BGR image,
    its mask and the decoder's buffers, bounded by 3 of the largest sample's store bytes). Decoding into a list
    and packing it afterwards held every pixel twice (peak >= 2x the store)."""
    import tracemalloc

    rows = realistic[:12]
    reference = store_of(rows)
    largest = int((reference.pixel_heights * reference.pixel_widths * 5).max())  # 3 bytes of RGB + 2 of ids
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        store = decode_store(rows, threads=1)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert torch.equal(store.pixels, reference.pixels) and torch.equal(store.ids, reference.ids)
    print(f"peak {peak / store.nbytes:.3f} x the store; largest sample {largest / store.nbytes:.3f}")
    assert store.nbytes <= peak <= store.nbytes + 3 * largest, (peak / store.nbytes, largest / store.nbytes)


def test_decode_store_names_a_sample_without_annotation(realistic):
    rows = [dict(row) for row in realistic[:3]]
    rows[1] = {**rows[1], "annotation": None, "image_id": "n01_000042"}
    with pytest.raises(ValueError, match="training sample 'n01_000042' has no annotation"):
        decode_store(rows, threads=1)


def test_decoding_refuses_a_mask_of_another_size(realistic):
    row = realistic[0]
    mask = decode_annotation(row["annotation"])
    with pytest.raises(ValueError, match="differs from annotation size"):
        decode_image_bgr(row["image"], (mask.shape[0] + 1, mask.shape[1]))
    assert decode_image_bgr(row["image"], mask.shape, (mask.shape[0] // 4, mask.shape[1] // 4)).shape[0] == -(
        -mask.shape[0] // 4
    )


def test_workers_start_after_multi_threaded_opencv_in_this_process(realistic):
    """OpenCV's thread pool does not survive a fork: a DataLoader worker forked after a multi-threaded OpenCV call
    in this process used to hang in its first OpenCV call (seen in a test process that had augmented before)."""
    cv2.setNumThreads(2)
    picture = np.zeros((1024, 1024, 3), np.uint8)
    cv2.GaussianBlur(cv2.resize(picture, (700, 700)), (5, 5), 0)  # large enough to run on the pool's threads
    config = AugmentConfig(crop_size=96, resize_scale=(384, 96))
    loader = build_train_dataloader(realistic[:4], config, batch_size=2, num_workers=1)
    loader.timeout = 120  # a hung worker fails the test instead of blocking the run
    batch = next(iter(loader))
    assert batch["labels"].shape == (2, 96, 96)
