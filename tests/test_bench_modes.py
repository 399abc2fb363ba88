"""The inference-mode benchmark (`scripts/bench_modes.py`): each named mode's mIoU is `evaluate_model`'s under that
mode, the slide window comes from the model's recipe, and the script prints the table and one JSON line."""

import json

import pytest
import torch
from script_runner import run_script

from imagenets_hf.benchmarks.modes import NAMED_MODES, run_modes_benchmark


@pytest.fixture
def saved_model(mini_dir, tmp_path):
    from imagenets_hf.data.imagenets import class_names
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    names = class_names(mini_dir, synset_words=mini_dir / "LOC_synset_mapping.txt")
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        num_labels=len(names),
        drop_path_rate=0.0,
        encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    )
    folder = tmp_path / "model"
    ViTFCNForSemanticSegmentation(config).save_pretrained(folder)
    ViTFCNImageProcessor(short_side=32, max_long_side=64).save_pretrained(folder)
    (folder / "recipe.yaml").write_text("crop_size: 24\n", encoding="utf-8")
    return folder


def test_each_modes_miou_is_evaluate_models(saved_model, mini_dir):
    from imagenets_hf.data.imagenets import load_imagenets
    from imagenets_hf.evaluation.inference import evaluate_model
    from imagenets_hf.evaluation.loading import load_model_and_processor

    result = run_modes_benchmark(saved_model, mini_dir, ["whole", "slide", "flip"], images=3, device="cpu")
    assert list(result["modes"]) == ["whole", "slide", "flip"] and result["images"] == 3
    assert result["modes"]["slide"]["mode"]["crop_size"] == [24, 24]  # the recipe's
    model, processor = load_model_and_processor(saved_model)
    rows = load_imagenets(mini_dir, split="validation").select(range(3))
    for name, row in result["modes"].items():
        assert row["images_per_second"] > 0
        mode = NAMED_MODES[name].with_crop_size(24)
        expected = evaluate_model(model, processor, rows, num_workers=0, progress=False, mode=mode)["mIoU"]
        assert row["mIoU"] == pytest.approx(expected, abs=0.005)  # the benchmark rounds to 2 decimals


def test_the_script_prints_the_table_and_one_json_line(saved_model, mini_dir, monkeypatch, capsys):
    status, lines = run_script(
        "bench_modes",
        *("--model", saved_model, "--data-dir", mini_dir, "--images", "2", "--modes", "whole", "ms+flip"),
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 0, lines
    assert lines[:2] == ["| mode | mIoU | images/s |", "|---|---|---|"]
    assert lines[3].startswith("| `ms+flip`: whole, scales 0.5, 0.75, 1, 1.25, 1.5, 1.75 + flip |")
    assert list(json.loads(lines[4])["modes"]) == ["whole", "ms+flip"]  # stdout: the table, then the JSON line
    status, lines = run_script(
        "bench_modes",
        "--model",
        saved_model,
        "--data-dir",
        mini_dir,
        "--modes",
        "tiles",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert status == 2 and lines[0].startswith("bench_modes.py: error: argument --modes: invalid choice: 'tiles'")
