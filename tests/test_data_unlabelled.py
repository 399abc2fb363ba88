"""The unlabelled stream of semi-supervised training (imagenets_hf/training/unlabelled_data.py): the file index, the
sampler's coverage and exact resume, draws from (seed, position), the weak/strong views, CutMix boxes, the ignore
mask on padding and bad input."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.data_loader import skip_first_batches
from PIL import Image
from torchvision.transforms.v2 import functional as tvf

from imagenets_hf import cli
from imagenets_hf.data.augment import IMAGENET_MEAN_255, IMAGENET_STD_255, AugmentConfig, draw_params
from imagenets_hf.training.recipes import RecipeError, load_recipe
from imagenets_hf.training.unlabelled_data import (
    BATCH_KEYS,
    BadUnlabelledImageError,
    ImageFileIndex,
    StrongConfig,
    UnlabelledBatches,
    UnlabelledPool,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    build_unlabelled_batches,
    cutmix_box,
    gaussian_blur,
    grayscale,
    index_image_files,
    make_unlabelled_batch,
    unlabelled_batch_size,
    unlabelled_seeds,
    weak_config,
)

CONFIG = AugmentConfig(crop_size=32, resize_scale=(96, 32), ratio_range=(0.5, 2.0))
STRONG = StrongConfig()


def _write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"c{i % 3}" / f"img_{i:03d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unlabelled")
    _write_images(folder, 12)
    return folder


def _pool(folder: Path) -> UnlabelledPool:
    return UnlabelledPool(index_image_files([folder]))


def _fake_accelerator(rank: int = 0, processes: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        print=lambda *args: None,
        num_processes=processes,
        process_index=rank,
        device=torch.device("cpu"),
        skip_first_batches=skip_first_batches,
    )


def _recipe(folder: Path, **overrides):
    values = {
        "unlabelled_dirs": [str(folder)],
        "crop_size": 32,
        "resize_scale": [96, 32],
        "global_batch_size": 4,
        "per_device_batch_size": 2,
        "unlabelled_global_batch_size": 8,
        "num_workers": 0,
        **overrides,
    }
    return load_recipe("demo", values)


# -- the index --------------------------------------------------------------------------------------------------------


def test_index_lists_only_images_sorted_over_several_folders(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for relative in ("b/z.JPEG", "b/a.jpg", "a/deep/x.PNG", "a/y.webp", "c.jpeg"):
        (first / relative).parent.mkdir(parents=True, exist_ok=True)
        (first / relative).write_bytes(b"")  # the index opens no file: empty ones are listed
    for relative in ("a/notes.txt", "a/.hidden.JPEG", ".cache/k.JPEG", "b/labels.csv"):
        (first / relative).parent.mkdir(parents=True, exist_ok=True)
        (first / relative).write_bytes(b"")
    (second / "n1").mkdir(parents=True)
    (second / "n1" / "q.JPEG").write_bytes(b"")
    (second / "link").symlink_to(second, target_is_directory=True)  # a cycle: followed once, no loop

    index = index_image_files([first, second])
    paths = [index.path(i) for i in range(len(index))]
    expected_first = ["a/deep/x.PNG", "a/y.webp", "b/a.jpg", "b/z.JPEG", "c.jpeg"]
    assert paths[:5] == [str(first / p) for p in expected_first]
    assert paths[5:] == [str(second / "n1" / "q.JPEG")]
    assert len(index) == 6 and index.other_files == 2  # notes.txt, labels.csv (hidden entries are not counted)
    assert index.names.dtype == np.uint8 and index.names.nbytes == sum(len(p) for p in expected_first) + len(
        "n1/q.JPEG"
    )
    # the same list on every process: a second scan, and a pickled copy (shared memory or not), agree
    again = index_image_files([first, second])
    assert [again.path(i) for i in range(len(again))] == paths
    for copy in (pickle.loads(pickle.dumps(index)), pickle.loads(pickle.dumps(index.share_memory()))):
        assert isinstance(copy, ImageFileIndex) and [copy.path(i) for i in range(len(copy))] == paths


def test_index_refuses_a_missing_or_imageless_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope'} does not exist \(unlabelled_dirs\)"):
        index_image_files([tmp_path / "nope"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'empty'} holds no image file"):
        index_image_files([tmp_path / "empty"])


# -- the stream: coverage, process counts, resume ---------------------------------------------------------------------


def _stream_indices(pool_size: int, seed: int, processes: int, batch: int, batches: int) -> list[list[int]]:
    """Each process's pool indices over `batches` micro-batches, from the stream's own sampler."""
    from torch.utils.data import BatchSampler

    from imagenets_hf.training.data import InfiniteShardedSampler

    per_process = []
    for rank in range(processes):
        sampler = InfiniteShardedSampler(pool_size, seed=unlabelled_seeds(seed).order, rank=rank, world_size=processes)
        iterator = iter(BatchSampler(sampler, batch, drop_last=True))
        per_process.append([index for _ in range(batches) for index, _ in next(iterator)])
    return per_process


@pytest.mark.parametrize("processes", [1, 2])
def test_each_image_comes_once_per_epoch_over_all_processes(processes):
    size, batch = 30, 3  # 30 images, 6 per global micro-batch with 2 processes: 5 micro-batches an epoch
    batches = 3 * size // (batch * processes)  # three epochs
    per_process = _stream_indices(size, seed=4, processes=processes, batch=batch, batches=batches)
    # position p = rank + processes x draw: interleave the processes' draws back into stream order
    stream = [per_process[p % processes][p // processes] for p in range(3 * size)]
    epochs = [stream[e * size : (e + 1) * size] for e in range(3)]
    assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    # the order does not depend on the process count, and differs from the labelled stream's (same recipe seed)
    assert stream == [i for b in _stream_indices(size, 4, 1, batch * processes, batches) for i in b][: 3 * size]
    from imagenets_hf.training.data import InfiniteShardedSampler

    labelled = InfiniteShardedSampler(size, seed=4).epoch_order(0).tolist()
    assert epochs[0] != labelled


def test_two_processes_serve_the_one_process_samples_and_resume_skips_exactly(image_dir):
    recipe = _recipe(image_dir)
    single = build_unlabelled_batches(recipe, _fake_accelerator(), skip=0)
    assert unlabelled_batch_size(recipe, 1) == 4  # 8 a step, 2 micro-batches of accumulation
    first, second, third = next(single), next(single), next(single)
    assert set(first) == set(BATCH_KEYS)
    ranks = [build_unlabelled_batches(recipe, _fake_accelerator(rank, 2), skip=0) for rank in range(2)]
    assert unlabelled_batch_size(recipe, 2) == 4  # 8 = 2 processes x 1 accumulation x 4
    rank_batches = [next(batches) for batches in ranks]
    # positions 0..7 = the one-process run's first two micro-batches; rank r holds positions r, r + 2, ...
    one_process = {key: torch.cat([first[key], second[key]]) for key in BATCH_KEYS}
    for key in BATCH_KEYS:
        torch.testing.assert_close(rank_batches[0][key], one_process[key][0::2], rtol=0, atol=0)
        torch.testing.assert_close(rank_batches[1][key], one_process[key][1::2], rtol=0, atol=0)
    resumed = build_unlabelled_batches(recipe, _fake_accelerator(), skip=2)
    after = next(resumed)
    for key in BATCH_KEYS:
        torch.testing.assert_close(after[key], third[key], rtol=0, atol=0)


def _check_index_in_group(rank: int, port: int, folders: list[str], results) -> None:
    import torch.distributed as dist

    from imagenets_hf.training.unlabelled_data import check_same_index

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        check_same_index(index_image_files([folders[0]]))  # the same folder on both: no complaint
        try:
            check_same_index(index_image_files([folders[rank]]))
        except ValueError as error:
            results.put((rank, str(error)))
        else:
            results.put((rank, "no error"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: about 20 s on the shared 2-core machine
def test_processes_that_index_different_files_are_stopped(image_dir, tmp_path):
    """Two processes of a gloo group: the same folder passes; a folder with one file more on process 1 stops both."""
    import multiprocessing
    import shutil
    import socket

    shutil.copytree(image_dir, tmp_path / "copy")
    _write_images(tmp_path / "copy" / "extra", 1, seed=9)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    folders = [str(image_dir), str(tmp_path / "copy")]
    processes = [context.Process(target=_check_index_in_group, args=(r, port, folders, results)) for r in range(2)]
    for process in processes:
        process.start()
    messages = dict(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    expected = "the processes indexed different unlabelled files (process 0: 12 files, process 1: 13 files;"
    assert messages[0].startswith(expected) and messages[1] == messages[0]


def test_unlabelled_batch_must_divide_over_processes_and_accumulation(image_dir):
    recipe = _recipe(image_dir, unlabelled_global_batch_size=5)
    with pytest.raises(RecipeError, match=r"unlabelled_global_batch_size 5 is not a multiple of 1 process\(es\) x 2"):
        unlabelled_batch_size(recipe, 1)
    with pytest.raises(RecipeError, match=r"unlabelled_global_batch_size \(0\) must be at least 1"):
        _recipe(image_dir, unlabelled_global_batch_size=0)


def test_default_folder_is_the_data_dirs_train_split_and_extra_rows_join(mini_dir):
    from imagenets_hf.data.imagenets import load_imagenets

    recipe = load_recipe("demo", {"data_dir": str(mini_dir), "unlabelled_global_batch_size": 4, "num_workers": 0})
    semi = load_imagenets(mini_dir, "train_semi").select(range(3))
    lines = []
    batches = build_unlabelled_batches(recipe, _fake_accelerator(), skip=0, extra_pool=semi, log=lines.append)
    assert lines[0].startswith(f"Indexed 60 unlabelled image files in {mini_dir / 'train'}")
    assert "3 train-semi images without their masks join them" in lines[0]
    batch = next(batches)
    assert batch["image_weak"].shape == (2, 3, 96, 96)
    pool = UnlabelledPool(index_image_files([mini_dir / "train"]), semi)
    assert len(pool) == 63 and pool.item(61)[0] == f"train-semi image {semi[1]['image_id']}"
    sample = make_unlabelled_batch(pool, [61], [5], AugmentConfig.from_recipe(recipe), STRONG, 0)
    assert sample["ignore_mask"].float().mean() < 255  # decoded from the Arrow bytes


def test_image_class_comes_from_the_first_folder_or_the_rows_label(image_dir, tmp_path):
    """Files under a folder named after a class get its id, other files (another folder, none) -1; train-semi rows
    their label. The batch carries them; pseudo_label_classes image_class with no file in a class folder is refused."""
    pool = UnlabelledPool(index_image_files([image_dir]), classes={"c1": 7, "c2": 2})
    expected = {"c0": -1, "c1": 7, "c2": 2}
    assert [pool.item(i)[2] for i in range(len(pool))] == [
        expected[Path(pool.item(i)[0]).parent.name] for i in range(12)
    ]
    assert pool.count_known_classes() == 8
    batch = make_unlabelled_batch(pool, [0, 4, 8], [0, 1, 2], CONFIG, STRONG, seed=0)
    assert batch["image_class"].tolist() == [pool.item(i)[2] for i in (0, 4, 8)]
    assert (
        make_unlabelled_batch(_pool(image_dir), [0, 4], [0, 1], CONFIG, STRONG, 0)["image_class"].tolist() == [-1] * 2
    )
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (20, 20)).save(loose / "c1.JPEG")  # a file named like a class, in no class folder
    assert UnlabelledPool(index_image_files([loose]), classes={"c1": 7}).item(0)[2] == -1

    rows = [{"image": {"bytes": b"", "path": "x"}, "image_id": "a/x", "label": 5}]
    assert UnlabelledPool(None, rows, classes={"c1": 7}).item(0)[2] == 5
    assert UnlabelledPool(None, rows).item(0)[2] == -1  # classes are read only when asked for


def test_image_class_option_reads_the_data_dirs_classes(mini_dir, image_dir):
    from imagenets_hf.data.mini import MINI_WNIDS

    recipe = load_recipe(
        "demo",
        {
            "data_dir": str(mini_dir),
            "unlabelled_global_batch_size": 4,
            "num_workers": 0,
            "pseudo_label_classes": "image_class",
        },
    )
    lines = []
    batch = next(build_unlabelled_batches(recipe, _fake_accelerator(), skip=0, log=lines.append))
    assert "image_class: 60 of 60 unlabelled images have a class" in lines[0]
    assert set(batch["image_class"].tolist()) <= set(range(1, len(MINI_WNIDS) + 1))
    wrong = _recipe(image_dir, data_dir=str(mini_dir), pseudo_label_classes="image_class")
    with pytest.raises(ValueError, match="no unlabelled image is in a folder named after a class"):
        build_unlabelled_batches(wrong, _fake_accelerator(), skip=0)


# -- one sample: draws, views, boxes, padding -------------------------------------------------------------------------


def test_a_sample_depends_only_on_seed_and_position(image_dir):
    pool = _pool(image_dir)
    batch = make_unlabelled_batch(pool, [0, 5, 7], [10, 11, 12], CONFIG, STRONG, seed=3)
    again = make_unlabelled_batch(pool, [7, 0], [12, 10], CONFIG, STRONG, seed=3)
    for key in BATCH_KEYS:
        torch.testing.assert_close(again[key][0], batch[key][2], rtol=0, atol=0)  # batch mates do not matter
        torch.testing.assert_close(again[key][1], batch[key][0], rtol=0, atol=0)
    other_position = make_unlabelled_batch(pool, [0], [13], CONFIG, STRONG, seed=3)
    other_seed = make_unlabelled_batch(pool, [0], [10], CONFIG, STRONG, seed=4)
    for other in (other_position, other_seed):
        assert not torch.equal(other["image_weak"][0], batch["image_weak"][0])


def _to_uint8(normalised: torch.Tensor) -> np.ndarray:
    """(3, h, w) normalised -> uint8 RGB (exact: the normalisation is an affine map of 8-bit values)."""
    mean = np.asarray(IMAGENET_MEAN_255, np.float64)[:, None, None]
    std = np.asarray(IMAGENET_STD_255, np.float64)[:, None, None]
    return np.round(normalised.numpy() * std + mean).astype(np.uint8)


def test_strong_views_share_the_weak_views_geometry(image_dir):
    pool = _pool(image_dir)
    indices, positions = list(range(12)), list(range(100, 112))
    plain = StrongConfig(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, cutmix_prob=0.0)
    batch = make_unlabelled_batch(pool, indices, positions, CONFIG, plain, seed=0)
    torch.testing.assert_close(batch["image_strong1"], batch["image_weak"], rtol=0, atol=0)
    torch.testing.assert_close(batch["image_strong2"], batch["image_weak"], rtol=0, atol=0)
    assert not batch["cutmix_box1"].any() and not batch["cutmix_box2"].any()
    # grayscale always: each strong view is torchvision's grayscale of the weak view's own pixels
    gray = StrongConfig(color_jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0, cutmix_prob=0.0)
    grey_batch = make_unlabelled_batch(pool, indices, positions, CONFIG, gray, seed=0)
    for i in range(len(indices)):
        inside = grey_batch["ignore_mask"][i] == 0
        height, width = int(inside.any(1).sum()), int(inside.any(0).sum())
        weak = torch.from_numpy(_to_uint8(batch["image_weak"][i][:, :height, :width]))
        expected = tvf.rgb_to_grayscale(weak, num_output_channels=3).numpy()
        np.testing.assert_array_equal(_to_uint8(grey_batch["image_strong1"][i][:, :height, :width]), expected)
    # the default strong views differ from the weak one and from each other
    default = make_unlabelled_batch(pool, indices, positions, CONFIG, STRONG, seed=0)
    assert not torch.equal(default["image_strong1"], default["image_weak"])
    assert not torch.equal(default["image_strong1"], default["image_strong2"])
    torch.testing.assert_close(default["image_weak"], batch["image_weak"], rtol=0, atol=0)


def test_ignore_mask_is_255_exactly_on_the_padding(image_dir):
    pool = _pool(image_dir)
    positions = np.arange(40)
    indices = positions % len(pool)
    batch = make_unlabelled_batch(pool, indices.tolist(), positions.tolist(), CONFIG, STRONG, seed=1)
    sizes = []
    for index in indices:
        with Image.open(pool.item(int(index))[1]) as image:
            sizes.append((image.height, image.width))
    sizes = np.array(sizes)
    params = draw_params(weak_config(CONFIG), unlabelled_seeds(1).geometry, positions, sizes[:, 0], sizes[:, 1])
    padded = 0
    for i in range(len(positions)):
        expected = np.full((32, 32), 255, np.uint8)
        expected[: params.crop_height[i], : params.crop_width[i]] = 0
        np.testing.assert_array_equal(batch["ignore_mask"][i].numpy(), expected)
        for key in ("image_weak", "image_strong1", "image_strong2"):
            assert not batch[key][i][:, expected == 255].any()  # padding 0 after normalising, as the labelled batches
        padded += int((expected == 255).any())
    assert 5 <= padded < len(positions)  # images 20-60 px at a short side of 16-64 px: some crops are padded


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, tvf.adjust_brightness, (0.5, 0.83, 1.5)),
        (adjust_contrast, tvf.adjust_contrast, (0.5, 1.21, 1.5)),
        (adjust_saturation, tvf.adjust_saturation, (0.5, 0.9, 1.5)),
        (adjust_hue, tvf.adjust_hue, (-0.25, -0.07, 0.13, 0.25)),
        (gaussian_blur, lambda image, sigma: tvf.gaussian_blur(image, [13, 13], [sigma, sigma]), (0.1, 0.8, 2.0)),
        (lambda rgb, _: grayscale(rgb), lambda image, _: tvf.rgb_to_grayscale(image, 3), (None,)),
    ],
)
def test_strong_ops_follow_torchvision(ours, theirs, factors):
    """The strong views' OpenCV/NumPy ops against torchvision v2's tensor kernels (the reference formulas): at
    most one level apart (float rounding), almost everywhere equal."""
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rows, columns = np.meshgrid(np.arange(37) * 6, np.arange(53) * 4, indexing="ij")
    ramp = np.stack([rows, columns, np.full((37, 53), 90)], axis=2)
    for rgb in (noise, np.clip(ramp, 0, 255).astype(np.uint8)):
        for factor in factors:
            mine = ours(rgb, factor).astype(np.int64)
            reference = theirs(torch.from_numpy(rgb).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()
            difference = np.abs(mine - reference.astype(np.int64))
            assert difference.max() <= 1 and difference.mean() < 0.05, (factor, difference.max(), difference.mean())


def _unimatch_cutmix_box(rng: np.random.Generator, size: int, p: float = 0.5):
    """UniMatch V2's dataset/transform.py `obtain_cutmix_box` (random/np.random -> one numpy generator): the
    reference law. Returns (y, x, h, w) or None."""
    if rng.random() > p:
        return None
    area = rng.uniform(0.02, 0.4) * size * size
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        cutmix_w = int(np.sqrt(area / ratio))
        cutmix_h = int(np.sqrt(area * ratio))
        x = rng.integers(0, size)
        y = rng.integers(0, size)
        if x + cutmix_w <= size and y + cutmix_h <= size:
            return y, x, cutmix_h, cutmix_w


def test_cutmix_boxes_follow_unimatchs_law_and_fit_the_crop():
    crop, draws = 64, 3000
    boxes = [cutmix_box(7, position, view, crop, 0.5) for position in range(draws // 2) for view in (0, 1)]
    reference = [_unimatch_cutmix_box(np.random.default_rng([11, i]), crop) for i in range(draws)]

    def stats(drawn):
        present = [b for b in drawn if b is not None]
        fraction = len(present) / len(drawn)
        areas = np.array([h * w for _, _, h, w in present]) / crop**2
        log_ratios = np.log([h / w for _, _, h, w in present])
        centres = np.array([(y + h / 2, x + w / 2) for y, x, h, w in present]) / crop
        return present, fraction, areas, log_ratios, centres

    present, fraction, areas, log_ratios, centres = stats(boxes)
    _, ref_fraction, ref_areas, ref_log_ratios, ref_centres = stats(reference)
    assert all(y >= 0 and x >= 0 and y + h <= crop and x + w <= crop for y, x, h, w in present)
    assert all(h >= 1 and w >= 1 for _, _, h, w in present)
    assert areas.max() <= 0.4 and areas.min() >= 0.015  # int() truncation takes a little off 0.02
    assert abs(fraction - 0.5) < 4 * np.sqrt(0.25 / draws)
    # the same law as the reference: means within 4 standard errors of the difference
    for ours, theirs in ((areas, ref_areas), (log_ratios, ref_log_ratios), (centres[:, 0], ref_centres[:, 0])):
        error = np.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
        assert abs(ours.mean() - theirs.mean()) < 4 * error
    # the rejection loop keeps big boxes rare at extreme ratios: compare the upper quantiles too
    assert abs(np.quantile(areas, 0.9) - np.quantile(ref_areas, 0.9)) < 0.03
    assert abs(fraction - ref_fraction) < 4 * np.sqrt(0.5 / draws)
    # deterministic, the two views independent, probability 0 and 1 honoured
    assert cutmix_box(7, 3, 0, crop, 0.5) == cutmix_box(7, 3, 0, crop, 0.5)
    assert boxes[0::2] != boxes[1::2]
    assert all(cutmix_box(7, p, 0, crop, 0.0) is None for p in range(50))
    assert all(cutmix_box(7, p, 0, crop, 1.0) is not None for p in range(50))


def test_batch_boxes_are_the_drawn_boxes(image_dir):
    pool = _pool(image_dir)
    batch = make_unlabelled_batch(pool, list(range(12)), list(range(12)), CONFIG, STRONG, seed=2)
    for i in range(12):
        for view, key in ((0, "cutmix_box1"), (1, "cutmix_box2")):
            expected = np.zeros((32, 32), np.uint8)
            box = cutmix_box(unlabelled_seeds(2).cutmix, i, view, 32, 0.5)
            if box is not None:
                y, x, h, w = box
                expected[y : y + h, x : x + w] = 1
            np.testing.assert_array_equal(batch[key][i].numpy(), expected)


# -- bad input --------------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_dir(tmp_path) -> Path:
    _write_images(tmp_path, 3)
    (tmp_path / "c0" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "c1" / "notes.png").write_text("this is text, not a picture")
    return tmp_path


def test_bad_file_stops_with_one_line_naming_it_and_the_flag(bad_dir):
    pool = _pool(bad_dir)
    broken = [i for i in range(len(pool)) if pool.item(i)[0].endswith("broken.JPEG")]
    with pytest.raises(BadUnlabelledImageError) as error:
        make_unlabelled_batch(pool, [0, broken[0]], [0, 1], CONFIG, STRONG, seed=0)
    line = cli.error_lines(error.value)
    assert len(line) == 1 and line[0].startswith(
        f"unlabelled image {bad_dir / 'c0' / 'broken.JPEG'}: cannot be decoded"
    )
    assert "skip_bad_unlabelled (--skip-bad-unlabelled true)" in line[0]


def test_bad_files_are_skipped_and_counted_when_asked(bad_dir):
    recipe = _recipe(bad_dir, skip_bad_unlabelled=True, unlabelled_global_batch_size=10, global_batch_size=2)
    lines = []
    batches = build_unlabelled_batches(recipe, _fake_accelerator(), skip=0, log=lines.append)
    batch = next(batches)  # 5 files, 10 a micro-batch: two epochs, each bad file twice
    assert set(batch) == set(BATCH_KEYS)
    assert batches.skipped == 4 and sorted(set(batches.skipped_names)) == [
        str(bad_dir / "c0" / "broken.JPEG"),
        str(bad_dir / "c1" / "notes.png"),
    ]
    assert sum("note: skipped unlabelled image" in line for line in lines) == 4
    skipped = batch["ignore_mask"].flatten(1).float().mean(1) == 255
    assert int(skipped.sum()) == 4  # the skipped samples are fully ignored, the others are not
    for key in ("image_weak", "image_strong1", "image_strong2", "cutmix_box1", "cutmix_box2"):
        assert not batch[key][skipped].any()


def test_bad_file_in_a_worker_reaches_the_user_as_one_line(bad_dir):
    """Through a forkserver DataLoader worker (the index in shared memory): the worker's error, in one line."""
    recipe = _recipe(bad_dir, num_workers=1, unlabelled_global_batch_size=10, global_batch_size=2)
    batches = build_unlabelled_batches(recipe, _fake_accelerator(), skip=0)
    with pytest.raises(BadUnlabelledImageError) as error:
        next(batches)
    line = cli.error_lines(error.value)
    assert len(line) == 1 and line[0].startswith("unlabelled image ") and "skip_bad_unlabelled" in line[0]
    assert ("broken.JPEG" in line[0]) or ("notes.png" in line[0])


def test_unlabelled_batches_pass_batches_without_skips_unchanged():
    batch = {key: torch.zeros(1) for key in BATCH_KEYS}
    wrapped = UnlabelledBatches(iter([{**batch, "skipped_files": []}]))
    assert set(next(wrapped)) == set(BATCH_KEYS) and wrapped.skipped == 0


def test_a_run_stopped_by_a_bad_file_may_resume_skipping_it():
    from imagenets_hf.training.run_folder import recipe_differences

    before = load_recipe("demo")
    after = load_recipe("demo", {"skip_bad_unlabelled": True})
    assert recipe_differences(before, after) == {}
    assert recipe_differences(before, load_recipe("demo", {"labels_per_class": 1})) == {"labels_per_class": (None, 1)}
