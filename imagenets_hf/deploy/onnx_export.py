"""ONNX export of a saved ViT + FCN model, and its parity with PyTorch under onnxruntime.

The graph maps `pixel_values` (B, 3, H, W), normalised as the image processor makes them, to `logits`
(B, num_labels, ceil(H/p), ceil(W/p)) (p: the patch size), exactly as `model(pixel_values).logits`; batch, height and
width are dynamic. The padding to a multiple of the patch and the position-embedding resize to the input's patch grid
(`encoder.feature_maps`) are inside the graph. The image processor (resize, normalise) and the post-processing
(logits resized to the image, argmax) stay outside, as for the PyTorch model.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript). The TorchScript exporter
(`dynamo=False`) also gives equal logits on torch 2.14 but is deprecated (a DeprecationWarning at every export: to be
removed) and traces Python values as constants (TracerWarnings at the position-embedding size checks and at the
multi-layer head's size comparison): correct only as long as those values do not change with the input size.
torch.export keeps the sizes symbolic and fails rather than bakes one in.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the `onnx` extra
# Weights above this go to an external data file next to the graph (protobuf files are limited to 2 GiB).
SINGLE_FILE_LIMIT_BYTES = 1_800_000_000


def require_onnx_packages() -> None:
    """ImportError naming the missing packages of the `onnx` extra (export: onnx, onnxscript; parity: onnxruntime)."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'imagenets-hf[onnx]' "
            f"(or pip install {' '.join(missing)})"
        )


class LogitsOnly(nn.Module):
    """The model as the graph sees it: pixel values in, logits out (no output dict, no loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def parity_sizes(model: nn.Module) -> list[tuple[int, int, int, int]]:
    """Input shapes the export is checked on: the encoder's native size (position embedding unchanged), a batch of
    two at a size the patch does not divide (padding and a resized position embedding; also the export's example
    input), and a wide one the patch divides."""
    patch = int(model.patch_size)
    grid_h, grid_w = (int(side) for side in model.encoder.patch_embed.grid_size)
    return [
        (1, 3, grid_h * patch, grid_w * patch),
        (2, 3, grid_h * patch + patch // 2 + 1, (grid_w + 2) * patch - 3),
        (1, 3, (grid_h // 2 + 1) * patch, (grid_w + 3) * patch),
    ]


def check_out_path(out: str | os.PathLike) -> Path:
    """The ONNX file to write; refuses a folder, or a path whose folder does not exist."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the .onnx file to write, e.g. {out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist; create it first")
    return out


def export_onnx(model: nn.Module, out: str | os.PathLike, opset_version: int | None = None) -> Path:
    """Write `model` (a `ViTFCNForSemanticSegmentation`, float32) as an ONNX graph with dynamic batch, height and
    width; returns the path. Weights over `SINGLE_FILE_LIMIT_BYTES` go to `<out>.data` beside it."""
    require_onnx_packages()
    out = check_out_path(out)
    was_training = model.training
    model.eval()  # the graph is the inference forward: BatchNorm statistics, no dropout
    example = torch.randn(*parity_sizes(model)[1], generator=torch.Generator().manual_seed(0))
    dynamic = torch.export.Dim.DYNAMIC
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    try:
        with torch.no_grad():
            torch.onnx.export(
                LogitsOnly(model).eval(),
                (example.to(next(model.parameters()).device),),
                str(out),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"pixel_values": {0: dynamic, 2: dynamic, 3: dynamic}},
                opset_version=opset_version,
                external_data=weight_bytes > SINGLE_FILE_LIMIT_BYTES,
                verbose=False,
            )
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class Parity:
    """onnxruntime against PyTorch on one input shape."""

    shape: tuple[int, ...]
    max_abs_difference: float
    max_abs_logit: float
    mask_agreement: float  # fraction of logit positions whose argmax class is the same


def onnx_parity(model: nn.Module, path: str | os.PathLike, shapes=None, seed: int = 0) -> list[Parity]:
    """Run the graph at `path` under onnxruntime (CPU) and `model` under PyTorch on random inputs of `shapes`
    (default `parity_sizes`) and compare their logits."""
    require_onnx_packages()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return [_compare(model, session, shape, generator) for shape in shapes or parity_sizes(model)]
    finally:
        model.train(was_training)


def _compare(model: nn.Module, session, shape: tuple[int, ...], generator: torch.Generator) -> Parity:
    import numpy as np

    pixel_values = torch.randn(*shape, generator=generator)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values.to(next(model.parameters()).device)).logits.float().cpu().numpy()
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.numpy()})
    if got.shape != expected.shape:
        raise ValueError(
            f"the graph gives logits of shape {got.shape} for input {tuple(shape)}; PyTorch {expected.shape}"
        )
    return Parity(
        shape=tuple(shape),
        max_abs_difference=float(np.abs(got - expected).max()),
        max_abs_logit=float(np.abs(expected).max()),
        mask_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
    )


def export_model_folder(
    model_name_or_path: str | os.PathLike, out: str | os.PathLike, check: bool = True
) -> tuple[Path, list[Parity]]:
    """Export a saved model (folder, Hub id or training checkpoint) to `out`, and (with `check`) compare the graph
    with the model on `parity_sizes`. Returns the path and the comparisons."""
    require_onnx_packages()
    out = check_out_path(out)  # before the model loads: a wrong --out answers at once
    from imagenets_hf.evaluation.loading import load_model_and_processor

    model, _ = load_model_and_processor(model_name_or_path, device="cpu")
    path = export_onnx(model, out)
    return path, (onnx_parity(model, path) if check else [])
