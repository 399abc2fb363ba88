"""Encoders beyond ViT-S/B and the selectable heads: which forward each encoder takes, feature maps at several layers
against timm's own blocks, the reference resampling against a plainly written bicubic, layer ids for every
parameter, the multi-layer head against a plain reference, and save / Auto / pipeline for every head."""

from __future__ import annotations

import ast
import json
import os
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, pipeline

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor
from imagenets_hf.model.configuration_vit_fcn import PRESETS
from imagenets_hf.model.encoder import is_reference_vit
from imagenets_hf.model.pos_embed import resample_pos_embed
from imagenets_hf.training.optim import layer_decay_param_groups

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}
# timm model -> tiny overrides (small image sizes keep the position grids small)
ENCODERS = {
    "vit_small_patch16_224": {"img_size": 32},
    "vit_small_patch14_dinov2": {"img_size": 28},
    "vit_small_patch14_reg4_dinov2": {"img_size": 28},
    "vit_small_patch16_dinov3": {"img_size": 32},
    "eva02_small_patch14_224": {"img_size": 28},
    "deit3_small_patch16_224": {"img_size": 32},
}
# Feature maps of the model against timm's blocks on the same weights: the same modules on the same inputs (measured:
# bitwise equal at 1 and 2 threads); 1e-5 on |x| <= ~5 leaves ~20 float32 ulps for another summation order.
ATOL = 1e-5


def tiny_model(encoder_name: str, head: str = "fcn", seed: int = 0, **config) -> ViTFCNForSemanticSegmentation:
    torch.manual_seed(seed)
    values = {"encoder_kwargs": {**TINY, **ENCODERS[encoder_name]}, "drop_path_rate": 0.0, "num_labels": 5, **config}
    return ViTFCNForSemanticSegmentation(ViTFCNConfig.from_preset(head, encoder_name=encoder_name, **values)).eval()


# -- the encoder ------------------------------------------------------------------------------------------------


def test_reference_resampling_is_plain_bicubic():
    """timm's resample_abs_pos_embed(antialias=False), which resample_pos_embed calls, against F.interpolate
    written out plainly (mmsegmentation's resize_pos_embed)."""
    generator = torch.Generator().manual_seed(0)
    for old, new, prefix in [
        ((14, 14), (16, 20), 1),
        ((37, 37), (16, 16), 0),
        ((4, 4), (7, 3), 5),
        ((6, 6), (6, 6), 1),
    ]:
        pos_embed = torch.randn(1, prefix + old[0] * old[1], 24, generator=generator)
        grid = pos_embed[:, prefix:].reshape(1, *old, 24).permute(0, 3, 1, 2)
        plain = F.interpolate(grid, size=new, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        expected = torch.cat([pos_embed[:, :prefix], plain.reshape(1, -1, 24)], dim=1)
        # the same F.interpolate call on the same tensor (measured: bitwise equal on every case here)
        assert torch.equal(resample_pos_embed(pos_embed, new, num_prefix_tokens=prefix, old_grid=old), expected)


@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_auto_forward_is_reference_only_for_the_reference_vit(encoder_name):
    model = tiny_model(encoder_name)
    expected = "reference" if encoder_name == "vit_small_patch16_224" else "timm"
    assert model.config.encoder_forward == expected == ("reference" if is_reference_vit(model.encoder) else "timm")


def block_outputs(reference: torch.nn.Module, pixel_values: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """timm's forward_features with hooks on the blocks: the outputs of `indices`, through the final norm, as maps."""
    outputs = {}
    hooks = [
        reference.blocks[i].register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
        for i in indices
    ]
    with torch.no_grad():
        reference.forward_features(pixel_values)
    for hook in hooks:
        hook.remove()
    patch = reference.patch_embed.patch_size[0]
    grid = (-(-pixel_values.shape[-2] // patch), -(-pixel_values.shape[-1] // patch))
    maps = []
    for i in indices:
        tokens = reference.norm(outputs[i])[:, reference.num_prefix_tokens :]
        maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid))
    return maps


@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_feature_maps_at_several_layers_equal_timm_blocks(encoder_name):
    """The model's maps at out_indices [0, 2, 3] against timm's own forward (with its own dynamic size and padding)
    observed at the same blocks. The reference ViT is compared at its native size only (elsewhere its position
    embedding resize is plain bicubic, timm's antialiased: test_model_vit_fcn covers it against mmseg's)."""
    model = tiny_model(encoder_name, "multilayer", out_indices=[0, 2, 3])
    kwargs = {**TINY, **ENCODERS[encoder_name]}
    reference = timm.create_model(
        encoder_name, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True, **kwargs
    ).eval()
    reference.load_state_dict(model.encoder.state_dict())
    native = kwargs["img_size"]
    sizes = [(native, native)] if model.config.encoder_forward == "reference" else [(native, native), (37, 61)]
    torch.manual_seed(1)
    for height, width in sizes:
        pixel_values = torch.randn(2, 3, height, width)
        with torch.no_grad():
            maps, hidden_states = model.forward_feature_maps(pixel_values, output_hidden_states=True)
            quiet, _ = model.forward_feature_maps(pixel_values)
        expected = block_outputs(reference, pixel_values, [0, 2, 3])
        for got, plain, want in zip(maps, quiet, expected):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            torch.testing.assert_close(plain, want, atol=ATOL, rtol=0)
        # hidden states: every block's tokens up to the last selected one (after the embedding too, reference)
        assert len(hidden_states) == 4 + (model.config.encoder_forward == "reference")


@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_every_parameter_gets_its_layer_id(encoder_name):
    """Tokens (class, register), position / patch / rotary embedding -> 0; block i (layer scale and q/v biases
    included) -> i + 1; final norm, fc_norm and head -> depth + 1. The optimiser groups cover every parameter, each
    with scale decay ** (depth + 1 - id)."""
    model = tiny_model(encoder_name, "multilayer")
    depth = model.num_layers
    ids = {name: model.get_layer_id(name) for name, _ in model.named_parameters()}
    for name, layer in ids.items():
        short = name.removeprefix("encoder.")
        if short.startswith("blocks."):
            assert layer == int(short.split(".")[1]) + 1, name
        elif name.startswith("decode_head.") or short.startswith(("norm.", "fc_norm.")):
            assert layer == depth + 1, name
        else:
            assert short.split(".")[0] in ("cls_token", "reg_token", "pos_embed", "patch_embed"), name
            assert layer == 0, name
    if "reg4" in encoder_name or "dinov3" in encoder_name:
        assert ids["encoder.reg_token"] == 0
    layer_scales = [name for name in ids if name.endswith(("ls1.gamma", "gamma_1"))]
    assert bool(layer_scales) == (encoder_name != "vit_small_patch16_224" and "eva02" not in encoder_name)
    groups = layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == len(ids)
    for group in groups:
        assert group["lr_scale"] == 0.5 ** (depth + 1 - group["layer_id"])  # powers of 2: exact


@pytest.mark.slow
def test_timm_encoder_traces_in_one_graph_at_padded_sizes():
    """DINOv2 (timm forward) under torch.compile(dynamic=True, fullgraph=True): no graph break at sizes that need
    padding, and the eager logits. Slow: dynamo traces the graph for about 30 s on 2 CPU cores."""
    model = tiny_model("vit_small_patch14_reg4_dinov2", "linear")
    compiled = torch.compile(model, dynamic=True, backend="eager", fullgraph=True)  # dynamo only, no inductor
    with torch.no_grad():
        for height, width in ((30, 45), (41, 29)):
            pixel_values = torch.randn(1, 3, height, width)
            # the same ops traced by dynamo and run eagerly (measured: bitwise equal)
            torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=1e-5)


# -- heads ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_multilayer_head_matches_dinov2_bnhead_written_plainly(training):
    """DINOv2's BNHead (resize_concat, BatchNorm, 1x1 classifier) with plain torch functions on the head's tensors."""
    torch.manual_seed(2)
    head = tiny_model("vit_small_patch14_dinov2", "multilayer").decode_head
    with torch.no_grad():
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
        head.bn.weight.normal_()
        head.bn.bias.normal_()
    head.train(training)
    maps = [torch.randn(2, 32, 3, 5) for _ in range(4)]
    x = torch.cat(maps, dim=1)
    bn = head.bn
    expected = F.batch_norm(
        x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, training, 0.1, bn.eps
    )
    expected = F.conv2d(expected, head.conv_seg.weight, head.conv_seg.bias)
    with torch.no_grad():
        actual = head(maps)
    assert actual.shape == (2, 5, 3, 5)
    # the same batch-norm and conv ops (measured: bitwise equal); rtol 1e-5 allows another order of the 128-term sum
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="list of 4 feature maps"):
        head(maps[:2])


def test_each_head_owns_its_initialisation():
    fcn = tiny_model("vit_small_patch16_224", "fcn", num_labels=200).decode_head
    linear = tiny_model("vit_small_patch16_224", "linear", num_labels=200).decode_head
    multilayer = tiny_model("vit_small_patch14_dinov2", "multilayer", num_labels=200).decode_head
    # statistical bounds: the std of 6,400 (fcn, linear) or 25,600 (multilayer) draws is within 1 % of its value
    # (1 sigma); +-10 % is +-10 sigma or more
    for head, std in ((fcn, 2e-5), (linear, 2e-5), (multilayer, 0.01)):
        assert 0.9 * std < head.conv_seg.weight.std().item() < 1.1 * std
        assert torch.count_nonzero(head.conv_seg.bias) == 0
    assert [name for name, _ in linear.named_parameters()] == ["conv_seg.weight", "conv_seg.bias"]
    assert torch.equal(multilayer.bn.weight, torch.ones(128)) and torch.equal(
        multilayer.bn.running_var, torch.ones(128)
    )
    # mmcv's Kaiming normal (fan_out = 32 x 9, ReLU gain): std sqrt(2 / 288) = 0.083, 18,432 draws
    assert 0.075 < fcn.conv_cat.conv.weight.std().item() < 0.092


def test_head_and_out_indices_are_validated():
    with pytest.raises(ValueError, match="reads one feature map"):
        ViTFCNConfig.from_preset("fcn", out_indices=[-2, -1])
    with pytest.raises(ValueError, match="linear head is only the 1x1 classifier"):
        ViTFCNConfig.from_preset("linear", num_convs=1)
    with pytest.raises(ValueError, match="head must be one of"):
        ViTFCNConfig(head="upernet")
    with pytest.raises(ValueError, match="encoder of depth 4"):
        tiny_model("vit_small_patch16_224", "multilayer", out_indices=[1, 4])
    with pytest.raises(ValueError, match="strictly increasing"):
        tiny_model("vit_small_patch16_224", "multilayer", out_indices=[2, 1])
    with pytest.raises(ValueError, match="encoder_forward 'reference' runs a timm VisionTransformer"):
        tiny_model("vit_small_patch16_dinov3", encoder_forward="reference")
    assert ViTFCNConfig.from_preset("multilayer").out_indices == [-4, -3, -2, -1]
    assert set(PRESETS) == {"fcn", "linear", "multilayer"}


# -- Hugging Face behaviour for every head ----------------------------------------------------------------------

# (encoder, head): the published path with the FCN head is test_model_hf's; here the other kinds of encoder.
SAVED = [
    ("vit_small_patch14_reg4_dinov2", "linear"),
    ("vit_small_patch16_dinov3", "multilayer"),
    ("eva02_small_patch14_224", "fcn"),
]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny model per (encoder, head), saved with its image processor, with an input and its logits."""
    root = tmp_path_factory.mktemp("backbones")
    saved = []
    for index, (encoder_name, head) in enumerate(SAVED):
        model = tiny_model(encoder_name, head, seed=index)
        with torch.no_grad():  # a classifier far from zero and BatchNorm statistics off identity
            model.decode_head.conv_seg.weight.normal_()
            for module in model.decode_head.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.normal_()
        folder = root / f"{encoder_name}-{head}"
        model.save_pretrained(folder)
        ViTFCNImageProcessor(short_side=32, max_long_side=64).save_pretrained(folder)
        pixel_values = torch.randn(2, 3, 30, 47)
        with torch.no_grad():
            logits = model(pixel_values).logits
        np.save(folder / "pixel_values.npy", pixel_values.numpy())
        np.save(folder / "logits.npy", logits.numpy())
        saved.append((folder, model, pixel_values, logits))
    return saved


def test_every_head_round_trips_through_save_auto_and_pipeline(saved_models):
    for folder, model, pixel_values, logits in saved_models:
        config = json.loads((folder / "config.json").read_text())
        assert config["encoder_forward"] == "timm" and config["head"] == model.config.head
        assert os.path.isfile(folder / "encoder.py")
        for loaded in (
            ViTFCNForSemanticSegmentation.from_pretrained(folder),
            AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=False),
        ):
            assert type(loaded) is ViTFCNForSemanticSegmentation and type(loaded.decode_head) is type(model.decode_head)
            with torch.no_grad():
                # float32 weights and buffers (RoPE tables rebuilt by timm) round-trip exactly; the same forward in
                # the same process: bitwise
                assert torch.equal(loaded.eval()(pixel_values).logits, logits), folder.name
        segmenter = pipeline("image-segmentation", model=str(folder), trust_remote_code=False)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8))
        segments = segmenter(image)
        assert segments and {s["label"] for s in segments} <= set(model.config.id2label.values())
        assert all(s["mask"].size == (52, 40) for s in segments)


def test_remote_code_files_stand_alone(saved_models):
    """The files save_pretrained copies import nothing but torch, timm, transformers, numpy, PIL and each other
    (loading them with trust_remote_code in a process without imagenets_hf: tests/test_train_backbones.py)."""
    folder = saved_models[0][0]
    allowed = {"torch", "timm", "transformers", "numpy", "PIL"} | set(sys.stdlib_module_names)
    for name in ("encoder.py", "modeling_vit_fcn.py", "pos_embed.py", "configuration_vit_fcn.py"):
        for node in ast.walk(ast.parse((folder / name).read_text())):
            if isinstance(node, ast.Import):
                assert {alias.name.split(".")[0] for alias in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (name, node.module)
