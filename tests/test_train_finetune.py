"""The fine-tuning loop end to end on the mini dataset: exact resume, two processes, NaN stop, pretrained weights.

That the demo learns is tested on its real runs: the README's main job (worker path) and docs/training.md's device-path
example, in tests/test_docs_examples.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import TINY_RECIPE, cli_args

from imagenets_hf.training.checkpoints import newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "finetune.py"

# The tiny recipe at a global batch of 8 (2 processes x 4 in the two-process test), in a DataLoader worker.
TINY_OVERRIDES = {**TINY_RECIPE, "global_batch_size": 8, "lr": 1e-3, "log_interval": 1, "num_workers": 1}
TINY = cli_args(TINY_OVERRIDES)


def run_finetune(
    args: list[str], launcher: list[str] | None = None, timeout: int = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    command = (launcher or [sys.executable]) + [str(SCRIPT), "--no-progress", *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stop_then_resume_gives_the_same_weights(mini_dir, tmp_path, capsys):
    """6 iterations in one go vs 3 iterations, stop, resume from the iteration-2 checkpoint (written just before a
    validation): identical final weights (data order, augmentation, drop path, lr and AdamW state all restored), in
    DataLoader workers. (The command line's stop and resume: test_train_run_folder.py's kill and Ctrl-C tests.)"""
    from imagenets_hf.training.finetune import finetune
    from imagenets_hf.training.recipes import load_recipe

    def recipe(output_dir: Path):
        overrides = {**TINY_OVERRIDES, "data_dir": str(mini_dir), "val_interval": 2}
        return load_recipe("demo", {**overrides, "output_dir": str(output_dir)})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(recipe(straight), progress=False)
    capsys.readouterr()
    finetune(recipe(resumed), stop_after=3, progress=False)
    assert "Stopped after 3 iterations" in capsys.readouterr().out
    assert not (resumed / "model.safetensors").exists()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_3"]
    assert (
        newest_complete_checkpoint(resumed).path == resumed / "checkpoints" / "checkpoint_3"
    )  # what --resume latest picks
    checkpoint_2 = str(resumed / "checkpoints" / "checkpoint_2")
    finetune(recipe(resumed), resume=checkpoint_2, progress=False)
    out = capsys.readouterr().out
    assert "Resumed from" in out and "at iteration 2" in out
    # total_limit 2: only the last two checkpoints are kept
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["checkpoint_4", "checkpoint_6"]

    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert all(t.dtype == torch.float32 for t in actual.values() if t.is_floating_point())
    first_results = json.loads((straight / "results.json").read_text())
    assert json.loads((resumed / "results.json").read_text())["mIoU"] == first_results["mIoU"]
    # the output folder: weights, image processor, model card with the recipe and results, recipe, logs
    for name in ("config.json", "preprocessor_config.json", "README.md", "recipe.yaml", "results.json"):
        assert (straight / name).is_file(), name
    card = (straight / "README.md").read_text()
    assert "max_iters: 6" in card and f"{first_results['mIoU']:.2f}" in card
    # both say how the model was evaluated
    assert "## Results (validation, inference: whole (official protocol))" in card
    assert first_results["inference"] == {
        "mode": "whole",
        "crop_size": None,
        "stride": None,
        "scales": [1.0],
        "flip": False,
    }
    assert any((straight / "logs").rglob("events.out.tfevents.*"))


def test_stop_then_resume_on_the_device_path_gives_the_same_weights(mini_dir, tmp_path):
    """`augment_on_device`: 6 iterations straight vs stopped after 3 and resumed; identical final weights."""
    from imagenets_hf.training.finetune import finetune
    from imagenets_hf.training.recipes import load_recipe

    overrides = {
        **TINY_OVERRIDES,
        "data_dir": str(mini_dir),
        "augment_on_device": True,
        "photometric_distortion": True,
    }
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(load_recipe("demo", {**overrides, "output_dir": str(straight)}), progress=False)
    finetune(load_recipe("demo", {**overrides, "output_dir": str(resumed)}), stop_after=3, progress=False)
    finetune(load_recipe("demo", {**overrides, "output_dir": str(resumed)}), resume="latest", progress=False)
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_deterministic_recipe_turns_deterministic_algorithms_on(mini_dir, tmp_path, monkeypatch):
    """`--deterministic true` sets torch's deterministic algorithms, cuDNN's flags and cuBLAS's workspace before
    anything runs, trains under them (the loss's bilinear upsampling has a deterministic backward) and is recorded
    in recipe.yaml. That CUDA then repeats itself bit for bit only a GPU can show (scripts/check_gpu.py)."""
    import argparse

    import yaml

    from imagenets_hf.training.finetune import finetune
    from imagenets_hf.training.recipes import add_recipe_arguments, recipe_from_args

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    out = tmp_path / "deterministic"
    paths = ["--data-dir", str(mini_dir), "--output-dir", str(out), "--num-workers", "0"]
    recipe = recipe_from_args(parser.parse_args([*TINY, *paths, "--deterministic", "true"]))
    assert recipe.deterministic and not torch.are_deterministic_algorithms_enabled()
    try:
        finetune(recipe, stop_after=1, progress=False)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    assert yaml.safe_load((out / "recipe.yaml").read_text())["deterministic"] is True


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(mini_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): per-device 4 x 2 processes = global 8, the
    scheduler steps once per optimizer step, and the 2-process evaluation equals a 1-process one of the saved weights."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not on PATH")
    out = tmp_path / "ddp"
    launcher = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    # One image a forward pass (and one thread, as run_finetune sets): each image's logits are then computed by the
    # same operations in the same order in every process, so the evaluations below can be compared exactly (a
    # batch of another composition rounds differently, and a near-tie pixel may flip).
    args = ["--data-dir", str(mini_dir), *TINY, "--output-dir", str(out), "--eval-batch-size", "1"]
    completed = run_finetune(args, launcher=launcher)
    assert "2 process(es) x 4 per device x 1 accumulation = global batch 8" in completed.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["iterations"] == 6
    # the scheduler (checkpointed beside the model) stepped 6 times, not 12
    scheduler_state = torch.load(out / "checkpoints" / "checkpoint_6" / "custom_checkpoint_0.pkl", weights_only=False)
    assert scheduler_state["last_epoch"] == 6

    from imagenets_hf.data.imagenets import load_imagenets
    from imagenets_hf.evaluation.inference import evaluate_model
    from imagenets_hf.model import ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    model = ViTFCNForSemanticSegmentation.from_pretrained(out).eval()
    processor = ViTFCNImageProcessor.from_pretrained(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = load_imagenets(mini_dir, "validation")
        single = evaluate_model(model, processor, rows, batch_size=1, progress=False, num_workers=0)
    finally:
        torch.set_num_threads(threads)
    assert single["mIoU"] == pytest.approx(results["mIoU"], abs=1e-9)
    assert single["per_class_iou"] == pytest.approx(results["per_class_iou"], abs=1e-9)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(mini_dir, tmp_path, monkeypatch):
    """A loss that turns NaN at iteration 3 stops training with a clear error; checkpoint_2 is kept."""
    import imagenets_hf.training.finetune as finetune_module
    from imagenets_hf.training.recipes import load_recipe

    build_model = finetune_module.build_model
    calls = {"n": 0}

    def poisoned_build_model(recipe, names):
        model = build_model(recipe, names)
        original = model.compute_loss

        def compute_loss(logits, labels):
            calls["n"] += 1
            loss = original(logits, labels)
            return loss * float("nan") if calls["n"] > 4 else loss  # 2 micro-batches per iteration

        model.compute_loss = compute_loss
        return model

    monkeypatch.setattr(finetune_module, "build_model", poisoned_build_model)
    overrides = {
        **TINY_RECIPE,
        "data_dir": str(mini_dir),
        "output_dir": str(tmp_path / "nan"),
        "per_device_batch_size": 2,
        "max_iters": 10,
    }
    with pytest.raises(finetune_module.NonFiniteLossError, match=r"loss is nan at iteration 3.*checkpoint_2"):
        finetune_module.finetune(load_recipe("demo", overrides), progress=False)
    assert (tmp_path / "nan" / "checkpoints" / "checkpoint_2").is_dir()
    assert not (tmp_path / "nan" / "checkpoints" / "checkpoint_4").exists()


@pytest.mark.parametrize("pretrained_key", [None, "student"])
def test_pretrained_encoder_weights_are_loaded(mini_dir, tmp_path, pretrained_key):
    """`pretrained` goes through load_pretrained_encoder: with lr 0 the saved encoder equals the checkpoint (an
    MAE-style file; or the student of a DINO-style file holding student and teacher, picked by `pretrained_key`)."""
    import timm

    from imagenets_hf.training.finetune import finetune
    from imagenets_hf.training.recipes import load_recipe

    encoder_kwargs = TINY_RECIPE["encoder_kwargs"]
    torch.manual_seed(123)
    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **encoder_kwargs)
    checkpoint = tmp_path / "checkpoint.pth"
    if pretrained_key is None:
        torch.save({"model": source.state_dict()}, checkpoint)
    else:
        teacher = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **encoder_kwargs)
        torch.save(
            {
                "student": {f"module.backbone.{k}": v for k, v in source.state_dict().items()},
                "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            },
            checkpoint,
        )
    overrides = {
        **TINY_RECIPE,
        "data_dir": str(mini_dir),
        "output_dir": str(tmp_path / "pretrained"),
        "pretrained": str(checkpoint),
        "pretrained_key": pretrained_key,
        "per_device_batch_size": 2,
        "global_batch_size": 2,
        "max_iters": 2,
        "warmup_iters": 1,
        "lr": 0.0,
        "min_lr": 0.0,  # (mmcv's min_lr is absolute: it would lift a zero lr)
        "checkpoint_interval": 0,
    }
    finetune(load_recipe("demo", overrides), progress=False)
    saved = load_file(tmp_path / "pretrained" / "model.safetensors")
    for name, tensor in source.state_dict().items():
        assert torch.equal(saved[f"encoder.{name}"], tensor), name


def test_train_step_returns_the_lr_it_stepped_with():
    """mmcv logs the lr the iteration used; `train_step` returns (and the loop logs) the head group's lr read before
    the scheduler moves on. Warmup 4 iterations from ratio 0.1, base 1e-3, min_lr 0, 10 iterations (hand-computed:
    lr(0) = 1e-3 x 0.1; lr(1) = 1e-3 x (1 + cos(pi / 10)) / 2 x (1 - 0.75 x 0.9) = 3.1705e-4). Adam's first step
    moves each weight by lr x g / (|g| + eps): the returned lr is also the one the update used."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from imagenets_hf.training.finetune import train_step
    from imagenets_hf.training.optim import WarmupCosineLR

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3))

        def forward(self, pixel_values, labels):
            return SimpleNamespace(loss=((self.weight - pixel_values) ** 2).sum())

    model = Quadratic()
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr": 1e-3}], weight_decay=0.0, eps=1e-12)
    scheduler = WarmupCosineLR(optimizer, max_iters=10, warmup_iters=4, warmup_ratio=0.1, min_lr=0.0)
    batch = {"pixel_values": torch.tensor([1.0, -2.0, 3.0]), "labels": torch.zeros(1)}
    run = SimpleNamespace(
        accelerator=Accelerator(cpu=True),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        batches=iter([batch, batch]),
        accumulation=1,
        recipe=SimpleNamespace(grad_clip=None),
        last_checkpoint=None,
        teacher=None,  # a supervised run
    )
    before = model.weight.detach().clone()
    _, lr0 = train_step(run, 0)
    assert lr0 == pytest.approx(1e-4, rel=1e-12)  # float64 products; the next iteration's lr is 3.2x larger
    torch.testing.assert_close(model.weight.detach() - before, torch.full((3,), 1e-4) * torch.tensor([1.0, -1, 1]))
    _, lr1 = train_step(run, 1)
    assert lr1 == pytest.approx(1e-3 * (1 + math.cos(math.pi / 10)) / 2 * (1 - 0.75 * 0.9), rel=1e-12)
