"""Fine-tuning recipes as data: a `Recipe` dataclass and YAML files named after what they reproduce.

The published defaults live once, in the `Recipe` dataclass (mmsegmentation's `fcn_*_3600_imagenets919`);
`recipes/*.yaml` hold the published ImageNet-S recipes, each stating only its own row of the published table, and the
CPU demo; `recipes/unpublished/*.yaml` hold recipes for other encoders (DINOv2) that no one has reported on ImageNet-S.
Every field can be overridden: `load_recipe("mae-base-pretrained", {"lr": 1e-4, "subset": "300"})`, from a YAML file
(`load_recipe("my.yaml")`, or overrides read with `read_overrides("my.yaml")`) or from the command line
(`add_recipe_arguments` + `recipe_from_args`). Each field's help text and choices live in its `metadata`; a bad value
raises `RecipeError` naming where it came from (`--max-iters 2`, `--set ...`, a `--config` file, `recipe demo`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from imagenets_hf.data.masks import SUBSETS, num_labels

RECIPES_DIR = Path(__file__).parent / "recipes"
UNPUBLISHED_RECIPES_DIR = RECIPES_DIR / "unpublished"
PIPELINES = ("mmseg", "imagenetsegmodel")
# The model's heads (imagenets_hf.model.configuration_vit_fcn.PRESETS), named here so that reading a recipe does not
# import torch and transformers; tests/test_train_recipe_deltas.py holds the two equal.
HEADS = ("fcn", "linear", "multilayer")
DROP_PATH_BRANCHES = ("both", "mlp")  # the model's too (configuration_vit_fcn.DROP_PATH_BRANCHES), held equal by a test
MIXED_PRECISIONS = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "none")  # accelerate's trackers a run may log to (`report_to`)
SEMI_METHODS = ("none", "unimatch")
SEMI_FINAL_MODELS = ("teacher", "student")
PSEUDO_LABEL_CLASSES = ("all", "image_class")
OVERRIDES_ORIGIN = "overrides"  # where a value passed to `load_recipe(..., overrides)` without an origin came from
BASE_KEY = "base"  # in a recipe file: the shipped recipe it starts from (see read_overrides)


class RecipeError(ValueError):
    """A recipe name, field or value that cannot be used; the message says where the value came from."""


class RecipeFileNotFoundError(RecipeError, FileNotFoundError):
    """A recipe or overrides YAML file that does not exist."""


def _option(default: Any = dataclasses.MISSING, *, help: str, choices: tuple[str, ...] = (), factory=None) -> Any:
    """A Recipe field with its help text (shown by `--help`) and, for a closed set of values, its choices."""
    metadata = {"help": help, "choices": tuple(choices)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Recipe:
    """Everything one fine-tuning run needs. Defaults are the published ImageNet-S919 MAE ViT-B/16 recipe: the one
    place the published schedule, optimiser, pipeline and data are written (recipe files state their differences)."""

    name: str = _option("custom", help="run name: progress bar label, TensorBoard run and model card title")
    description: str = _option("", help="one-line description for the model card")
    # -- data
    data_dir: str = _option("ImageNetS919", help="prepared ImageNet-S folder (official layout)")
    subset: str = _option(
        "919",
        help="ImageNet-S subset: 50, 300, 919 (51, 301, 920 labels) or mini (labels from the data)",
        choices=(*SUBSETS, "mini"),
    )
    synset_words: str | None = _option(
        None, help="class names file (LOC_synset_mapping.txt); null: <data_dir>/LOC_synset_mapping.txt if present"
    )
    pipeline: str = _option(
        "mmseg", help="training augmentation: mmseg (published) or imagenetsegmodel", choices=PIPELINES
    )
    crop_size: int = _option(224, help="side of the square training crops, in pixels")
    resize_scale: list[int] = _option(
        help="[long, short] size images are resized to (keeping the ratio) before the random ratio",
        factory=lambda: [1024, 256],
    )
    ratio_range: list[float] = _option(
        help="[low, high] of the random factor on resize_scale", factory=lambda: [0.5, 2.0]
    )
    cat_max_ratio: float = _option(0.75, help="redraw crops whose largest class covers more than this (0 < x <= 1)")
    flip_prob: float = _option(0.5, help="probability of a horizontal flip")
    photometric_distortion: bool = _option(True, help="mmseg's random brightness, contrast, saturation and hue")
    eval_short_side: int = _option(256, help="evaluation: resize the short side to this many pixels")
    eval_max_long_side: int = _option(1024, help="evaluation: at most this many pixels on the long side")
    num_workers: int = _option(4, help="DataLoader worker processes decoding and augmenting training samples")
    augment_on_device: bool = _option(
        False,
        help="decode train-semi once into a uint8 store and augment whole batches on the training device "
        "(no DataLoader workers)",
    )
    # -- unlabelled data (semi-supervised training; imagenets_hf/training/unlabelled_data.py)
    unlabelled_dirs: list[str] = _option(
        help="folders of unlabelled images, scanned recursively; []: <data_dir>/train (ImageNet-S's unlabelled split)",
        factory=list,
    )
    unlabelled_global_batch_size: int = _option(
        256,
        help="unlabelled images per optimizer step over all processes (a multiple of processes x accumulation)",
    )
    labels_per_class: int | None = _option(
        None,
        help="label budget: keep k labelled train-semi images a class (chosen by labels_seed; the others join the "
        "unlabelled pool without their masks); null: all",
    )
    labels_seed: int | None = _option(None, help="seed choosing the label budget's images; null: the recipe's seed")
    strong_color_jitter: list[float] = _option(
        help="strong views: colour jitter [brightness, contrast, saturation, hue] (torchvision ColorJitter)",
        factory=lambda: [0.5, 0.5, 0.5, 0.25],
    )
    strong_color_jitter_prob: float = _option(0.8, help="strong views: probability of the colour jitter")
    strong_grayscale_prob: float = _option(0.2, help="strong views: probability of grayscale")
    strong_blur_prob: float = _option(0.5, help="strong views: probability of a Gaussian blur")
    strong_blur_sigma: list[float] = _option(
        help="strong views: [low, high] of the blur's sigma, in pixels", factory=lambda: [0.1, 2.0]
    )
    cutmix_prob: float = _option(0.5, help="strong views: probability of a CutMix box (UniMatch V2's box law)")
    skip_bad_unlabelled: bool = _option(
        False, help="skip (and count) unlabelled files that cannot be decoded instead of stopping the run"
    )
    # -- model
    encoder_name: str = _option(
        "vit_base_patch16_224",
        help="timm ViT-family encoder, e.g. vit_small_patch16_224, vit_small_patch14_reg4_dinov2, "
        "vit_small_patch16_dinov3, eva02_small_patch14_224",
    )
    encoder_kwargs: dict = _option(
        help="timm model overrides, e.g. {depth: 4, embed_dim: 96} (tiny demo models)", factory=dict
    )
    head: str = _option(
        "fcn",
        help="decode head: fcn (mmsegmentation), linear (ImageNetSegModel) or multilayer (DINOv2's 4-layer linear head)",
        choices=HEADS,
    )
    model_kwargs: dict = _option(
        help="further ViTFCNConfig overrides, e.g. {num_convs: 1} or {out_indices: [8, 9, 10, 11]}", factory=dict
    )
    drop_path_rate: float = _option(0.1, help="stochastic depth rate of the encoder")
    drop_path_branches: str = _option(
        "mlp",
        help="residual branches stochastic depth drops: mlp (mmsegmentation's ViT, the published runs) or both "
        "(attention and MLP: timm, DINOv2)",
        choices=DROP_PATH_BRANCHES,
    )
    pretrained: str | None = _option(
        None, help="encoder checkpoint: file, folder, URL or Hub id; null: train from scratch"
    )
    pretrained_allow_partial: bool = _option(False, help="load a checkpoint that does not cover the whole encoder")
    pretrained_key: str | None = _option(
        None, help="sub-dict of the checkpoint holding the weights, e.g. student; null: teacher where both exist"
    )
    # -- optimisation
    lr: float = _option(5e-4, help="peak learning rate of the head; block i gets lr x layer_decay^(depth - i)")
    layer_decay: float = _option(0.60, help="layer-wise learning rate decay (0 < x <= 1; 1: same lr everywhere)")
    weight_decay: float = _option(0.05, help="AdamW weight decay (none on biases and other 1-D parameters)")
    betas: list[float] = _option(help="AdamW [beta1, beta2]", factory=lambda: [0.9, 0.999])
    eps: float = _option(1e-8, help="AdamW epsilon")
    no_weight_decay_tokens: bool = _option(
        False,
        help="no weight decay on cls_token, pos_embed and reg_token; false decays them as the published mmseg runs "
        "did (see optim.py)",
    )
    grad_clip: float | None = _option(None, help="clip the gradient norm to this; null: no clipping")
    warmup_iters: int = _option(180, help="linear warmup iterations (fewer than max_iters)")
    warmup_ratio: float = _option(1e-6, help="the warmup starts at lr x warmup_ratio")
    min_lr: float = _option(1e-6, help="learning rate at the end of the cosine schedule")
    max_iters: int = _option(3600, help="training iterations (optimizer steps over a global batch)")
    global_batch_size: int = _option(256, help="images per optimizer step over all processes")
    per_device_batch_size: int = _option(
        32, help="images per process and micro-batch; gradient accumulation makes up the global batch"
    )
    # -- semi-supervised training (UniMatch V2; see docs/semi_supervised.md)
    semi_supervised: str = _option(
        "none",
        help="none: train on the labelled images alone; unimatch: add an unlabelled batch to every iteration, "
        "pseudo-labelled by an EMA teacher (UniMatch V2)",
        choices=SEMI_METHODS,
    )
    confidence_threshold: float = _option(
        0.95, help="semi: the student learns the teacher's pixels whose softmax maximum is at least this (0 to 1)"
    )
    ema_momentum: float = _option(
        0.996, help="semi: teacher = EMA of the student with momentum min(1 - 1/(t + 1), this) at iteration t (0 to 1)"
    )
    supervised_loss_weight: float = _option(0.5, help="semi: weight of the labelled loss (UniMatch V2: 0.5)")
    unsupervised_loss_weight: float = _option(
        0.5, help="semi: weight of the mean of the two strong views' losses (UniMatch V2: 0.5)"
    )
    unsupervised_start_iter: int = _option(
        0,
        help="semi: iterations trained on the labelled images alone before the unlabelled stream starts (a burn-in for "
        "models trained from scratch, whose first pseudo-labels are noise; UniMatch V2 starts at once: 0)",
    )
    feature_dropout: float = _option(
        0.5,
        help="semi: fraction of the unlabelled image pairs whose two strong views get complementary channel dropout "
        "on the features the head reads (0: none)",
    )
    pseudo_label_classes: str = _option(
        "all",
        help="semi: all: the pseudo-label is the teacher's argmax (UniMatch V2); image_class: the teacher decides object "
        "against other, the image's folder which class the object is (ImageNet-S train/<wnid>/: the ImageNet class "
        "every unlabelled image has), for images whose folder names a class",
        choices=PSEUDO_LABEL_CLASSES,
    )
    semi_final_model: str = _option(
        "teacher",
        help="semi: the model saved and evaluated at the end (both are evaluated): teacher (the EMA) or student",
        choices=SEMI_FINAL_MODELS,
    )
    # -- runtime
    mixed_precision: str = _option(
        "fp16", help="no, fp16 (autocast + gradient scaler, GPU only) or bf16", choices=MIXED_PRECISIONS
    )
    tf32: bool = _option(True, help="float32 matmuls and convolutions on CUDA GPUs from Ampere on use TF32 cores")
    compile: bool = _option(False, help="compile the model with torch.compile (inductor)")
    deterministic: bool = _option(
        False,
        help="deterministic algorithms (torch, cuDNN, cuBLAS workspace): on a GPU, a resumed run then equals an "
        "uninterrupted one bit for bit (slower; the CPU is deterministic anyway)",
    )
    seed: int = _option(0, help="random seed: initial weights, sample order and augmentation")
    val_interval: int = _option(360, help="evaluate on validation every N iterations (0: only at the end)")
    eval_batch_size: int = _option(8, help="images per evaluation batch")
    checkpoint_interval: int = _option(360, help="save a checkpoint every N iterations (0: none)")
    checkpoints_total_limit: int = _option(2, help="keep this many newest checkpoints")
    log_interval: int = _option(10, help="log loss and lr to the tracker every N iterations (0: never)")
    report_to: str = _option(
        "tensorboard",
        help="experiment tracker: tensorboard (<output_dir>/logs), wandb (the wandb extra; its files in "
        "<output_dir>/logs/wandb) or none",
        choices=TRACKERS,
    )
    worker_timeout: float = _option(
        300.0, help="seconds a training batch from the DataLoader workers may take before the run stops with a message"
    )
    collective_timeout: float = _option(
        1800.0, help="seconds a collective between processes (NCCL, gloo) may wait before the run stops"
    )
    prepare_timeout: float = _option(
        7200.0,
        help="seconds the other processes wait for the main process to build the data's Arrow cache (or fetch the "
        "pretrained weights) before stopping",
    )
    output_dir: str = _option("outputs/custom", help="where the model, recipe.yaml, checkpoints and logs go")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, origins: dict[str, str] | None = None, base: str = "Recipe") -> None:
        """Check choices and value ranges; raise RecipeError naming the bad field and where its value came from:
        `origins` maps a field to what set it (`--max-iters 2`, a `--config` file), the others come from `base`."""
        origins = origins or {}

        def fail(rule: str, *names: str) -> NoReturn:
            # Lead with what the user set (a flag, a file), else the recipe; name the origin of each other value.
            lead = next((origins[name] for name in names if name in origins), base)
            shown = []
            for name in names:
                where = origins.get(name, base)
                value = getattr(self, name)
                shown.append(f"{name} ({value!r})" if where == lead else f"{name} ({value!r}, from {where})")
            raise RecipeError(f"{lead}: {rule.format(*shown)}")

        self.subset = str(self.subset)
        for f in dataclasses.fields(self):
            if f.metadata.get("choices") and getattr(self, f.name) not in f.metadata["choices"]:
                fail(f"{{}} must be one of {', '.join(f.metadata['choices'])}", f.name)
        for name in ("resize_scale", "ratio_range", "betas"):
            if len(getattr(self, name)) != 2:
                fail("{} must hold two numbers", name)
        if not 0 < self.cat_max_ratio <= 1:
            fail("{} must lie in (0, 1]", "cat_max_ratio")
        for name in ("crop_size", "max_iters", "global_batch_size", "per_device_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                fail("{} must be at least 1", name)
        for name in ("val_interval", "checkpoint_interval", "log_interval", "warmup_iters", "num_workers"):
            if getattr(self, name) < 0:
                fail("{} must not be negative", name)
        for name in ("worker_timeout", "collective_timeout", "prepare_timeout"):
            if not getattr(self, name) > 0:
                fail("{} must be positive (seconds)", name)
        if self.warmup_iters >= self.max_iters:
            fail("{} must be smaller than {}", "warmup_iters", "max_iters")
        if self.global_batch_size % self.per_device_batch_size:
            fail("{} must be a multiple of {}", "global_batch_size", "per_device_batch_size")
        if not 0 < self.layer_decay <= 1:
            fail("{} must lie in (0, 1]", "layer_decay")
        self._validate_unlabelled(fail)
        self._validate_semi(fail)

    def _validate_unlabelled(self, fail) -> None:
        if self.unlabelled_global_batch_size < 1:
            fail("{} must be at least 1", "unlabelled_global_batch_size")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            fail("{} must be at least 1 (or null: all labelled images)", "labels_per_class")
        for name in ("strong_color_jitter_prob", "strong_grayscale_prob", "strong_blur_prob", "cutmix_prob"):
            if not 0 <= getattr(self, name) <= 1:
                fail("{} must lie in [0, 1]", name)
        jitter = self.strong_color_jitter
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            fail("{} must hold four numbers >= 0 (brightness, contrast, saturation, hue <= 0.5)", "strong_color_jitter")
        sigma = self.strong_blur_sigma
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            fail("{} must hold two numbers 0 < low <= high", "strong_blur_sigma")

    def _validate_semi(self, fail) -> None:
        for name in ("confidence_threshold", "feature_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                fail("{} must lie in [0, 1]", name)
        if not 0 <= self.ema_momentum < 1:
            fail("{} must lie in [0, 1)", "ema_momentum")
        if self.unsupervised_start_iter < 0:
            fail("{} must not be negative", "unsupervised_start_iter")
        if self.semi_supervised != "none" and self.unsupervised_start_iter >= self.max_iters:
            fail(
                "{} must be smaller than {} (the unlabelled images would never be used)",
                "unsupervised_start_iter",
                "max_iters",
            )
        for name in ("supervised_loss_weight", "unsupervised_loss_weight"):
            if getattr(self, name) < 0:
                fail("{} must not be negative", name)
        if self.semi_supervised != "none" and self.augment_on_device:
            # The device path decodes train-semi into a store once; the unlabelled pool (up to 1.2 million images)
            # does not fit one, so its batches come from DataLoader workers only.
            fail(
                "{} cannot go with {}: the unlabelled images come from DataLoader workers (pass "
                "--augment-on-device false)",
                "augment_on_device",
                "semi_supervised",
            )

    @property
    def num_labels(self) -> int | None:
        """Labels with "other" for an ImageNet-S subset (919 -> 920); None for "mini" (read from the data)."""
        return num_labels(self.subset) if self.subset in SUBSETS else None

    def gradient_accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimizer step so that per_device_batch_size x processes x steps = global_batch_size."""
        per_step = self.per_device_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise RecipeError(
                f"recipe {self.name!r}: global batch {self.global_batch_size} is not a multiple of "
                f"per-device batch {self.per_device_batch_size} x {num_processes} processes = {per_step}; "
                "change --per-device-batch-size or the number of processes"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved recipe as YAML (loadable again with `load_recipe(path)`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


def available_recipes() -> list[str]:
    """Names of the recipes shipped in `recipes/`: the published ones and the demo."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def unpublished_recipes() -> list[str]:
    """Names of the recipes shipped in `recipes/unpublished/`: other encoders, no ImageNet-S result reported."""
    return sorted(p.stem for p in UNPUBLISHED_RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path | None:
    """The YAML file of a shipped recipe (published or unpublished), None if there is none of that name."""
    for folder in (RECIPES_DIR, UNPUBLISHED_RECIPES_DIR):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    return None


def _shipped_names() -> str:
    return f"{', '.join(available_recipes())}; not published for ImageNet-S: {', '.join(unpublished_recipes())}"


# -- field types: converting values and saying what is expected ------------------------------------------------------

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a YAML mapping"}
_LIST_WORDS = {int: "a list of integers", float: "a list of numbers"}
_METAVARS = {bool: "BOOL", int: "INT", float: "NUMBER", str: "TEXT", list: "LIST", dict: "MAPPING"}


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(Recipe)


def _field_type(name: str) -> tuple[type, type | None, bool]:
    """(base type, list item type or None, whether null is allowed) of a Recipe field."""
    hint = _type_hints()[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    items = typing.get_args(base)
    return typing.get_origin(base) or base, (items[0] if items else None), optional


def type_words(name: str) -> str:
    """What a field takes, in words: "a number", "a list of integers", "text or null", ..."""
    base, item, optional = _field_type(name)
    words = _LIST_WORDS.get(item, "a YAML list") if base is list else _TYPE_WORDS[base]
    return f"{words} or null" if optional else words


def _check_known(name: str, origin: str) -> None:
    known = [f.name for f in dataclasses.fields(Recipe)]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{origin}: unknown recipe field {name!r}{hint}")


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Convert a YAML/CLI value to the field's type (YAML reads "1e-4" as a string, "5" as an int)."""
    _check_known(name, origin)
    base, item, optional = _field_type(name)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise RecipeError(f"{origin}: field {name!r} cannot be null; it expects {type_words(name)}")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if base is float:
            return float(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is str:
            return str(value)
        if base is list:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return [item(v) if item is not None else v for v in value]
        if base is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError, yaml.YAMLError) as err:
        raise RecipeError(f"{origin}: field {name!r} expects {type_words(name)}, got {value!r}") from err
    return value


def read_overrides(path: str | os.PathLike, origin: str | None = None, allow_base: bool = False) -> dict[str, Any]:
    """Read a YAML mapping of recipe fields (a full recipe or a few overrides); errors name `origin` (the path).

    With `allow_base` (recipe files, not `--config` overrides), a `base: <shipped recipe>` key starts from that
    recipe's values, so that a variant (e.g. `demo-semi`) states only what differs from it."""
    path = Path(path)
    origin = origin or str(path)
    if not path.is_file():
        raise RecipeFileNotFoundError(f"no such recipe file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{origin}: not valid YAML ({' '.join(str(err).split())})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping of recipe fields, got {type(data).__name__}")
    values: dict[str, Any] = {}
    if allow_base and BASE_KEY in data:
        base = str(data.pop(BASE_KEY))
        base_path = recipe_path(base)
        if base_path is None or base_path.resolve() == path.resolve():
            raise RecipeError(f"{origin}: {BASE_KEY} {base!r} is not another shipped recipe ({_shipped_names()})")
        values = read_overrides(base_path, f"recipe {base}", allow_base=True)
    values.update({str(k): _coerce(str(k), v, origin) for k, v in data.items()})
    return values


def load_recipe(
    name_or_yaml: str | os.PathLike = "demo",
    overrides: dict[str, Any] | None = None,
    origins: dict[str, str] | None = None,
) -> Recipe:
    """Load a shipped recipe by name (`available_recipes()`) or a YAML file, then apply `overrides` (field -> value).

    `origins` (field -> what set it, e.g. "--max-iters 2") make error messages name the flag or file; overrides
    without one are called "overrides". Unknown fields, wrong types and bad values raise RecipeError.
    """
    candidate = Path(name_or_yaml)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        values = read_overrides(candidate, allow_base=True)
        base = str(candidate)
    else:
        path = recipe_path(str(name_or_yaml))
        if path is None:
            raise RecipeError(f"unknown recipe {str(name_or_yaml)!r}; available: {_shipped_names()} (or a YAML file)")
        base = f"recipe {name_or_yaml}"
        values = read_overrides(path, base, allow_base=True)
    origins = {key: (origins or {}).get(key, OVERRIDES_ORIGIN) for key in overrides or {}}
    for key, value in (overrides or {}).items():
        values[key] = _coerce(key, value, origins[key])
    recipe = Recipe.__new__(Recipe)
    for f in dataclasses.fields(Recipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        setattr(recipe, f.name, values.get(f.name, default))
    recipe.validate(origins, base)
    return recipe


# -- command line -----------------------------------------------------------------------------------------------------


def add_recipe_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add `--recipe`, `--config FILE`, `--set KEY=VALUE` and one `--field-name VALUE` flag per Recipe field (but
    the fields in `exclude`, which the script sets itself)."""
    parser.add_argument(
        "--recipe",
        default="demo",
        help=f"recipe name ({_shipped_names()}) or a YAML file (default: demo)",
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of overrides")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one field (YAML value)"
    )
    group = parser.add_argument_group(
        "recipe fields (override the recipe; LIST and MAPPING values are YAML, null unsets an optional field)"
    )
    for f in dataclasses.fields(Recipe):
        if f.name in exclude:
            continue
        choices = f.metadata["choices"]
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"recipe_{f.name}",
            default=None,
            metavar="{" + ",".join(choices) + "}" if choices else _METAVARS[_field_type(f.name)[0]],
            help=f.metadata["help"],
        )


def _overrides_and_origins(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Overrides in precedence order (`--config` files, then per-field flags, then `--set`) and what set each."""
    overrides: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for path in args.config:
        origin = f"--config {path}"
        for key, value in read_overrides(path, origin).items():
            overrides[key], origins[key] = value, origin
    for f in dataclasses.fields(Recipe):
        value = getattr(args, f"recipe_{f.name}", None)
        if value is not None:
            origin = f"--{f.name.replace('_', '-')} {value}"
            overrides[f.name] = _coerce(f.name, value, origin)
            origins[f.name] = origin
    for item in args.set:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected KEY=VALUE, e.g. --set max_iters=1000")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        origin = f"--set {item}"
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value  # not YAML: the field's own conversion says what it expects
        overrides[key] = _coerce(key, parsed, origin)
        origins[key] = origin
    return overrides, origins


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides in precedence order: `--config` files, then per-field flags, then `--set`."""
    return _overrides_and_origins(args)[0]


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe `--recipe` names with the command line's overrides; errors name the flag or file that set a value."""
    overrides, origins = _overrides_and_origins(args)
    return load_recipe(args.recipe, overrides, origins)
