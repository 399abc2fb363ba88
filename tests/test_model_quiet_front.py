"""The standard Hugging Face front is quiet: with the package imported (`import imagenets_hf` is enough), or without
it through `trust_remote_code=True`, loading a saved folder with the Auto classes and running
`pipeline("image-segmentation", model=folder)` asks nothing (no "run the custom code? [y/N]"), logs no warning or
error (transformers, huggingface_hub, any other logger), raises no Python warning and prints nothing else, and the
pipeline returns labelled masks.

Each case runs in a fresh interpreter: transformers logs several of these messages with `warning_once`, so in the
test process an earlier test would already have used them up, and registration by import order can only be seen from
a clean start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

CLASS_NAMES = ["other", "goldfish", "shark", "hen", "ostrich"]
TINY_ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
IMAGE_SIZE = (70, 100)  # height, width

# What the child process runs: `SETUP` (how the package is, or is not, imported), then the standard calls, with
# input(), warnings and the loggers recorded; one JSON line on stdout.
PROBE = """
import builtins, json, logging, sys, warnings

folder, setup, trust = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
prompts = []
builtins.input = lambda prompt="": prompts.append(str(prompt)) or "n"  # answered "no", and recorded
records = []

class Recorder(logging.Handler):
    def emit(self, record):
        records.append(f"{record.levelname} {record.name}: {record.getMessage()[:300]}")

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exec(setup)
    import numpy as np
    from PIL import Image
    import huggingface_hub.utils.logging
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    transformers.utils.logging.set_verbosity_warning()  # whatever the environment says: warnings are emitted
    huggingface_hub.utils.logging.set_verbosity_warning()
    for name in ("", "transformers", "huggingface_hub"):  # transformers' logger does not propagate to the root
        logging.getLogger(name).addHandler(Recorder(level=logging.WARNING))

    kwargs = {"trust_remote_code": True} if trust else {}
    config = AutoConfig.from_pretrained(folder, **kwargs)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, **kwargs)
    processor = AutoImageProcessor.from_pretrained(folder, **kwargs)
    segmenter = pipeline("image-segmentation", model=folder, **kwargs)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    annotations = segmenter(image)

masks = [np.asarray(a["mask"]) for a in annotations]
print(json.dumps({
    "classes": [type(x).__module__ + "." + type(x).__name__ for x in (config, model, processor, segmenter.model)],
    "labels": [a["label"] for a in annotations],
    "mask_modes": [a["mask"].mode for a in annotations],
    "mask_shapes": [list(m.shape) for m in masks],
    "mask_values": sorted({int(v) for m in masks for v in np.unique(m)}),
    "coverage": np.sum([m == 255 for m in masks], axis=0).tolist(),
    "prompts": prompts,
    "records": records,
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "imagenets_hf_imported": sorted(n for n, m in sys.modules.items() if n.startswith("imagenets_hf") and m is not None),
}))
"""

# How the package is brought in. "without the package" blocks it (it is installed editable) and needs
# trust_remote_code=True.
SETUPS = {
    "import imagenets_hf": ("import imagenets_hf", False),
    "import imagenets_hf.model": ("import imagenets_hf.model", False),
    "transformers first, then import imagenets_hf": ("import transformers\nimport imagenets_hf", False),
    "without the package, trust_remote_code=True": ('sys.modules["imagenets_hf"] = None', True),
}

# A tqdm progress bar segment ("Loading weights: 100%|####| 38/38 [00:00<00:00, ...]"): not a message.
PROGRESS_BAR = re.compile(r"^[^:\n]{0,80}: *\d{1,3}%\|[^|]*\| *\d+/\d+ \[[^\]]*\]$")


def child_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    env = {k: v for k, v in env.items() if not k.startswith("TRANSFORMERS_")}  # verbosity / advisory switches
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    return env


def messages_besides_progress_bars(stderr: str) -> list[str]:
    segments = (segment.strip() for segment in re.split(r"[\r\n]", stderr))
    return [segment for segment in segments if segment and not PROGRESS_BAR.match(segment)]


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny random model and its image processor, saved as `save_pretrained` does (weights, code, auto_map)."""
    folder = tmp_path_factory.mktemp("quiet_front") / "model"
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        encoder_kwargs=TINY_ENCODER,
        drop_path_rate=0.0,
        classifier_init_std=1.0,  # a classifier far from zero, so that the prediction holds several classes
        id2label=dict(enumerate(CLASS_NAMES)),
    )
    ViTFCNForSemanticSegmentation(config).eval().save_pretrained(folder)
    ViTFCNImageProcessor().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]  # the case that used to prompt
    return folder


@pytest.mark.parametrize("setup", list(SETUPS))
def test_auto_classes_and_pipeline_load_without_prompt_warning_or_error(saved_folder, tmp_path, setup):
    code, trust = SETUPS[setup]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(saved_folder), code, "1" if trust else "0"],
        cwd=tmp_path,
        env=child_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    *other_output, last_line = result.stdout.strip().splitlines() or [""]
    report = json.loads(last_line)

    # quiet: no question asked, nothing logged at warning level or above, no Python warning, nothing printed
    assert report["prompts"] == []
    assert report["records"] == []
    assert report["warnings"] == []
    assert other_output == []
    assert messages_besides_progress_bars(result.stderr) == []
    for text in (result.stdout, result.stderr):
        assert "[y/N]" not in text and "not supported" not in text and "backend" not in text

    # the classes are the local ones with the package, the folder's copies without it
    origin = "transformers_modules." if trust else "imagenets_hf.model."
    expected_names = ["ViTFCNConfig", "ViTFCNForSemanticSegmentation", "ViTFCNImageProcessor"]
    classes = report["classes"]
    assert [name.rsplit(".", 1)[1] for name in classes] == [*expected_names, "ViTFCNForSemanticSegmentation"]
    assert all(name.startswith(origin) for name in classes), classes
    if trust:
        assert report["imagenets_hf_imported"] == []

    # labelled masks: one per class found, named from the config, full-size binary L images partitioning the image
    labels = report["labels"]
    assert len(labels) >= 2 and len(set(labels)) == len(labels)
    assert set(labels) <= set(CLASS_NAMES)
    assert labels == sorted(labels, key=CLASS_NAMES.index)  # in class-id order
    assert set(report["mask_modes"]) == {"L"}
    assert all(shape == list(IMAGE_SIZE) for shape in report["mask_shapes"])
    assert report["mask_values"] == [0, 255]
    assert {value for row in report["coverage"] for value in row} == {1}  # each pixel in exactly one mask


def test_import_imagenets_hf_stays_cheap_and_registers_when_transformers_comes(saved_folder, tmp_path):
    """`import imagenets_hf` imports neither torch nor transformers; the registration happens on `import
    transformers` (the Auto classes then know the config without a folder being loaded), also after an availability
    probe (`importlib.util.find_spec`) of transformers, and the import hook leaves no trace."""
    script = textwrap.dedent(
        """
        import importlib.util, json, sys
        import imagenets_hf
        heavy = sorted(name for name in ("torch", "transformers", "timm") if name in sys.modules)
        assert importlib.util.find_spec("transformers") is not None  # an availability probe (accelerate's) first
        import transformers
        from transformers import AutoConfig, AutoModelForSemanticSegmentation
        config = AutoConfig.for_model("imagenets_vit_fcn")
        print(json.dumps({"heavy_after_import": heavy, "config": type(config).__module__,
                          "model": AutoModelForSemanticSegmentation._model_mapping[type(config)].__module__,
                          "loader": type(transformers.__spec__.loader).__name__,
                          "hooks": [type(f).__name__ for f in sys.meta_path if "Transformers" in type(f).__name__]}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=child_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy_after_import"] == []
    assert report["config"] == "imagenets_hf.model.configuration_vit_fcn"
    assert report["model"] == "imagenets_hf.model.modeling_vit_fcn"
    assert report["loader"] == "SourceFileLoader" and report["hooks"] == []  # the hook put things back and left
    assert messages_besides_progress_bars(result.stderr) == []
