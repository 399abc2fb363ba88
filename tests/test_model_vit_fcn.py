"""ViT + FCN model against independent references: timm's VisionTransformer, a plainly written FCN head, a
hand-written loss; presets, layer ids, SDPA, gradient checkpointing, SyncBatchNorm conversion."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation

TINY_ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
# A 224-input encoder with patch 16 as the recipe's, only narrow and shallow.
SMALL_224 = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_config(preset: str = "fcn", **kwargs) -> ViTFCNConfig:
    values = {
        "encoder_name": "vit_small_patch16_224",
        "encoder_kwargs": TINY_ENCODER,
        "drop_path_rate": 0.0,
        "num_labels": 5,
        **kwargs,
    }
    return ViTFCNConfig.from_preset(preset, **values)


def timm_reference(model: ViTFCNForSemanticSegmentation, img_size, antialias: bool = False):
    """A bare timm VisionTransformer at `img_size` holding the model's encoder weights, its position embedding
    resized by timm's own function."""
    config = model.config
    reference = timm.create_model(
        config.encoder_name, pretrained=False, num_classes=0, **{**config.encoder_kwargs, "img_size": img_size}
    ).eval()
    state = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=reference.patch_embed.grid_size,
        old_size=model.encoder.patch_embed.grid_size,
        num_prefix_tokens=1,
        antialias=antialias,
    )
    reference.load_state_dict(state)
    return reference


def reference_patch_map(reference, pixel_values: torch.Tensor) -> torch.Tensor:
    tokens = reference.forward_features(pixel_values)[:, reference.num_prefix_tokens :]
    h, w = reference.patch_embed.grid_size
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


@pytest.fixture(scope="module")
def small_224_model():
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn", encoder_name="vit_small_patch16_224", encoder_kwargs=SMALL_224, drop_path_rate=0.0, num_labels=3
    )
    model = ViTFCNForSemanticSegmentation(config).eval()
    # Position embeddings with spatial structure make resampling differences visible.
    with torch.no_grad():
        model.encoder.pos_embed.normal_(std=1.0)
    return model


# -- encoder ----------------------------------------------------------------------------------------------------


def test_encoder_matches_timm_at_224(small_224_model):
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 224, 224)
    reference = timm_reference(small_224_model, (224, 224))
    with torch.no_grad():
        features, _ = small_224_model.forward_features(pixel_values)
        expected = reference_patch_map(reference, pixel_values)
    assert features.shape == (2, 64, 14, 14)
    # Both run timm's blocks on the same weights (measured: bitwise equal at 1, 2 and 16 threads); 1e-5 on features
    # of |x| <= ~4 (final LayerNorm) leaves ~20 float32 ulps for a reordered sum. A wrong position embedding moves
    # them by >= 1e-2 (see the antialiasing check below).
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("height", "width", "padded"), [(256, 320, (256, 320)), (250, 330, (256, 336))])
def test_encoder_matches_timm_at_non_square_sizes(small_224_model, height, width, padded):
    torch.manual_seed(2)
    pixel_values = torch.randn(1, 3, height, width)
    # The reference pads bottom/right with zeros and resizes the grid with plain bicubic (no antialiasing).
    padded_input = F.pad(pixel_values, (0, padded[1] - width, 0, padded[0] - height))
    reference = timm_reference(small_224_model, padded)
    with torch.no_grad():
        features, _ = small_224_model.forward_features(pixel_values)
        expected = reference_patch_map(reference, padded_input)
        antialiased = reference_patch_map(timm_reference(small_224_model, padded, antialias=True), padded_input)
    assert features.shape == (1, 64, padded[0] // 16, padded[1] // 16)
    # Our padding and bicubic position-embedding resize against timm's: equal up to float32 rounding (as above).
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    # timm's antialiased resampling is measurably different (0.30 measured at both sizes): the comparison above can
    # tell them apart.
    assert (features - antialiased).abs().max() > 1e-2


def test_final_norm_off_gives_the_last_block_output(small_224_model):
    config = ViTFCNConfig(**{**small_224_model.config.to_dict(), "final_norm": False})
    model = ViTFCNForSemanticSegmentation(config).eval()
    model.load_state_dict(small_224_model.state_dict())
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features, hidden_states = model.forward_features(pixel_values, output_hidden_states=True)
        reference = timm_reference(model, (224, 224))
        reference.norm = torch.nn.Identity()
        expected = reference_patch_map(reference, pixel_values)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)  # as in test_encoder_matches_timm_at_224
    assert len(hidden_states) == model.num_layers + 1
    # the same values of the same forward call, laid out as a map: exact
    assert torch.equal(hidden_states[-1][:, 1:].transpose(1, 2).reshape_as(features), features)


def test_logits_shape_is_ceil_of_input_over_patch():
    model = ViTFCNForSemanticSegmentation(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 41, 57))
    assert out.logits.shape == (2, 5, 6, 8)
    assert out.loss is None


def test_encoder_keeps_timm_parameter_names():
    model = ViTFCNForSemanticSegmentation(tiny_config())
    reference = timm.create_model("vit_small_patch16_224", num_classes=0, **TINY_ENCODER)
    assert set(model.encoder.state_dict()) == set(reference.state_dict())
    assert model.encoder.blocks[0].attn.qkv.bias is not None
    assert model.encoder.norm.eps == 1e-6


# -- decode head ------------------------------------------------------------------------------------------------


def plain_fcn_head(x, head, num_convs, concat_input, kernel_size, training):
    """mmseg's FCNHead written with plain torch functions from the head's tensors."""

    def conv_bn_relu(inp, module):
        out = F.conv2d(inp, module.conv.weight, module.conv.bias, padding=kernel_size // 2)
        bn = module.bn
        out = F.batch_norm(
            out, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, training, 0.1, bn.eps
        )
        return torch.relu(out)

    out = x
    for i in range(num_convs):
        out = conv_bn_relu(out, head.convs[i])
    if concat_input:
        out = conv_bn_relu(torch.cat([x, out], dim=1), head.conv_cat)
    return F.conv2d(out, head.conv_seg.weight, head.conv_seg.bias)


@pytest.mark.parametrize("num_convs", [0, 1, 2])
@pytest.mark.parametrize("concat_input", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_fcn_head_matches_plain_reference(num_convs, concat_input, training):
    torch.manual_seed(3)
    channels = 32 if num_convs == 0 else 24
    config = tiny_config(num_convs=num_convs, concat_input=concat_input, channels=channels)
    head = ViTFCNForSemanticSegmentation(config).decode_head
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
        head.conv_seg.weight.normal_()
    head.train(training)
    x = torch.randn(2, 32, 5, 6)
    expected = plain_fcn_head(x, head, num_convs, concat_input, 3, training)
    with torch.no_grad():
        actual = head(x)
    assert actual.shape == (2, 5, 5, 6)
    # The same conv / batch-norm ops (measured: bitwise equal); rtol 1e-5 covers a reordered 3x3x64 conv sum on
    # outputs up to ~50 (normal_ classifier weights). A missing BatchNorm, ReLU or concat changes them by O(1).
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert len(head.convs) == num_convs
    assert (head.conv_cat is not None) == concat_input


def test_fcn_preset_is_the_published_head():
    config = tiny_config("fcn")
    head = ViTFCNForSemanticSegmentation(config).decode_head
    assert (config.num_convs, config.concat_input, config.dropout_ratio, config.loss_average) == (0, True, 0.0, "all")
    assert config.final_norm
    # one 3x3 conv 2C -> C without bias (BatchNorm follows), BatchNorm, ReLU, then the 1x1 classifier
    assert head.conv_cat.conv.weight.shape == (32, 64, 3, 3) and head.conv_cat.conv.bias is None
    assert isinstance(head.conv_cat.bn, torch.nn.BatchNorm2d)
    assert head.conv_seg.weight.shape == (5, 32, 1, 1)
    # truncated normal with std 2e-5 (bounds +-2 absolute, as mmcv's trunc_normal_init), bias zero
    head = ViTFCNForSemanticSegmentation(tiny_config("fcn", num_labels=200)).decode_head
    # a statistical bound: the std of 6,400 draws is within 1% of 2e-5 (1 sigma); +-10% is +-11 sigma
    assert 1.8e-5 < head.conv_seg.weight.std().item() < 2.2e-5
    assert torch.count_nonzero(head.conv_seg.bias) == 0


def test_linear_preset_is_imagenetsegmodel_head():
    config = tiny_config("linear")
    head = ViTFCNForSemanticSegmentation(config).decode_head
    assert config.final_norm and config.loss_average == "valid"
    assert head.conv_cat is None and len(head.convs) == 0
    assert [name for name, _ in head.named_parameters()] == ["conv_seg.weight", "conv_seg.bias"]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown preset"):
        ViTFCNConfig.from_preset("segformer")
    with pytest.raises(ValueError, match="loss_average"):
        ViTFCNConfig(loss_average="mean")
    with pytest.raises(ValueError, match="num_convs=0"):
        ViTFCNForSemanticSegmentation(tiny_config(channels=16))
    assert ViTFCNConfig().num_labels == 920


# -- loss -------------------------------------------------------------------------------------------------------


def hand_loss(logits: np.ndarray, labels: np.ndarray, ignore_index: int, average: str) -> float:
    """Cross entropy pixel by pixel, logits and labels already at the same size."""
    total, valid = 0.0, 0
    batch, _, height, width = logits.shape
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                label = labels[b, i, j]
                if label == ignore_index:
                    continue
                scores = logits[b, :, i, j].astype(np.float64)
                total += np.log(np.exp(scores - scores.max()).sum()) + scores.max() - scores[label]
                valid += 1
    return total / (batch * height * width) if average == "all" else total / valid


@pytest.mark.parametrize("average", ["all", "valid"])
def test_loss_matches_hand_written_reference(average):
    torch.manual_seed(4)
    # Patch 8 and loss_downsample 8: logits (5x7) are already at the label size, so the reference needs no resize.
    model = ViTFCNForSemanticSegmentation(tiny_config(loss_average=average)).eval()
    with torch.no_grad():
        model.decode_head.conv_seg.weight.normal_()
    labels = torch.randint(0, 5, (2, 40, 56))
    labels[0, :16] = 1000
    labels[1, :, :8] = 1000
    with torch.no_grad():
        out = model(torch.randn(2, 3, 40, 56), labels=labels)
    # nearest to 1/8 keeps the top-left pixel of each 8x8 cell
    expected = hand_loss(out.logits.numpy(), labels[:, ::8, ::8].numpy(), 1000, average)
    # float32 cross entropy against float64 from the same logits: measured 1.2e-7 relative at most (thread counts
    # and CPU kernels varied); averaging over the other pixel set changes the loss by 37 % (27 % of it ignored).
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_averages_differ_by_the_valid_fraction():
    torch.manual_seed(5)
    model_all = ViTFCNForSemanticSegmentation(tiny_config(loss_average="all")).eval()
    model_valid = ViTFCNForSemanticSegmentation(tiny_config(loss_average="valid")).eval()
    model_valid.load_state_dict(model_all.state_dict())
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 5, (1, 64, 64))
    labels[:, :32] = 1000  # half the 8x8 label grid ignored
    with torch.no_grad():
        loss_all = model_all(pixel_values, labels=labels).loss
        loss_valid = model_valid(pixel_values, labels=labels).loss
    # the same per-pixel losses summed and divided by 64 or by 32 (measured equal; rel 1e-6 allows another float32
    # summation order of 64 terms); a mixed-up average is off by a factor 2
    assert loss_all.item() == pytest.approx(loss_valid.item() / 2, rel=1e-6)


def test_loss_at_full_resolution_upsamples_logits_bilinearly():
    torch.manual_seed(6)
    model = ViTFCNForSemanticSegmentation(tiny_config(loss_downsample=1, loss_average="valid")).eval()
    with torch.no_grad():
        model.decode_head.conv_seg.weight.normal_()
    labels = torch.randint(0, 5, (1, 16, 24))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 24), labels=labels)
    upsampled = F.interpolate(out.logits, size=(16, 24), mode="bilinear", align_corners=False)
    # float32 against float64 as in test_loss_matches_hand_written_reference (measured 1.1e-7 relative)
    assert out.loss.item() == pytest.approx(hand_loss(upsampled.numpy(), labels.numpy(), 1000, "valid"), rel=1e-5)


@pytest.mark.parametrize(("in_size", "out_size"), [((14, 14), (28, 28)), ((5, 7), (13, 3)), ((9, 4), (2, 17))])
def test_deterministic_bilinear_resize_has_interpolates_forward_and_gradient(in_size, out_size):
    """Under deterministic algorithms the loss's bilinear upsampling runs `interpolate` forward and a backward of two
    matrix products (CUDA's atomic-add backward is refused in that mode): the same values, and the same gradient up
    to the order of the sums (float64: within 1e-14; up-, down- and mixed scaling)."""
    from imagenets_hf.model.modeling_vit_fcn import resize_bilinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, *in_size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *out_size, dtype=torch.float64)
    reference = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    (expected,) = torch.autograd.grad(reference, x, grad)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        resized = resize_bilinear(x, out_size)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert type(resized.grad_fn).__name__ == "_DeterministicBilinearBackward"
    assert torch.equal(resized, reference)
    (actual,) = torch.autograd.grad(resized, x, grad)
    torch.testing.assert_close(actual, expected, atol=1e-14, rtol=0)
    assert resize_bilinear(x, out_size).grad_fn.name().startswith("UpsampleBilinear2D")  # otherwise interpolate


def test_labels_at_wrong_size_are_refused():
    model = ViTFCNForSemanticSegmentation(tiny_config())
    with pytest.raises(ValueError, match="input resolution"):
        model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 4, 4, dtype=torch.long))


# -- layer ids, attention, checkpointing, SyncBatchNorm ------------------------------------------------------------


def test_layer_ids_follow_the_layer_decay_formula():
    model = ViTFCNForSemanticSegmentation(tiny_config())
    assert model.num_layers == 2
    ids = {name: model.get_layer_id(name) for name, _ in model.named_parameters()}
    assert ids["encoder.cls_token"] == ids["encoder.pos_embed"] == ids["encoder.patch_embed.proj.weight"] == 0
    assert ids["encoder.blocks.0.attn.qkv.weight"] == 1 and ids["encoder.blocks.1.mlp.fc2.bias"] == 2
    assert ids["encoder.norm.weight"] == 3 and ids["decode_head.conv_seg.weight"] == 3
    assert ids["decode_head.conv_cat.bn.weight"] == 3


def test_sdpa_is_on_by_default_and_eager_gives_the_same_logits(monkeypatch):
    torch.manual_seed(7)
    model = ViTFCNForSemanticSegmentation(tiny_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    pixel_values = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        fused = model(pixel_values).logits
        assert len(calls) == model.num_layers
        model.set_attn_implementation("eager")
        eager = model(pixel_values).logits
    assert len(calls) == model.num_layers  # eager attention does not call SDPA
    assert not model.encoder.blocks[0].attn.fused_attn
    # Fused and explicit softmax attention differ by float32 rounding: measured 1e-7 of the logits' scale. The
    # logits are ~5e-4 (classifier std 2e-5), so the tolerance is relative to that scale; a wrong attention (scale,
    # softmax axis) changes them by O(their scale).
    scale = eager.abs().max().item()
    torch.testing.assert_close(fused, eager, atol=1e-5 * scale, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(8)
    config = tiny_config(drop_path_rate=0.2)
    model = ViTFCNForSemanticSegmentation(config).train()
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    forward_calls = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda *args: forward_calls.append(1))

    def gradients():
        model.zero_grad()
        torch.manual_seed(9)  # the same drop-path draws in both runs
        model(pixel_values, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert len(forward_calls) == 1
    model.activation_checkpointing_enable()
    assert model.encoder.grad_checkpointing
    checkpointed = gradients()
    assert len(forward_calls) == 3  # block 0 ran again during the backward pass: checkpointing is active
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        # Checkpointing reruns the same ops on the same inputs and drop-path draws: equal up to float32 reordering
        # of the backward sums (measured: bitwise). Encoder gradients are tiny (1e-8..1e-5: the classifier starts
        # at std 2e-5), so the tolerance is relative to each tensor's own scale; other drop-path draws or a block
        # run without its checkpointed recompute change a gradient by O(its scale).
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5 * scale, rtol=1e-5, msg=name)
    model.activation_checkpointing_disable()
    assert not model.encoder.grad_checkpointing


def test_batchnorm_converts_to_syncbatchnorm():
    model = ViTFCNForSemanticSegmentation(tiny_config()).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values).logits
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted.decode_head.conv_cat.bn, torch.nn.SyncBatchNorm)
    with torch.no_grad():
        # in eval mode SyncBatchNorm runs the same F.batch_norm on the same running statistics: exact
        torch.testing.assert_close(converted(pixel_values).logits, before, atol=0, rtol=0)


def test_drop_path_on_the_mlp_branch_only_as_mmsegmentation():
    """mmsegmentation's ViT layer (0.x and 1.x) is x + attn(ln1(x)), then x + drop_path(ffn(ln2(x))) with block i of n
    at rate drop_path_rate * i / (n - 1) (torch.linspace); timm's block drops both branches at the same rates."""
    depth, rate = 4, 0.3
    encoder_kwargs = {**TINY_ENCODER, "depth": depth}
    both = ViTFCNForSemanticSegmentation(tiny_config(encoder_kwargs=encoder_kwargs, drop_path_rate=rate))
    mlp = ViTFCNForSemanticSegmentation(
        tiny_config(encoder_kwargs=encoder_kwargs, drop_path_rate=rate, drop_path_branches="mlp")
    )
    assert both.config.drop_path_branches == "both" and mlp.config.drop_path_branches == "mlp"
    mmseg_rates = torch.linspace(0, rate, depth).tolist()  # mmseg's `dpr` (float32 values, as timm's)

    def rates(block, branch):
        module = getattr(block, f"drop_path{branch}")
        return getattr(module, "drop_prob", 0.0)  # an Identity drops nothing

    assert [rates(b, 2) for b in mlp.encoder.blocks] == mmseg_rates
    assert [rates(b, 1) for b in mlp.encoder.blocks] == [0.0] * depth
    assert [rates(b, 2) for b in both.encoder.blocks] == mmseg_rates
    assert [rates(b, 1) for b in both.encoder.blocks] == mmseg_rates
    # Stochastic depth holds no weights: the same state dict keys either way.
    assert both.state_dict().keys() == mlp.state_dict().keys()


def test_mlp_drop_path_keeps_the_attention_residual_in_training():
    """At rate 1 the last block's dropped branches contribute exactly nothing: with "mlp" its output is
    x + attn(norm1(x)) (mmseg's layer with its FFN dropped), with "both" it is x."""
    torch.manual_seed(3)
    models = {
        branches: ViTFCNForSemanticSegmentation(tiny_config(drop_path_rate=1.0, drop_path_branches=branches)).train()
        for branches in ("both", "mlp")
    }
    models["mlp"].load_state_dict(models["both"].state_dict())
    x = torch.randn(2, 17, TINY_ENCODER["embed_dim"])
    block = models["mlp"].encoder.blocks[-1]  # rate linspace(0, 1, 2)[-1] = 1
    with torch.no_grad():
        attention_residual = x + block.attn(block.norm1(x))
        assert not torch.allclose(attention_residual, x)  # the attention branch is not zero by itself
        torch.testing.assert_close(block(x), attention_residual, rtol=0, atol=0)
        torch.testing.assert_close(models["both"].encoder.blocks[-1](x), x, rtol=0, atol=0)
        # In evaluation nothing is dropped: both models are the same function.
        pixel_values = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(
            models["mlp"].eval()(pixel_values).logits, models["both"].eval()(pixel_values).logits
        )


def test_drop_path_branches_default_and_old_configs(tmp_path):
    """Configs saved before the field existed load as "both" (timm's blocks, what those models trained with); a saved
    "mlp" stays "mlp"; an unknown value or a block without the two branches is refused."""
    import json

    from imagenets_hf.model.encoder import drop_path_only_on_mlp

    assert tiny_config().drop_path_branches == "both"
    tiny_config(drop_path_branches="mlp").save_pretrained(tmp_path / "new")
    assert ViTFCNConfig.from_pretrained(tmp_path / "new").drop_path_branches == "mlp"
    old = json.loads((tmp_path / "new" / "config.json").read_text())
    del old["drop_path_branches"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    config = ViTFCNConfig.from_pretrained(tmp_path / "old")
    assert config.drop_path_branches == "both"
    with pytest.raises(ValueError, match="drop_path_branches must be one of"):
        tiny_config(drop_path_branches="attention")
    not_a_vit = torch.nn.Module()
    not_a_vit.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="block 0 is a Linear: use 'both'"):
        drop_path_only_on_mlp(not_a_vit)
