"""The full-size synthetic generator (`imagenets_hf.data.scale`, `make_mini_dataset.py --scale`) at a toy scale:
counts, file names, sizes and masks as the real subsets'; the same files whatever the number of workers; the default
mini dataset untouched. And the cache built on several threads (`num_proc`) or without copying the images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from script_runner import run_script

from imagenets_hf.data.imagenets import detect_subset, list_classes, load_imagenets
from imagenets_hf.data.masks import decode_mask
from imagenets_hf.data.mini import MINI_IMAGES_PER_CLASS, MINI_NUM_CLASSES, count_mini_files
from imagenets_hf.data.scale import LARGE_SIDES, image_size, make_scale_dataset, scale_counts

TOY_CLASSES = 3


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_scale_dataset(tmp_path_factory.mktemp("scale") / "toy", scale=TOY_CLASSES, workers=2)


def test_official_counts_are_imagenets():
    # IMAGENETS.md's table
    assert scale_counts("919") == {"train-semi": 9190, "validation": 12419, "test": 27423}
    assert scale_counts(300) == {"train-semi": 3000, "validation": 4097, "test": 9088}
    assert scale_counts("50") == {"train-semi": 500, "validation": 752, "test": 1682}
    # another class count: 10 a class, validation and test in 919's proportions (12419 / 919 = 13.51, 27423 / 919)
    assert scale_counts(3) == {"train-semi": 30, "validation": 41, "test": 90}
    with pytest.raises(ValueError, match="scale must be"):
        scale_counts("0")


def test_toy_folder_has_the_layout_counts_and_pairs(toy_root):
    files = count_mini_files(toy_root)
    assert files == {
        "train": TOY_CLASSES,
        "train-semi": 30,
        "train-semi-segmentation": 30,
        "validation": 41,
        "validation-segmentation": 41,
        "test": 90,
    }
    wnids = list_classes(toy_root)
    assert len(wnids) == TOY_CLASSES and detect_subset(toy_root) == "custom"
    for wnid in wnids:
        assert len(list((toy_root / "train-semi" / wnid).iterdir())) == 10
        assert (toy_root / "validation" / wnid).iterdir()  # every class in every split
        for image in (toy_root / "validation" / wnid).iterdir():
            assert image.name.startswith("ILSVRC2012_val_") and image.suffix == ".JPEG"
            assert (toy_root / "validation-segmentation" / wnid / f"{image.stem}.png").is_file()
    names = (toy_root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split()[0] for line in names] == wnids
    assert json.loads((toy_root / ".scale_complete").read_text())["counts"]["validation"] == 41


def test_masks_hold_other_their_class_and_an_ignore_band(toy_root):
    wnids = list_classes(toy_root)
    for path in sorted((toy_root / "validation-segmentation").rglob("*.png"))[:12]:
        ids = decode_mask(path)
        cls = wnids.index(path.parent.name) + 1
        with Image.open(toy_root / "validation" / path.parent.name / f"{path.stem}.JPEG") as image:
            assert image.size == (ids.shape[1], ids.shape[0])
        values = set(np.unique(ids).tolist())
        assert {0, cls, 1000} <= values and values <= {0, 1, 2, 3, 1000}
        assert len(values - {0, 1000}) in (1, 2)


def test_image_sizes_follow_the_real_distribution():
    rng = np.random.default_rng(0)
    sizes = np.array([image_size(rng) for _ in range(5000)])
    large = (sizes[:, 0] * sizes[:, 1]) > 1000 * 1000
    assert 0.014 < large.mean() < 0.026  # about 2% above 1000 x 1000 pixels
    assert sizes[large].min() >= LARGE_SIDES[0] and sizes[large].max() < LARGE_SIDES[1]
    assert sizes[~large].min() >= 300 and sizes[~large].max() <= 500
    assert ((sizes[~large] == (375, 500)).all(axis=1)).mean() > 0.3  # the most common ImageNet size


def test_toy_jpegs_are_about_real_size(toy_root):
    # about 100 KB a 375 x 500 image (the real 919 validation averages 104 KB over all its sizes)
    sizes = [p.stat().st_size for p in (toy_root / "test").rglob("*.JPEG") if Image.open(p).size == (500, 375)]
    assert sizes and 70_000 < np.mean(sizes) < 140_000


def test_same_files_whatever_the_workers(toy_root, tmp_path):
    again = make_scale_dataset(tmp_path / "again", scale=TOY_CLASSES, workers=1)
    assert _digest(again) == _digest(toy_root)


def test_script_scale_option_and_default_mini(tmp_path, monkeypatch, capsys):
    code, lines = run_script(
        "make_mini_dataset",
        "--out",
        tmp_path / "s",
        "--scale",
        2,
        "--no-progress",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 0, lines
    assert count_mini_files(tmp_path / "s")["validation"] == scale_counts(2)["validation"] == 27
    assert "full-size synthetic" in lines[-1]
    # without --scale: the mini dataset as before
    code, lines = run_script("make_mini_dataset", "--out", tmp_path / "m", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, lines
    expected = {split: n * MINI_NUM_CLASSES for split, n in MINI_IMAGES_PER_CLASS.items()}
    counts = count_mini_files(tmp_path / "m")
    assert {split: counts[split] for split in expected} == expected
    assert (tmp_path / "m" / ".mini_complete").is_file() and not (tmp_path / "m" / ".scale_complete").exists()
    code, lines = run_script(
        "make_mini_dataset", "--out", tmp_path / "x", "--scale", 0, monkeypatch=monkeypatch, capsys=capsys
    )
    assert code == 2 and "--scale" in lines[-1]


def _rows(dataset) -> list[tuple]:
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    dataset = dataset.cast_column("annotation", datasets.Image(decode=False))
    return [(row["image_id"], row["label"], row["image"]["bytes"], row["annotation"]["bytes"]) for row in dataset]


def test_cache_on_several_threads_is_the_same(toy_root, tmp_path):
    one = load_imagenets(toy_root, "validation", cache_dir=tmp_path / "one", num_proc=1)
    three = load_imagenets(toy_root, "validation", cache_dir=tmp_path / "three", num_proc=3)
    assert len(one) == 41
    assert _rows(one) == _rows(three)


def test_cache_without_copying_the_images(toy_root, tmp_path):
    copied = load_imagenets(toy_root, "train_semi", cache_dir=tmp_path / "c")
    linked = load_imagenets(toy_root, "train_semi", cache_dir=tmp_path / "c", copy_images=False)
    raw = linked.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] is None and Path(raw["path"]).is_file() and Path(raw["path"]).is_absolute()
    assert raw["path"] == str((toy_root / "train-semi" / copied[0]["image_id"]).resolve()) + ".JPEG"
    assert np.array_equal(np.asarray(linked[0]["image"]), np.asarray(copied[0]["image"]))
    assert np.array_equal(np.asarray(linked[0]["annotation"]), np.asarray(copied[0]["annotation"]))
    assert linked.data.nbytes < copied.data.nbytes / 5  # masks and paths only
