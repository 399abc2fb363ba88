"""The recipe benchmark at toy size on the CPU: every figure present and sane (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from imagenets_hf.benchmarks.recipe import (
    Precision,
    make_train_step,
    measure_data_path,
    resolve_precision,
    run_recipe_benchmark,
)
from imagenets_hf.training.finetune import build_model
from imagenets_hf.training.optim import WarmupCosineLR, build_optimizer
from imagenets_hf.training.recipes import load_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_recipe.py"
QUICK = {"iters": 1, "warmup": 1, "eval_iters": 1, "data_images": 2, "device": "cpu", "toy": True}
POSITIVE_FIELDS = (
    "params_m first_step_s train_samples_per_s train_gflops_per_sample matmul_peak_tflops mfu train_peak_mem_gib "
    "eval_fps eval_forward_fps eval_gflops_per_image data_worker_samples_per_s data_samples_per_s data_workers_needed "
    "projected_train_s projected_data_bound_s"
).split()


def check_row(row: dict, recipe: str, precision: str) -> None:
    assert row["recipe"] == recipe and row["precision"] == precision
    for field in POSITIVE_FIELDS:
        value = row[field]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (field, value)
    assert 0 < row["mfu"] <= 1
    assert row["num_labels"] == 920 and row["batch_size"] == 2 and row["crop_size"] == 64
    assert row["eval_input_hw"] == [64, 85]  # the 128x96 toy image at short side 64
    assert row["projected_train_s"] == pytest.approx(3600 * 256 / row["train_samples_per_s"], rel=1e-3)


def run_script(args: list[str], capsys) -> tuple[list[str], dict]:
    spec = importlib.util.spec_from_file_location("bench_recipe_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(args) in (None, 0)
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_script_runs_the_toy_recipe_in_float32(capsys):
    """The recipe's fp16 runs in float32 on a CPU (as fine-tuning does there) and says so; a table, then JSON."""
    args = ["--toy", "--device", "cpu", "--recipes", "sere-small-pretrained", "--iters", "1", "--warmup", "1"]
    lines, summary = run_script([*args, "--eval-iters", "1", "--data-images", "2"], capsys)
    assert any(line.startswith("recipe") and "MFU" in line for line in lines)
    assert summary["benchmark"] == "bench_recipe" and summary["device"] == "cpu" and summary["toy"] is True
    assert "RSS" in summary["memory"]
    (row,) = summary["results"]
    check_row(row, "sere-small-pretrained", "fp32")
    assert "fp16 -> fp32" in row["precision_note"] and row["grad_scaler"] is False
    assert row["eval_dtype"] == "float32"


def test_bf16_autocast_on_cpu():
    summary = run_recipe_benchmark("mae-base-finetuned", mixed_precision="bf16", **QUICK)
    (row,) = summary["results"]
    check_row(row, "mae-base-finetuned", "bf16")
    assert row["eval_dtype"] == "float32"  # evaluate_model autocasts on CUDA only
    json.loads(json.dumps(summary))


def test_precision_as_finetune_runs_it():
    assert resolve_precision("fp16", torch.device("cuda")) == Precision(
        "fp16", torch.float16, True, "fp16 autocast + GradScaler"
    )
    assert resolve_precision("fp16", torch.device("cpu")).autocast_dtype is None
    assert resolve_precision("bf16", torch.device("cpu")).autocast_dtype is torch.bfloat16
    assert resolve_precision("no", torch.device("cuda")).compute_dtype is torch.float32
    with pytest.raises(ValueError, match="unknown mixed precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_fp16_step_with_grad_scaler_updates_the_weights():
    """The CUDA fp16 step (autocast + GradScaler), exercised on the CPU, where torch has fp16 autocast."""
    recipe = load_recipe("sere-small-pretrained", {"encoder_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}})
    torch.manual_seed(0)
    model = build_model(recipe, [str(i) for i in range(920)])
    optimizer = build_optimizer(model, lr=recipe.lr, weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay)
    scheduler = WarmupCosineLR(optimizer, recipe.max_iters, recipe.warmup_iters)
    fp16 = Precision("fp16", torch.float16, True)
    step = make_train_step(model, optimizer, scheduler, fp16, torch.device("cpu"), grad_clip=1.0)
    before = model.decode_head.conv_seg.weight.detach().clone()
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 920, (2, 32, 32))
    losses = [step(pixel_values, labels) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert not torch.equal(before, model.decode_head.conv_seg.weight)


def test_data_path_rates():
    rates = measure_data_path(load_recipe("mae-base-pretrained", {"crop_size": 64}), num_images=2, passes=1)
    assert set(rates) == {"worker_samples_per_s", "device_samples_per_s"}
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())
