"""predict.py on a folder with bad input: other files named, an unreadable image one line (or skipped and listed with
--skip-bad), tiny and very large images warned about in one line each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_runner import run_script

WNID = "n01000001"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny random 3-label model saved as finetune.py saves one."""
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        id2label={0: "other", 1: "a", 2: "b"},
        drop_path_rate=0.0,
        encoder_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8, "img_size": 32},
    )
    out = tmp_path_factory.mktemp("model") / "tiny"
    ViTFCNForSemanticSegmentation(config).save_pretrained(out)
    ViTFCNImageProcessor(short_side=32, max_long_side=128).save_pretrained(out)
    return out


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    write_image(root / WNID / "good.JPEG", 40, 30)
    write_image(root / WNID / "tiny.png", 1, 1)
    (root / WNID / "notes.txt").write_text("not an image")
    (root / "extra" / "data.json").parent.mkdir()
    (root / "extra" / "data.json").write_text("{}")
    (root / WNID / ".hidden").write_text("x")  # hidden files are not counted
    return root


def predict(saved_model, images, out, *args, monkeypatch, capsys):
    return run_script(
        "predict", "--model", saved_model, "--images", images, "--out", out, "--num-workers", "0", "--no-progress",
        *args, monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip


def test_other_files_are_named_and_tiny_images_warned_about(saved_model, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pred"
    status, lines = predict(saved_model, images, out, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, lines
    assert sorted(lines) == [  # run_script gives stdout's lines, then stderr's (the warnings)
        f"2 predictions written to {out} (this process; inference: whole (official protocol))",
        f"note: left out 2 files (extra/data.json, {WNID}/notes.txt) of {images}: not images by their extension",
        f"warning: {images / WNID / 'tiny.png'}: 1x1 pixels, under 16 on a side: its prediction means little",
    ]
    assert Image.open(out / WNID / "tiny.png").size == (1, 1)


def test_unreadable_image_stops_in_one_line_or_is_skipped_and_listed(
    saved_model, images, tmp_path, monkeypatch, capsys
):
    bad = images / WNID / "broken.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    status, lines = predict(saved_model, images, tmp_path / "pred", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 1
    assert lines[-1] == (
        f"predict.py: error: {bad}: cannot read image (UnidentifiedImageError: cannot identify image file "
        f"'{bad}') (--skip-bad skips unreadable images)"
    )
    out = tmp_path / "pred-skip"
    status, lines = predict(saved_model, images, out, "--skip-bad", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, lines
    listed = f"{bad}: cannot read image (UnidentifiedImageError: cannot identify image file '{bad}')"
    assert lines[-4:-1] == [  # then the warning about tiny.png (stderr)
        f"2 predictions written to {out} (this process; inference: whole (official protocol))",
        f"skipped 1 unreadable image(s) (listed in {out / 'skipped_images.txt'}):",
        f"  {listed}",
    ]
    assert (out / "skipped_images.txt").read_text() == listed + "\n"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [f"{WNID}/good.png", f"{WNID}/tiny.png"]


def test_decompression_bomb_limits_become_our_lines(saved_model, tmp_path, monkeypatch, capsys):
    """PIL warns above Image.MAX_IMAGE_PIXELS and refuses above twice that; a low limit stands in for 89 megapixels."""
    images = tmp_path / "images"
    write_image(images / WNID / "large.png", 40, 30)  # 1,200 pixels: over 1,000, under 2,000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    status, lines = predict(saved_model, images, tmp_path / "pred", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, lines
    assert lines == [
        f"1 predictions written to {tmp_path / 'pred'} (this process; inference: whole (official protocol))",
        f"warning: {images / WNID / 'large.png'}: 40x30 pixels (0 megapixels) is over PIL's decompression-bomb limit "
        "(0 megapixels): predicted anyway, in much memory",
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    status, lines = predict(saved_model, images, tmp_path / "pred2", monkeypatch=monkeypatch, capsys=capsys)
    assert (status, lines) == (
        1,
        [
            f"predict.py: error: {images / WNID / 'large.png'}: cannot read image: 0 megapixels, over twice PIL's "
            "decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = 500 pixels); downscale it (--skip-bad skips "
            "unreadable images)"
        ],
    )


def test_workers_that_send_no_batch_end_in_one_line(saved_model, images, tmp_path):
    """predict_folder's DataLoader workers (fork server) are waited for at most `timeout` seconds: a limit far below a
    worker's start-up (a process start and its imports) ends in one line naming what was waited for."""
    from imagenets_hf.evaluation.predict import predict_folder
    from imagenets_hf.model import ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    model = ViTFCNForSemanticSegmentation.from_pretrained(saved_model)
    processor = ViTFCNImageProcessor.from_pretrained(saved_model)
    with pytest.raises(TimeoutError, match=r"^prediction images: no batch from the DataLoader workers in 0.001 s"):
        predict_folder(model, processor, images, tmp_path / "pred", num_workers=1, progress=False, timeout=0.001)
