"""Training augmentation a recipe asks for (`train_augmentation_from_recipe`).

- `pipeline: mmseg` (the published recipe): `imagenets_hf.data.augment` (per sample in DataLoader workers, NumPy +
  OpenCV) and `imagenets_hf.data.augment_device` (whole batches on the training device), one set of draws for both.
- `pipeline: imagenetsegmodel`: LUSSeg/ImageNetSegModel's `build_transform(is_train=True)` with torchvision v2
  (`tv_tensors.Image` and `tv_tensors.Mask` together): RandomResizedCrop 224 (scale 0.14-1, ratio 3/4-4/3), flip
  p=0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2, Gaussian blur (sigma 0.1-2) with p=0.5,
  normalise with ImageNet mean/std (0-1 scale). Masks are resized nearest (torchvision's Mask kernels), so ids are
  never invented. Its randomness comes from torch's global generator, which `imagenets_hf.training.data` seeds per
  sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from imagenets_hf.data.augment import AugmentConfig
from imagenets_hf.data.masks import decode_mask

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
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)]
    steps += [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def train_augmentation_from_recipe(recipe: Any) -> AugmentConfig | v2.Compose:
    """The training augmentation `recipe.pipeline` names: an `AugmentConfig` ("mmseg") or a torchvision pipeline
    ("imagenetsegmodel")."""
    if recipe.pipeline == "mmseg":
        return AugmentConfig.from_recipe(recipe)
    if recipe.pipeline == "imagenetsegmodel":
        return imagenetsegmodel_train_transform(
            crop_size=recipe.crop_size, flip_prob=recipe.flip_prob, color_augmentation=recipe.photometric_distortion
        )
    raise ValueError(f"unknown training pipeline {recipe.pipeline!r}; expected 'mmseg' or 'imagenetsegmodel'")
