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


def test_sync_batchnorm_runs_eagerly_in_a_compiled_model():
    """Under DDP on GPUs the head's BatchNorm becomes SyncBatchNorm, whose process-group collectives dynamo cannot
    trace (pytorch/pytorch#107372, #161302): for a compiled run its forward is excluded from compilation, so the
    graph breaks there (only there) with the same outputs and the
    same state_dict keys; uncompiled runs are unchanged. (SyncBatchNorm trains only on GPUs, in eval mode it is
    BatchNorm: what the compiled multi-GPU run does is not yet measured.)"""
    from imagenets_hf.training.finetune import convert_sync_batchnorm

    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn", encoder_name="vit_small_patch16_224", num_labels=11, drop_path_rate=0.0, encoder_kwargs=TINY_ENCODER
    )
    pixel_values = torch.randn(2, 3, 32, 32)
    plain = ViTFCNForSemanticSegmentation(config).eval()
    with torch.no_grad():
        expected = plain(pixel_values).logits
    for compiling in (False, True):
        torch._dynamo.reset()
        model = convert_sync_batchnorm(ViTFCNForSemanticSegmentation(config).eval(), compiling=compiling)
        model.load_state_dict(plain.state_dict())
        layers = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert len(layers) >= 1 and model.state_dict().keys() == plain.state_dict().keys()
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(pixel_values)
            torch.testing.assert_close(model(pixel_values).logits, expected, atol=0, rtol=0)
        reasons = [str(reason.reason) for reason in explanation.break_reasons]
        if compiling:
            # each layer's break is reported by every frame it is nested in (model, head, conv module)
            assert len(reasons) >= len(layers) and all("SyncBatchNorm.forward" in r for r in reasons), reasons
        else:
            assert reasons == [] and explanation.graph_count == 1
    torch._dynamo.reset()
