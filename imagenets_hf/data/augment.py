"""The published training augmentation (mmsegmentation's ImageNet-S pipeline): its random draws, its geometry, and
the per-sample implementation that DataLoader workers run (NumPy + OpenCV, as mmsegmentation does).

Steps, as mmsegmentation runs them (`configs/_base_/datasets/imagenets.py`): keep-ratio resize to scale (1024, 256)
x r, r ~ U(0.5, 2) (mmcv `rescale_size`: factor min(long / max(h, w), short / min(h, w)), sizes rounded half up);
random crop of 224 whose largest class covers less than `cat_max_ratio` of the non-ignored pixels and that holds
more than one class (up to 10 checked draws, then an 11th is kept unchecked); horizontal flip with p = 0.5;
`PhotoMetricDistortion` with its 8-bit semantics (brightness + U(-32, 32) and contrast x U(0.5, 1.5) in float32,
clipped and truncated to uint8; saturation x U(0.5, 1.5) and hue + randint(-18, 18) each through OpenCV's 8-bit HSV;
contrast first or last by a coin; each step on with p = 0.5); normalise with ImageNet's mean and std (0-255 scale);
pad bottom/right to 224 with image 0 and label 1000.

What is done differently, keeping the result:
- Every random number of a sample comes from a counter-based generator keyed by (seed, stream position)
  (`draw_params`): the same sample gets the same draws in a DataLoader worker (`augment_encoded_samples`) and on the
  training device (`augment_device.augment_batch`), in any process, after any resume.
- The resized image is never made: the crop window is chosen in resized coordinates first (masks sampled with
  nearest's index rule, `nearest_index`, so ids are never invented), and only the crop's pixels are sampled from the
  original, at the sample points of a full resize (`cv2.warpAffine` with the resize's affine map; flipping is a
  mirrored map).
- A JPEG that the drawn scale shrinks 2x or more is decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (PIL's
  draft mode), then sampled as if that smaller image were resized: much cheaper, and less aliased than a
  non-antialiased resize of the full image (with mmsegmentation's first shrinking of images over 1000 x 1000 pixels
  to long side 1000, which is not done here, the only steps whose pixels differ from mmsegmentation's).
- Brightness, contrast, saturation and hue are per-sample lookup tables (`photometric_tables`); only saturation and
  hue go through HSV, on the crop only.
- Training decodes each mask once (`training.data.pack_train_masks`, kept run-length packed: `packed_masks`) and
  hands the decoded ids in; the ids are the same.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
MAX_ID = 1000  # ids are 0..N (N <= 919) and the ignore id 1000: one histogram bin each when checking crops
_EXIF_ORIENTATION = 274


@dataclass(frozen=True)
class AugmentConfig:
    """The published pipeline's parameters (mmsegmentation's ImageNet-S values by default)."""

    crop_size: int = 224
    resize_scale: tuple[int, int] = (1024, 256)  # (long, short) before the random ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    max_tries: int = 10  # checked crop draws; one more is drawn and kept unchecked when all fail
    flip_prob: float = 0.5
    photometric_distortion: bool = True
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18
    ignore_index: int = IGNORE_INDEX
    mean: tuple[float, float, float] = IMAGENET_MEAN_255
    std: tuple[float, float, float] = IMAGENET_STD_255

    @classmethod
    def from_recipe(cls, recipe: Any) -> AugmentConfig:
        return cls(
            crop_size=int(recipe.crop_size),
            resize_scale=(int(max(recipe.resize_scale)), int(min(recipe.resize_scale))),
            ratio_range=(float(recipe.ratio_range[0]), float(recipe.ratio_range[1])),
            cat_max_ratio=float(recipe.cat_max_ratio),
            flip_prob=float(recipe.flip_prob),
            photometric_distortion=bool(recipe.photometric_distortion),
        )


# -- counter-based random numbers ---------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x, constant: int):
    """x * constant mod 2^32 for x in [0, 2^32), exact in int64 (no product reaches 2^63)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(x):
    """A 32-bit integer hash (C. Wellons' lowbias32) on Python ints or int64 arrays alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_uniforms(seed: int, positions: np.ndarray, count: int) -> np.ndarray:
    """(B, count) float64 numbers in [0, 1) (24-bit resolution) that depend only on (seed, position, column)."""
    key = _hash32((seed & _MASK32) ^ _hash32(((seed >> 32) & _MASK32) ^ 0x9E3779B9))
    positions = np.asarray(positions, dtype=np.int64)
    state = _hash32((positions & _MASK32) ^ key)
    state = _hash32(state ^ _hash32(((positions >> 32) & _MASK32) ^ 0x85EBCA6B))
    columns = _hash32(np.arange(count, dtype=np.int64) ^ 0xC2B2AE35)
    bits = _hash32(_mul32(state[:, None], 0x27D4EB2F) ^ columns[None, :])
    return (bits >> 8).astype(np.float64) * (1.0 / (1 << 24))


# Columns of the per-sample table of uniforms.
_RATIO, _FLIP = 0, 1
_BRIGHT_ON, _BRIGHT, _CONTRAST_FIRST, _CONTRAST_ON, _CONTRAST = 2, 3, 4, 5, 6
_SAT_ON, _SAT, _HUE_ON, _HUE = 7, 8, 9, 10
_CROPS = 11  # then (top, left) for each of max_tries + 1 crop draws


@dataclass
class AugmentParams:
    """Everything drawn for a batch of B samples (NumPy arrays of B rows; `tensors` puts them on a device)."""

    ratio: np.ndarray  # float64: the random resize ratio
    resized_height: np.ndarray  # int64: the size the image would be resized to
    resized_width: np.ndarray
    tops: np.ndarray  # int64 (B, max_tries + 1): crop draws in resized coordinates
    lefts: np.ndarray
    crop_height: np.ndarray  # int64: min(crop_size, resized size)
    crop_width: np.ndarray
    flip: np.ndarray  # bool
    brightness_on: np.ndarray  # bool
    brightness: np.ndarray  # float32 added (0 where off)
    contrast_first: np.ndarray  # bool
    contrast_on: np.ndarray
    contrast: np.ndarray  # float32 factor (1 where off)
    saturation_on: np.ndarray
    saturation: np.ndarray  # float32 factor (1 where off)
    hue_on: np.ndarray
    hue: np.ndarray  # int64 shift in OpenCV hue units (0..179 a turn), -18..17
    chosen: np.ndarray | None = None  # int64: which crop draw was used (set by `choose_crops`)

    def __len__(self) -> int:
        return len(self.ratio)

    def subset(self, index: np.ndarray) -> AugmentParams:
        return AugmentParams(**{k: (v[index] if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()})


def draw_params(config: AugmentConfig, seed: int, positions, heights, widths) -> AugmentParams:
    """Draw the augmentation of the samples at stream `positions` whose original sizes are (heights, widths)."""
    u = sample_uniforms(seed, positions, _CROPS + 2 * (config.max_tries + 1))
    heights = np.asarray(heights, dtype=np.float64)
    widths = np.asarray(widths, dtype=np.float64)
    low, high = config.ratio_range
    ratio = u[:, _RATIO] * (high - low) + low
    long_edge = np.floor(config.resize_scale[0] * ratio)  # mmcv: int(scale * ratio)
    short_edge = np.floor(config.resize_scale[1] * ratio)
    factor = np.minimum(long_edge / np.maximum(heights, widths), short_edge / np.minimum(heights, widths))
    resized_height = np.floor(heights * factor + 0.5).astype(np.int64)  # mmcv rescale_size: int(x + 0.5)
    resized_width = np.floor(widths * factor + 0.5).astype(np.int64)
    crop = config.crop_size
    margin_h = np.maximum(resized_height - crop, 0)
    margin_w = np.maximum(resized_width - crop, 0)
    draws = u[:, _CROPS:].reshape(len(u), config.max_tries + 1, 2)
    tops = np.floor(draws[..., 0] * (margin_h[:, None] + 1)).astype(np.int64)  # randint(0, margin + 1)
    lefts = np.floor(draws[..., 1] * (margin_w[:, None] + 1)).astype(np.int64)

    def coin(column: int) -> np.ndarray:
        return (u[:, column] < 0.5) & config.photometric_distortion

    def uniform(column: int, low: float, high: float) -> np.ndarray:
        return (u[:, column] * (high - low) + low).astype(np.float32)

    brightness_on, contrast_on, saturation_on, hue_on = (
        coin(_BRIGHT_ON),
        coin(_CONTRAST_ON),
        coin(_SAT_ON),
        coin(_HUE_ON),
    )
    delta = float(config.brightness_delta)
    hue = np.floor(u[:, _HUE] * 2 * config.hue_delta).astype(np.int64) - config.hue_delta  # randint(-18, 18)
    return AugmentParams(
        ratio=ratio,
        resized_height=resized_height,
        resized_width=resized_width,
        tops=tops,
        lefts=lefts,
        crop_height=np.minimum(resized_height, crop),
        crop_width=np.minimum(resized_width, crop),
        flip=u[:, _FLIP] < config.flip_prob,
        brightness_on=brightness_on,
        brightness=np.where(brightness_on, uniform(_BRIGHT, -delta, delta), np.float32(0)),
        contrast_first=u[:, _CONTRAST_FIRST] < 0.5,
        contrast_on=contrast_on,
        contrast=np.where(contrast_on, uniform(_CONTRAST, *config.contrast_range), np.float32(1)),
        saturation_on=saturation_on,
        saturation=np.where(saturation_on, uniform(_SAT, *config.saturation_range), np.float32(1)),
        hue_on=hue_on,
        hue=np.where(hue_on, hue, 0),
    )


# -- geometry: where each output pixel comes from (NumPy; float32 arithmetic as `interpolate` does it) -----------


def nearest_index(out_index: np.ndarray, in_size: np.ndarray, out_size: np.ndarray) -> np.ndarray:
    """`interpolate(mode="nearest")`'s (and OpenCV's INTER_NEAREST resize's) source index of each (B, n) output index:
    floor(dst * (in / out)) in float32, at most in - 1."""
    scale = (np.asarray(in_size).astype(np.float32) / np.asarray(out_size).astype(np.float32))[:, None]
    source = np.floor(out_index.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(source, np.asarray(in_size)[:, None] - 1)


def linear_index(out_index: np.ndarray, in_size: np.ndarray, out_size: np.ndarray):
    """`interpolate(mode="bilinear", align_corners=False)`'s two source indices of each (B, n) output index and the
    weight of the second, as its float32 arithmetic gives them."""
    in_size = np.asarray(in_size)
    scale = (in_size.astype(np.float32) / np.asarray(out_size).astype(np.float32))[:, None]
    source = np.maximum((out_index.astype(np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    last = in_size[:, None] - 1
    first = np.minimum(np.floor(source).astype(np.int64), last)
    weight = np.minimum(source - first.astype(np.float32), np.float32(1))
    return first, np.minimum(first + 1, last), weight


@dataclass
class CropWindow:
    """Resized-frame rows and columns (B, crop) of each output pixel of a crop, and which are inside it."""

    rows: np.ndarray
    columns: np.ndarray
    inside_rows: np.ndarray  # bool (B, crop): False for the padding
    inside_columns: np.ndarray


def crop_window(params: AugmentParams, draw: int | np.ndarray, crop: int, flip: bool) -> CropWindow:
    """The window of crop draw `draw` (one for all samples, or one a sample); with `flip`, the columns of flipped
    samples are mirrored within their crop."""
    batch = np.arange(len(params))
    top, left = params.tops[batch, draw], params.lefts[batch, draw]
    steps = np.arange(crop)[None, :]
    columns = np.broadcast_to(steps, (len(batch), crop))
    if flip:
        columns = np.where(params.flip[:, None], np.maximum(params.crop_width[:, None] - 1 - steps, 0), columns)
    return CropWindow(
        rows=top[:, None] + steps,
        columns=left[:, None] + columns,
        inside_rows=steps < params.crop_height[:, None],
        inside_columns=steps < params.crop_width[:, None],
    )


def crop_accepted(counts: np.ndarray, config: AugmentConfig) -> np.ndarray:
    """mmseg's crop test on (B, MAX_ID + 1) class-pixel counts of candidate crops (padding counted in bin MAX_ID):
    more than one class, and the largest under `cat_max_ratio` of the non-ignored pixels."""
    counts = np.array(counts, dtype=np.int64)
    counts[:, min(config.ignore_index, MAX_ID)] = 0
    counts[:, MAX_ID] = 0
    total = counts.sum(1)
    return ((counts > 0).sum(1) > 1) & (counts.max(1) / np.maximum(total, 1) < config.cat_max_ratio)


# -- photometric distortion as lookup tables ----------------------------------------------------------------------


def _convert_table(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(B, 256) tables of mmseg's `convert` on 8-bit values: clip(float32(v) * alpha + beta, 0, 255), truncated."""
    values = np.arange(256, dtype=np.float32)[None, :]
    return np.floor(np.clip(values * alpha[:, None] + beta[:, None], 0, 255)).astype(np.uint8)


@dataclass
class PhotometricTables:
    """A batch's photometric distortion as (B, 256) uint8 tables: `before` (brightness, then contrast when it comes
    first) on R, G, B; `saturation` on HSV saturation; `hue` on HSV hue (entries 0..179); `after` (contrast when it
    comes last) on R, G, B. Identity tables where a step is off."""

    before: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    after: np.ndarray


def photometric_tables(params: AugmentParams) -> PhotometricTables:
    one = np.ones(len(params), dtype=np.float32)
    zero = np.zeros(len(params), dtype=np.float32)
    contrast_before = np.where(params.contrast_first & params.contrast_on, params.contrast, one)
    contrast_after = np.where(~params.contrast_first & params.contrast_on, params.contrast, one)
    brightness = _convert_table(one, params.brightness)
    before = np.take_along_axis(_convert_table(contrast_before, zero), brightness.astype(np.int64), axis=1)
    values = np.arange(256)[None, :]
    hue = np.where(values < 180, (values + params.hue[:, None]) % 180, values).astype(np.uint8)
    return PhotometricTables(
        before=before,
        saturation=_convert_table(params.saturation, zero),
        hue=hue,
        after=_convert_table(contrast_after, zero),
    )


@functools.lru_cache(maxsize=8)
def normalisation_tables(config: AugmentConfig) -> np.ndarray:
    """(3, 256) float32: (v - mean) / std of each 8-bit value v in R, G, B (as float32 arithmetic computes it)."""
    values = np.arange(256, dtype=np.float32)[None, :]
    mean = np.asarray(config.mean, dtype=np.float32)[:, None]
    inverse_std = (1.0 / np.asarray(config.std, dtype=np.float32))[:, None].astype(np.float32)
    return (values - mean) * inverse_std


# -- one sample at a time, in a DataLoader worker (NumPy + OpenCV, BGR as OpenCV decodes) ---------------------------


def _encoded_bytes(value: Any) -> bytes | None:
    """The file bytes of a `datasets.Image(decode=False)` value, bytes, or a path; None for decoded images."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as handle:
            return handle.read()
    return None


def open_image(value: Any) -> Image.Image:
    """A PIL image, opened lazily (not decoded) from bytes, a path, a `datasets` value, an array or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    data = _encoded_bytes(value)
    if data is None:
        raise TypeError(f"not an image: {type(value).__name__}")
    return Image.open(io.BytesIO(data))


_JPEG_SCALES = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_image_bgr(value: Any, size: tuple[int, int], target: tuple[int, int] | None = None) -> np.ndarray:
    """An (H', W', 3) uint8 BGR array of an image whose (oriented) size must be `size`. A JPEG that will be shrunk to
    `target` (height, width) 2x or more is decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (libjpeg's DCT
    scaling, much cheaper), so H', W' are then ceil(H / s), ceil(W / s). EXIF orientation is applied, as `datasets`
    does."""
    data = _encoded_bytes(value)
    decoded = None
    if data is not None and data[:2] == b"\xff\xd8":  # a JPEG (ImageNet's rare PNGs and CMYK files go through PIL)
        flag = cv2.IMREAD_COLOR
        for scale, reduced in _JPEG_SCALES:
            if target is not None and scale * target[0] <= size[0] and scale * target[1] <= size[1]:
                flag = reduced
                break
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if decoded is None:
        picture = ImageOps.exif_transpose(open_image(value)).convert("RGB")
        decoded = cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR)
    scale = -(-size[0] // decoded.shape[0])  # 1, 2, 4 or 8 for a matching image
    if (-(-size[0] // scale), -(-size[1] // scale)) != decoded.shape[:2]:
        raise ValueError(f"image size {decoded.shape[:2]} (decoded at 1/{scale}) differs from annotation size {size}")
    return decoded


def decode_annotation(annotation: Any) -> np.ndarray:
    """An (H, W) int16 array of the class ids of a mask (anything `decode_mask` takes, or a `datasets` value)."""
    data = _encoded_bytes(annotation)
    # A single-channel PNG (the builder's annotation) holds the ids themselves (`masks.mask_to_ids`'s rule);
    # OpenCV decodes it without PIL's copies. Anything else goes through the rule's home.
    if data is not None and data[:8] == b"\x89PNG\r\n\x1a\n" and data[25] == 0:  # IHDR colour type 0: grey
        ids = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        ids = decode_mask(annotation if data is None else Image.open(io.BytesIO(data)))
    if ids.size and int(ids.max()) > MAX_ID:
        raise ValueError(f"mask ids must lie in 0..{MAX_ID}, got up to {int(ids.max())}")
    if ids.dtype == np.uint16:
        return ids.view(np.int16)  # ids <= MAX_ID: the same bits
    return ids.astype(np.int16)


def _source_indices(params: AugmentParams, sample: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask row and column (nearest) under every row and column of sample `sample`'s resized frame."""
    height, width = params.resized_height[sample : sample + 1], params.resized_width[sample : sample + 1]
    rows = nearest_index(np.arange(height[0])[None], mask.shape[:1], height)[0]
    columns = nearest_index(np.arange(width[0])[None], mask.shape[1:], width)[0]
    return rows, columns


def choose_crop(
    config: AugmentConfig,
    params: AugmentParams,
    sample: int,
    mask: np.ndarray,
    source: tuple[np.ndarray, np.ndarray],
) -> int:
    """`augment_device.choose_crops` for sample `sample` of `params` and its (H, W) mask, in NumPy. `source`: the
    sample's `_source_indices`."""
    if config.cat_max_ratio >= 1.0:
        return 0
    height, width = int(params.crop_height[sample]), int(params.crop_width[sample])
    rows, columns = source
    for draw in range(config.max_tries):
        top, left = params.tops[sample, draw], params.lefts[sample, draw]
        window = mask[rows[top : top + height]][:, columns[left : left + width]]
        if crop_accepted(np.bincount(window.ravel(), minlength=MAX_ID + 1)[None], config)[0]:
            return draw
    return config.max_tries


def augment_sample(
    config: AugmentConfig,
    params: AugmentParams,
    sample: int,
    image: np.ndarray,
    mask: np.ndarray,
    tables: PhotometricTables | None,
    pixel_values: np.ndarray,
    labels: np.ndarray,
    source: tuple[np.ndarray, np.ndarray],
) -> None:
    """Augment sample `sample` of `params` (its crop chosen) into `pixel_values` (3, crop, crop) float32 and
    `labels` (crop, crop), which hold the padding values. `image`: BGR, possibly a reduced decode of the image of
    the (H, W) `mask`; `source`: the sample's `_source_indices` (computed once for the crop test and this)."""
    draw = params.chosen[sample]
    top, left = int(params.tops[sample, draw]), int(params.lefts[sample, draw])
    height, width = int(params.crop_height[sample]), int(params.crop_width[sample])
    flip = bool(params.flip[sample])
    rows, columns = source
    columns = columns[left : left + width]
    labels[:height, :width] = mask[rows[top : top + height]][:, columns[::-1] if flip else columns]
    pixels = crop_pixels(params, sample, image)
    if tables is not None:
        pixels = _photometric_distortion(pixels, tables, params, sample)
    normalise_into(config, cv2.split(pixels)[::-1], pixel_values)


def crop_pixels(params: AugmentParams, sample: int, image: np.ndarray) -> np.ndarray:
    """The (crop height, crop width, 3) uint8 crop of sample `sample` of `params` (its crop chosen), flipped when
    drawn, sampled from `image` (possibly a reduced decode of the original) at the points of a full resize."""
    draw = params.chosen[sample]
    top, left = int(params.tops[sample, draw]), int(params.lefts[sample, draw])
    height, width = int(params.crop_height[sample]), int(params.crop_width[sample])
    flip = bool(params.flip[sample])
    # The resize's map from output to source pixels, restricted to the crop (mirrored when flipped):
    # x_src = (x + 0.5) * in / out - 0.5, the sample points of `interpolate` and of OpenCV's resize.
    scale_y = image.shape[0] / float(params.resized_height[sample])
    scale_x = image.shape[1] / float(params.resized_width[sample])
    first_column = left + width - 1 if flip else left
    affine = np.array(
        [
            [-scale_x if flip else scale_x, 0.0, (first_column + 0.5) * scale_x - 0.5],
            [0.0, scale_y, (top + 0.5) * scale_y - 0.5],
        ]
    )
    return cv2.warpAffine(
        image, affine, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )


def normalise_into(config: AugmentConfig, planes_rgb: list[np.ndarray], out: np.ndarray) -> None:
    """Normalise R, G, B uint8 planes (h, w) into the top-left of `out` (3, crop, crop) float32, whose rest keeps
    the padding. Contiguous planes: the lookups run much faster than on strided channels; OpenCV's float lookup
    writes into the output in place (2x np.take)."""
    normalise = normalisation_tables(config)
    height, width = planes_rgb[0].shape
    for channel in range(3):
        cv2.LUT(planes_rgb[channel], normalise[channel], dst=out[channel, :height, :width])


def _photometric_distortion(pixels: np.ndarray, tables: PhotometricTables, params: AugmentParams, sample: int):
    """mmseg's PhotoMetricDistortion on an (H, W, 3) uint8 BGR crop, with OpenCV's 8-bit HSV as mmseg uses it."""
    if params.brightness_on[sample] or (params.contrast_first[sample] and params.contrast_on[sample]):
        pixels = cv2.LUT(pixels, tables.before[sample])
    for on, channel, table in ((params.saturation_on, 1, tables.saturation), (params.hue_on, 0, tables.hue)):
        if on[sample]:
            hsv = list(cv2.split(cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)))
            hsv[channel] = cv2.LUT(hsv[channel], table[sample])
            pixels = cv2.cvtColor(cv2.merge(hsv), cv2.COLOR_HSV2BGR)
    if not params.contrast_first[sample] and params.contrast_on[sample]:
        pixels = cv2.LUT(pixels, tables.after[sample])
    return pixels


def augment_encoded_samples(
    config: AugmentConfig,
    seed: int,
    positions: list[int] | np.ndarray,
    images: list[Any],
    annotations: list[Any],
    allow_draft: bool = True,
) -> dict[str, torch.Tensor]:
    """Decode and augment the samples at stream `positions`, one at a time: {"pixel_values": (B, 3, crop, crop)
    float32, "labels": (B, crop, crop) int64}. `images`, `annotations`: `datasets` values (decode=False), bytes,
    paths or PIL images; an annotation may also be an (H, W) int16 array of ids already decoded and checked (a
    `PackedMasks` item), taken as it is. `allow_draft=False` decodes every JPEG at full size."""
    masks = [
        annotation
        if isinstance(annotation, np.ndarray) and annotation.dtype == np.int16 and annotation.ndim == 2
        else decode_annotation(annotation)
        for annotation in annotations
    ]
    sizes = np.array([mask.shape for mask in masks], dtype=np.int64).reshape(-1, 2)
    params = draw_params(config, seed, positions, sizes[:, 0], sizes[:, 1])
    sources = [_source_indices(params, i, mask) for i, mask in enumerate(masks)]
    params.chosen = np.array(
        [choose_crop(config, params, i, mask, source) for i, (mask, source) in enumerate(zip(masks, sources))],
        dtype=np.int64,
    )
    tables = photometric_tables(params) if config.photometric_distortion else None
    crop = config.crop_size
    pixel_values = np.zeros((len(masks), 3, crop, crop), dtype=np.float32)  # mmseg pads with 0 after normalising
    labels = np.full((len(masks), crop, crop), config.ignore_index, dtype=np.int64)
    for i, (image, mask) in enumerate(zip(images, masks)):
        target = (int(params.resized_height[i]), int(params.resized_width[i])) if allow_draft else None
        bgr = decode_image_bgr(image, mask.shape, target)
        augment_sample(config, params, i, bgr, mask, tables, pixel_values[i], labels[i], sources[i])
    return {"pixel_values": torch.from_numpy(pixel_values), "labels": torch.from_numpy(labels)}
