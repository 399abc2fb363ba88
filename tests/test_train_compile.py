"""`--compile true`: the demo trains compiled (inductor) and evaluates; the compiled model takes padded sizes.

Slow: inductor compiles on CPU take tens of seconds each on 2 cores (see the README's Development section).
"""

from __future__ import annotations

import math

import pytest
import torch

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation
from imagenets_hf.training.finetune import finetune
from imagenets_hf.training.recipes import load_recipe

# One block 32 wide: compile time grows with the graph, and this is about compiling, not learning.
TINY_ENCODER = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8, "img_size": 32}


@pytest.mark.slow
def test_compiled_demo_trains_and_evaluates(mini_dir, tmp_path):
    """A few compiled iterations, then the final evaluation (one image at a time at varying sizes): finite mIoU."""
    overrides = {
        "data_dir": str(mini_dir),
        "output_dir": str(tmp_path / "out"),
        "compile": True,
        "encoder_kwargs": TINY_ENCODER,
        "crop_size": 32,
        "resize_scale": [128, 32],
        "eval_short_side": 32,
        "eval_max_long_side": 128,
        "per_device_batch_size": 2,
        "global_batch_size": 2,
        "max_iters": 3,
        "warmup_iters": 1,
        "val_interval": 0,
        "checkpoint_interval": 0,
        "num_workers": 0,
    }
    result = finetune(load_recipe("demo", overrides), progress=False)
    assert result["iterations"] == 3
    assert math.isfinite(result["metrics"]["mIoU"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_compiled_model_matches_eager_at_padded_sizes():
    """Compiled with dynamic sizes, inputs that need padding to the patch multiple give the eager logits (the
    padding arithmetic once failed in inductor: "TensorReferenceAnalysis has no attribute python_mod")."""
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn", encoder_name="vit_small_patch16_224", num_labels=11, drop_path_rate=0.0, encoder_kwargs=TINY_ENCODER
    )
    model = ViTFCNForSemanticSegmentation(config).eval()
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for height, width in ((36, 50), (41, 33), (32, 64)):
            pixel_values = torch.randn(1, 3, height, width)
            expected = model(pixel_values).logits
            actual = compiled(pixel_values).logits
            assert actual.shape == expected.shape == (1, 11, math.ceil(height / 8), math.ceil(width / 8))
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
