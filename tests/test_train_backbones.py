"""End to end with each head on other encoders: a few fine-tuning iterations on the mini dataset, then the saved
model reloads through the Auto classes and, in a process where imagenets_hf cannot be imported, with
trust_remote_code.

Slow: three short fine-tuning runs (each evaluates the 50 mini validation images, most of its 25-35 s) and a
subprocess importing torch, timm and transformers: about 2 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation

from imagenets_hf.model import ViTFCNForSemanticSegmentation
from imagenets_hf.training.finetune import build_model, finetune
from imagenets_hf.training.recipes import load_recipe

# (head, encoder, tiny timm overrides): each head on an encoder of another family than the published ViT-S/B (whose
# FCN head trains end to end in test_train_finetune.py and test_train_compile.py)
RUNS = [
    ("fcn", "eva02_small_patch14_224", {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}),
    ("linear", "vit_small_patch14_reg4_dinov2", {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}),
    ("multilayer", "vit_small_patch16_dinov3", {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 32}),
]


@pytest.mark.slow
def test_each_head_trains_on_mini_data_and_reloads_with_and_without_the_package(mini_dir, tmp_path):
    data_dir = mini_dir
    pixel_values = torch.randn(1, 3, 40, 57, generator=torch.Generator().manual_seed(0))
    folders = []
    for head, encoder_name, encoder_kwargs in RUNS:
        out = tmp_path / head
        recipe = load_recipe(
            "demo",
            {
                "data_dir": str(data_dir),
                "output_dir": str(out),
                "head": head,
                "encoder_name": encoder_name,
                "encoder_kwargs": encoder_kwargs,
                "crop_size": 32,
                "resize_scale": [128, 32],
                "eval_short_side": 32,
                "eval_max_long_side": 128,
                "per_device_batch_size": 2,
                "global_batch_size": 2,
                "max_iters": 3,
                "warmup_iters": 1,
                "lr": 1e-2,
                "val_interval": 0,
                "checkpoint_interval": 0,
                "num_workers": 0,
            },
        )
        result = finetune(recipe, progress=False)
        assert result["iterations"] == 3 and math.isfinite(result["metrics"]["mIoU"])

        saved = load_file(out / "model.safetensors")
        torch.manual_seed(recipe.seed)  # finetune's initial weights: the same seed, the same model
        initial = build_model(recipe, ["other"] + [f"c{i}" for i in range(10)]).state_dict()
        assert not torch.equal(saved["decode_head.conv_seg.weight"], initial["decode_head.conv_seg.weight"])

        model = ViTFCNForSemanticSegmentation.from_pretrained(out).eval()
        auto = AutoModelForSemanticSegmentation.from_pretrained(out, trust_remote_code=False).eval()
        assert model.config.head == head and type(auto.decode_head) is type(model.decode_head)
        with torch.no_grad():
            logits = model(pixel_values).logits
            # the same saved float32 weights, the same forward in the same process: bitwise
            assert torch.equal(auto(pixel_values).logits, logits)
        np.save(out / "logits.npy", logits.numpy())
        folders.append(str(out))

    np.save(tmp_path / "pixel_values.npy", pixel_values.numpy())
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["imagenets_hf"] = None  # the package is installed editable: block it explicitly
        import numpy as np
        import torch
        from transformers import AutoModelForSemanticSegmentation
        pixel_values = torch.from_numpy(np.load({str(tmp_path / "pixel_values.npy")!r}))
        for folder in {folders!r}:
            model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
            assert not type(model).__module__.startswith("imagenets_hf"), type(model).__module__
            expected = torch.from_numpy(np.load(folder + "/logits.npy"))
            with torch.no_grad():
                logits = model(pixel_values).logits
            # The parent computed `expected` with its own thread count, so float32 sums may be reordered (as
            # test_model_hf: measured up to 4e-6 on logits of ~10). A wrong or missing weight or buffer (the rotary
            # tables are rebuilt on load) moves logits by O(1).
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
            print("OK", type(model.decode_head).__name__)
        assert not any(name.startswith("imagenets_hf.") for name in sys.modules), "imagenets_hf was imported"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.split() == ["OK", "FCNHead", "OK", "LinearHead", "OK", "MultiLayerHead"]
