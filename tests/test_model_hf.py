"""Hugging Face behaviour of the ViT + FCN model: save/load, Auto classes, dtype on load, trust_remote_code without
the package, push_to_hub (offline), image processor sizes and post-processing, the image-segmentation pipeline."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

TINY_ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
CLASS_NAMES = ["other", "goldfish", "shark", "hen", "ostrich"]


def tiny_model(seed: int = 0) -> ViTFCNForSemanticSegmentation:
    torch.manual_seed(seed)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        encoder_kwargs=TINY_ENCODER,
        drop_path_rate=0.0,
        id2label=dict(enumerate(CLASS_NAMES)),
    )
    model = ViTFCNForSemanticSegmentation(config).eval()
    with torch.no_grad():  # a classifier far from zero so predictions vary over the image
        model.decode_head.conv_seg.weight.normal_()
        model.decode_head.conv_cat.bn.running_mean.normal_()
    return model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model and its image processor saved to a folder, with an input and the logits it gives."""
    folder = tmp_path_factory.mktemp("vit_fcn")
    model = tiny_model()
    model.save_pretrained(folder)
    ViTFCNImageProcessor().save_pretrained(folder)
    pixel_values = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        logits = model(pixel_values).logits
    np.save(folder.parent / "pixel_values.npy", pixel_values.numpy())
    np.save(folder.parent / "logits.npy", logits.numpy())
    return folder, model, pixel_values, logits


def test_save_load_round_trip_gives_identical_outputs(saved_model):
    folder, _, pixel_values, logits = saved_model
    reloaded = ViTFCNForSemanticSegmentation.from_pretrained(folder).eval()
    with torch.no_grad():
        # float32 weights round-trip exactly; the same forward on the same input in the same process (the module's
        # fixture, same thread count): bitwise
        assert torch.equal(reloaded(pixel_values).logits, logits)
    assert reloaded.config.id2label == dict(enumerate(CLASS_NAMES))
    assert reloaded.config.label2id["shark"] == 2


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_all_get_the_umasks_mode(tmp_path, umask):
    """model.safetensors came out 0600 (safetensors writes through a private temporary file) beside 0644 files."""
    previous = os.umask(umask)
    try:
        tiny_model().save_pretrained(tmp_path / "model")
        ViTFCNImageProcessor().save_pretrained(tmp_path / "model")
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_saved_folder_holds_weights_code_and_auto_map(saved_model):
    folder = saved_model[0]
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    # the code the folder needs without imagenets_hf installed, relative imports included
    assert {"configuration_vit_fcn.py", "modeling_vit_fcn.py", "pos_embed.py", "image_processing_vit_fcn.py"} <= files
    allowed = {"torch", "timm", "transformers", "numpy", "PIL"} | set(sys.stdlib_module_names)
    for name in ("configuration_vit_fcn.py", "modeling_vit_fcn.py", "image_processing_vit_fcn.py", "pos_embed.py"):
        for node in ast.walk(ast.parse((folder / name).read_text())):
            if isinstance(node, ast.Import):
                assert {alias.name.split(".")[0] for alias in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (name, node.module)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSemanticSegmentation"] == "modeling_vit_fcn.ViTFCNForSemanticSegmentation"
    assert json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]["AutoImageProcessor"]


def test_auto_classes_load_the_registered_classes(saved_model):
    folder, _, pixel_values, logits = saved_model
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    assert isinstance(config, ViTFCNConfig) and config.model_type == "imagenets_vit_fcn"
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=False).eval()
    assert type(model) is ViTFCNForSemanticSegmentation
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, logits)  # as in the round trip above: bitwise
    assert type(AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)) is ViTFCNImageProcessor
    # built from a config, as the training loop may do
    assert type(AutoModelForSemanticSegmentation.from_config(config)) is ViTFCNForSemanticSegmentation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_in_float32(tmp_path, dtype):
    model = tiny_model()
    model.to(dtype).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    for loader in (ViTFCNForSemanticSegmentation, AutoModelForSemanticSegmentation):
        reloaded = loader.from_pretrained(tmp_path)
        assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
        # the half-precision values, upcast exactly (a dtype conversion, no arithmetic)
        assert torch.equal(reloaded.encoder.pos_embed, model.encoder.pos_embed.float())
    assert next(ViTFCNForSemanticSegmentation.from_pretrained(tmp_path, dtype=dtype).parameters()).dtype == dtype


def test_loads_with_trust_remote_code_where_the_package_is_not_importable(saved_model, tmp_path):
    folder = saved_model[0]
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["imagenets_hf"] = None  # the package is installed editable: block it explicitly
        try:
            import imagenets_hf.model
        except ImportError:
            pass
        else:
            raise SystemExit("imagenets_hf is importable in the isolated process")
        import numpy as np
        import torch
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert not type(model).__module__.startswith("imagenets_hf"), type(model).__module__
        assert not type(processor).__module__.startswith("imagenets_hf"), type(processor).__module__
        assert not any(name.startswith("imagenets_hf.") for name in sys.modules), "imagenets_hf was imported"
        pixel_values = torch.from_numpy(np.load({str(folder.parent / "pixel_values.npy")!r}))
        expected = torch.from_numpy(np.load({str(folder.parent / "logits.npy")!r}))
        with torch.no_grad():
            logits = model(pixel_values).logits
        # The parent computed `expected` with its own thread count (and possibly another CPU kernel), so float32
        # sums are reordered: measured up to 4e-6 on logits of ~10. A wrong or missing weight moves logits by O(1).
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
        print("OK", type(model).__module__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK transformers_modules" in result.stdout


def test_push_to_hub_uploads_weights_config_and_code(monkeypatch, tmp_path):
    """The Hub cannot be reached here: the upload calls are replaced and the uploaded folder is checked."""
    uploaded = tmp_path / "uploaded"
    commits = []

    class FakeRepo:
        repo_id = "someone/vit-fcn-tiny"

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return FakeRepo()

        def create_commit(self, repo_id, operations, **kwargs):
            commits.append(repo_id)
            for op in operations:
                target = uploaded / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(op.path_or_fileobj, target)

    monkeypatch.setattr(transformers.utils.hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(
        transformers.utils.hub,
        "create_and_tag_model_card",
        lambda *args, **kwargs: transformers.utils.hub.ModelCard("---\nlicense: apache-2.0\n---\n"),
    )
    model = tiny_model()
    model.push_to_hub("someone/vit-fcn-tiny")
    ViTFCNImageProcessor().push_to_hub("someone/vit-fcn-tiny")
    assert commits == ["someone/vit-fcn-tiny"] * 2
    assert {"config.json", "model.safetensors", "modeling_vit_fcn.py", "pos_embed.py", "README.md"} <= set(
        os.listdir(uploaded)
    )
    assert (uploaded / "preprocessor_config.json").exists()
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(uploaded, trust_remote_code=False).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # the uploaded float32 weights, the same forward in the same process: bitwise
        assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)


# -- image processor --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (256, 341)),  # short side 256
        ((640, 480), (341, 256)),
        ((300, 2000), (154, 1024)),  # long side capped at 1024
        ((256, 256), (256, 256)),
        ((100, 150), (256, 384)),  # small images are enlarged
        ((1200, 1000), (307, 256)),  # > 1000^2 pixels: long side 1000 first (1000x833), then short side 256
    ],
)
def test_processor_output_sizes(size, expected):
    processor = ViTFCNImageProcessor()
    image = Image.new("RGB", (size[1], size[0]), (10, 20, 30))
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, *expected)
    assert processor.model_input_size(*size) == expected


def test_processor_normalises_with_imagenet_mean_and_std():
    image = np.zeros((30, 40, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 128, 0
    processor = ViTFCNImageProcessor(do_resize=False)
    pixel_values = processor(Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    for channel in range(3):
        # float32 against float64 constants of ~2: measured 1 ulp (1.2e-7); a wrong mean, std or 0-255 scale is off
        # by >= 0.1
        assert torch.allclose(pixel_values[channel], torch.tensor(expected[channel]), atol=1e-5)


def test_processor_resizes_masks_nearest_without_inventing_ids():
    rng = np.random.default_rng(0)
    ids = rng.choice(np.array([0, 3, 919, 1000]), size=(60, 90))
    mask = Image.fromarray(ids.astype(np.uint16))  # mode I;16, as the dataset's annotation column
    image = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    processor = ViTFCNImageProcessor()
    batch = processor(image, segmentation_maps=mask, return_tensors="pt")
    labels = batch["labels"]
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (1, 256, 384)
    assert set(labels.unique().tolist()) <= {0, 3, 919, 1000}
    # RGB-encoded ImageNet-S masks (id = R + 256 * G) decode to the same ids
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=-1).astype(np.uint8)
    labels_rgb = processor(image, segmentation_maps=Image.fromarray(rgb), return_tensors="pt")["labels"]
    assert torch.equal(labels_rgb, labels)  # integer ids


def test_processor_refuses_mixed_sizes_unless_padding():
    processor = ViTFCNImageProcessor()
    images = [Image.new("RGB", (320, 240)), Image.new("RGB", (240, 320))]
    with pytest.raises(ValueError, match="different sizes"):
        processor(images, return_tensors="pt")
    masks = [np.zeros((240, 320), np.int64), np.ones((320, 240), np.int64)]
    batch = processor(images, segmentation_maps=masks, return_tensors="pt", do_pad=True)
    assert tuple(batch["pixel_values"].shape) == (2, 3, 341, 341)
    assert batch["labels"][0, 300, 0] == 1000 and batch["labels"][1, 0, 300] == 1000
    with pytest.raises(ValueError, match="segmentation map 0 has size"):
        processor(images[0], segmentation_maps=np.zeros((10, 10), np.int64))


def test_post_processing_resizes_logits_bilinearly_then_argmaxes():
    torch.manual_seed(10)
    logits = torch.randn(2, 5, 16, 21)
    processor = ViTFCNImageProcessor()
    outputs = transformers.modeling_outputs.SemanticSegmenterOutput(logits=logits)
    results = processor.post_process_semantic_segmentation(outputs, target_sizes=[(480, 640), (100, 90)])
    for result, image_logits, size in zip(results, logits, [(480, 640), (100, 90)]):
        expected = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False).argmax(1)[0]
        # the processor and the test run the same interpolation on the same logits in the same process: the same
        # floats, so the same argmax (integers)
        assert result.shape == size and torch.equal(result, expected)
    no_resize = processor.post_process_semantic_segmentation(outputs)
    assert torch.equal(no_resize[0], logits[0].argmax(0))


def test_post_processing_of_a_large_image_goes_through_long_side_1000():
    torch.manual_seed(11)
    logits = torch.randn(1, 5, 19, 16)
    processor = ViTFCNImageProcessor()
    size = (1200, 1000)  # 1.2 M pixels > 1000^2
    result = processor.post_process_semantic_segmentation(
        transformers.modeling_outputs.SemanticSegmenterOutput(logits=logits), target_sizes=[size]
    )[0]
    assert result.shape == size
    # the prediction at long side 1000 (1000 x 833), then nearest upsampling: blocks of a 1000x833 map
    working = F.interpolate(logits, size=(1000, 833), mode="bilinear", align_corners=False).argmax(1)
    rows = (np.arange(1200) * 1000 / 1200).astype(int)
    cols = (np.arange(1000) * 833 / 1000).astype(int)
    assert torch.equal(result, working[0][rows][:, cols])  # same ops on the same logits, as above: exact
    direct = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)[0]
    assert not torch.equal(result, direct)  # the protocol is not the same as a direct resize


def test_processor_round_trips_through_save_and_auto(tmp_path):
    processor = ViTFCNImageProcessor(short_side=224, max_long_side=896)
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(reloaded) is ViTFCNImageProcessor
    assert (reloaded.short_side, reloaded.max_long_side) == (224, 896)
    assert reloaded.image_std == processor.image_std


# -- pipeline ---------------------------------------------------------------------------------------------------


def test_image_segmentation_pipeline_returns_labelled_masks(saved_model):
    folder, model, _, _ = saved_model
    segmenter = transformers.pipeline("image-segmentation", model=str(folder), trust_remote_code=False)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8))
    annotations = segmenter(image)

    processor = ViTFCNImageProcessor()
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[(70, 100)])[0].numpy()
    present = np.unique(expected)
    assert len(present) > 1
    assert [a["label"] for a in annotations] == [CLASS_NAMES[i] for i in present]
    for annotation, class_id in zip(annotations, present):
        mask = np.asarray(annotation["mask"])
        assert mask.shape == (70, 100)
        # the pipeline runs the same weights, processor and forward on one image in this process: the same argmax
        assert np.array_equal(mask == 255, expected == class_id)
