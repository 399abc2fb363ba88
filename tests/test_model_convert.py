"""Pre-trained weight import: every checkpoint layout is built from a random timm ViT (or a random transformers
ViTModel / ViTMAEModel), imported, and compared tensor by tensor and on encoder features against its source."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from script_runner import run_script
from timm.models.vision_transformer import VisionTransformer

from imagenets_hf.model.convert import (
    convert_checkpoint,
    load_checkpoint,
    load_pretrained_encoder,
    to_timm_state_dict,
)
from imagenets_hf.model.pos_embed import resample_pos_embed

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# Features of an imported encoder against its source (|x| up to ~5): the same timm forward on bitwise-equal
# weights, so equal up to float32 rounding (measured: bitwise at 1, 2 and 16 threads); 1e-5 leaves ~20 ulps. A
# wrongly mapped or transposed tensor moves them by O(0.1-1).
ATOL = 1e-5


def tiny_vit(seed: int, **overrides) -> VisionTransformer:
    """A random tiny timm ViT; LayerNorm affine parameters and biases randomised too, so a swapped or
    re-initialised tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, "num_classes": 0, **overrides}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model


def encoder_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}


def vit2mmseg(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmsegmentation's tools/model_converters/vit2mmseg.py renaming, written out independently."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head"):
            continue
        if k.startswith("norm"):
            k = k.replace("norm.", "ln1.")
        elif k.startswith("patch_embed"):
            k = k.replace("proj", "projection")
        elif k.startswith("blocks"):
            if "norm" in k:
                k = k.replace("norm", "ln")
            elif "mlp.fc1" in k:
                k = k.replace("mlp.fc1", "ffn.layers.0.0")
            elif "mlp.fc2" in k:
                k = k.replace("mlp.fc2", "ffn.layers.1")
            elif "attn.qkv" in k:
                k = k.replace("attn.qkv.", "attn.attn.in_proj_")
            elif "attn.proj" in k:
                k = k.replace("attn.proj", "attn.attn.out_proj")
            k = k.replace("blocks.", "layers.")
        out[k] = v
    return out


def assert_imported(target: VisionTransformer, expected: dict[str, torch.Tensor], source_features=None, x=None):
    got = target.state_dict()
    assert set(expected) == {k for k in got if not k.startswith(("head.", "fc_norm."))}
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name  # copied (renamed, stacked, reshaped), never computed: exact
    if source_features is not None:
        with torch.no_grad():
            torch.testing.assert_close(target.forward_features(x), source_features, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# timm-named layouts


def _prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def _projection_head(prefix):
    return {f"{prefix}head.mlp.0.weight": torch.randn(64, 32), f"{prefix}head.last_layer.weight_g": torch.randn(1, 64)}


def build_layout(name: str, source: VisionTransformer, other: VisionTransformer):
    """(checkpoint, expected layout name, key) for one layout, weights from `source` (`other` is a decoy)."""
    sd, decoy = encoder_state(source), encoder_state(other)
    if name == "timm":
        return sd, "timm", None
    if name == "mae-pretrained":
        mae_extras = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32)}
        return {"model": {**sd, **mae_extras}}, "model/timm", None
    if name == "dino-teacher":
        checkpoint = {
            "student": {**_prefixed(decoy, "module.backbone."), **_projection_head("module.")},
            "teacher": {**_prefixed(sd, "backbone."), **_projection_head("")},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
        }
        return checkpoint, "teacher/timm", None
    if name == "dino-student":
        checkpoint = {
            "student": {**_prefixed(sd, "module.backbone."), **_projection_head("module.")},
            "teacher": {**_prefixed(decoy, "backbone."), **_projection_head("")},
        }
        return checkpoint, "student/timm", "student"
    if name == "ibot-teacher":
        teacher = {**_prefixed(sd, "backbone."), "backbone.masked_embed": torch.randn(1, 32), **_projection_head("")}
        return {"teacher": teacher, "student": _prefixed(decoy, "module.backbone.")}, "teacher/timm", None
    if name == "sere-model":  # ImageNetSegModel reads `model` / `state_dict` and strips module. and backbone.
        return {"model": _prefixed(sd, "module.backbone.")}, "model/timm", None
    if name == "state_dict-module":
        return {"state_dict": _prefixed(sd, "module.")}, "state_dict/timm", None
    if name == "mmseg":
        return vit2mmseg(sd), "mmseg", None
    if name == "mmseg-segmentor":
        decode_head = {"decode_head.conv_seg.weight": torch.randn(5, 32, 1, 1)}
        return {"state_dict": {**_prefixed(vit2mmseg(sd), "backbone."), **decode_head}}, "state_dict/mmseg", None
    raise AssertionError(name)


LAYOUTS = [
    "timm",
    "mae-pretrained",
    "dino-teacher",
    "dino-student",
    "ibot-teacher",
    "sere-model",
    "state_dict-module",
    "mmseg",
    "mmseg-segmentor",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_round_trip(layout, pixels):
    source, decoy, target = tiny_vit(1), tiny_vit(2), tiny_vit(3)
    checkpoint, expected_layout, key = build_layout(layout, source, decoy)
    report = load_pretrained_encoder(target, checkpoint, key=key, verbose=False)
    assert report.layout == expected_layout
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(encoder_state(source))
    with torch.no_grad():
        reference = source.forward_features(pixels)
    assert_imported(target, encoder_state(source), reference, pixels)


def test_mae_finetuned_takes_final_norm_from_fc_norm(pixels):
    """MAE fine-tuned: global pooling, `fc_norm` + 1000-class head, no `norm`. The encoder's final norm must be
    fc_norm (mmseg left it random), so the imported tokens equal fc_norm(source tokens)."""
    source = tiny_vit(4, global_pool="avg", num_classes=1000)
    sd = source.state_dict()
    assert "norm.weight" not in sd and "fc_norm.weight" in sd and sd["head.weight"].shape == (1000, 32)
    target = tiny_vit(5)
    report = load_pretrained_encoder(target, {"model": sd}, verbose=False)
    assert report.layout == "model/timm+fc_norm"
    assert set(report.ignored) == {"head.weight", "head.bias"}
    expected = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    expected["norm.weight"], expected["norm.bias"] = sd["fc_norm.weight"], sd["fc_norm.bias"]
    with torch.no_grad():
        reference = source.fc_norm(source.forward_features(pixels))
    assert_imported(target, expected, reference, pixels)


def test_to_timm_state_dict_is_pure_and_names_layouts():
    source = tiny_vit(6)
    checkpoint, _, _ = build_layout("dino-teacher", source, tiny_vit(7))
    before = {k: dict(v) if isinstance(v, dict) else v for k, v in checkpoint.items()}
    state_dict, layout = to_timm_state_dict(checkpoint)
    assert layout == "teacher/timm"
    assert checkpoint.keys() == before.keys() and checkpoint["teacher"].keys() == before["teacher"].keys()
    assert state_dict.keys() == encoder_state(source).keys()
    state_dict, layout = to_timm_state_dict(checkpoint, key="student")
    assert layout == "student/timm"
    assert torch.equal(state_dict["cls_token"], tiny_vit(7).cls_token.detach())  # a copy, and seeded init: exact


# ---------------------------------------------------------------------------------------------------------------
# transformers ViTModel / ViTMAEModel


def _hf_config_kwargs():
    # timm's ViT uses LayerNorm eps 1e-6 (transformers defaults to 1e-12): same eps so the comparison is exact.
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )


def _randomise(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.2)


def _compare_with_hf(target, hf_output, pixels):
    """Encoder features equal last_hidden_state; each block's output equals hidden_states[i + 1]."""
    # Two implementations (transformers' separate q/k/v projections against timm's fused qkv): other matrix shapes
    # may sum in another order on another CPU, so rtol 1e-5 is added to ATOL for hidden states up to ~11 (measured:
    # bitwise equal here). A wrongly mapped tensor still moves them by O(0.1-1).
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(pixels), hf_output.last_hidden_state, atol=ATOL, rtol=1e-5)
        x = target._pos_embed(target.patch_embed(pixels))
        torch.testing.assert_close(x, hf_output.hidden_states[0], atol=ATOL, rtol=1e-5)
        for index, block in enumerate(target.blocks):
            x = block(x)
            torch.testing.assert_close(x, hf_output.hidden_states[index + 1], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("variant", ["ViTModel-folder", "ViTModel-v5-state-dict", "classification-folder", "dino"])
def test_transformers_vit_import_equals_hidden_states(variant, tmp_path, pixels):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    config = ViTConfig(**_hf_config_kwargs(), num_labels=3)
    if variant == "classification-folder":
        hf_task = ViTForImageClassification(config).eval()
        _randomise(hf_task, 8)
        hf = hf_task.vit
    else:
        # facebook/dino-vit* folders are ViTModel checkpoints without the pooler.
        hf = ViTModel(config, add_pooling_layer=variant != "dino").eval()
        _randomise(hf, 8)
        hf_task = hf
    with torch.no_grad():
        hf_output = hf(pixels, output_hidden_states=True)
    if variant == "ViTModel-v5-state-dict":
        checkpoint = hf.state_dict()  # transformers 5 names in memory: layers.N.attention.q_proj ...
        assert any(".q_proj." in k for k in checkpoint)
        expected_layout = "transformers-v5"
    else:
        hf_task.save_pretrained(tmp_path)  # on disk: v4 names, encoder.layer.N.attention.attention.query ...
        checkpoint = tmp_path
        expected_layout = "transformers"
    target = tiny_vit(9)
    report = load_pretrained_encoder(target, checkpoint, verbose=False)
    assert report.layout == expected_layout
    assert report.missing == [] and report.unexpected == []
    _compare_with_hf(target, hf_output, pixels)


@pytest.mark.parametrize("variant", ["ViTMAEModel-folder", "ViTMAEForPreTraining-folder", "v5-state-dict"])
def test_transformers_vitmae_import_equals_hidden_states(variant, tmp_path, pixels):
    """ViTMAEModel masks a random subset of patches and shuffles them by `noise`: mask_ratio 0 keeps every patch,
    and noise = arange(num_patches) makes argsort the identity, so the sequence keeps the timm order exactly."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

    config = ViTMAEConfig(**_hf_config_kwargs(), mask_ratio=0.0, decoder_hidden_size=16, decoder_num_hidden_layers=1)
    if variant == "ViTMAEForPreTraining-folder":
        hf_task = ViTMAEForPreTraining(config).eval()
        _randomise(hf_task, 10)
        hf = hf_task.vit
    else:
        hf = hf_task = ViTMAEModel(config).eval()
        _randomise(hf, 10)
    num_patches = (32 // 8) ** 2
    noise = torch.arange(num_patches, dtype=torch.float32).expand(pixels.shape[0], -1)
    with torch.no_grad():
        hf_output = hf(pixels, noise=noise, output_hidden_states=True)
    assert torch.equal(hf_output.ids_restore[0], torch.arange(num_patches))  # integers
    if variant == "v5-state-dict":
        checkpoint = hf.state_dict()
    else:
        hf_task.save_pretrained(tmp_path)
        checkpoint = tmp_path
    target = tiny_vit(11)
    report = load_pretrained_encoder(target, checkpoint, verbose=False)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(target.pos_embed.detach(), hf.embeddings.position_embeddings.detach())  # copied: exact
    _compare_with_hf(target, hf_output, pixels)


def test_transformers_folder_eps_difference_is_noted(tmp_path):
    from transformers import ViTConfig, ViTModel

    kwargs = {**_hf_config_kwargs(), "layer_norm_eps": 1e-12}
    ViTModel(ViTConfig(**kwargs)).save_pretrained(tmp_path)
    report = load_pretrained_encoder(tiny_vit(36), tmp_path, verbose=False)
    assert report.notes == ["the checkpoint's config uses LayerNorm eps 1e-12; the encoder uses 1e-06"]


def test_final_norm_follows_the_encoder():
    """An encoder built with global pooling keeps its final norm as fc_norm; one without a final norm ignores it."""
    source = tiny_vit(37)
    pooled = tiny_vit(38, global_pool="avg")
    load_pretrained_encoder(pooled, encoder_state(source), verbose=False)
    assert torch.equal(pooled.fc_norm.weight.detach(), source.norm.weight.detach())  # copied: exact
    bare = tiny_vit(39, final_norm=False)
    report = load_pretrained_encoder(bare, encoder_state(source), verbose=False)
    assert report.missing == [] and report.unexpected == [] and {"norm.weight", "norm.bias"} <= set(report.ignored)


# ---------------------------------------------------------------------------------------------------------------
# Refusals, resizing, errors


def test_partial_checkpoint_refused_unless_allowed(tmp_path):
    source, target = tiny_vit(12), tiny_vit(13)
    sd = {k: v for k, v in encoder_state(source).items() if not k.startswith("blocks.1.")}
    before = encoder_state(target)
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*12 encoder tensor\(s\) missing.*blocks\.1\.norm1\.weight"):
        load_pretrained_encoder(target, tmp_path / "partial.pth", verbose=False)
    for name, tensor in encoder_state(target).items():  # nothing loaded after a refusal: untouched, exact
        assert torch.equal(tensor, before[name]), name
    report = load_pretrained_encoder(target, {"model": sd}, allow_partial=True, verbose=False)
    assert sorted(report.missing) == sorted(k for k in before if k.startswith("blocks.1."))
    got = encoder_state(target)
    for name in before:
        expected = before[name] if name.startswith("blocks.1.") else sd[name]
        assert torch.equal(got[name], expected), name  # kept or copied: exact


def test_deeper_checkpoint_refused_as_unexpected():
    source, target = tiny_vit(14, depth=3), tiny_vit(15)
    with pytest.raises(ValueError, match=r"with no place in the encoder: \[blocks\.2\.norm1\.weight"):
        load_pretrained_encoder(target, encoder_state(source), verbose=False)
    report = load_pretrained_encoder(target, encoder_state(source), allow_partial=True, verbose=False)
    assert report.missing == [] and len(report.unexpected) == 12


@pytest.mark.parametrize("img_size", [48, (32, 48)])
def test_pos_embed_resized_with_reference_bicubic(img_size):
    source = tiny_vit(16)
    target = tiny_vit(17, img_size=img_size)
    report = load_pretrained_encoder(target, encoder_state(source), verbose=False)
    grid = tuple(target.patch_embed.grid_size)
    expected = resample_pos_embed(source.pos_embed.detach(), grid, num_prefix_tokens=1)
    assert target.pos_embed.shape == (1, 1 + grid[0] * grid[1], 32)
    # the loader and the test call the same function on the same tensor in the same process: exact
    assert torch.equal(target.pos_embed.detach(), expected)
    assert any("pos_embed resized" in note for note in report.notes)


def test_shape_mismatch_names_key_and_shapes():
    source, target = tiny_vit(18), tiny_vit(19, mlp_ratio=2.0)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint \(128, 32\) vs encoder \(64, 32\)"):
        load_pretrained_encoder(target, encoder_state(source), allow_partial=True, verbose=False)


def test_unknown_layout_and_missing_key_are_clear_errors():
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        to_timm_state_dict({"conv1.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no sub-dict 'teacher'"):
        to_timm_state_dict({"model": encoder_state(tiny_vit(20))}, key="teacher")


def test_prints_counts_and_names(capsys):
    source = tiny_vit(21)
    load_pretrained_encoder(tiny_vit(22), {"model": {**encoder_state(source), "head.weight": torch.zeros(3, 32)}})
    printed = capsys.readouterr().out
    assert "layout model/timm" in printed
    assert "loaded 30 tensors" in printed and "blocks.{0-1}.attn.qkv.weight" in printed
    assert (
        "missing 0" in printed and "unexpected 0" in printed and "ignored 1 non-encoder entries: head.weight" in printed
    )


# ---------------------------------------------------------------------------------------------------------------
# Files, folders and the Hub


def test_pth_round_trip_loads_with_weights_only(tmp_path):
    source = tiny_vit(23)
    checkpoint, _, _ = build_layout("dino-teacher", source, tiny_vit(24))  # carries an argparse.Namespace
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    loaded = load_checkpoint(path)
    assert loaded["args"].arch == "vit_small"
    target = tiny_vit(25)
    load_pretrained_encoder(target, path, verbose=False)
    assert_imported(target, encoder_state(source))


class _NotAllowed:  # a pickled class that weights_only=True must refuse
    pass


def test_unsafe_pickle_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": encoder_state(tiny_vit(26)), "extra": _NotAllowed()}, path)
    with pytest.raises(ValueError, match=r"unsafe\.pth: cannot be read with torch\.load\(weights_only=True\)"):
        load_checkpoint(path)


def test_safetensors_file(tmp_path):
    source = tiny_vit(27)
    save_file(encoder_state(source), tmp_path / "weights.safetensors")
    target = tiny_vit(28)
    load_pretrained_encoder(target, tmp_path / "weights.safetensors", verbose=False)
    assert_imported(target, encoder_state(source))


def test_hub_id_downloads_through_huggingface_hub(tmp_path, monkeypatch):
    """Offline stand-in for `timm/vit_base_patch16_224.mae`: hf_hub_download is monkeypatched to a local file; a
    repository without model.safetensors falls back to pytorch_model.bin."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    source = tiny_vit(29)
    torch.save(encoder_state(source), tmp_path / "pytorch_model.bin")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if filename == "model.safetensors":
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    target = tiny_vit(30)
    report = load_pretrained_encoder(target, "timm/vit_tiny_test.mae", verbose=False)
    assert calls == [("timm/vit_tiny_test.mae", "model.safetensors"), ("timm/vit_tiny_test.mae", "pytorch_model.bin")]
    assert report.layout == "timm"
    assert_imported(target, encoder_state(source))
    assert load_checkpoint("hf-hub:timm/vit_tiny_test.mae").keys() == encoder_state(source).keys()


def test_url_downloads_through_torch_hub(tmp_path, monkeypatch):
    """Offline stand-in for https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth."""
    import shutil

    source = tiny_vit(34)
    torch.save({"model": encoder_state(source), "args": argparse.Namespace(model="mae")}, tmp_path / "served.pth")
    urls = []

    def fake_download(url, destination, *args, **kwargs):
        urls.append(url)
        shutil.copy(tmp_path / "served.pth", destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = "https://example.org/mae/pretrain/mae_tiny.pth"
    target = tiny_vit(35)
    report = load_pretrained_encoder(target, url, verbose=False)
    assert urls == [url] and report.layout == "model/timm"
    assert_imported(target, encoder_state(source))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_checkpoint(tmp_path / "nothing.pth")


# ---------------------------------------------------------------------------------------------------------------
# Whole model: library call and CLI

TINY_ENCODER_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}


def test_convert_checkpoint_end_to_end(tmp_path, pixels):
    from imagenets_hf.model import ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

    path = tmp_path / "mae_finetuned.pth"
    finetuned = tiny_vit(31, global_pool="avg", num_classes=1000)
    torch.save({"model": finetuned.state_dict()}, path)
    id2label = {0: "other", 1: "goldfish", 2: "tench"}
    model = convert_checkpoint(
        path,
        "vit_base_patch16_224",
        3,
        tmp_path / "out",
        id2label=id2label,
        encoder_kwargs=TINY_ENCODER_KWARGS,
        drop_path_rate=0.0,
    )
    expected = {k: v for k, v in finetuned.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    expected["norm.weight"] = finetuned.fc_norm.weight.detach()
    expected["norm.bias"] = finetuned.fc_norm.bias.detach()
    assert_imported(model.encoder, expected)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(saved[f"encoder.{name}"], tensor), name  # float32 written and read back: exact
    reloaded = ViTFCNForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.id2label == id2label and reloaded.config.num_labels == 3
    ViTFCNImageProcessor.from_pretrained(tmp_path / "out")
    # the saved folder is itself an importable checkpoint (`encoder.` prefix, decode head dropped)
    fresh = tiny_vit(40)
    report = load_pretrained_encoder(fresh, tmp_path / "out", verbose=False)
    assert report.layout == "timm" and any(k.startswith("decode_head.") for k in report.ignored)
    assert_imported(fresh, expected)
    with torch.no_grad():
        # Bitwise-equal weights, the same forward in the same process: exact (as test_model_hf's round trip). An
        # absolute 1e-5 would not even test these logits: they are ~3e-4 (classifier std 2e-5).
        torch.testing.assert_close(reloaded(pixels).logits, model.eval()(pixels).logits, atol=0, rtol=0)


def _cli_command(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    """`python scripts/convert_checkpoint.py ...` for the tiny encoder."""
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "convert_checkpoint.py"),
        "--checkpoint",
        str(checkpoint),
        "--encoder",
        "vit_small_patch16_224",
        "--num-labels",
        "4",
        "--out",
        str(out),
        "--preset",
        "linear",
        "--encoder-kwargs",
        json.dumps(TINY_ENCODER_KWARGS),
        *extra,
    ]
    return [str(part) for part in command]


SUBPROCESS = {"capture_output": True, "text": True, "env": {**os.environ, "OMP_NUM_THREADS": "1"}, "timeout": 300}


@pytest.mark.slow
def test_cli_converts_in_a_subprocess(tmp_path, monkeypatch, capsys):
    source = tiny_vit(32)
    checkpoint, _, _ = build_layout("dino-teacher", source, tiny_vit(33))
    torch.save(checkpoint, tmp_path / "dino.pth")
    result = subprocess.run(_cli_command(tmp_path / "dino.pth", tmp_path / "out"), **SUBPROCESS)
    assert result.returncode == 0, result.stderr
    assert "layout teacher/timm" in result.stdout and "missing 0" in result.stdout
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in encoder_state(source).items():
        assert torch.equal(saved[f"encoder.{name}"], tensor), name  # copied, saved and read back: exact
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()

    # a partial checkpoint: refused (exit 1, the reason, nothing written), accepted with --allow-partial; the same
    # script run in this process (the subprocess above checked the wiring)
    def run(*args) -> tuple[int, list[str]]:
        return run_script("convert_checkpoint", *_cli_command(*args)[2:], monkeypatch=monkeypatch, capsys=capsys)

    partial = {"model": {k: v for k, v in encoder_state(source).items() if not k.startswith("blocks.1.")}}
    torch.save(partial, tmp_path / "partial.pth")
    status, lines = run(tmp_path / "partial.pth", tmp_path / "refused")
    assert status == 1 and len(lines) == 1 and "missing from the checkpoint" in lines[0]
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    status, lines = run(tmp_path / "partial.pth", tmp_path / "accepted", "--allow-partial", "--key", "model")
    assert status == 0, lines
    text = "\n".join(lines)
    assert "layout model/timm" in text and "missing 12" in text, text
