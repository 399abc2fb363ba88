"""evaluate.py and predict.py take a training checkpoint folder (`<run>/checkpoints/checkpoint_<N>`): its model is
built as the run's recipe.yaml says and loaded from accelerate's model.safetensors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from script_runner import run_script
from tiny_runs import TINY_RECIPE

from imagenets_hf.evaluation.run import load_model_and_processor

pytestmark = pytest.mark.slow  # a training run


@pytest.fixture(scope="module")
def run_dir(mini_dir, tmp_path_factory) -> Path:
    """A tiny 6-iteration run with checkpoints at 4 and 6 (the final model is checkpoint 6's)."""
    from imagenets_hf.training.finetune import finetune
    from imagenets_hf.training.recipes import load_recipe

    output_dir = tmp_path_factory.mktemp("runs") / "run"
    finetune(
        load_recipe("demo", {**TINY_RECIPE, "data_dir": str(mini_dir), "output_dir": str(output_dir)}), progress=False
    )
    return output_dir


def state_of(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_checkpoint_loads_the_weights_it_holds(run_dir):
    final_model, final_processor = load_model_and_processor(run_dir)
    last_model, last_processor = load_model_and_processor(run_dir / "checkpoints" / "checkpoint_6")
    earlier_model, _ = load_model_and_processor(run_dir / "checkpoints" / "checkpoint_4")
    final, last, earlier = state_of(final_model), state_of(last_model), state_of(earlier_model)
    assert final.keys() == last.keys() == earlier.keys()
    assert all(torch.equal(final[name], last[name]) for name in final)  # the final model is the last checkpoint's
    assert not all(torch.equal(final[name], earlier[name]) for name in final)  # two optimizer steps earlier
    assert last_model.config.id2label == final_model.config.id2label and not last_model.training
    saved = {key: value for key, value in final_processor.to_dict().items() if key != "auto_map"}  # remote-code map
    assert last_processor.to_dict() == saved


def test_run_files_all_get_the_umasks_mode(run_dir):
    """accelerate's model.safetensors came out 0600 (safetensors writes through a private temporary file)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for folder in (run_dir, run_dir / "checkpoints" / "checkpoint_4"):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()}
        assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_evaluate_script_on_a_checkpoint(run_dir, mini_dir, tmp_path, monkeypatch, capsys):
    for name in ("checkpoint_6", "checkpoint_4"):
        out = tmp_path / f"{name}.json"
        status, lines = run_script(
            "evaluate", "--model", run_dir / "checkpoints" / name, "--data-dir", mini_dir, "--output", out,
            "--num-workers", "0", "--no-progress", "--no-extended", monkeypatch=monkeypatch, capsys=capsys,
        )  # fmt: skip
        assert status == 0, lines
    final = json.loads((run_dir / "results.json").read_text())["mIoU"]  # training's evaluation of the final model
    assert json.loads((tmp_path / "checkpoint_6.json").read_text())["mIoU"] == pytest.approx(final, abs=1e-9)


def test_checkpoint_without_its_run_recipe_is_one_line(run_dir, tmp_path, mini_dir, monkeypatch, capsys):
    moved = tmp_path / "alone" / "checkpoint_4"
    shutil.copytree(run_dir / "checkpoints" / "checkpoint_4", moved)
    status, lines = run_script(
        "evaluate", "--model", moved, "--data-dir", mini_dir, monkeypatch=monkeypatch, capsys=capsys
    )
    assert (status, lines) == (
        1,
        [
            f"evaluate.py: error: {moved}: a training checkpoint, but its run folder holds no recipe.yaml "
            f"({tmp_path / 'recipe.yaml'}), which says how to build its model"
        ],
    )
