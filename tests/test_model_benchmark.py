"""The model benchmark's two contenders (`imagenets_hf.benchmarks.model`) compute the same thing at any input size the
patch divides, so their speeds compare like with like."""

from __future__ import annotations

import pytest
import torch

from imagenets_hf.benchmarks.model import bench_encoder


def bench_vit_small(image_size: int) -> dict:
    """One quick pass of the benchmark (1 image, 1 iteration, 5 labels) for ViT-S/16 at `image_size` on the CPU."""
    torch.manual_seed(0)
    return bench_encoder(
        "vit_small_patch16_224",
        batch_size=1,
        iters=1,
        warmup=0,
        image_size=image_size,
        num_labels=5,
        device=torch.device("cpu"),
        dtype=torch.float32,
        peak_flops=1e12,
    )


def test_ours_and_the_timm_peer_agree_away_from_224():
    row = bench_vit_small(64)
    # Same weights, same float32 operations in a different order: agreement to float32 rounding of the logits.
    assert row["logits_max_abs_diff_eval"] <= 1e-4 * max(row["logits_max_abs_eval"], 1e-6)
    # 4x4 patches at 64 px: the FLOPs scale with the token count, far below 224's 14x14
    assert 0 < row["gflops_per_image_forward"] < 1.0


def test_a_size_the_patch_does_not_divide_is_named():
    with pytest.raises(ValueError, match="--image-size 70 is not a multiple of vit_small_patch16_224's patch size 16"):
        bench_vit_small(70)
