"""Nothing waits forever: DataLoader workers started by a fork server (no lock inherited from the training process's
threads), a bounded wait for each worker batch and for the main process's data preparation, each ending in one line.

The 2-process checks run tests/two_process_start.py (it launches its own 2 gloo processes)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch

from imagenets_hf.data.augment import AugmentConfig
from imagenets_hf.data.imagenets import load_imagenets
from imagenets_hf.data.packed_masks import PackedMasks
from imagenets_hf.runtime import bounded_batches
from imagenets_hf.training.data import build_train_dataloader

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "two_process_start.py"
CONFIG = AugmentConfig(crop_size=32, resize_scale=(128, 32))


def run_two_processes(*args: str, limit: int = 300) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    command = [sys.executable, str(HARNESS), *args, "--limit", str(limit - 30)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit, cwd=REPO)


@pytest.fixture(scope="module")
def train_rows(mini_dir):
    return load_imagenets(mini_dir, "train_semi")


@pytest.mark.slow
def test_workers_start_50_of_50_times_after_a_training_start_up(mini_dir):
    """2 gloo processes, each with the threads of a training run alive (gloo's, tqdm's monitor) and the masks just
    decoded by a thread pool, build the training DataLoader 50 times and take its first batch. Workers forked from
    that process hung in 4 of 400 first batches (2 of 4 runs of this check failed; busy 2-core machine); workers
    started by the fork server: 0 of 400 (4 runs)."""
    completed = run_two_processes("--check", "workers", "--data-dir", str(mini_dir), "--rounds", "50")
    output = completed.stdout + completed.stderr
    for rank in (0, 1):
        assert f"rank {rank}: 50 of 50 first batches, 0 timed out" in completed.stdout, output[-3000:]
    assert completed.returncode == 0, output[-3000:]


@pytest.mark.parametrize("pipeline", ["mmseg", "torchvision"])
def test_worker_batches_equal_in_process_batches(train_rows, pipeline):
    """Batches made by 2 workers of the fork server (the packed masks reached through shared memory, the
    torchvision pipeline pickled) are bit-identical to those made in this process."""
    from imagenets_hf.data.transforms import imagenetsegmodel_train_transform

    augmentation = CONFIG if pipeline == "mmseg" else imagenetsegmodel_train_transform(crop_size=32)
    rows = train_rows.select(range(12))
    here = iter(build_train_dataloader(rows, augmentation, 3, seed=4, rank=1, world_size=2, num_workers=0))
    loader = build_train_dataloader(rows, augmentation, 3, seed=4, rank=1, world_size=2, num_workers=2)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    workers = bounded_batches(loader, 120, "training data", "")
    for _ in range(5):  # more batches than the dataset: the second epoch's order too
        a, b = next(here), next(workers)
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def slow_augmentation(image, mask):
    """A torchvision-style augmentation that never finishes in time (a stuck worker)."""
    time.sleep(30)
    return image, mask


def test_a_batch_that_does_not_come_ends_in_one_line(train_rows):
    loader = build_train_dataloader(train_rows.select(range(4)), slow_augmentation, 2, num_workers=1, timeout=2)
    with pytest.raises(
        TimeoutError, match=r"^training data: no batch from the DataLoader workers in 2 s .*--worker-timeout"
    ):
        next(bounded_batches(loader, 2, "training data", "raise worker_timeout (--worker-timeout)"))


def test_shared_packed_masks_pickle_as_handles_and_load_equal():
    """After share_memory() a worker's pickle carries shared-memory handles, not the runs; both forms load equal."""
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 5, (300, 400)).astype(np.int16) for _ in range(8)]  # noise: stored raw, ~1.9 MB
    packed = PackedMasks.pack(masks)
    plain = io.BytesIO()
    ForkingPickler(plain).dump(packed)
    assert len(plain.getvalue()) > packed.nbytes
    packed.share_memory()
    shared = io.BytesIO()
    ForkingPickler(shared).dump(packed)
    assert len(shared.getvalue()) < 10_000
    for data in (plain, shared):
        again = ForkingPickler.loads(data.getvalue())
        assert all(np.array_equal(again[i], masks[i]) for i in range(len(masks)))


@pytest.mark.slow
def test_the_wait_for_the_data_preparation_has_its_own_bound(mini_dir):
    """The main process prepares the data for 5 s under a 2 s collective timeout: the other process waits for it
    (prepare_timeout, its own bound) and both go on (`accelerator.main_process_first()` failed here at the
    collective timeout: gloo's "Timed out waiting 2000ms"). Then a preparation of 6 s past a prepare_timeout of 2 s
    ends in one line."""
    completed = run_two_processes(
        "--check", "prepare", "--data-dir", str(mini_dir), "--slow", "5", "--collective-timeout", "2",
        "--prepare-timeout", "120", "--then-slow", "6", "--then-prepare-timeout", "2",
    )  # fmt: skip
    output = completed.stdout + completed.stderr
    for rank in (0, 1):
        assert f"rank {rank}: prepared 100 rows" in completed.stdout, output[-3000:]
    assert completed.returncode == 1, output[-3000:]
    errors = [line for line in completed.stderr.splitlines() if ": error: " in line]
    waiting = "two_process_start.py: error: process 1: the main process did not finish preparing the data of"
    assert any(line.startswith(waiting) and "within 2 s" in line and "--prepare-timeout" in line for line in errors)
    assert "Traceback" not in completed.stderr


def test_setup_run_passes_the_collective_timeout_to_the_process_group(mini_dir, tmp_path, monkeypatch):
    """accelerate hands `InitProcessGroupKwargs.to_kwargs()` to `init_process_group`: the recipe's
    collective_timeout must be in it (torch's default would be 600 s for NCCL)."""
    from imagenets_hf.training import finetune
    from imagenets_hf.training.recipes import load_recipe

    seen = {}

    class Stop(Exception):
        pass

    def make_accelerator(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(finetune, "make_accelerator", make_accelerator)
    recipe = load_recipe(
        "demo", {"data_dir": str(mini_dir), "output_dir": str(tmp_path / "run"), "collective_timeout": 42}
    )
    with pytest.raises(Stop):
        finetune.setup_run(recipe, resume=None, overwrite=False, make_mini_dataset=False)
    (handler,) = seen["kwargs_handlers"]
    assert handler.to_kwargs() == {"timeout": timedelta(seconds=42)}
