"""Pictures of predictions: the legend names exactly the classes shown in their overlay colours, the grid's layout,
`predict.py --overlay`'s legend, `scripts/make_overlays.py` end to end and the model card's picture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_runner import run_script

from imagenets_hf.data.masks import IGNORE_INDEX
from imagenets_hf.data.mini import MINI_CLASSES, mini_class_names
from imagenets_hf.evaluation.overlays import (
    FONT_SIZE,
    GAP,
    GRID_ALPHA,
    IGNORE_NAME,
    OVERLAY_ALPHA,
    draw_legend,
    label_palette,
    legend_entries,
    make_overlay,
    make_prediction_grid,
    spread_indices,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_overlays.py"
NAMES = ["other", "red solid disc", "blue striped square", "green dotted triangle"]
ID2LABEL = dict(enumerate(NAMES))


def colours_in(image: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(int(c) for c in pixel) for pixel in np.asarray(image.convert("RGB")).reshape(-1, 3)}


def palette_colour(class_id: int) -> tuple[int, int, int]:
    """The overlay colour of a mini dataset class id (the names above and the tiny model's are the mini ones)."""
    return tuple(int(c) for c in label_palette(id2label=dict(enumerate(mini_class_names())))[class_id])


def test_mini_classes_are_drawn_in_the_colours_their_names_say():
    """The "red solid disc" was drawn blue: each mini class takes the colour it is drawn in, whatever its id."""
    palette = label_palette(id2label={0: "other", 7: "red solid disc", 3: "white wavy diamond", 4: "hen"})
    assert tuple(palette[7]) == MINI_CLASSES[0].colour == (220, 30, 30)
    assert tuple(palette[3]) == MINI_CLASSES[8].colour == (240, 240, 240)
    assert tuple(palette[4]) == tuple(label_palette()[4])  # another name keeps the id's hue
    assert tuple(palette[0]) == (0, 0, 0) and tuple(palette[IGNORE_INDEX]) == (128, 128, 128)
    colours = {tuple(int(c) for c in colour) for colour in label_palette(id2label=dict(enumerate(mini_class_names())))}
    assert len(colours) == 1001  # "other", ignore and every class apart
    # the overlay of a white image: the disc's pixels are red over white
    image = Image.fromarray(np.full((4, 4, 3), 255, dtype=np.uint8))
    overlay = np.asarray(make_overlay(image, np.full((4, 4), 1), id2label=ID2LABEL))[:4, -4:]  # the prediction panel
    expected = np.round((1 - OVERLAY_ALPHA) * 255 + OVERLAY_ALPHA * np.array([220, 30, 30]))
    assert (overlay == expected).all()


def test_legend_entries_are_the_classes_shown_by_id_with_their_names():
    ground_truth = np.array([[0, 1], [IGNORE_INDEX, 1]])
    prediction = np.array([[0, 3], [3, 3]])
    entries, more = legend_entries([ground_truth, None, prediction], ID2LABEL)
    assert entries == [(0, "other"), (1, "red solid disc"), (3, "green dotted triangle"), (IGNORE_INDEX, IGNORE_NAME)]
    assert more == 0
    # config.json round trips give string keys; an id the model does not name keeps its number
    entries, _ = legend_entries([np.array([[2, 7]])], {str(k): v for k, v in ID2LABEL.items()})
    assert entries == [(2, "blue striped square"), (7, "7")]


def test_legend_keeps_the_largest_classes_and_counts_the_rest():
    ids = np.repeat(np.arange(30), np.arange(1, 31))[None, :]  # class i covers i + 1 pixels
    entries, more = legend_entries([ids], None, max_entries=5)
    assert [i for i, _ in entries] == [25, 26, 27, 28, 29] and more == 25


def test_legend_draws_each_class_in_its_overlay_colour_and_wraps():
    entries = [(1, NAMES[1]), (2, NAMES[2]), (3, NAMES[3])]
    legend = draw_legend(entries, width=600)
    assert legend.width == 600
    colours = colours_in(legend)
    assert {palette_colour(1), palette_colour(2), palette_colour(3)} <= colours
    assert palette_colour(5) not in colours
    narrow = draw_legend(entries, width=120)  # one entry a line
    assert narrow.height > legend.height
    assert draw_legend(entries, width=600, more=4).height == legend.height  # "+4 more classes" fits the line


def test_overlay_with_names_adds_a_legend_below_the_panels():
    image = Image.fromarray(np.full((10, 20, 3), 128, dtype=np.uint8))
    ids = np.zeros((10, 20), dtype=np.int64)
    ids[:, 10:] = 2
    plain = make_overlay(image, ids, ids)
    named = make_overlay(image, ids, ids, id2label={0: "other", 2: "hen"})  # not mini names: the same colours
    assert plain.size == (3 * 20 + 2 * GAP, 10)
    assert named.width == plain.width and named.height > plain.height
    assert np.array_equal(np.asarray(named)[:10], np.asarray(plain))  # the panels are unchanged
    legend = named.crop((0, 10, named.width, named.height))
    assert {tuple(int(c) for c in label_palette()[i]) for i in (0, 2)} <= colours_in(legend)


def test_grid_has_three_rows_of_cells_and_blends_the_class_colours():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 80), (60, 30)]]
    ground_truths = [np.full((40, 80), 1), None]  # the second has no mask: its cell stays white
    predictions = [np.full((40, 80), 2), np.full((60, 30), 3)]
    cell = 32
    grid = make_prediction_grid(images, predictions, ground_truths, ID2LABEL, cell_height=cell, title="t")
    widths = [64, 16]  # 80 x 32/40 and 30 x 32/60, rounded
    pixels = np.asarray(grid).astype(np.int64)
    label_width = grid.width - sum(w + GAP for w in widths)
    image_cell = np.asarray(images[0].resize((64, cell), Image.Resampling.BILINEAR)).astype(np.float64)
    top = FONT_SIZE + 2 * GAP  # the title line
    rows = [pixels[top + r * (cell + GAP) :][:cell, label_width : label_width + 64] for r in (0, 1, 2)]
    assert np.abs(rows[0] - image_cell).max() <= 1
    for row, class_id in ((rows[1], 1), (rows[2], 2)):
        expected = (1 - GRID_ALPHA) * image_cell + GRID_ALPHA * np.array(palette_colour(class_id))
        assert np.abs(row - expected).max() <= 1
    second_gt = pixels[top + cell + GAP : top + 2 * cell + GAP, label_width + 64 + GAP : label_width + 64 + GAP + 16]
    assert (second_gt == 255).all()
    legend = grid.crop((0, top + 3 * (cell + GAP), grid.width, grid.height))
    assert {palette_colour(1), palette_colour(2), palette_colour(3)} <= colours_in(legend)
    with pytest.raises(ValueError, match="as many predictions"):
        make_prediction_grid(images, predictions[:1], ground_truths, ID2LABEL)


def test_spread_indices():
    assert spread_indices(50, 6) == [0, 10, 20, 29, 39, 49]
    assert spread_indices(3, 6) == [0, 1, 2]
    assert spread_indices(9, 1) == [0]


@pytest.fixture(scope="module")
def saved_model(mini_dir, tmp_path_factory) -> Path:
    """A tiny random model named after the mini classes, saved as finetune.py saves one."""
    from imagenets_hf.data.imagenets import class_names
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    torch.manual_seed(0)
    names = class_names(mini_dir, synset_words=mini_dir / "LOC_synset_mapping.txt")
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        id2label=dict(enumerate(names)),
        drop_path_rate=0.0,
        encoder_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8, "img_size": 32},
    )
    out = tmp_path_factory.mktemp("model") / "tiny"
    ViTFCNForSemanticSegmentation(config).save_pretrained(out)
    ViTFCNImageProcessor(short_side=32, max_long_side=128).save_pretrained(out)
    return out


def run_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env.pop("IMAGENETS_DEBUG", None)
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_script_writes_the_grid_with_the_models_class_names(saved_model, mini_dir, tmp_path):
    out = tmp_path / "pictures" / "grid.png"  # the folder is created
    completed = run_subprocess(
        "--model", str(saved_model), "--data-dir", str(mini_dir), "--out", str(out), "--num-images", "3",
        "--cell-height", "48", cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert f"wrote {out}" in completed.stdout
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.mode == "RGB"
    # title line, three rows of 48 px cells, then the legend
    assert grid.height > FONT_SIZE + 2 * GAP + 3 * (48 + GAP)
    # the three images spread over the 50 sorted validation files are those of classes 1, 5 and 10
    legend = grid.crop((0, FONT_SIZE + 2 * GAP + 3 * (48 + GAP), grid.width, grid.height))
    assert {palette_colour(1), palette_colour(5), palette_colour(10)} <= colours_in(legend)


def test_script_errors_are_one_line(saved_model, mini_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGENETS_DEBUG", raising=False)

    def run(*args) -> tuple[int, list[str]]:
        return run_script("make_overlays", *args, monkeypatch=monkeypatch, capsys=capsys)

    missing = tmp_path / "nope"
    assert run("--model", missing, "--data-dir", mini_dir, "--out", "x.png") == (
        1,
        [f"make_overlays.py: error: no such model folder: {missing}"],
    )
    status, lines = run("--model", saved_model, "--data-dir", tmp_path, "--out", "x.png")
    assert status == 1 and len(lines) == 1 and "no such image folder" in lines[0]
    status, lines = run("--model", "m", "--data-dir", "d", "--out", "x.png", "--num-images", "0")
    assert status == 2 and len(lines) == 1 and "--num-images must be at least 1" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_predict_overlays_carry_the_legend(saved_model, mini_dir, tmp_path):
    from imagenets_hf.evaluation.predict import predict_folder
    from imagenets_hf.evaluation.run import load_model_and_processor

    model, processor = load_model_and_processor(saved_model)
    images = mini_dir / "validation"
    predict_folder(
        model, processor, images, tmp_path / "pred", overlay_dir=tmp_path / "overlays", num_workers=0, progress=False
    )
    relative = "n90000001/" + sorted(p.name for p in (images / "n90000001").iterdir())[0]
    with Image.open(images / relative) as image:
        width, height = image.size
    overlay = Image.open(tmp_path / "overlays" / (os.path.splitext(relative)[0] + ".jpg"))
    assert overlay.width == 3 * width + 2 * GAP  # image | ground truth | prediction
    assert overlay.height > height  # and the legend below


def test_model_card_shows_the_results_table_and_the_picture(saved_model, mini_dir, tmp_path):
    import shutil

    from imagenets_hf.training.finetune import write_model_card
    from imagenets_hf.training.recipes import load_recipe

    out = tmp_path / "run"
    shutil.copytree(saved_model, out)
    recipe = load_recipe("demo", {"data_dir": str(mini_dir), "output_dir": str(out)})
    metrics = {"mIoU": 71.234, "num_images": 50}
    runtime = {"iterations": 700, "num_processes": 1, "gradient_accumulation_steps": 2, "train_seconds": 123.4}
    card = write_model_card(out, recipe, metrics, "TABLE", runtime).read_text()
    assert "| `run` | `demo` |" in card and "**71.23**" in card and "50 images" in card
    assert "CPU" in card or "x NVIDIA" in card
    assert "![predictions on validation images](predictions.png)" in card
    assert Image.open(out / "predictions.png").format == "PNG"
    # a published recipe's card quotes what the recipe reported, from its YAML header
    published = load_recipe("mae-base-pretrained", {"data_dir": str(mini_dir)})
    (tmp_path / "empty").mkdir()
    card = write_model_card(tmp_path / "empty", published, None, None, runtime).read_text()
    assert "40.4 (mmseg) / 38.3 (ImageNetSegModel) on ImageNet-S919 validation" in card
    assert "predictions.png" not in card  # no saved model there: no picture
