"""The test-server zip: written in the official layout, and the checker catches what the server would reject."""

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagenets_hf.data.masks import encode_mask
from imagenets_hf.evaluation.submission import (
    METHOD_FIELDS,
    check_submission,
    default_method_text,
    make_submission,
    method_placeholder_problems,
    method_problems,
)

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
TEST_IMAGES = {
    "n01000001/ILSVRC2012_val_00000001": (30, 40),
    "n01000002/ILSVRC2012_val_00000002": (25, 20),
    "n01000003/ILSVRC2012_val_00000003": (16, 16),
}


FILLED_METHOD = {
    "Method name": "ViT-S/16 FCN, SERE pre-training",
    "Training data": "ImageNet-S919 train-semi",
    "Training scheme": "semi-supervised fine-tuning",
    "Networks": "ViT-S/16 + FCN head",
    "Paper/Project link": "https://example.org/paper",
    "Method description": "Fine-tuned with the published recipe; a method to do segmentation.",  # "to do" is prose
}
# The template's two placeholder fields, as the checker reports them.
TEMPLATE_PROBLEMS = [
    "method.txt: 'Paper/Project link:' still reads the template's placeholder ('TODO'): fill it in",
    "method.txt: 'Method description:' still reads the template's placeholder ('TODO: describe the method'): "
    "fill it in",
]


def write_method_file(path, values=FILLED_METHOD):
    path.write_text("\n".join(f"{field}: {values[field]}" for field in METHOD_FIELDS) + "\n")
    return path


def run_checker(zip_path, data_dir):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_submission.py"), str(zip_path), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    for wnid in ("n01000001", "n01000002", "n01000003"):
        (root / "test" / wnid).mkdir(parents=True)
    for stem, (height, width) in TEST_IMAGES.items():
        Image.new("RGB", (width, height), (10, 20, 30)).save(root / "test" / f"{stem}.JPEG")
    return root


def write_predictions(folder, sizes=None, ids=None):
    rng = np.random.default_rng(0)
    for stem, (height, width) in (sizes or TEST_IMAGES).items():
        path = folder / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        values = rng.integers(0, NUM_CLASSES + 1, (height, width)) if ids is None else np.full((height, width), ids)
        encode_mask(values).save(path)


def test_good_submission_passes_and_has_the_official_layout(data_dir, tmp_path):
    write_predictions(tmp_path / "pred")
    zip_path = make_submission(tmp_path / "pred", tmp_path / "submission.zip", write_method_file(tmp_path / "m.txt"))
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
        method = archive.read("method.txt").decode()
    assert names == sorted([f"{stem}.png" for stem in TEST_IMAGES] + ["method.txt"])
    assert [line.split(":")[0] for line in method.splitlines()] == list(METHOD_FIELDS)
    assert check_submission(zip_path, data_dir) == []
    script = run_checker(zip_path, data_dir)
    assert script.returncode == 0 and "OK" in script.stdout


def test_template_method_file_fails_the_checker_until_filled_in(data_dir, tmp_path):
    write_predictions(tmp_path / "pred")
    with pytest.warns(UserWarning, match="template"):
        zip_path = make_submission(tmp_path / "pred", tmp_path / "submission.zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert [line.split(":")[0] for line in archive.read("method.txt").decode().splitlines()] == list(METHOD_FIELDS)
    assert check_submission(zip_path, data_dir) == TEMPLATE_PROBLEMS
    script = run_checker(zip_path, data_dir)
    assert script.returncode == 1 and "2 problem(s)" in script.stdout
    assert all(problem in script.stdout for problem in TEMPLATE_PROBLEMS)
    # A given method file still holding a placeholder: the zip is written, with a warning naming the field.
    half_filled = write_method_file(tmp_path / "method.txt", {**FILLED_METHOD, "Networks": "ViT-S/16, TODO head"})
    with pytest.warns(UserWarning, match="'Networks:' still reads the template's placeholder"):
        zip_path = make_submission(tmp_path / "pred", tmp_path / "half.zip", method_file=half_filled)
    assert check_submission(zip_path, data_dir) == [
        "method.txt: 'Networks:' still reads the template's placeholder ('ViT-S/16, TODO head'): fill it in"
    ]


def test_checker_catches_missing_file_wrong_size_and_ids_out_of_range(data_dir, tmp_path):
    stems = list(TEST_IMAGES)
    sizes = {stems[0]: (30, 41), stems[1]: TEST_IMAGES[stems[1]]}  # wrong width, and stems[2] missing
    write_predictions(tmp_path / "pred", sizes=sizes)
    encode_mask(np.full(TEST_IMAGES[stems[1]], NUM_CLASSES + 1)).save(tmp_path / "pred" / f"{stems[1]}.png")
    method = write_method_file(tmp_path / "method.txt")
    zip_path = make_submission(tmp_path / "pred", tmp_path / "bad.zip", method_file=method)
    problems = check_submission(zip_path, data_dir)
    assert len(problems) == 3, problems
    assert any(stems[2] in p and "missing" in p for p in problems)
    assert any(stems[0] in p and "size 41x30" in p for p in problems)
    assert any(stems[1] in p and "out of range 0..3: [4]" in p for p in problems)
    script = run_checker(zip_path, data_dir)
    assert script.returncode == 1 and "3 problem(s)" in script.stdout


def test_method_file_fields_are_checked(tmp_path):
    assert method_problems(default_method_text()) == []  # every field there and non-empty...
    assert method_placeholder_problems(default_method_text()) == TEMPLATE_PROBLEMS  # ...two still placeholders
    filled = write_method_file(tmp_path / "filled.txt").read_text()
    assert method_problems(filled) == [] and method_placeholder_problems(filled) == []
    lines = default_method_text().splitlines()
    text = "\n".join([line for line in lines if not line.startswith("Networks")][:-1] + ["Method description:"])
    problems = method_problems(text)
    assert any("missing line 'Networks:'" in p for p in problems)
    assert any("'Method description:' is empty" in p for p in problems)
    bad = tmp_path / "method.txt"
    bad.write_text("Method name: x\n")
    (tmp_path / "pred").mkdir()
    encode_mask(np.zeros((2, 2), int)).save(tmp_path / "pred" / "a.png")
    with pytest.raises(ValueError, match="missing line 'Training data:'"):
        make_submission(tmp_path / "pred", tmp_path / "s.zip", method_file=bad)


@pytest.mark.slow
def test_mini_test_split_submission_passes_the_checker(tmp_path):
    """scripts/predict.py on the mini dataset's test split with a tiny random-weight model, then the checker."""
    import torch

    from imagenets_hf.data.mini import MINI_NUM_CLASSES, make_mini_dataset
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    root = make_mini_dataset(tmp_path / "mini")
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        num_labels=MINI_NUM_CLASSES + 1,
        drop_path_rate=0.0,
        encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16, "img_size": 32},
    )
    ViTFCNForSemanticSegmentation(config).save_pretrained(tmp_path / "model")
    ViTFCNImageProcessor().save_pretrained(tmp_path / "model")
    predict = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "predict.py"),
            "--model",
            str(tmp_path / "model"),
            "--images",
            str(root / "test"),
            "--out",
            str(tmp_path / "pred"),
            "--submission",
            str(tmp_path / "submission.zip"),
            "--no-progress",
            "--num-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "template method.txt" in predict.stderr
    # Everything passes but the template's placeholders, which the user fills in before submitting.
    assert check_submission(tmp_path / "submission.zip", root) == TEMPLATE_PROBLEMS
