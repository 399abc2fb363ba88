"""Training augmentation for image + mask with torchvision v2 (`tv_tensors.Image` and `tv_tensors.Mask` together).

Two pipelines:
- `mmseg_train_transform`: the published recipe (mmsegmentation `configs/_base_/datasets/imagenets.py`): keep-ratio
  resize to scale (1024, 256) x a random ratio in [0.5, 2], random 224 crop whose largest class covers less than
  75% of the crop (up to 10 retries; ignore 1000 not counted), horizontal flip p=0.5, mmseg's
  PhotoMetricDistortion, normalise with ImageNet mean/std (0-255 scale), pad bottom/right to 224 with image 0 and
  label 1000.
- `imagenetsegmodel_train_transform`: LUSSeg/ImageNetSegModel's `build_transform(is_train=True)`: RandomResizedCrop
  224 (scale 0.14-1, ratio 3/4-4/3), flip p=0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2,
  Gaussian blur (sigma 0.1-2) with p=0.5, normalise with ImageNet mean/std (0-1 scale).

Masks are always resized nearest (torchvision's Mask kernels), so ids are never invented. All randomness comes from
torch's global generator, so seeding it per sample (as `imagenets_hf.training.data` does) makes a sample's
augmentation reproducible in any worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tv_tensors(image: Image.Image | np.ndarray, annotation: Any) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """A PIL image (any mode, converted to RGB) and its annotation (anything `decode_mask` takes) as a uint8
    (3, H, W) `tv_tensors.Image` and an int64 (H, W) `tv_tensors.Mask`."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.array(image)  # a writable copy: torch.from_numpy warns on read-only PIL buffers
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    ids = decode_mask(annotation)
    if ids.shape != array.shape[:2]:
        raise ValueError(f"annotation size {ids.shape} differs from image size {array.shape[:2]}")
    image_tensor = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))
    return image_tensor, tv_tensors.Mask(torch.from_numpy(ids.astype(np.int64)))


def _find_mask(flat_inputs: list[Any]) -> tv_tensors.Mask:
    masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
    if len(masks) != 1:
        raise TypeError(f"expected exactly one tv_tensors.Mask among the inputs, got {len(masks)}")
    return masks[0]


class RandomRatioResize(v2.Transform):
    """mmseg `Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)`.

    The scale (long, short) is multiplied by r ~ U(ratio_range) and truncated to ints; the image is rescaled by
    min(long / max(h, w), short / min(h, w)) with sizes rounded half up (mmcv `rescale_size`). Images bilinear
    without antialiasing (as OpenCV in mmcv), masks nearest.
    """

    def __init__(
        self,
        scale: Sequence[int] = (1024, 256),
        ratio_range: Sequence[float] = (0.5, 2.0),
        antialias: bool = False,
    ):
        super().__init__()
        self.scale = (int(max(scale)), int(min(scale)))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(_find_mask(flat_inputs))
        low, high = self.ratio_range
        ratio = float(torch.rand(()) * (high - low) + low)
        long_edge, short_edge = int(self.scale[0] * ratio), int(self.scale[1] * ratio)
        factor = min(long_edge / max(height, width), short_edge / min(height, width))
        return {"size": [int(height * factor + 0.5), int(width * factor + 0.5)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=self.antialias
        )


class RandomCropCatMax(v2.Transform):
    """mmseg `RandomCrop(crop_size, cat_max_ratio, ignore_index)`.

    Draw a crop of at most `size` (offsets uniform over the margins); while its largest class covers
    `cat_max_ratio` or more of the non-ignored pixels, or it holds a single class, draw again, at most `max_tries`
    times (the last draw is kept). A smaller image gives a smaller crop; pad afterwards.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
    ):
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def accepts(self, crop_ids: torch.Tensor, cat_max_ratio: float | None = None) -> bool:
        """mmseg's test: more than one class, and the largest under `cat_max_ratio` of the non-ignored pixels."""
        ratio = self.cat_max_ratio if cat_max_ratio is None else cat_max_ratio
        counts = torch.bincount(crop_ids.reshape(-1))
        if len(counts) > self.ignore_index:
            counts[self.ignore_index] = 0  # ignored pixels do not count (mmseg)
        counts = counts[counts > 0]
        return bool(len(counts) > 1 and counts.max() / counts.sum() < ratio)

    def _random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        margin_h, margin_w = max(height - self.size[0], 0), max(width - self.size[1], 0)
        top = int(torch.randint(0, margin_h + 1, ()))
        left = int(torch.randint(0, margin_w + 1, ()))
        return top, left, min(self.size[0], height), min(self.size[1], width)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        mask = _find_mask(flat_inputs)
        height, width = F.get_size(mask)
        box = self._random_box(height, width)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                top, left, h, w = box
                if self.accepts(mask[..., top : top + h, left : left + w].reshape(-1)):
                    break
                box = self._random_box(height, width)
        top, left, h, w = box
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 255] -> (3, H, W) HSV with hue in [0, 1), saturation in [0, 1], value in [0, 255]."""
    r, g, b = rgb.unbind(0)
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    return torch.stack([hue, saturation, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rgb_to_hsv`: channel n in (R, G, B) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n' + 6 h) mod 6
    with n' = 5, 3, 1 (the closed form, all channels at once)."""
    hue, saturation, value = hsv[0:1], hsv[1:2], hsv[2:3]
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    k = torch.remainder(offsets + hue * 6, 6)
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


class PhotoMetricDistortion(v2.Transform):
    """mmseg `PhotoMetricDistortion` on uint8 images (masks pass through).

    Random brightness (add U(-32, 32)), then contrast (multiply by U(0.5, 1.5)) either first or last (coin flip),
    saturation (HSV saturation x U(0.5, 1.5)) and hue (shift by randint(-18, 18) in OpenCV's 0-180 hue units);
    each step applied with probability 0.5 and the result clipped to 0-255 and truncated to uint8 as mmcv does.
    HSV is computed in float rather than OpenCV's 8-bit HSV, so values can differ from mmseg's by rounding.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(torch.rand(()) * (high - low) + low)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self._coin():
            params["brightness"] = self._uniform(-self.brightness_delta, self.brightness_delta)
        params["contrast_first"] = self._coin()
        if self._coin():
            params["contrast"] = self._uniform(*self.contrast_range)
        if self._coin():
            params["saturation"] = self._uniform(*self.saturation_range)
        if self._coin():
            params["hue"] = int(torch.randint(-self.hue_delta, self.hue_delta, ()))
        return params

    @staticmethod
    def _to_uint8_range(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 255).floor()  # np.clip then astype(np.uint8), which truncates

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8:
            raise TypeError(f"PhotoMetricDistortion expects a uint8 image (0-255), got {inpt.dtype}")
        img = inpt.as_subclass(torch.Tensor).float()
        if "brightness" in params:
            img = self._to_uint8_range(img + params["brightness"])
        if params["contrast_first"] and "contrast" in params:
            img = self._to_uint8_range(img * params["contrast"])
        if "saturation" in params or "hue" in params:
            hsv = _rgb_to_hsv(img)
            if "saturation" in params:
                hsv[1] = (hsv[1] * params["saturation"]).clamp(0, 1)
            if "hue" in params:
                hsv[0] = (hsv[0] + params["hue"] / 180.0) % 1.0
            img = _hsv_to_rgb(hsv).round().clamp(0, 255)
        if not params["contrast_first"] and "contrast" in params:
            img = self._to_uint8_range(img * params["contrast"])
        return tv_tensors.wrap(img.to(torch.uint8), like=inpt)


class PadToSize(v2.Transform):
    """Pad bottom/right up to `size` (mmseg `Pad(size, pad_val=0, seg_pad_val=1000)`); larger inputs unchanged."""

    def __init__(self, size: int | Sequence[int], fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.fill = fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(_find_mask(flat_inputs))
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def _to_float_image(scale: bool) -> v2.ToDtype:
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=scale)


def mmseg_train_transform(
    crop_size: int = 224,
    resize_scale: Sequence[int] = (1024, 256),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric_distortion: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> v2.Compose:
    """The published training pipeline (see the module docstring). Input: uint8 Image + int64 Mask."""
    steps: list[v2.Transform] = [
        RandomRatioResize(resize_scale, ratio_range),
        RandomCropCatMax(crop_size, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if photometric_distortion:
        steps.append(PhotoMetricDistortion())
    steps += [
        _to_float_image(scale=False),
        v2.Normalize(IMAGENET_MEAN_255, IMAGENET_STD_255),
        PadToSize(crop_size, fill=0.0, mask_fill=ignore_index),
    ]
    return v2.Compose(steps)


def imagenetsegmodel_train_transform(
    crop_size: int = 224,
    scale: Sequence[float] = (0.14, 1.0),
    flip_prob: float = 0.5,
    color_augmentation: bool = True,
) -> v2.Compose:
    """LUSSeg/ImageNetSegModel's training pipeline (see the module docstring). Input: uint8 Image + int64 Mask."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if color_augmentation:
        steps += [
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            # PIL GaussianBlur(radius) with radius ~ U(0.1, 2); a 13-tap kernel covers 3 sigma at sigma 2.
            v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=0.5),
        ]
    steps += [_to_float_image(scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def train_transform_from_recipe(recipe: Any) -> v2.Compose:
    """The training pipeline a `Recipe` asks for (`recipe.pipeline`: "mmseg" or "imagenetsegmodel")."""
    if recipe.pipeline == "mmseg":
        return mmseg_train_transform(
            crop_size=recipe.crop_size,
            resize_scale=recipe.resize_scale,
            ratio_range=recipe.ratio_range,
            cat_max_ratio=recipe.cat_max_ratio,
            flip_prob=recipe.flip_prob,
            photometric_distortion=recipe.photometric_distortion,
        )
    if recipe.pipeline == "imagenetsegmodel":
        return imagenetsegmodel_train_transform(
            crop_size=recipe.crop_size, flip_prob=recipe.flip_prob, color_augmentation=recipe.photometric_distortion
        )
    raise ValueError(f"unknown training pipeline {recipe.pipeline!r}; expected 'mmseg' or 'imagenetsegmodel'")
