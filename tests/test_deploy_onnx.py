"""ONNX export (`imagenets_hf.deploy.onnx_export`, `scripts/export_onnx.py`): onnxruntime's logits against the
PyTorch model's for the three heads at input sizes the patch divides and does not, one batch of three, one input
smaller than a patch; the graph's dynamic axes; the script's output and its one-line errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from script_runner import run_script

from imagenets_hf.deploy.onnx_export import ONNX_PACKAGES, export_onnx
from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

MISSING = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} (the onnx extra: pip install 'imagenets-hf[onnx]')"
)

TINY_ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
HEADS = {"fcn": {}, "linear": {}, "multilayer": {"out_indices": [0, 1]}}
# (B, 3, H, W): the native 32x32 (4x4 patches, position embedding as trained), sizes patch 8 does not divide (padding,
# a resized position embedding), a batch of three at a wide size it divides, an input smaller than one patch.
SHAPES = [(1, 3, 32, 32), (2, 3, 37, 61), (3, 3, 24, 64), (1, 3, 5, 9)]
TOLERANCE = 1e-4


def tiny_model(head: str) -> ViTFCNForSemanticSegmentation:
    """A tiny model whose every part shows in the logits: a position embedding far from zero (so that resizing it
    matters), BatchNorm statistics off identity, and the classifier scaled to logits of standard deviation 5 (as a
    trained model's: tens at most; the initial std 2e-5 would make every difference look small)."""
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        head,
        encoder_name="vit_small_patch16_224",
        encoder_kwargs=TINY_ENCODER,
        drop_path_rate=0.0,
        num_labels=5,
        **HEADS[head],
    )
    model = ViTFCNForSemanticSegmentation(config).eval()
    with torch.no_grad():
        model.encoder.pos_embed.normal_()
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(std=0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
        model.decode_head.conv_seg.weight.normal_()
        scale = model(torch.randn(2, 3, 32, 32)).logits.std()
        model.decode_head.conv_seg.weight.mul_(5 / scale)
    return model


@pytest.mark.parametrize("head", list(HEADS))
def test_onnxruntime_logits_equal_pytorch(head, tmp_path):
    import onnx
    import onnxruntime

    model = tiny_model(head).train()
    path = export_onnx(model, tmp_path / "model.onnx")  # the graph is the inference forward, whatever the mode
    assert model.training  # given back as it came
    model.eval()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # weights inside: one file
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, height, width dynamic
    assert dims[1].dim_value == 3

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        pixel_values = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = model(pixel_values).logits.numpy()
        (got,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        batch, _, height, width = shape
        assert got.shape == expected.shape == (batch, 5, -(-height // 8), -(-width // 8))
        assert np.abs(expected).max() > 2  # logits of a trained model's size, not all near zero
        difference = float(np.abs(got - expected).max())
        assert difference <= TOLERANCE, (head, shape, difference)


def test_script_exports_a_saved_model_and_reports_parity(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    tiny_model("fcn").save_pretrained(model_dir)
    ViTFCNImageProcessor().save_pretrained(model_dir)
    out = tmp_path / "model.onnx"
    status, lines = run_script(
        "export_onnx", "--model", model_dir, "--out", out, monkeypatch=monkeypatch, capsys=capsys
    )
    assert status in (0, None), lines
    assert out.is_file()
    assert lines[0].startswith(f"wrote {out}: pixel_values (batch, 3, height, width)")
    # the three parity sizes of a 32x32 encoder with patch 8
    parity = [line for line in lines if line.startswith("onnxruntime vs PyTorch at ")]
    assert [line.split(" at ")[1].split(":")[0] for line in parity] == ["1x3x32x32", "2x3x37x45", "1x3x24x56"]
    for line in parity:
        difference = float(line.split("max abs difference ")[1].split(" ")[0])
        assert difference <= TOLERANCE and line.endswith("same class at 100.00 % of positions"), line


def test_script_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")

    def run(*args):
        return run_script("export_onnx", *args, monkeypatch=monkeypatch, capsys=capsys)

    assert run("--model", tmp_path / "missing", "--out", tmp_path / "m.onnx") == (
        1,
        [f"export_onnx.py: error: no such model folder: {tmp_path / 'missing'}"],
    )
    assert run("--model", model_dir, "--out", tmp_path / "no" / "m.onnx") == (
        1,
        [
            f"export_onnx.py: error: --out {tmp_path / 'no' / 'm.onnx'}: folder {tmp_path / 'no'} does not exist; "
            "create it first"
        ],
    )
    assert run("--model", model_dir, "--out", tmp_path) == (
        1,
        [
            f"export_onnx.py: error: --out {tmp_path} is a folder; give the .onnx file to write, e.g. "
            f"{tmp_path / 'model.onnx'}"
        ],
    )
    assert not list(tmp_path.glob("*.onnx"))
