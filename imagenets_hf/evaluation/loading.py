"""Load what evaluation runs: a saved model (folder, Hub id or training checkpoint) with its image processor, and a
dataset's class names. Inputs are checked first, so a mistyped folder is one line before anything heavy loads.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from imagenets_hf.evaluation.modes import InferenceMode


def load_model_and_processor(
    model_name_or_path: str | os.PathLike,
    device: torch.device | str | None = None,
    names: list[str] | None = None,
):
    """A saved `ViTFCNForSemanticSegmentation` (folder or Hub id) in float32 and its image processor (the default
    evaluation processor, with a warning, when none was saved). A training checkpoint folder
    (`<run>/checkpoints/checkpoint_<N>`) gives its model as the run's recipe builds it (see `load_checkpoint_model`;
    `names` are its class names, by default those of the run's data folder)."""
    from imagenets_hf.model import ViTFCNForSemanticSegmentation, ViTFCNImageProcessor
    from imagenets_hf.training.checkpoints import is_checkpoint_folder, load_checkpoint_model

    name = os.fspath(model_name_or_path)
    check_model_location(name)
    if is_checkpoint_folder(name):
        model, processor = load_checkpoint_model(name, names)
        if device is not None:
            model.to(device)
        return model.eval(), processor
    try:
        model = ViTFCNForSemanticSegmentation.from_pretrained(name, dtype=torch.float32)
    except OSError as err:  # transformers' message does not say which model it was loading
        raise OSError(f"{name}: cannot load the model: {' '.join(str(err).split())}") from err
    try:
        processor = ViTFCNImageProcessor.from_pretrained(name)
    except OSError:
        warnings.warn(f"{name}: no image processor saved; using the default evaluation preprocessing", stacklevel=2)
        processor = ViTFCNImageProcessor()
    if device is not None:
        model.to(device)
    return model.eval(), processor


def check_model_location(name: str) -> None:
    """Refuse a model that is neither a saved model folder nor an `owner/name` Hub id before transformers looks it
    up on the Hub (a mistyped local folder would otherwise end in a network error)."""
    from imagenets_hf.model.convert import looks_like_hub_repo_id
    from imagenets_hf.training.checkpoints import is_checkpoint_folder

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not is_checkpoint_folder(path):
            raise FileNotFoundError(
                f"{name}: not a saved model folder (no config.json); give the folder that finetune.py or "
                "convert_checkpoint.py wrote, or a training checkpoint (<run>/checkpoints/checkpoint_<N>)"
            )
    elif path.exists():
        raise NotADirectoryError(
            f"{name}: a file, not a model folder; give the folder holding config.json and the weights "
            "(convert_checkpoint.py makes one from a checkpoint file)"
        )
    elif not looks_like_hub_repo_id(name):
        raise FileNotFoundError(f"no such model folder: {name}")
    elif not _hub_reachable():
        # A missing local folder such as outputs/demoo has the shape of a Hub id too: say so at once rather than
        # after transformers' retries end in a connection error.
        raise FileNotFoundError(
            f"no such model folder: {name} (and the Hugging Face Hub cannot be reached from here to look for a "
            "repository of that name)"
        )


def _hub_reachable() -> bool:
    """False when the Hub's host name does not even resolve (no network), or offline mode is on; True otherwise."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # transformers reads the local cache then, and says so itself
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def dataset_class_names(data_dir: str | os.PathLike, synset_words: str | os.PathLike | None = None) -> list[str]:
    """Class names ("other" first), using `<data_dir>/LOC_synset_mapping.txt` when no synset file is given."""
    from imagenets_hf.data.imagenets import class_names, default_synset_words

    if synset_words is None:
        synset_words = default_synset_words(data_dir)
    return class_names(data_dir, synset_words=synset_words)


def recipe_crop_size(model_name_or_path: str | os.PathLike) -> int | None:
    """The training crop of the recipe a model was trained with (`crop_size` of the `recipe.yaml` in its folder, or
    in a training checkpoint's run folder): slide inference's default window. None when there is no such file (a
    Hub id, or a folder that convert_checkpoint.py wrote)."""
    from imagenets_hf.training.checkpoints import checkpoint_run_folder, is_checkpoint_folder
    from imagenets_hf.training.recipes import read_overrides
    from imagenets_hf.training.run_folder import RECIPE_FILE_NAME

    path = Path(model_name_or_path).expanduser()
    folder = checkpoint_run_folder(path) if is_checkpoint_folder(path) else path
    recipe_file = folder / RECIPE_FILE_NAME
    if not recipe_file.is_file():
        return None
    return read_overrides(recipe_file).get("crop_size")


def resolve_mode(mode: InferenceMode | None, model_name_or_path: str | os.PathLike) -> InferenceMode:
    """The inference mode to run (default: the official protocol), a slide window left out taken from the model's
    recipe (`recipe_crop_size`)."""
    mode = mode or InferenceMode()
    if mode.mode == "slide" and mode.crop_size is None:
        crop_size = recipe_crop_size(model_name_or_path)
        if crop_size is None:
            raise ValueError(
                f"{model_name_or_path}: no recipe.yaml beside the model to take slide's window from (its crop_size); "
                "pass --crop-size"
            )
        mode = mode.with_crop_size(crop_size)
    return mode.with_crop_size(None)
