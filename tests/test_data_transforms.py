"""The torchvision training pipeline (ImageNetSegModel's) and the recipe dispatch (imagenets_hf.data.transforms).

The published (mmseg) pipeline is tested in tests/test_data_augment.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from imagenets_hf.data.augment import AugmentConfig
from imagenets_hf.data.masks import IGNORE_INDEX
from imagenets_hf.data.transforms import (
    imagenetsegmodel_train_transform,
    to_tv_tensors,
    train_augmentation_from_recipe,
)
from imagenets_hf.training.recipes import load_recipe

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


def test_to_tv_tensors_types_and_size_check():
    image, ids = block_pattern()
    img, mask = to_tv_tensors(image, ids)
    assert isinstance(img, tv_tensors.Image) and img.dtype == torch.uint8 and img.shape == (3, 200, 280)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (200, 280)
    with pytest.raises(ValueError, match="annotation size"):
        to_tv_tensors(image, ids[:100])


@pytest.mark.parametrize("seed", range(4))
def test_imagenetsegmodel_steps_keep_integer_ids_from_the_image_set(seed):
    image, ids = block_pattern()
    allowed = set(np.unique(ids).tolist()) | {IGNORE_INDEX}
    img, mask = to_tv_tensors(image, ids)
    torch.manual_seed(seed)
    for step in imagenetsegmodel_train_transform(crop_size=96).transforms:
        img, mask = step(img, mask)
        assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= allowed, type(step).__name__
    assert img.shape == (3, 96, 96) and img.dtype == torch.float32


def test_recipe_picks_the_pipeline():
    published = train_augmentation_from_recipe(load_recipe("mae-base-pretrained"))
    assert published == AugmentConfig()  # the published values are the config's defaults
    demo = train_augmentation_from_recipe(load_recipe("demo"))
    assert demo.crop_size == 96 and demo.resize_scale == (384, 96) and not demo.photometric_distortion
    segmodel = train_augmentation_from_recipe(load_recipe("demo", {"pipeline": "imagenetsegmodel"}))
    assert segmodel.transforms[0].size == (96, 96)


def test_torchvision_samples_seed_only_the_cpu_generator(monkeypatch):
    """Each sample of the torchvision pipeline is drawn from (seed, position) on the CPU generator; the CUDA
    generators (drop-path masks of a num_workers=0 run on a GPU) are neither seeded nor left changed. Before the fix
    `torch.manual_seed` seeded every CUDA device per sample, which `fork_rng(devices=[])` does not restore."""
    import io

    from imagenets_hf.training.data import AugmentedSegmentationDataset

    image, ids = block_pattern()
    encoded = {}
    for name, picture in (("image", image), ("annotation", Image.fromarray(ids.astype(np.uint8)))):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded[name] = {"bytes": buffer.getvalue(), "path": None}
    dataset = AugmentedSegmentationDataset([encoded, encoded], imagenetsegmodel_train_transform(crop_size=64), seed=3)
    seeded_devices = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded_devices.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded_devices.append(seed))
    before = torch.get_rng_state()
    first = dataset[(0, 5)]
    assert seeded_devices == []
    assert torch.equal(torch.get_rng_state(), before)  # the caller's CPU state is restored
    torch.manual_seed(1234)  # another global state: the sample depends only on (seed, position)
    again = dataset[(1, 5)]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["pixel_values"], dataset[(0, 6)]["pixel_values"])
