"""Masks decoded once and run-length packed for the DataLoader workers: the ids come back equal to a fresh decode, and
the worker path gives the same batches, bit for bit, from packed masks as from the encoded annotations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from imagenets_hf.benchmarks.data import realistic_samples
from imagenets_hf.data.augment import AugmentConfig, augment_encoded_samples, decode_annotation
from imagenets_hf.data.masks import IGNORE_INDEX, ids_to_annotation
from imagenets_hf.data.packed_masks import PackedMasks, run_length_encode
from imagenets_hf.training.data import AugmentedSegmentationDataset, build_train_dataloader, pack_train_masks


@pytest.fixture(scope="module")
def realistic():
    return realistic_samples(12, seed=5)


def annotation_bytes(ids: np.ndarray) -> dict:
    buffer = io.BytesIO()
    ids_to_annotation(ids).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_packed_masks_equal_a_fresh_decode(realistic):
    packed = pack_train_masks(realistic, threads=2)
    assert len(packed) == len(realistic)
    for index, row in enumerate(realistic):
        expected = decode_annotation(row["annotation"])
        got = packed[index]
        assert got.dtype == np.int16 and got.shape == expected.shape
        assert np.array_equal(got, expected)
    # Run-length packing is what makes the store small: these masks (1-3 ellipses outlined by ignore) take a few KB
    # each against 375 KB decoded.
    assert packed.nbytes < 0.1 * sum(decode_annotation(row["annotation"]).nbytes for row in realistic)


def test_edge_cases_round_trip():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 920, (37, 53)).astype(np.int16)  # more runs than pixels / 3: stored raw
    masks = [
        np.full((5, 7), IGNORE_INDEX, np.int16),  # one run
        np.zeros((1, 1), np.int16),
        noise,
        np.zeros((0, 4), np.int16),  # no pixels
        np.array([[0, 0, 1000], [1000, 919, 919]], np.int16),  # runs across rows
    ]
    assert run_length_encode(noise)[1] is None and run_length_encode(masks[0])[1] is not None
    packed = PackedMasks.pack(masks)
    for index, mask in enumerate(masks):
        assert packed[index].shape == mask.shape and np.array_equal(packed[index], mask), index
    packed[2][0, 0] = 5  # a caller writing into a mask leaves the store alone
    assert np.array_equal(packed[2], noise)


def test_worker_batches_are_the_same_from_packed_masks(realistic):
    config = AugmentConfig()
    positions = list(range(100, 100 + len(realistic)))
    images = [row["image"] for row in realistic]
    packed = pack_train_masks(realistic, threads=1)
    decoded = augment_encoded_samples(config, 3, positions, images, [row["annotation"] for row in realistic])
    from_packed = augment_encoded_samples(config, 3, positions, images, [packed[i] for i in range(len(realistic))])
    assert torch.equal(decoded["pixel_values"], from_packed["pixel_values"])
    assert torch.equal(decoded["labels"], from_packed["labels"])
    # and through the dataset the DataLoader uses
    dataset = AugmentedSegmentationDataset(realistic, config, seed=3, masks=packed)
    assert torch.equal(dataset.__getitems__(list(zip(range(4), positions[:4])))["labels"], decoded["labels"][:4])


def test_the_training_loader_packs_the_masks_and_says_so(realistic):
    heard = []
    loader = build_train_dataloader(realistic[:4], AugmentConfig(crop_size=96), 2, num_workers=0, log=heard.append)
    assert isinstance(loader.dataset.masks, PackedMasks) and len(loader.dataset.masks) == 4
    assert len(heard) == 1 and heard[0].startswith("Decoded 4 train-semi masks once into")
    assert next(iter(loader))["labels"].shape == (2, 96, 96)


def test_a_bad_training_mask_is_named_before_any_worker_starts(realistic):
    rows = [dict(row) for row in realistic[:3]]
    rows[1]["image_id"] = "n01443537_42"
    rows[1]["annotation"] = None
    with pytest.raises(ValueError, match=r"training sample 'n01443537_42' has no annotation"):
        pack_train_masks(rows, threads=2)
    rows[1]["annotation"] = annotation_bytes(np.full((375, 500), 1001, np.int64))
    with pytest.raises(ValueError, match=r"training sample 'n01443537_42': mask ids must lie in 0\.\.1000"):
        pack_train_masks(rows, threads=2)
    with pytest.raises(ValueError, match="2 packed masks for 3 rows"):
        AugmentedSegmentationDataset(rows, AugmentConfig(), masks=PackedMasks.pack([np.zeros((2, 2), np.int16)] * 2))
