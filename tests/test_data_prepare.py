"""Preparation of ImageNet-S from a fake raw ImageNet-1k built from the lists, and the list checker.

Every test runs on two sets of lists (the `imagenets_lists` fixture of conftest.py): the official ones where they are
found (../shared/imagenets/lists or IMAGENETS_LISTS_DIR; skipped otherwise) and synthetic ones in the official
format with the official line counts, made by `write_synthetic_lists`, which run everywhere with the sha256 check
off (the structural checks still run). Images are a tiny JPEG's bytes and masks a tiny PNG's bytes: preparation
never decodes them.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    MERGED_TRAIN_SEMI_EXAMPLE,
    OFFICIAL_LISTS_DIR,
    OFFICIAL_LISTS_FOUND,
    REMAPPED_919_VALIDATION,
    SHARED_WNID,
    write_synthetic_lists,
)
from PIL import Image

from imagenets_hf.data.lists import (
    EXPECTED_COUNTS,
    LIST_KINDS,
    MERGED_CLASSES,
    ListFileError,
    check_list_file,
    download_lists,
    list_relpath,
    load_lists,
)
from imagenets_hf.data.masks import encode_mask
from imagenets_hf.data.prepare import MissingFilesError, prepare_imagenets


@functools.cache
def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


@functools.cache
def png_bytes() -> bytes:
    buffer = io.BytesIO()
    encode_mask(np.full((8, 8), 1, dtype=np.int32)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_fake_imagenet(root: Path, all_lists, val_layout: str = "classes", extra_train: int = 2) -> Path:
    """Write the ImageNet-1k files the lists need: train folders (with a few extra images) and val images."""
    for lists in all_lists:
        for wnid in lists.categories:
            sources = [wnid] + [s for s, t in MERGED_CLASSES.items() if t == wnid and lists.subset == "919"]
            for source in sources:
                for k in range(extra_train):
                    _write(root / "train" / source / f"{source}_90000{k}.JPEG", jpeg_bytes())
        for image, _ in lists.train_semi:
            name = image.split("/")[1]
            _write(root / "train" / name.split("_")[0] / name, jpeg_bytes())
        for left, _ in (*lists.validation_mapping, *lists.test_mapping):
            wnid, name = left.split("/")
            _write(root / "val" / (left if val_layout == "classes" else name), jpeg_bytes())
    return root


def build_annotation_zip(path: Path, lists, top: str | None, drop=()) -> Path:
    """An annotation archive like the official one: masks under [top/]<split>-segmentation/<wnid>/<file>.png."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{top}/" if top else ""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for split, entries in (
            ("train-semi-segmentation", lists.train_semi),
            ("validation-segmentation", lists.validation),
        ):
            for _, mask in entries:
                if mask not in drop:
                    archive.writestr(f"{prefix}{split}/{mask}", png_bytes())
    return path


def count_train_sources(imagenet: Path, lists) -> int:
    total = 0
    for wnid in lists.categories:
        sources = [wnid] + [s for s, t in MERGED_CLASSES.items() if t == wnid and lists.subset == "919"]
        total += sum(len(os.listdir(imagenet / "train" / s)) for s in sources)
    return total


@pytest.fixture(scope="module")
def lists50(imagenets_lists):
    return load_lists("50", **imagenets_lists.load_kwargs)


@pytest.fixture(scope="module")
def lists919(imagenets_lists):
    return load_lists("919", **imagenets_lists.load_kwargs)


@pytest.fixture(scope="module")
def sample919(lists919):
    """A sample of 919: the five merged target classes plus classes receiving re-mapped validation images."""
    remapped = [t for s, t in lists919.validation_mapping if s.split("/")[0] != t.split("/")[0]]
    classes = sorted(set(MERGED_CLASSES.values()) | {t.split("/")[0] for t in remapped[:3]})
    return lists919.restricted_to(classes)


@pytest.fixture(scope="module")
def fake50(tmp_path_factory, lists50):
    root = tmp_path_factory.mktemp("fake50")
    imagenet = build_fake_imagenet(root / "imagenet", [lists50], val_layout="classes")
    flat = build_fake_imagenet(root / "imagenet_flat_val", [lists50], val_layout="flat", extra_train=0)
    shutil.rmtree(flat / "train")
    (flat / "train").symlink_to(imagenet / "train")  # same train folders, flat val
    zip_top = build_annotation_zip(root / "ImageNetS50.zip", lists50, top="ImageNetS50")
    zip_flat = build_annotation_zip(root / "masks_no_top" / "annotations.zip", lists50, top=None)
    return {"imagenet": imagenet, "flat": flat, "zip_top": zip_top, "zip_flat": zip_flat}


# ---------------------------------------------------------------------------------------------------------------
# Lists


@pytest.mark.parametrize("subset", ["50", "300", "919"])
def test_lists_match_the_table(imagenets_lists, subset):
    lists = load_lists(subset, **imagenets_lists.load_kwargs)
    expected = EXPECTED_COUNTS[subset]
    assert len(lists.categories) == expected["categories"] == int(subset)
    assert len(lists.train_semi) == expected["train_semi"] == 10 * int(subset)
    assert len(lists.validation) == len(lists.validation_mapping) == expected["validation"]
    assert len(lists.test_mapping) == expected["test"]
    assert list(lists.categories) == sorted(lists.categories)


def test_merged_classes_in_919_lists(lists919):
    # Facts of the official lists (the synthetic ones reproduce them): read back through the checker.
    assert (f"{MERGED_TRAIN_SEMI_EXAMPLE}.JPEG", f"{MERGED_TRAIN_SEMI_EXAMPLE}.png") in lists919.train_semi
    merged_sources = {image.split("/")[1].split("_")[0] for image, _ in lists919.train_semi} - set(lists919.categories)
    assert merged_sources == set(MERGED_CLASSES)
    remapped = sum(s.split("/")[0] != t.split("/")[0] for s, t in lists919.validation_mapping)
    assert remapped == REMAPPED_919_VALIDATION  # IMAGENETS.md: 1,652 of 12,419


@pytest.mark.skipif(not OFFICIAL_LISTS_FOUND, reason=f"official ImageNet-S lists not found under {OFFICIAL_LISTS_DIR}")
def test_synthetic_lists_have_the_official_shape(tmp_path):
    # Same files, line counts, line formats (the checker's patterns) and ends as the official lists; other content.
    synthetic = write_synthetic_lists(tmp_path)
    for subset in ("50", "300", "919"):
        categories = {}
        for kind in LIST_KINDS:
            relpath = list_relpath(kind, subset)
            official, made = (OFFICIAL_LISTS_DIR / relpath).read_bytes(), (synthetic / relpath).read_bytes()
            assert made.count(b"\n") == official.count(b"\n"), relpath
            assert not made.endswith(b"\n") and not official.endswith(b"\n"), relpath
            assert made != official, relpath
            for source, path in (("official", OFFICIAL_LISTS_DIR / relpath), ("synthetic", synthetic / relpath)):
                entries = check_list_file(path, kind, subset, categories.get(source), verify_checksum=False)
                categories.setdefault(source, entries)


def _copy_lists(source: Path, dest: Path, subset: str = "50", flat: bool = False) -> Path:
    for kind in LIST_KINDS:
        relpath = list_relpath(kind, subset)
        target = dest / (Path(relpath).name if flat else relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relpath, target)
    return dest


def test_lists_load_from_flat_folder(tmp_path, imagenets_lists, lists50):
    flat = _copy_lists(imagenets_lists.path, tmp_path / "flat", flat=True)
    assert load_lists("50", flat, verify_checksums=imagenets_lists.verify_checksums) == lists50


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    lines = data.split(b"\n")
    if how == "drop_line":
        path.write_bytes(b"\n".join(lines[:-1]))
    elif how == "malformed":
        lines[3] = lines[3].replace(b" ", b"\t")
        path.write_bytes(b"\n".join(lines))
    elif how == "changed_digit":  # well formed, but not the official file
        lines[3] = lines[3].replace(b"_0", b"_9")
        path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("how, match", [("drop_line", "751 lines, expected 752"), ("malformed", "line 4 is malformed")])
def test_list_checker_rejects_corrupted_list(tmp_path, imagenets_lists, how, match):
    lists_dir = _copy_lists(imagenets_lists.path, tmp_path / "lists")
    broken = lists_dir / list_relpath("validation", "50")
    _corrupt(broken, how)
    with pytest.raises(ListFileError, match=match) as info:
        load_lists("50", lists_dir, verify_checksums=imagenets_lists.verify_checksums)
    assert str(broken) in str(info.value)


def test_list_checker_rejects_a_copy_that_is_not_the_official_file(tmp_path, imagenets_lists):
    lists_dir = _copy_lists(imagenets_lists.path, tmp_path / "lists")
    broken = lists_dir / list_relpath("validation", "50")
    _corrupt(broken, "changed_digit")
    # The official copy fails on the changed file; synthetic lists differ from the official ones from the first
    # file read on (categories).
    named = broken if imagenets_lists.kind == "official" else lists_dir / list_relpath("categories", "50")
    with pytest.raises(ListFileError, match="sha256") as info:
        load_lists("50", lists_dir, verify_checksums=True)
    assert str(info.value).startswith(f"{named}: sha256")


def test_list_checker_without_checksums_still_checks_consistency(tmp_path, imagenets_lists):
    lists_dir = _copy_lists(imagenets_lists.path, tmp_path / "lists")
    _corrupt(lists_dir / list_relpath("validation", "50"), "changed_digit")
    with pytest.raises(ListFileError, match="disagree"):
        load_lists("50", lists_dir, verify_checksums=False)


@pytest.fixture()
def served_lists(tmp_path, imagenets_lists):
    """A copy of the lists' data/ folder served over HTTP on 127.0.0.1."""
    served = _copy_lists(imagenets_lists.path, tmp_path / "served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_lists_over_http_and_reject_corrupt(tmp_path, imagenets_lists, served_lists, lists50):
    served, url = served_lists
    verify = imagenets_lists.verify_checksums
    cache = download_lists("50", cache_dir=tmp_path / "cache", base_url=url, verify_checksums=verify)
    for kind in LIST_KINDS:
        relpath = list_relpath(kind, "50")
        assert (cache / relpath).read_bytes() == (imagenets_lists.path / relpath).read_bytes()
    unreachable = "http://127.0.0.1:9/unreachable"
    assert load_lists("50", cache_dir=tmp_path / "cache", base_url=unreachable, verify_checksums=verify) == lists50

    _corrupt(served / list_relpath("test_mapping", "50"), "drop_line")
    with pytest.raises(ListFileError, match="downloaded .*ImageNetS_im50_mapping_test.txt.*1681 lines"):
        download_lists("50", cache_dir=tmp_path / "fresh", base_url=url, verify_checksums=verify)
    assert not (tmp_path / "fresh" / list_relpath("test_mapping", "50")).exists()
    assert not list((tmp_path / "fresh" / "mapping").glob("*.part"))


def test_download_lists_from_file_url(tmp_path, imagenets_lists):
    served = _copy_lists(imagenets_lists.path, tmp_path / "served")
    verify = imagenets_lists.verify_checksums
    cache = download_lists("50", cache_dir=tmp_path / "cache", base_url=served.as_uri(), verify_checksums=verify)
    assert load_lists("50", cache, verify_checksums=verify).categories[0] == SHARED_WNID
    with pytest.raises(ListFileError, match="cannot download .*; without network, give the lists with --lists DIR"):
        download_lists("50", cache_dir=tmp_path / "other", base_url=(tmp_path / "nowhere").as_uri())


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def _assert_counts_50(report, expected_train):
    sub = report.subsets["50"]
    assert sub.counts == sub.expected
    assert sub.counts["train-semi"] == sub.counts["train-semi-segmentation"] == 500
    assert sub.counts["validation"] == sub.counts["validation-segmentation"] == 752
    assert sub.counts["test"] == 1682
    assert sub.counts["train"] == expected_train
    assert sub.official == {
        "train": 64431,
        "train-semi": 500,
        "train-semi-segmentation": 500,
        "validation": 752,
        "validation-segmentation": 752,
        "test": 1682,
    }


def test_prepare_subset50_links_idempotent(tmp_path, imagenets_lists, fake50, lists50, capsys):
    imagenet, out = fake50["imagenet"], tmp_path / "out"
    report = prepare_imagenets(imagenet, fake50["zip_top"], "50", out, **imagenets_lists.load_kwargs, progress=False)
    _assert_counts_50(report, count_train_sources(imagenet, lists50))
    printed = capsys.readouterr().out
    assert "ImageNetS50" in printed and "64,431" in printed and "1,682" in printed
    root = out / "ImageNetS50"

    link = root / "train-semi" / lists50.train_semi[0][0]
    assert link.is_symlink()
    assert os.readlink(link) == str(imagenet / "train" / lists50.train_semi[0][0])
    # a validation image whose ImageNet label differs: placed under its ImageNet-S wnid
    source, target = next((s, t) for s, t in lists50.validation_mapping if s.split("/")[0] != t.split("/")[0])
    assert os.readlink(root / "validation" / target) == str(imagenet / "val" / source)
    assert not (root / "validation" / source).exists()
    mask = root / "validation-segmentation" / lists50.validation[0][1]
    assert not mask.is_symlink() and mask.read_bytes() == png_bytes()
    assert len(os.listdir(root / "train")) == 50 and len(os.listdir(root / "test")) == 50

    again = prepare_imagenets(imagenet, fake50["zip_top"], "50", out, **imagenets_lists.load_kwargs, progress=False)
    assert (again.subsets["50"].created, again.subsets["50"].replaced) == (0, 0)
    assert again.subsets["50"].kept == report.subsets["50"].created

    # damage: a link to the wrong file, a deleted link, a truncated mask -> replaced / created on rerun
    wrong_link = root / "test" / lists50.test_mapping[0][1]
    wrong_link.unlink()
    wrong_link.symlink_to(imagenet / "train" / lists50.train_semi[0][0])
    (root / "train-semi" / lists50.train_semi[1][0]).unlink()
    mask.write_bytes(b"\x89PNG")
    fixed = prepare_imagenets(imagenet, fake50["zip_top"], "50", out, **imagenets_lists.load_kwargs, progress=False)
    assert (fixed.subsets["50"].created, fixed.subsets["50"].replaced) == (1, 2)
    assert os.readlink(wrong_link) == str(imagenet / "val" / lists50.test_mapping[0][0])
    assert mask.read_bytes() == png_bytes()
    _assert_counts_50(fixed, count_train_sources(imagenet, lists50))


def test_prepare_subset50_copies_flat_val_zip_without_top(tmp_path, imagenets_lists, fake50, lists50):
    flat, out = fake50["flat"], tmp_path / "out"
    report = prepare_imagenets(
        flat, fake50["zip_flat"], "50", out, copy=True, **imagenets_lists.load_kwargs, progress=False, verbose=False
    )
    _assert_counts_50(report, count_train_sources(fake50["imagenet"], lists50))
    root = out / "ImageNetS50"
    for split in ("train", "train-semi", "validation", "test"):
        some = next((root / split / lists50.categories[0]).iterdir())
        assert not some.is_symlink() and some.read_bytes() == jpeg_bytes()
    again = prepare_imagenets(
        flat, fake50["zip_flat"], "50", out, copy=True, **imagenets_lists.load_kwargs, progress=False, verbose=False
    )
    assert (again.subsets["50"].created, again.subsets["50"].replaced) == (0, 0)
    # switching to links replaces the copies
    linked = prepare_imagenets(flat, fake50["zip_flat"], "50", out, **imagenets_lists.load_kwargs, progress=False)
    images = sum(linked.subsets["50"].counts[split] for split in ("train", "train-semi", "validation", "test"))
    assert (linked.subsets["50"].replaced, linked.subsets["50"].kept) == (images, 500 + 752)
    assert os.path.islink(root / "train-semi" / lists50.train_semi[0][0])


def test_prepare_unpacked_annotation_folder(tmp_path, imagenets_lists, fake50, lists50):
    with zipfile.ZipFile(fake50["zip_top"]) as archive:
        archive.extractall(tmp_path / "unpacked")
    report = prepare_imagenets(
        fake50["imagenet"],
        tmp_path / "unpacked",  # holds ImageNetS50/
        "50",
        tmp_path / "out",
        **imagenets_lists.load_kwargs,
        include_train=False,
        progress=False,
        verbose=False,
    )
    assert "train" not in report.subsets["50"].counts
    mask = tmp_path / "out" / "ImageNetS50" / "train-semi-segmentation" / lists50.train_semi[0][1]
    assert os.readlink(mask) == str(
        tmp_path / "unpacked" / "ImageNetS50" / "train-semi-segmentation" / lists50.train_semi[0][1]
    )


def test_prepare_919_sample_merged_and_remapped(tmp_path, imagenets_lists, sample919):
    imagenet = build_fake_imagenet(tmp_path / "imagenet", [sample919], val_layout="classes")
    archive = build_annotation_zip(tmp_path / "ImageNetS919.zip", sample919, top="ImageNetS919")
    out = tmp_path / "out"
    report = prepare_imagenets(
        imagenet, archive, "919", out, **imagenets_lists.load_kwargs, classes=sample919.categories, progress=False
    ).subsets["919"]
    root = out / "ImageNetS919"
    assert report.counts == report.expected
    assert report.official == {}  # a sample: no comparison with the full table
    assert report.counts["train-semi"] == 10 * len(sample919.categories)
    assert report.counts["validation"] == len(sample919.validation_mapping)
    assert report.counts["train"] == count_train_sources(imagenet, sample919)

    semi = root / "train-semi" / "n15075141" / "n03887697_174.JPEG"
    assert os.readlink(semi) == str(imagenet / "train" / "n03887697" / "n03887697_174.JPEG")
    for source, target in MERGED_CLASSES.items():
        names = set(os.listdir(root / "train" / target))
        assert names == set(os.listdir(imagenet / "train" / target)) | set(os.listdir(imagenet / "train" / source))
        assert not (root / "train" / source).exists()
    remapped = [(s, t) for s, t in sample919.validation_mapping if s.split("/")[0] != t.split("/")[0]]
    assert len(remapped) >= 3
    for source, target in remapped:
        assert os.readlink(root / "validation" / target) == str(imagenet / "val" / source)
        assert (root / "validation-segmentation" / target.replace(".JPEG", ".png")).is_file()


def test_prepare_all_subsets_from_a_folder_of_archives(tmp_path, imagenets_lists):
    all_lists = [
        load_lists(s, **imagenets_lists.load_kwargs).restricted_to([SHARED_WNID]) for s in ("50", "300", "919")
    ]
    imagenet = build_fake_imagenet(tmp_path / "imagenet", all_lists, extra_train=1)
    for lists in all_lists:
        build_annotation_zip(
            tmp_path / "annotations" / f"ImageNetS{lists.subset}.zip", lists, f"ImageNetS{lists.subset}"
        )
    report = prepare_imagenets(
        imagenet,
        tmp_path / "annotations",
        "all",
        tmp_path / "out",
        **imagenets_lists.load_kwargs,
        classes=[SHARED_WNID],
        progress=False,
        verbose=False,
    )
    assert sorted(report.subsets) == ["300", "50", "919"]
    for lists in all_lists:
        sub = report.subsets[lists.subset]
        assert sub.counts == sub.expected and sub.counts["train-semi"] == 10
        assert sub.counts["validation"] == len(lists.validation) > 0


def test_missing_image_and_mask_fail_naming_them(tmp_path, imagenets_lists, fake50, lists50):
    # an ImageNet whose val lacks one image, and an archive lacking one mask
    imagenet = tmp_path / "imagenet"
    imagenet.mkdir()
    (imagenet / "train").symlink_to(fake50["imagenet"] / "train")
    shutil.copytree(fake50["flat"] / "val", imagenet / "val", symlinks=True)
    gone_source, gone_target = lists50.test_mapping[5]
    (imagenet / "val" / gone_source.split("/")[1]).unlink()
    gone_mask = lists50.validation[7][1]
    archive = build_annotation_zip(tmp_path / "ImageNetS50.zip", lists50, "ImageNetS50", drop={gone_mask})
    out = tmp_path / "out"
    with pytest.raises(MissingFilesError) as info:
        prepare_imagenets(imagenet, archive, "50", out, **imagenets_lists.load_kwargs, progress=False)
    message = str(info.value)
    assert "2 missing" in message
    assert f"test/{gone_target}" in message and f"validation-segmentation/{gone_mask}" in message
    assert len(info.value.missing) == 2
    assert not out.exists()  # checked before writing anything


def test_wrong_subset_archive_rejected(tmp_path, imagenets_lists, fake50, sample919):
    archive919 = build_annotation_zip(tmp_path / "ImageNetS919.zip", sample919, top="ImageNetS919")
    with pytest.raises(ValueError, match="no annotations for ImageNetS50"):
        prepare_imagenets(fake50["imagenet"], archive919, "50", tmp_path / "out", **imagenets_lists.load_kwargs)
    no_top = build_annotation_zip(tmp_path / "unnamed" / "masks.zip", sample919, top=None)
    with pytest.raises(ValueError, match="outside ImageNetS50"):
        prepare_imagenets(fake50["imagenet"], no_top, "50", tmp_path / "out", **imagenets_lists.load_kwargs)


def test_cli(tmp_path, imagenets_lists, sample919):
    spec = importlib.util.spec_from_file_location(
        "prepare_cli", Path(__file__).parents[1] / "scripts" / "prepare_imagenets.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    main = cli.main
    imagenet = build_fake_imagenet(tmp_path / "imagenet", [sample919], extra_train=0)
    archive = build_annotation_zip(tmp_path / "ImageNetS919.zip", sample919, top="ImageNetS919")
    args = ["--imagenet", str(imagenet), "--annotations", str(archive), "--subset", "919", "--out", str(tmp_path / "o")]
    args += ["--lists", str(imagenets_lists.path), "--no-progress", "--classes", *sample919.categories]
    args += [] if imagenets_lists.verify_checksums else ["--no-verify-lists"]
    assert main(args) == 0
    assert (tmp_path / "o" / "ImageNetS919" / "train-semi" / "n15075141" / "n03887697_174.JPEG").is_file()
    os.unlink(imagenet / "train" / "n03887697" / "n03887697_174.JPEG")
    assert main(args) == 1
