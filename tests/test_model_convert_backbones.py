"""Checkpoint import for DINOv2 (with and without registers), DINOv3 and EVA-02: each release layout is built from a
perturbed random timm model by the renaming its authors' code uses (the inverse of timm's `checkpoint_filter_fn`),
or from a random transformers Dinov2 model, then imported into the segmentation model's encoder. References: timm's
own model loading the same file through timm's own filter (every tensor must equal it), timm's forward (features at
the native size, at a non-square size and at a size that needs padding), transformers' Dinov2 forward."""

from __future__ import annotations

import pytest
import timm
import torch

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation
from imagenets_hf.model.convert import load_pretrained_encoder, timm_checkpoint_filter, to_timm_state_dict

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
# Features of the imported encoder against timm's model on bitwise-equal weights: the same timm blocks on the same
# inputs (measured: bitwise equal at 1 and 2 threads); 1e-5 on features of |x| <= ~5 (final LayerNorm) leaves ~20
# float32 ulps for a reordered sum on another CPU or thread count. A wrongly mapped, transposed or unfolded tensor
# moves them by O(0.1-1); timm's antialiased against plain bicubic position embeddings by ~0.1 (see below).
ATOL = 1e-5

# name -> (timm model, tiny overrides: the family's own image size, so the grid is the release's)
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", {"img_size": 56}),
    "dinov2-reg4": ("vit_small_patch14_reg4_dinov2", {"img_size": 56}),
    "dinov3": ("vit_small_patch16_dinov3_qkvb", {"img_size": 64}),
    "dinov3-no-bias": ("vit_small_patch16_dinov3", {"img_size": 64}),
    "eva02": ("eva02_base_patch14_224", {"img_size": 56}),
}


def perturbed_timm_model(family: str, seed: int) -> torch.nn.Module:
    """A tiny random timm model of the family with every parameter perturbed (norms around 1, layer scales, biases
    and tokens random), so a tensor left at its init, swapped or mis-scaled cannot go unnoticed."""
    name, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **TINY, **overrides).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            centre = 1.0 if param_name.endswith("weight") and param.ndim == 1 else 0.0
            param.copy_(centre + 0.3 * torch.randn_like(param))
    return model


def release_layout(family: str, model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The state dict of the family's release file for `model`'s weights, by its authors' names."""
    generator = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    width = TINY["embed_dim"]
    if family.startswith("dinov2"):
        # Meta's DINOv2: the mask token of the iBOT loss; with registers the position embedding keeps the class
        # token's slot, which timm folds into the class token (timm's model has no_embed_class).
        sd["mask_token"] = torch.randn(1, width, generator=generator)
        if "reg_token" in sd:
            class_slot = torch.randn(1, 1, width, generator=generator)
            sd["register_tokens"] = sd.pop("reg_token")
            sd["pos_embed"] = torch.cat([class_slot, sd["pos_embed"]], dim=1)
            sd["cls_token"] = sd["cls_token"] - class_slot
        return sd
    if family.startswith("dinov3"):
        # Meta's DINOv3: storage tokens, ls1/ls2 layer scales, one qkv bias (k part zero) with its mask, RoPE periods.
        out = {"mask_token": torch.randn(1, width, generator=generator), "rope_embed.periods": torch.rand(4)}
        for key, value in sd.items():
            key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
            key = key.replace("gamma_2", "ls2.gamma")
            if key.endswith("attn.q_bias"):
                v_bias = sd[key.replace("q_bias", "v_bias")]
                out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
                out[key.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * width)
            elif not key.endswith("attn.v_bias"):
                out[key] = value
        if family == "dinov3-no-bias":  # the distilled releases carry an all-zero qkv bias timm's model omits
            for index in range(TINY["depth"]):
                out[f"blocks.{index}.attn.qkv.bias"] = torch.zeros(3 * width)
        return out
    # EVA-02 (BAAI) masked-image-modelling checkpoint: SwiGLU w1/w2/w3 with a sub-LN ffn_ln, q/v biases apart from
    # q_proj/v_proj, the final norm as `norm` (timm moves it to fc_norm), rotary tables, mask token and MIM head.
    out = {
        "mask_token": torch.randn(1, 1, width, generator=generator),
        "lm_head.weight": torch.randn(8, width, generator=generator),
        "rope.freqs_cos": torch.rand(16, 8),
        "rope.freqs_sin": torch.rand(16, 8),
    }
    renames = (
        ("mlp.fc1_g.", "mlp.w1."),
        ("mlp.fc1_x.", "mlp.w2."),
        ("mlp.fc2.", "mlp.w3."),
        ("mlp.norm.", "mlp.ffn_ln."),
        ("attn.q_proj.bias", "attn.q_bias"),
        ("attn.v_proj.bias", "attn.v_bias"),
        ("fc_norm.", "norm."),
    )
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def timm_loaded(family: str, checkpoint: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's own model (dynamic size and padding) loading the release file through timm's own filter, strictly."""
    name, overrides = FAMILIES[family]
    model = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True, **TINY, **overrides
    ).eval()
    filter_fn = timm_checkpoint_filter(model)
    model.load_state_dict(filter_fn({k: v.clone() for k, v in checkpoint.items()}, model), strict=True)
    return model


def segmentation_model(family: str, **config) -> ViTFCNForSemanticSegmentation:
    name, overrides = FAMILIES[family]
    torch.manual_seed(99)  # other random weights than the checkpoint's
    values = {"encoder_kwargs": {**TINY, **overrides}, "drop_path_rate": 0.0, "num_labels": 4, **config}
    return ViTFCNForSemanticSegmentation(ViTFCNConfig.from_preset("fcn", encoder_name=name, **values)).eval()


def timm_feature_map(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """timm's forward_features (its own padding, position-embedding resize and final norm) as a patch-token map."""
    tokens = model.forward_features(pixel_values)[:, model.num_prefix_tokens :]
    patch = model.patch_embed.patch_size[0]
    grid = (-(-pixel_values.shape[-2] // patch), -(-pixel_values.shape[-1] // patch))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def native_and_other_sizes(family: str) -> list[tuple[int, int]]:
    size = FAMILIES[family][1]["img_size"]
    patch = 16 if family.startswith("dinov3") else 14
    # the release grid, a non-square multiple of the patch, and a size that needs bottom/right padding
    return [(size, size), (3 * patch, 5 * patch), (2 * patch + 5, 4 * patch - 3)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_release_layout_fills_every_tensor_and_matches_timm(family):
    source = perturbed_timm_model(family, seed=1)
    checkpoint = release_layout(family, source, seed=2)
    reference = timm_loaded(family, checkpoint)
    model = segmentation_model(family)
    assert model.config.encoder_forward == "timm"
    report = load_pretrained_encoder(model, {k: v.clone() for k, v in checkpoint.items()}, verbose=False)
    assert report.missing == [] and report.unexpected == []
    expected_layout = family.split("-")[0]
    assert report.layout == expected_layout
    assert any("checkpoint_filter_fn" in note for note in report.notes)
    got, wanted = model.encoder.state_dict(), reference.state_dict()
    assert got.keys() == wanted.keys()
    for name in wanted:
        # both ran timm's filter on the same tensors (renamed, split, folded): the same floats
        assert torch.equal(got[name], wanted[name]), name
    assert len(report.loaded) == len([k for k in got if not k.startswith("head.")])
    if family == "dinov2-reg4":  # the folded class token: (cls - slot) + slot, the source's up to float rounding
        torch.testing.assert_close(got["cls_token"], source.cls_token.detach(), atol=1e-6, rtol=0)
    torch.manual_seed(3)
    for height, width in native_and_other_sizes(family):
        pixel_values = torch.randn(2, 3, height, width)
        with torch.no_grad():
            features, _ = model.forward_features(pixel_values)
            expected = timm_feature_map(reference, pixel_values)
        assert features.shape == expected.shape
        torch.testing.assert_close(features, expected, atol=ATOL, rtol=0, msg=f"{family} at {height}x{width}")


def test_dinov2_training_checkpoint_with_chunked_blocks_and_heads():
    """A DINOv2 training file: teacher and student, `backbone.` prefixes, blocks in chunks, DINO / iBOT heads."""
    source = perturbed_timm_model("dinov2-reg4", seed=4)
    meta = release_layout("dinov2-reg4", source, seed=5)
    chunked = {}
    for key, value in meta.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{index}." + key.split(".", 2)[2]  # chunks of two, global index kept
        chunked["backbone." + key] = value
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 32), "ibot_head.last_layer.weight_g": torch.randn(1, 8)}
    decoy = {"backbone." + k: torch.zeros_like(v) for k, v in meta.items()}
    checkpoint = {"teacher": {**chunked, **heads}, "student": decoy, "iteration": torch.tensor(5)}
    model = segmentation_model("dinov2-reg4")
    report = load_pretrained_encoder(model, checkpoint, verbose=False)
    assert report.layout == "teacher/dinov2+chunks"
    assert {"dino_head.mlp.0.weight", "ibot_head.last_layer.weight_g", "mask_token"} <= set(report.ignored)
    reference = timm_loaded("dinov2-reg4", meta)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], tensor), name  # as above: the same floats


def test_timm_hub_layouts_load_as_they_are():
    """timm's Hub files (timm/vit_small_patch14_reg4_dinov2.lvd142m, ...) hold timm's names: a plain copy."""
    for family in ("dinov2-reg4", "dinov3", "eva02"):
        source = perturbed_timm_model(family, seed=6)
        model = segmentation_model(family)
        report = load_pretrained_encoder(model, source.state_dict(), verbose=False)
        assert report.missing == [] and report.unexpected == []
        for name, tensor in source.state_dict().items():
            assert torch.equal(model.encoder.state_dict()[name], tensor), (family, name)  # copied: exact


def test_pure_conversion_leaves_release_names_for_timm():
    source = perturbed_timm_model("dinov3", seed=7)
    state_dict, layout = to_timm_state_dict(release_layout("dinov3", source, seed=8))
    assert layout == "dinov3" and "storage_tokens" in state_dict and "mask_token" not in state_dict


# ---------------------------------------------------------------------------------------------------------------
# transformers Dinov2


def _hf_dinov2(registers: bool, seed: int):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    if registers:
        hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kwargs, num_register_tokens=4))
    else:
        hf = Dinov2Model(Dinov2Config(**kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            centre = 1.0 if name.endswith("weight") and param.ndim == 1 else 0.0
            param.copy_(centre + 0.3 * torch.randn_like(param))
    return hf.eval()


@pytest.mark.parametrize("registers", [True, False])
@pytest.mark.parametrize("where", ["folder", "v5-state-dict"])
def test_transformers_dinov2_import_equals_its_hidden_states(registers, where, tmp_path):
    hf = _hf_dinov2(registers, seed=9)
    checkpoint = hf.state_dict() if where == "v5-state-dict" else tmp_path
    if where == "folder":
        hf.save_pretrained(tmp_path)  # on disk: v4 names (attention.attention.query, ...)
    family = "dinov2-reg4" if registers else "dinov2"
    model = segmentation_model(family)
    report = load_pretrained_encoder(model, checkpoint, verbose=False)
    assert report.layout == "transformers-dinov2"
    assert report.missing == [] and report.unexpected == []
    torch.manual_seed(10)
    pixel_values = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        features, _ = model.forward_features(pixel_values)
        tokens = hf(pixel_values).last_hidden_state[:, 1 + (4 if registers else 0) :]
    expected = tokens.transpose(1, 2).reshape(2, 32, 4, 4)
    # Two implementations (transformers' separate q/k/v against timm's fused qkv; the class token folded with its
    # position slot when there are registers) may sum in another order on another CPU (measured: bitwise equal here,
    # 1 and 2 threads), so rtol 1e-5 is added to ATOL. A wrongly mapped tensor moves the features by O(0.1-1).
    torch.testing.assert_close(features, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("registers", [True, False])
def test_forwards_match_transformers_dinov2_at_a_non_square_size(registers):
    """transformers' Dinov2WithRegisters resizes position embeddings with antialiased bicubic (as Meta's register
    models and timm's dynamic size), its Dinov2 with plain bicubic (as the reference forward): at a non-square size
    each matches the forward that resizes as it does, and the other one differs measurably."""
    family = "dinov2-reg4" if registers else "dinov2"
    hf = _hf_dinov2(registers, seed=11)
    models = {forward: segmentation_model(family, encoder_forward=forward) for forward in ("timm", "reference")}
    for model in models.values():
        load_pretrained_encoder(model, hf.state_dict(), verbose=False)
    torch.manual_seed(12)
    pixel_values = torch.randn(1, 3, 42, 98)  # 3 x 7 patches; the release grid is 4 x 4
    with torch.no_grad():
        tokens = hf(pixel_values).last_hidden_state[:, 1 + (4 if registers else 0) :]
        expected = tokens.transpose(1, 2).reshape(1, 32, 3, 7)
        features = {forward: model.forward_features(pixel_values)[0] for forward, model in models.items()}
    same, other = ("timm", "reference") if registers else ("reference", "timm")
    torch.testing.assert_close(features[same], expected, atol=ATOL, rtol=1e-5)  # as in the test above
    assert (features[other] - expected).abs().max() > 1e-2  # the other kernel: measured 0.026 and 0.034
