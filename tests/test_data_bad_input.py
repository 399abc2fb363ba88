"""Bad input: each problem raises an error naming the file and what is wrong; skip_bad skips and reports."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagenets_hf.data.checks import ImageNetSDataError
from imagenets_hf.data.export import export_imagenets
from imagenets_hf.data.imagenets import class_names, detect_subset, load_imagenets
from imagenets_hf.data.masks import decode_mask, encode_mask

WNIDS = ("n00000001", "n00000002", "n00000003")


def make_tiny_imagenets(root: Path, images_per_class: int = 2) -> Path:
    """A 3-class folder in the official layout: small JPEG and PNG images, RGB-encoded masks with ignore pixels."""
    rng = np.random.default_rng(0)
    for image_folder, mask_folder in (
        ("train-semi", "train-semi-segmentation"),
        ("validation", "validation-segmentation"),
        ("test", None),
        ("train", None),
    ):
        for label, wnid in enumerate(WNIDS, start=1):
            (root / image_folder / wnid).mkdir(parents=True)
            for index in range(images_per_class):
                height, width = int(rng.integers(16, 40)), int(rng.integers(16, 40))
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                stem = f"{wnid}_{index}"
                suffix = ".JPEG" if index % 2 == 0 else ".png"
                Image.fromarray(pixels).save(root / image_folder / wnid / f"{stem}{suffix}")
                if mask_folder is not None:
                    (root / mask_folder / wnid).mkdir(parents=True, exist_ok=True)
                    ids = np.zeros((height, width), np.int64)
                    ids[4:12, 4:12] = label
                    ids[0, :] = 1000
                    encode_mask(ids).save(root / mask_folder / wnid / f"{stem}.png")
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return make_tiny_imagenets(tmp_path / "set")


def _load(root: Path, split: str = "validation", **kwargs):
    return load_imagenets(root, split=split, cache_dir=root.parent / "cache", **kwargs)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_good_tiny_folder_loads(root):
    dataset = _load(root)
    assert len(dataset) == 6 and dataset.info.config_name == "custom"


def test_truncated_jpeg(root):
    bad = root / "validation" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    _truncate(bad)
    with pytest.raises(ImageNetSDataError, match=re.escape(str(bad)) + ": corrupt or truncated image"):
        _load(root)


def test_corrupt_png_image(root):
    bad = root / "train-semi" / WNIDS[0] / f"{WNIDS[0]}_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all" * 4)
    with pytest.raises(ImageNetSDataError, match=re.escape(str(bad)) + ": corrupt or truncated image"):
        _load(root, "train_semi")


def test_truncated_mask_png(root):
    bad = root / "validation-segmentation" / WNIDS[2] / f"{WNIDS[2]}_1.png"
    _truncate(bad)
    with pytest.raises(ImageNetSDataError, match=re.escape(str(bad)) + ": cannot decode mask"):
        _load(root)


def test_truncated_image_while_streaming(root):
    bad = root / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    _truncate(bad)
    with pytest.raises(ImageNetSDataError, match=re.escape(str(bad))):
        list(_load(root, "train"))


def test_image_without_mask(root):
    mask = root / "validation-segmentation" / WNIDS[0] / f"{WNIDS[0]}_1.png"
    mask.unlink()
    image = root / "validation" / WNIDS[0] / f"{WNIDS[0]}_1.png"
    with pytest.raises(ImageNetSDataError, match=re.escape(str(image)) + ": image has no mask"):
        _load(root)


def test_mask_without_image(root):
    image = root / "train-semi" / WNIDS[2] / f"{WNIDS[2]}_0.JPEG"
    image.unlink()
    mask = root / "train-semi-segmentation" / WNIDS[2] / f"{WNIDS[2]}_0.png"
    with pytest.raises(ImageNetSDataError, match=re.escape(str(mask)) + ": mask has no image"):
        _load(root, "train_semi")


def test_mask_size_differs_from_image(root):
    mask = root / "validation-segmentation" / WNIDS[1] / f"{WNIDS[1]}_1.png"
    ids = decode_mask(mask)
    encode_mask(ids[:-1, :]).save(mask)
    height, width = ids.shape
    message = f"{mask}: mask is {width}x{height - 1} (WxH) but its image"
    with pytest.raises(ImageNetSDataError, match=re.escape(message)):
        _load(root)


@pytest.mark.parametrize("bad_id", [4, 999, 1001])
def test_mask_ids_outside_classes_and_ignore(root, bad_id):
    mask = root / "validation-segmentation" / WNIDS[0] / f"{WNIDS[0]}_0.png"
    ids = decode_mask(mask)
    ids[5, 5] = bad_id
    encode_mask(ids).save(mask)
    message = f"{mask}: mask has class ids outside 0..3 and 1000: {bad_id} (1 pixels)"
    with pytest.raises(ImageNetSDataError, match=re.escape(message)):
        _load(root)


def test_folder_that_is_not_imagenets(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(
        ImageNetSDataError, match="not an ImageNet-S folder: none of train-semi/, validation/, test/, train/"
    ):
        _load(tmp_path / "photos")
    (tmp_path / "photos" / "validation" / "cats").mkdir(parents=True)
    with pytest.raises(ImageNetSDataError, match=re.escape(str(tmp_path / "photos" / "validation" / "cats"))):
        detect_subset(tmp_path / "photos")
    with pytest.raises(ImageNetSDataError, match="no such data folder: .*missing"):
        _load(tmp_path / "missing")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ImageNetSDataError, match="a file, not a data folder"):
        _load(tmp_path / "a-file")


def test_empty_split(root):
    for path in (root / "test").glob("*/*"):
        path.unlink()
    with pytest.raises(ImageNetSDataError, match=re.escape(str(root / "test")) + ": split 'test' is empty"):
        _load(root, "test")


def test_split_names_in_either_spelling(root):
    assert len(_load(root, "train-semi")) == len(_load(root, "train_semi")) == 6
    with pytest.raises(ValueError, match="unknown split 'val'; expected one of train_semi, validation, test, train"):
        _load(root, "val")


def test_missing_split(root):
    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(ImageNetSDataError, match=re.escape(str(root / "test")) + ": split 'test' not found"):
        _load(root, "test")
    assert len(_load(root)) == 6  # the other splits still load


def test_unexpected_file_in_class_folder(root):
    stray = root / "validation" / WNIDS[0] / "notes.txt"
    stray.write_text("x")
    with pytest.raises(ImageNetSDataError, match=re.escape(str(stray)) + ": unexpected entry"):
        _load(root)


def test_synset_words_without_a_class(root, tmp_path):
    words = tmp_path / "LOC_synset_mapping.txt"
    words.write_text(f"{WNIDS[0]} one\n{WNIDS[1]} two\n")
    with pytest.raises(ImageNetSDataError, match=f"no name for 1 class.*{WNIDS[2]}"):
        class_names(root, words)
    words.write_text("garbage line\n")
    with pytest.raises(ImageNetSDataError, match=re.escape(f"{words}:1: expected 'wnid name")):
        class_names(root, words)


def _break_three_validation_files(root: Path) -> set[str]:
    """A truncated image, an image without mask and a mask with a bad id; returns the image ids left good."""
    _truncate(root / "validation" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG")
    (root / "validation-segmentation" / WNIDS[1] / f"{WNIDS[1]}_0.png").unlink()
    mask = root / "validation-segmentation" / WNIDS[2] / f"{WNIDS[2]}_1.png"
    ids = decode_mask(mask)
    ids[1, 1] = 77
    encode_mask(ids).save(mask)
    return {f"{WNIDS[0]}/{WNIDS[0]}_1", f"{WNIDS[1]}/{WNIDS[1]}_1", f"{WNIDS[2]}/{WNIDS[2]}_0"}


@pytest.mark.parametrize("num_proc", [1, 3])
def test_every_problem_of_a_split_in_one_error(root, num_proc):
    """Listing problems (pairing) and decoding problems (a truncated image, a bad id) come in one error, each
    naming its file, rather than one kind per run; also when the files are read on several threads."""
    _break_three_validation_files(root)
    not_an_image = root / "validation" / WNIDS[1] / f"{WNIDS[1]}_1.png"
    not_an_image.write_bytes(b"plain text, not an image")
    with pytest.raises(ImageNetSDataError) as error:
        _load(root, num_proc=num_proc)
    lines = str(error.value).splitlines()
    assert lines[0] == "4 bad file(s) in split 'validation':"
    assert sorted(line.strip().split(": ")[0] for line in lines[1:]) == sorted(
        [
            str(root / "validation" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"),
            str(root / "validation" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"),
            str(not_an_image),
            str(root / "validation-segmentation" / WNIDS[2] / f"{WNIDS[2]}_1.png"),
        ]
    )
    # PIL names the buffer it was given (<_io.BytesIO object at 0x...>): the message names the file instead
    assert f"{not_an_image}: corrupt or truncated image (UnidentifiedImageError: cannot identify image file " in (
        str(error.value)
    )
    assert "BytesIO" not in str(error.value)


def test_many_problems_are_counted_beyond_the_listed_ones(tmp_path):
    root = make_tiny_imagenets(tmp_path / "set", images_per_class=10)
    for path in sorted((root / "validation").glob("*/*"))[:25]:
        path.write_bytes(b"broken")
    with pytest.raises(ImageNetSDataError) as error:
        _load(root)
    lines = str(error.value).splitlines()
    assert lines[0] == "25 bad file(s) in split 'validation':"
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 5 more"


@pytest.mark.parametrize("num_proc", [1, 3])
def test_skip_bad_skips_and_reports(root, caplog, num_proc):
    good = _break_three_validation_files(root)
    with pytest.raises(ImageNetSDataError):
        _load(root, num_proc=num_proc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = _load(root, skip_bad=True, num_proc=num_proc)
    notices = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(notices) == 1, notices  # one notice (it came twice: a log line and a UserWarning)
    assert not [w for w in caught if "skipped" in str(w.message)]
    assert notices[0].startswith("skipped 3 bad file(s) in split 'validation':")  # listing and decoding together
    assert f"{WNIDS[1]}_0.JPEG: image has no mask" in notices[0]
    assert "corrupt or truncated image" in notices[0] and "outside 0..3 and 1000: 77" in notices[0]
    assert set(dataset["image_id"]) == good
    for row in dataset:  # the rows kept are the right ones, not shifted
        wnid, stem = row["image_id"].split("/")
        expected = decode_mask(root / "validation-segmentation" / wnid / f"{stem}.png")
        assert np.array_equal(np.asarray(row["annotation"]), expected)


def test_skip_bad_streaming_and_export(root, tmp_path, caplog):
    good = _break_three_validation_files(root)
    rows = list(_load(root, streaming=True, skip_bad=True))
    assert {row["image_id"] for row in rows} == good
    assert any("skipped 3 bad file(s)" in record.getMessage() for record in caplog.records)
    with pytest.raises(ImageNetSDataError, match="image has no mask"):
        export_imagenets(root, tmp_path / "out")
    caplog.clear()
    counts = export_imagenets(root, tmp_path / "out", skip_bad=True)
    assert any("skipped" in record.getMessage() for record in caplog.records)
    assert counts["validation"] == 3
