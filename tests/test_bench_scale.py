"""`scripts/bench_scale.py` at a toy scale (3 classes, the GPU check's toy model), so that the full-size benchmark
(minutes to hours, not in the suite) cannot rot: every stage runs in its own process and reports what it did."""

from __future__ import annotations

import json
import os

import pytest
from script_runner import run_script

from imagenets_hf.benchmarks.scale import STAGES, folder_bytes, spread, tree_memory_bytes
from imagenets_hf.data.scale import make_scale_dataset, scale_counts


def test_spread_takes_evenly_spaced_items():
    assert spread(list(range(10)), 3) == [0, 4, 9]  # round(i * 9 / 2): 0, 4.5 -> 4 (banker's), 9
    assert spread([1, 2], 5) == [1, 2]


def test_tree_memory_counts_this_process(tmp_path):
    rss, pss, own = tree_memory_bytes(os.getpid())
    assert own > 10_000_000 and rss >= own and 0 < pss <= rss
    assert tree_memory_bytes(os.getpid(), pss=False)[1] == 0
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c").write_bytes(b"y" * 24)
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert folder_bytes(tmp_path) == 1024


@pytest.mark.slow
def test_toy_scale_benchmark_runs_every_stage(tmp_path, monkeypatch, capsys):
    data = make_scale_dataset(tmp_path / "data", scale=3, workers=1)
    counts = scale_counts(3)
    work, cache = tmp_path / "work", tmp_path / "cache"
    code, lines = run_script(
        "bench_scale",
        *("--data-dir", data, "--work-dir", work, "--eval-images", 3, "--predict-images", 4),
        *("--batch-size", 2, "--train-iters", 1, "--toy", "--cache-dir", cache),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 0, lines
    result = json.loads(lines[-1])
    stages = result["stages"]
    assert set(STAGES) <= set(stages)
    rows = {"train_semi": counts["train-semi"], "validation": counts["validation"], "test": counts["test"]}
    assert stages["first_load"]["rows"] == stages["cached_load"]["rows"] == rows
    assert stages["export"]["rows"] == {"train_semi": 30, "validation": 41}
    assert stages["train_start"]["iterations"] == 1
    assert (stages["evaluate"]["images"], stages["evaluate"]["split_images"]) == (3, 41)
    assert (stages["predict"]["images"], stages["predict"]["split_images"]) == (4, 90)
    assert stages["check"]["problems"] == 0, stages["check"]
    assert result["classes"] == 3 and result["cache_gb"] > 0 and result["parquet_gb"] > 0
    for stage in STAGES:
        assert stages[stage]["wall_s"] > 0 and stages[stage]["peak_rss_gb"] > 0, stage
        assert 0 < stages[stage]["peak_main_rss_gb"] <= stages[stage]["peak_rss_gb"], stage
        assert 0 < stages[stage]["cpu_s"], stage
    for stage in ("evaluate", "predict"):
        assert stages[stage]["cpu_s_per_image"] == round(stages[stage]["cpu_s"] / stages[stage]["images"], 4)
    assert not work.exists()  # deleted without --keep

    # A later stage alone, on the kept cache, without DataLoader workers: the cache is read, not rebuilt.
    cached = {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}
    code, lines = run_script(
        "bench_scale",
        *("--data-dir", data, "--work-dir", work, "--eval-images", 3, "--stages", "evaluate"),
        *("--toy", "--cache-dir", cache, "--num-workers", 0),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 0, lines
    again = json.loads(lines[-1])
    assert again["num_workers"] == 0 and set(again["stages"]) == {"save_model", "evaluate"}
    assert again["stages"]["evaluate"]["mIoU"] == stages["evaluate"]["mIoU"]
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()} == cached


def test_a_cache_folder_inside_the_work_folder_is_refused(tmp_path):
    from imagenets_hf.benchmarks.scale import run_scale_benchmark

    with pytest.raises(ValueError, match="is inside the work folder"):
        run_scale_benchmark(tmp_path, tmp_path / "work", cache_dir=tmp_path / "work" / "cache", stages=())


def test_training_stage_refuses_to_reach_the_end_of_the_run(tmp_path):
    """At max_iters the run would evaluate the whole validation split (hours at full size): refused up front. (The
    first full-size run failed here when the demo's warm-up was longer than the iterations asked for.)"""
    from imagenets_hf.benchmarks.scale import _train_start

    with pytest.raises(ValueError, match=r"train_iters \(5\) must be below the recipe's max_iters \(5\)"):
        _train_start(str(tmp_path), str(tmp_path / "run"), 5, {"max_iters": 5, "warmup_iters": 1})
