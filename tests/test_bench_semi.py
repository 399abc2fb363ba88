"""scripts/bench_semi.py: supervised vs semi-supervised runs at the same iterations, their table and JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_runs import TINY_RECIPE, cli_args

from imagenets_hf.benchmarks import semi as bench

REPO = Path(__file__).resolve().parents[1]


def test_summary_pairs_each_seed_and_takes_mean_and_spread(monkeypatch, tmp_path):
    """Each (budget, seed) trains the semi recipe and the same recipe with semi_supervised none (nothing else
    changed); gains are paired by seed. Hand-computed: supervised 10, 20 and semi 14, 22 -> gains 4, 2, mean 3,
    sample std sqrt(2)."""
    seen = []

    def fake_finetune(recipe, overwrite, progress):
        seen.append(recipe)
        semi = recipe.semi_supervised == "unimatch"
        miou = {(0, False): 10.0, (0, True): 14.0, (1, False): 20.0, (1, True): 22.0}[(recipe.seed, semi)]
        both = {"mIoU_teacher": miou, "mIoU_student": miou - 1} if semi else {}
        return {"metrics": {"mIoU": miou}, "train_seconds": 6.0 if semi else 2.0, "iterations": 2, **both}

    from imagenets_hf.training import finetune as finetune_module

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    summary = bench.run_semi_benchmark(
        [1], [0, 1], output_root=tmp_path, overrides={"max_iters": 50, "unsupervised_start_iter": 10}, log=None
    )
    (row,) = summary["budgets"]
    assert (row["supervised"], row["semi"], row["gain_mean"]) == ([10.0, 20.0], [14.0, 22.0], 3.0)
    assert row["gain_std"] == pytest.approx(2**0.5)
    assert (row["semi_student"], row["gain_teacher_mean"], row["gain_student_mean"]) == ([13.0, 21.0], 3.0, 2.0)
    assert summary["seconds_per_iteration"] == {"supervised": 1.0, "semi": 3.0}
    assert len(seen) == 4 and all(r.labels_per_class == 1 and r.max_iters == 50 for r in seen)
    for supervised, semi in zip(seen[0::2], seen[1::2]):
        differing = {k for k, v in supervised.to_dict().items() if semi.to_dict()[k] != v}
        assert differing == {"semi_supervised", "output_dir"}
    assert "| 1 | 2 | 15.00 +- 7.07 | 18.00 +- 5.66 | +3.00 +- 1.41 | +3.00 | +2.00 |" in bench.format_semi_table(
        summary
    )


def test_a_supervised_recipe_is_refused():
    with pytest.raises(ValueError, match="not semi-supervised"):
        bench.run_semi_benchmark([1], [0], recipe="demo")


@pytest.mark.slow
def test_bench_semi_runs_at_toy_size(mini_dir, tmp_path):
    """The script end to end on the tiny recipe (2 iterations a run, 1 budget, 1 seed): a table, then one JSON line."""
    toy = {**TINY_RECIPE, "max_iters": 2, "warmup_iters": 1, "checkpoint_interval": 0, "num_workers": 0}
    toy["unsupervised_start_iter"] = 1  # iteration 0 on the labelled images alone, iteration 1 with both streams
    toy["unlabelled_global_batch_size"] = 4
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(REPO / "scripts" / "bench_semi.py"), "--labels-per-class", "1", "--seeds", "0"]
    command += ["--output-root", str(tmp_path), "--data-dir", str(mini_dir), *cli_args(toy)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    (row,) = summary["budgets"]
    assert row["labels_per_class"] == 1 and len(row["supervised"]) == len(row["semi"]) == 1
    assert row["gain_mean"] == pytest.approx(row["semi"][0] - row["supervised"][0])
    assert any(line.startswith("| 1 | 1 |") for line in lines)
    results = json.loads((tmp_path / "k1_seed0_semi" / "results.json").read_text())
    assert results["saved_model"] == "teacher" and results["iterations"] == 2


def test_bench_semi_refuses_fields_it_sets_per_run():
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_semi.py"), "--labels-per-class", "1", "--set", "seed=3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert completed.returncode == 2
    assert "seed is set per run by the benchmark (--labels-per-class, --seeds, --output-root)" in completed.stderr
