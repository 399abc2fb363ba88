"""The synthetic mini ImageNet-S: layout, masks, odd images, determinism and the completion marker."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask
from imagenets_hf.data.mini import (
    MARKER_NAME,
    MINI_IMAGES_PER_CLASS,
    MINI_NUM_CLASSES,
    MINI_WNIDS,
    SYNSET_FILE_NAME,
    _file_stems,
    _render_scene,
    ensure_mini_dataset,
    is_mini_dataset_complete,
    make_mini_dataset,
    mini_class_names,
    mini_special_images,
)

MASKED = {"train-semi": "train-semi-segmentation", "validation": "validation-segmentation"}


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory) -> Path:
    return make_mini_dataset(tmp_path_factory.mktemp("mini") / "root", seed=0)


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts_per_split_and_class(mini_root):
    assert MINI_NUM_CLASSES == 10 and len(MINI_WNIDS) == 10
    assert all(re.fullmatch(r"n\d{8}", w) for w in MINI_WNIDS) and list(MINI_WNIDS) == sorted(MINI_WNIDS)
    assert MINI_IMAGES_PER_CLASS["train-semi"] == 10
    val_test_names = []
    for split, per_class in MINI_IMAGES_PER_CLASS.items():
        assert sorted(p.name for p in (mini_root / split).iterdir()) == list(MINI_WNIDS)
        for wnid in MINI_WNIDS:
            images = sorted((mini_root / split / wnid).iterdir())
            assert len(images) == per_class, (split, wnid)
            assert all(p.suffix == ".JPEG" for p in images)
            if split in ("train", "train-semi"):
                assert all(re.fullmatch(rf"{wnid}_\d+", p.stem) for p in images)
            else:
                assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}", p.stem) for p in images)
                val_test_names += [p.name for p in images]
            if split in MASKED:
                masks = sorted((mini_root / MASKED[split] / wnid).iterdir())
                assert [p.name for p in masks] == [p.stem + ".png" for p in images]
    assert len(val_test_names) == 10 * (5 + 3) == len(set(val_test_names))
    # train names do not collide with train-semi names
    train = {p.name for p in (mini_root / "train").rglob("*.JPEG")}
    assert not train & {p.name for p in (mini_root / "train-semi").rglob("*.JPEG")}
    assert not (mini_root / "test-segmentation").exists() and not (mini_root / "train-segmentation").exists()


def test_masks_match_images_and_hold_the_right_ids(mini_root):
    allowed = set(range(MINI_NUM_CLASSES + 1)) | {IGNORE_INDEX}
    seen_ignore, two_class_masks = 0, 0
    for split, mask_split in MASKED.items():
        for class_id, wnid in enumerate(MINI_WNIDS, start=1):
            for mask_path in sorted((mini_root / mask_split / wnid).iterdir()):
                with Image.open(mask_path) as mask_image:
                    assert mask_image.mode == "RGB"
                    assert not np.asarray(mask_image)[..., 2].any()  # B = 0 in the official encoding
                ids = decode_mask(mask_path)
                with Image.open(mini_root / split / wnid / (mask_path.stem + ".JPEG")) as image:
                    assert ids.shape == (image.height, image.width), mask_path
                present = set(np.unique(ids).tolist())
                assert present <= allowed, (mask_path, present - allowed)
                assert 0 in present and class_id in present, mask_path
                # the folder's class is the main object: it covers more than any other class
                areas = np.bincount(ids[ids != IGNORE_INDEX], minlength=MINI_NUM_CLASSES + 1)
                assert areas[1:].argmax() + 1 == class_id, mask_path
                assert 0.03 < areas[class_id] / ids.size < 0.65, mask_path
                seen_ignore += IGNORE_INDEX in present
                two_class_masks += len(present - {0, IGNORE_INDEX}) == 2
    assert seen_ignore > 0
    assert two_class_masks >= 3


def test_special_images_exist_in_labelled_splits(mini_root):
    special = mini_special_images(mini_root)
    modes = {}
    for name, rel in special.items():
        with Image.open(mini_root / rel) as image:
            modes[name] = (image.mode, image.size)
        split, wnid, file = rel.split("/")
        assert split in MASKED
        ids = decode_mask(mini_root / MASKED[split] / wnid / file.replace(".JPEG", ".png"))
        assert ids.shape == (modes[name][1][1], modes[name][1][0])
    assert modes["grayscale"][0] == "L"
    assert modes["cmyk"][0] == "CMYK"
    width, height = modes["large"][1]
    assert width > 1000 and height > 1000
    # every other image is an RGB picture with short side 96-400 and aspect ratio 0.5-2
    others = [p for p in mini_root.rglob("*.JPEG") if p.relative_to(mini_root).as_posix() not in special.values()]
    assert len(others) == 10 * sum(MINI_IMAGES_PER_CLASS.values()) - 3
    for path in others:
        with Image.open(path) as image:
            assert image.mode == "RGB", path
            assert 96 <= min(image.size) <= 400 and 0.49 <= image.width / image.height <= 2.01, (path, image.size)


def test_synset_file_names_the_classes(mini_root):
    lines = (mini_root / SYNSET_FILE_NAME).read_text().splitlines()
    parsed = [line.split(" ", 1) for line in lines]
    assert [wnid for wnid, _ in parsed] == list(MINI_WNIDS)
    first_names = [names.split(",")[0].strip() for _, names in parsed]
    assert first_names[0] == "red solid disc"
    assert len(set(first_names)) == 10
    assert mini_class_names() == ["other", *first_names]


def test_make_refuses_an_existing_dataset_without_overwrite(mini_root):
    with pytest.raises(FileExistsError, match="overwrite"):
        make_mini_dataset(mini_root, seed=0)


def test_ensure_keeps_a_complete_folder(mini_root):
    before = {p: p.stat().st_mtime_ns for p in mini_root.rglob("*")}
    assert ensure_mini_dataset(mini_root, seed=0) == mini_root
    assert {p: p.stat().st_mtime_ns for p in mini_root.rglob("*")} == before


def test_ensure_redoes_an_unfinished_folder_byte_identically(mini_root, tmp_path):
    reference = _all_files(mini_root)
    copy = tmp_path / "copy"
    shutil.copytree(mini_root, copy)
    # a killed run: no marker, a missing image and a missing mask
    (copy / MARKER_NAME).unlink()
    victim = sorted((copy / "validation-segmentation").rglob("*.png"))[3]
    victim.unlink()
    (copy / "validation" / victim.parent.name / (victim.stem + ".JPEG")).unlink()
    assert ensure_mini_dataset(copy, seed=0) == copy
    # same seed -> the same bytes, masks and JPEGs alike
    assert _all_files(copy) == reference


def test_another_seed_gives_other_files():
    assert _file_stems(0) == _file_stems(0)
    assert _file_stems(0) != _file_stems(1)
    image_a, ids_a = _render_scene(3, 120, 160, np.random.default_rng([0, 1, 3, 0]))
    image_b, ids_b = _render_scene(3, 120, 160, np.random.default_rng([0, 1, 3, 0]))
    image_c, ids_c = _render_scene(3, 120, 160, np.random.default_rng([1, 1, 3, 0]))
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(ids_a, ids_b)
    assert not np.array_equal(ids_a, ids_c) and not np.array_equal(image_a, image_c)


def test_completion_marker_records_version_and_seed(mini_root, tmp_path):
    assert is_mini_dataset_complete(mini_root, seed=0)
    assert not is_mini_dataset_complete(mini_root, seed=1)  # ensure_mini_dataset(seed=1) would rewrite it
    assert not is_mini_dataset_complete(tmp_path, seed=0)
    (tmp_path / MARKER_NAME).write_text("{truncated")
    assert not is_mini_dataset_complete(tmp_path, seed=0)


def test_unlabelled_variant_adds_train_images_and_keeps_every_other_file(mini_root, tmp_path, monkeypatch, capsys):
    from script_runner import run_script

    root = tmp_path / "semi"
    status, lines = run_script(
        "make_mini_dataset", "--out", root, "--unlabelled-per-class", 9, monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 0 and lines[0].split() == ["train", "90", "files"]
    default, variant = _all_files(mini_root), _all_files(root)
    extra = {name for name in variant if name not in default}
    assert len(extra) == 3 * MINI_NUM_CLASSES and all(name.startswith("train/") for name in extra)
    # every default file, the 6 default train images a class included, is there with the same bytes; only the
    # marker differs, by the train count
    assert {name: variant[name] for name in default if name != MARKER_NAME} == {
        name: data for name, data in default.items() if name != MARKER_NAME
    }
    for wnid in MINI_WNIDS:
        names = sorted(p.stem for p in (root / "train" / wnid).iterdir())
        assert len(names) == len(set(names)) == 9 and all(re.fullmatch(rf"{wnid}_\d+", n) for n in names)
    assert not set(_file_stems(0, 9)["train"][0]) & set(_file_stems(0)["train-semi"][0])
    assert is_mini_dataset_complete(root, 0, unlabelled_per_class=9)
    assert not is_mini_dataset_complete(root, 0) and not is_mini_dataset_complete(mini_root, 0, 9)
    assert ensure_mini_dataset(root, 0) == root and _all_files(root) == default  # asked for the default: remade
