"""Layer-wise lr decay groups and the warmup + cosine schedule against the published formulas (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation
from imagenets_hf.training.optim import (
    WarmupCosineLR,
    build_optimizer,
    layer_decay_param_groups,
    warmup_cosine_lr,
)


@pytest.fixture(scope="module")
def twelve_layer_model():
    """12 blocks like ViT-B (so the scale is decay^(13 - layer_id)), but 16 wide."""
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        encoder_kwargs={"embed_dim": 16, "depth": 12, "num_heads": 2, "patch_size": 8, "img_size": 32},
        num_labels=5,
    )
    return ViTFCNForSemanticSegmentation(config)


def test_layer_scales_and_weight_decay(twelve_layer_model):
    lr, decay = 5e-4, 0.6
    groups = layer_decay_param_groups(twelve_layer_model, lr=lr, weight_decay=0.05, layer_decay=decay)
    by_param = {}
    for group in groups:
        for name in group["param_names"]:
            by_param[name] = group
    # Hand-computed: 0.6 ** 13, 0.6 ** 12, 0.6 ** 1, 0.6 ** 0
    expected = {
        "encoder.cls_token": (0.0013060694015999993, 0.0),
        "encoder.pos_embed": (0.0013060694015999993, 0.0),
        "encoder.patch_embed.proj.weight": (0.0013060694015999993, 0.05),
        "encoder.patch_embed.proj.bias": (0.0013060694015999993, 0.0),
        "encoder.blocks.0.attn.qkv.weight": (0.002176782335999999, 0.05),
        "encoder.blocks.0.norm1.weight": (0.002176782335999999, 0.0),
        "encoder.blocks.11.mlp.fc2.weight": (0.6, 0.05),
        "encoder.blocks.11.mlp.fc2.bias": (0.6, 0.0),
        "encoder.norm.weight": (1.0, 0.0),
        "decode_head.conv_seg.weight": (1.0, 0.05),
        "decode_head.conv_seg.bias": (1.0, 0.0),
    }
    # Python float64 powers and products, the same on any machine to ~1e-16; one layer off changes a scale by 40 %.
    for name, (scale, weight_decay) in expected.items():
        assert name in by_param, name
        assert by_param[name]["lr_scale"] == pytest.approx(scale, rel=1e-12), name
        assert by_param[name]["lr"] == pytest.approx(lr * scale, rel=1e-12), name
        assert by_param[name]["weight_decay"] == weight_decay, name
    # Every block i gets decay^(12 - i); every trainable parameter is in exactly one group.
    for i in range(12):  # default rel 1e-6: float64 powers, as above
        assert by_param[f"encoder.blocks.{i}.attn.proj.weight"]["lr_scale"] == pytest.approx(decay ** (12 - i))
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in twelve_layer_model.parameters())
    # BatchNorm weights of the head are 1-D: no decay.
    bn = [n for n in by_param if "bn" in n or "norm" in n.split(".")[-2]]
    assert bn and all(by_param[n]["weight_decay"] == 0.0 for n in bn)


def test_tokens_decayed_when_following_mmseg_effective_behaviour(twelve_layer_model):
    groups = layer_decay_param_groups(
        twelve_layer_model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, no_weight_decay_tokens=False
    )
    by_param = {n: g for g in groups for n in g["param_names"]}
    assert by_param["encoder.cls_token"]["weight_decay"] == 0.05
    assert by_param["encoder.pos_embed"]["weight_decay"] == 0.05


def test_optimizer_is_adamw_with_published_betas(twelve_layer_model):
    optimizer = build_optimizer(twelve_layer_model, lr=1e-4, weight_decay=0.05, layer_decay=0.4)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)
    # float64 products (default rel 1e-6); a missing layer or decay step changes them by >= 60 %
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(1e-4)
    assert min(g["lr"] for g in optimizer.param_groups) == pytest.approx(1e-4 * 0.4**13)


# mmcv CosineAnnealing(min_lr=1e-6) + linear warmup(180 iters, ratio 1e-6), max_iters 3600, base lr 5e-4; values
# computed by hand from lr = (1e-6 + (base - 1e-6) (1 + cos(pi t / 3600)) / 2) x (1 - (1 - t / 180)(1 - 1e-6)).
HAND_COMPUTED = {
    0: 5.000000000143779e-10,  # regular lr 5e-4 times the warmup factor 1e-6
    90: 0.00024961568699864516,  # regular 4.99231e-4 x (1 - 0.5 x (1 - 1e-6))
    179: 0.0004942013091974453,
    180: 0.0004969282409784868,  # end of warmup: 1e-6 + 4.99e-4 x (1 + cos(pi / 20)) / 2
    1800: 0.0002505,  # half way: (5e-4 + 1e-6) / 2
    3599: 1.0000950025517683e-06,
    3600: 1e-6,
}


@pytest.mark.parametrize("iteration", sorted(HAND_COMPUTED))
def test_schedule_formula_at_chosen_iterations(iteration):
    value = warmup_cosine_lr(iteration, 5e-4, max_iters=3600, warmup_iters=180, warmup_ratio=1e-6, min_lr=1e-6)
    # float64 arithmetic and libm's cos (a few ulps apart between platforms) against the formula: ~1e-15 relative;
    # an iteration off by one moves the lr by >= 9e-5 relative (3599 against 3600)
    assert value == pytest.approx(HAND_COMPUTED[iteration], rel=1e-9)


def test_scheduler_steps_per_group_with_absolute_min_lr():
    """Two groups (scales 1 and 0.6^13): each follows the formula from its own base, and both end at min_lr."""
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    base = [5e-4, 5e-4 * 0.6**13]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": b} for p, b in zip(params, base)])
    scheduler = WarmupCosineLR(optimizer, max_iters=3600, warmup_iters=180, warmup_ratio=1e-6, min_lr=1e-6)
    seen = {}
    for iteration in range(3601):
        seen[iteration] = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    for iteration, expected in HAND_COMPUTED.items():  # as in test_schedule_formula_at_chosen_iterations
        assert seen[iteration][0] == pytest.approx(expected, rel=1e-9)
    low = base[1]
    expected_low_180 = 1e-6 + (low - 1e-6) * (1 + math.cos(math.pi * 180 / 3600)) / 2
    assert seen[180][1] == pytest.approx(expected_low_180, rel=1e-9)
    assert seen[3600][1] == pytest.approx(1e-6, rel=1e-9)
    # Resuming from a state dict continues the same sequence.
    fresh = torch.optim.AdamW([{"params": [p], "lr": b} for p, b in zip(params, base)])
    resumed = WarmupCosineLR(fresh, max_iters=3600, warmup_iters=180, warmup_ratio=1e-6, min_lr=1e-6)
    reference = torch.optim.AdamW([{"params": [p], "lr": b} for p, b in zip(params, base)])
    ref_sched = WarmupCosineLR(reference, max_iters=3600, warmup_iters=180, warmup_ratio=1e-6, min_lr=1e-6)
    for _ in range(250):
        reference.step()
        ref_sched.step()
    resumed.load_state_dict(ref_sched.state_dict())
    fresh.load_state_dict(reference.state_dict())
    # the same float64 computation at the same iteration: equal but for the last bits
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx(seen[250], rel=1e-12)


def test_scheduler_rejects_warmup_longer_than_schedule():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="warmup_iters"):
        WarmupCosineLR(optimizer, max_iters=100, warmup_iters=100)
