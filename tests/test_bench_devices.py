"""The benchmarks measure the device they benchmark (`--device cuda:1`), not the current one: every torch.cuda call
that synchronizes or reads peak memory is given it. No GPU here: the torch.cuda functions are replaced by recorders."""

from __future__ import annotations

import pytest
import torch

from imagenets_hf.benchmarks import recipe as bench_recipe
from imagenets_hf.benchmarks.model import PeakMemory, synchronize
from imagenets_hf.training.recipes import load_recipe

CUDA1 = torch.device("cuda:1")


@pytest.fixture
def cuda_calls(monkeypatch):
    """Replace torch.cuda's synchronize / reset_peak_memory_stats / max_memory_allocated by recorders of
    (name, device); max_memory_allocated answers 7 MiB."""
    calls = []

    def recorder(name, result=None):
        def call(device=None):
            calls.append((name, device))
            return result

        return call

    monkeypatch.setattr(torch.cuda, "synchronize", recorder("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", recorder("reset_peak_memory_stats"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", recorder("max_memory_allocated", 7 * 2**20))
    return calls


def test_peak_memory_resets_and_reads_the_benchmarked_device(cuda_calls):
    with PeakMemory(CUDA1) as memory:
        pass
    assert memory.peak_bytes == 7 * 2**20
    assert cuda_calls == [
        ("synchronize", CUDA1),
        ("reset_peak_memory_stats", CUDA1),
        ("synchronize", CUDA1),
        ("max_memory_allocated", CUDA1),
    ]


def test_timings_synchronize_the_benchmarked_device(cuda_calls):
    synchronize(CUDA1)
    synchronize(torch.device("cpu"))  # nothing to wait for
    assert cuda_calls == [("synchronize", CUDA1)]


def test_recipe_benchmark_measures_the_device_path_on_the_benchmarked_device(monkeypatch):
    """`measure_data_path` ran the device path on `resolve_device()` (cuda:0 when cuda:1 was benchmarked, a GPU when
    `--device cpu` was asked for on a GPU machine)."""
    devices = []

    def fake_device_path(config, rows, device, batch_size=32, repeats=3):
        devices.append(device)
        return 123.0

    monkeypatch.setattr(bench_recipe, "measure_device_path", fake_device_path)
    recipe = load_recipe("mae-base-pretrained", {"crop_size": 64})
    rates = bench_recipe.measure_data_path(recipe, num_images=1, passes=1, device=CUDA1)
    assert devices == [CUDA1] and rates["device_samples_per_s"] == 123.0
