"""Fine-tuning recipes as data: a `Recipe` dataclass and YAML files named after what they reproduce.

`recipes/*.yaml` hold the published ImageNet-S recipes (mmsegmentation `fcn_*_3600_imagenets919`) and the CPU demo.
Every field can be overridden: `load_recipe("mae-base-pretrained", {"lr": 1e-4, "subset": "300"})`, from a YAML file
(`load_recipe("my.yaml")`, or overrides read with `read_overrides("my.yaml")`) or from the command line
(`add_recipe_arguments` + `overrides_from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagenets_hf.data.masks import SUBSETS, num_labels

RECIPES_DIR = Path(__file__).parent / "recipes"
PIPELINES = ("mmseg", "imagenetsegmodel")
HEADS = ("fcn", "linear")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class Recipe:
    """Everything one fine-tuning run needs. Defaults are the published ImageNet-S919 MAE ViT-B/16 recipe."""

    name: str = "custom"
    description: str = ""
    # -- data
    data_dir: str = "ImageNetS919"
    subset: str = "919"  # "50" | "300" | "919" (num_labels 51/301/920) or "mini" (num_labels from the class list)
    synset_words: str | None = None  # class names file; default <data_dir>/LOC_synset_mapping.txt when present
    pipeline: str = "mmseg"  # training augmentation: "mmseg" (published) or "imagenetsegmodel"
    crop_size: int = 224
    resize_scale: list[int] = field(default_factory=lambda: [1024, 256])  # (long, short) before the random ratio
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric_distortion: bool = True
    eval_short_side: int = 256
    eval_max_long_side: int = 1024
    num_workers: int = 4
    # -- model
    encoder_name: str = "vit_base_patch16_224"
    encoder_kwargs: dict = field(default_factory=dict)  # timm VisionTransformer overrides (tiny demo models)
    head: str = "fcn"  # ViTFCNConfig preset: "fcn" (mmseg) or "linear" (ImageNetSegModel)
    model_kwargs: dict = field(default_factory=dict)  # further ViTFCNConfig overrides
    drop_path_rate: float = 0.1
    pretrained: str | None = None  # checkpoint file or Hub id for the encoder; None trains from scratch
    pretrained_allow_partial: bool = False  # load a checkpoint that does not cover the whole encoder
    pretrained_key: str | None = None  # sub-dict of the checkpoint ("teacher" by default where both exist, "student")
    # -- optimisation
    lr: float = 5e-4
    layer_decay: float = 0.60
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    no_weight_decay_tokens: bool = True  # no weight decay on cls_token / pos_embed (see optim.py)
    grad_clip: float | None = None
    warmup_iters: int = 180
    warmup_ratio: float = 1e-6
    min_lr: float = 1e-6
    max_iters: int = 3600
    global_batch_size: int = 256
    per_device_batch_size: int = 32
    # -- runtime
    mixed_precision: str = "fp16"
    compile: bool = False
    seed: int = 0
    val_interval: int = 360
    eval_batch_size: int = 8
    checkpoint_interval: int = 360
    checkpoints_total_limit: int = 2
    log_interval: int = 10
    output_dir: str = "outputs/custom"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "recipe") -> None:
        """Check value ranges and choices; raise ValueError naming `source` and the field."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"{source}: field {name!r} {why} (got {getattr(self, name)!r})")

        self.subset = str(self.subset)
        if self.subset not in SUBSETS and self.subset != "mini":
            fail("subset", f"must be one of {', '.join(SUBSETS)} or 'mini'")
        if self.pipeline not in PIPELINES:
            fail("pipeline", f"must be one of {PIPELINES}")
        if self.head not in HEADS:
            fail("head", f"must be one of {HEADS}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            fail("mixed_precision", f"must be one of {MIXED_PRECISIONS}")
        if len(self.resize_scale) != 2 or len(self.ratio_range) != 2 or len(self.betas) != 2:
            fail("resize_scale", "resize_scale, ratio_range and betas must hold two numbers each")
        if not 0 < self.cat_max_ratio <= 1:
            fail("cat_max_ratio", "must lie in (0, 1]")
        for name in ("crop_size", "max_iters", "global_batch_size", "per_device_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("val_interval", "checkpoint_interval", "log_interval", "warmup_iters", "num_workers"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.warmup_iters >= self.max_iters:
            fail("warmup_iters", f"must be smaller than max_iters ({self.max_iters})")
        if self.global_batch_size % self.per_device_batch_size:
            fail("global_batch_size", f"must be a multiple of per_device_batch_size ({self.per_device_batch_size})")
        if not 0 < self.layer_decay <= 1:
            fail("layer_decay", "must lie in (0, 1]")

    @property
    def num_labels(self) -> int | None:
        """Labels with "other" for an ImageNet-S subset (919 -> 920); None for "mini" (read from the data)."""
        return num_labels(self.subset) if self.subset in SUBSETS else None

    def gradient_accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimizer step so that per_device_batch_size x processes x steps = global_batch_size."""
        per_step = self.per_device_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise ValueError(
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
    """Names of the recipes shipped in `recipes/`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Recipe)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the field's type (YAML reads "1e-4" as a string, "5" as an int)."""
    types = _field_types()
    if name not in types:
        known = ", ".join(f.name for f in dataclasses.fields(Recipe))
        raise ValueError(f"{source}: unknown recipe field {name!r}; known fields: {known}")
    hint = types[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise ValueError(f"{source}: field {name!r} cannot be null")
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if origin is float:
            return float(value)
        if origin is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if origin is str:
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            (item,) = typing.get_args(base) or (None,)
            return [item(v) if item is not None else v for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: field {name!r} expects {base}, got {value!r}") from err
    return value


def read_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of recipe fields (a full recipe or a few overrides)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of recipe fields, got {type(data).__name__}")
    return {str(k): _coerce(str(k), v, str(path)) for k, v in data.items()}


def load_recipe(name_or_yaml: str | os.PathLike = "demo", overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a shipped recipe by name (`available_recipes()`) or a YAML file, then apply `overrides` (field -> value).

    Unknown fields and wrong types raise ValueError naming the file and the field.
    """
    candidate = Path(name_or_yaml)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        values = read_overrides(candidate)
        source = str(candidate)
    else:
        path = RECIPES_DIR / f"{name_or_yaml}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {name_or_yaml!r}; available: {', '.join(available_recipes())}")
        values = read_overrides(path)
        source = str(path)
    for key, value in (overrides or {}).items():
        values[key] = _coerce(key, value, "overrides")
        source = f"{source} + overrides"
    recipe = Recipe.__new__(Recipe)
    for f in dataclasses.fields(Recipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        setattr(recipe, f.name, values.get(f.name, default))
    recipe.validate(source)
    return recipe


# -- command line -----------------------------------------------------------------------------------------------------


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--recipe`, `--config FILE`, `--set KEY=VALUE` and one `--field-name VALUE` flag per Recipe field."""
    parser.add_argument(
        "--recipe",
        default="demo",
        help=f"recipe name ({', '.join(available_recipes())}) or a YAML file (default: demo)",
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of overrides")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one field (YAML value)"
    )
    group = parser.add_argument_group("recipe fields (override the recipe)")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(
            flag, dest=f"recipe_{f.name}", default=None, metavar="VALUE", help=f"({_field_types()[f.name]})"
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides in precedence order: `--config` files, then per-field flags, then `--set`."""
    overrides: dict[str, Any] = {}
    for path in args.config:
        overrides.update(read_overrides(path))
    for f in dataclasses.fields(Recipe):
        value = getattr(args, f"recipe_{f.name}", None)
        if value is not None:
            overrides[f.name] = _coerce(
                f.name, yaml.safe_load(value) if _is_structured(f.name) else value, "--" + f.name
            )
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        overrides[key] = _coerce(key, yaml.safe_load(value), f"--set {key}")
    return overrides


def _is_structured(name: str) -> bool:
    hint = _field_types()[name]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if typing.get_args(hint) else hint
    return (typing.get_origin(base) or base) in (list, dict)
