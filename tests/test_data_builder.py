"""The ImageNet-S builder: rows equal the files decoded directly, class names and order, subsets, cache keying."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from imagenets_hf.data.imagenets import (
    ImageNetS,
    class_names,
    detect_subset,
    list_classes,
    load_imagenets,
    read_synset_words,
)
from imagenets_hf.data.lists import list_relpath
from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask, encode_mask
from imagenets_hf.data.mini import MINI_NUM_CLASSES, MINI_WNIDS, SYNSET_FILE_NAME, mini_class_names

SPLIT_FOLDERS = {
    "train_semi": ("train-semi", "train-semi-segmentation"),
    "validation": ("validation", "validation-segmentation"),
    "test": ("test", None),
    "train": ("train", None),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _expected_rows(root: Path, split: str) -> list[dict]:
    """The split's rows computed straight from the files, independent of the builder."""
    image_folder, mask_folder = SPLIT_FOLDERS[split]
    wnids = sorted(p.name for p in (root / "train-semi").iterdir() if p.is_dir())
    rows = []
    for path in sorted((root / image_folder).glob("*/*")):
        wnid = path.parent.name
        row = {"image_id": f"{wnid}/{path.stem}", "label": wnids.index(wnid) + 1, "image_path": path, "mask": None}
        if mask_folder is not None:
            row["mask"] = decode_mask(root / mask_folder / wnid / f"{path.stem}.png")
        rows.append(row)
    return sorted(rows, key=lambda row: row["image_id"])


def _assert_rows_equal_files(rows: list[dict], expected: list[dict]) -> None:
    assert [row["image_id"] for row in rows] == [row["image_id"] for row in expected]
    for row, want in zip(rows, expected):
        assert row["label"] == want["label"], row["image_id"]
        with Image.open(want["image_path"]) as image:
            want_pixels = np.asarray(image.convert("RGB"))
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), want_pixels), row["image_id"]
        if want["mask"] is None:
            assert row["annotation"] is None
        else:
            assert row["annotation"].mode == "I;16"
            assert np.array_equal(decode_mask(row["annotation"]), want["mask"]), row["image_id"]


@pytest.mark.parametrize("split", ["train_semi", "validation", "test"])
def test_builder_rows_equal_files(mini_dir, cache_dir, split):
    dataset = load_imagenets(mini_dir, split=split, cache_dir=cache_dir)
    assert isinstance(dataset, datasets.Dataset)
    expected = _expected_rows(mini_dir, split)
    assert len(dataset) == len(expected) > 0
    rows = sorted(dataset, key=lambda row: row["image_id"])
    _assert_rows_equal_files(rows, expected)
    # The stored image is the original file, byte for byte.
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    by_id = {row["image_id"]: row["image"]["bytes"] for row in raw}
    for want in expected:
        assert by_id[want["image_id"]] == want["image_path"].read_bytes()


def test_annotation_keeps_other_classes_and_ignore(mini_dir, cache_dir):
    dataset = load_imagenets(mini_dir, split="validation", cache_dir=cache_dir)
    ids = set()
    for row in dataset:
        ids.update(np.unique(np.asarray(row["annotation"])).tolist())
    assert {0, IGNORE_INDEX} <= ids
    assert ids <= set(range(MINI_NUM_CLASSES + 1)) | {IGNORE_INDEX}


def test_train_streams_by_default_and_equals_files(mini_dir, cache_dir):
    streamed = load_imagenets(mini_dir, split="train", cache_dir=cache_dir)
    assert isinstance(streamed, datasets.IterableDataset)
    expected = _expected_rows(mini_dir, "train")
    _assert_rows_equal_files(sorted(streamed, key=lambda row: row["image_id"]), expected)
    materialised = load_imagenets(mini_dir, split="train", streaming=False, cache_dir=cache_dir)
    assert isinstance(materialised, datasets.Dataset)
    assert sorted(materialised["image_id"]) == [row["image_id"] for row in expected]


def test_streaming_validation_equals_arrow_rows(mini_dir, cache_dir):
    streamed = list(load_imagenets(mini_dir, split="validation", streaming=True))
    arrow = load_imagenets(mini_dir, split="validation", cache_dir=cache_dir)
    assert [row["image_id"] for row in streamed] == arrow["image_id"]
    for a, b in zip(streamed, arrow):
        assert np.array_equal(np.asarray(a["annotation"]), np.asarray(b["annotation"]))


def test_mini_config_and_class_names(mini_dir, cache_dir):
    assert detect_subset(mini_dir) == "mini"
    assert list_classes(mini_dir) == list(MINI_WNIDS)
    assert class_names(mini_dir) == ["other", *MINI_WNIDS]
    synset_words = mini_dir / SYNSET_FILE_NAME
    assert class_names(mini_dir, synset_words) == mini_class_names()
    dataset = load_imagenets(mini_dir, split="validation", synset_words=synset_words, cache_dir=cache_dir)
    assert dataset.features["label"].names == mini_class_names()
    assert dataset.info.config_name == "mini"


def test_synset_words_duplicates_get_wnid(tmp_path):
    root = tmp_path / "set"
    for wnid in ("n02012849", "n03126707", "n01440764"):
        (root / "validation" / wnid).mkdir(parents=True)
    words = tmp_path / "LOC_synset_mapping.txt"
    words.write_text("n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n")
    assert read_synset_words(words)["n01440764"] == "tench, Tinca tinca"
    assert class_names(root, words) == ["other", "tench", "crane (n02012849)", "crane (n03126707)"]


def _write_class_folders(root: Path, wnids, split="validation") -> None:
    for wnid in wnids:
        (root / split / wnid).mkdir(parents=True, exist_ok=True)


def test_detect_official_subsets(tmp_path):
    wnids50 = [f"n{index:08d}" for index in range(1, 51)]
    _write_class_folders(tmp_path / "ImageNetS50", wnids50)
    assert detect_subset(tmp_path / "ImageNetS50") == "50"
    _write_class_folders(tmp_path / "renamed", [f"n{index:08d}" for index in range(1, 301)])
    assert detect_subset(tmp_path / "renamed") == "300"
    _write_class_folders(tmp_path / "ImageNetS919", wnids50)
    with pytest.raises(ValueError, match="subset 919 has 919 classes but the folder has 50"):
        detect_subset(tmp_path / "ImageNetS919")
    _write_class_folders(tmp_path / "other", wnids50[:7])
    assert detect_subset(tmp_path / "other") == "custom"


def test_class_order_matches_the_category_list(tmp_path, imagenets_lists):
    # The official list where found, else the synthetic one (conftest.py): line i of the list is class id i.
    categories = imagenets_lists.path / list_relpath("categories", "50")
    listed = categories.read_text().split()
    _write_class_folders(tmp_path / "ImageNetS50", reversed(listed))
    names = class_names(tmp_path / "ImageNetS50")
    assert names[0] == "other" and names[1:] == listed


def _copy_with_one_changed_mask(mini_dir: Path, dest: Path) -> Path:
    for folder in ("validation", "validation-segmentation"):
        shutil.copytree(mini_dir / folder, dest / folder)
    mask_path = sorted((dest / "validation-segmentation").glob("*/*.png"))[0]
    ids = decode_mask(mask_path)
    ids[:, :] = 0
    encode_mask(ids).save(mask_path)
    return mask_path


def test_cache_is_keyed_by_folder_and_content(mini_dir, tmp_path):
    cache = tmp_path / "cache"
    copy_root = tmp_path / "copy"
    changed_mask = _copy_with_one_changed_mask(mini_dir, copy_root)
    first = load_imagenets(mini_dir, split="validation", cache_dir=cache)
    changed_id = f"{changed_mask.parent.name}/{changed_mask.stem}"
    second = load_imagenets(copy_root, split="validation", cache_dir=cache)
    assert first.cache_files[0]["filename"] != second.cache_files[0]["filename"]
    row = second[second["image_id"].index(changed_id)]
    assert np.asarray(row["annotation"]).max() == 0
    assert np.asarray(first[first["image_id"].index(changed_id)]["annotation"]).max() > 0
    # Changing the folder again in place rebuilds too.
    ids = decode_mask(changed_mask)
    ids[0, 0] = 1
    encode_mask(ids).save(changed_mask)
    third = load_imagenets(copy_root, split="validation", cache_dir=cache)
    assert np.asarray(third[third["image_id"].index(changed_id)]["annotation"])[0, 0] == 1


def test_builder_detects_config_and_lists_splits(mini_dir, cache_dir):
    builder = ImageNetS(data_dir=mini_dir, cache_dir=str(cache_dir))
    assert builder.config.name == "mini"
    builder.download_and_prepare()
    assert set(builder.info.splits) == {"train_semi", "validation", "test"}  # train is not materialised by default
