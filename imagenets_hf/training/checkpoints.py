"""Training checkpoints that survive a kill: written aside, renamed into place when complete, verified on resume.

A checkpoint is `<output_dir>/checkpoints/checkpoint_<iteration>/`: what `accelerator.save_state` writes (model,
optimizer, scheduler, progress, every RNG state) plus `checkpoint.json`, a manifest of every file and its size written
last. It is first written to `.incomplete-checkpoint_<iteration>/` and renamed into place (an atomic rename) only
once every file is on disk, so a folder named `checkpoint_<N>` is complete unless something damaged it later; the
manifest catches that too (a file cut short or missing). Older checkpoints are removed only after the new one is in
place, so the newest complete checkpoint always survives.

A checkpoint resumes whatever wraps the model now (`load_checkpoint`): `save_state` writes the state dict of the module
that was handed to `prepare` (no `module.` from DDP, no `_orig_mod.` from accelerate's torch.compile, SyncBatchNorm
named as BatchNorm), and a model wrapped before `prepare` (compiled by the caller: `_orig_mod.` names) is read by the
names of the bare module, so runs move between process counts and `--compile` on and off.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

MANIFEST_FILE_NAME = "checkpoint.json"
MODEL_FILE_NAME = "model.safetensors"  # what accelerate's save_state writes for the (single) prepared model
# What wrappers put before a module's parameter names: torch.compile's OptimizedModule and DDP.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
CHECKPOINT_PREFIX = "checkpoint_"
INCOMPLETE_PREFIX = ".incomplete-"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    """Where the `checkpoint_<iteration>` folders of a run live."""
    return Path(output_dir) / "checkpoints"


def checkpoint_iteration(path: str | os.PathLike) -> int | None:
    """The iteration in a `checkpoint_<iteration>` folder name, or None for any other name."""
    name = Path(path).name
    suffix = name[len(CHECKPOINT_PREFIX) :] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """True for a `checkpoint_<iteration>` folder holding the model's weights (as `save_checkpoint` writes it)."""
    path = Path(path)
    return checkpoint_iteration(path) is not None and (path / MODEL_FILE_NAME).is_file()


def checkpoint_run_folder(path: str | os.PathLike) -> Path:
    """The run folder of a checkpoint: `<run>/checkpoints/checkpoint_<iteration>` -> `<run>`."""
    return Path(path).resolve().parent.parent


def load_checkpoint_model(path: str | os.PathLike, names: list[str] | None = None):
    """The model of a training checkpoint in float32, built as its run's recipe (`<run>/recipe.yaml`) builds it, and
    the recipe's evaluation image processor: what evaluate.py and predict.py load for a checkpoint folder.

    `names` (the class names, "other" first) default to those of the run's data folder.
    """
    from safetensors.torch import load_file

    from imagenets_hf.data.imagenets import class_names, default_synset_words
    from imagenets_hf.training.finetune import build_image_processor, build_model
    from imagenets_hf.training.run_folder import RECIPE_FILE_NAME, load_run_recipe

    path = Path(path)
    recipe_file = checkpoint_run_folder(path) / RECIPE_FILE_NAME
    if not recipe_file.is_file():
        raise FileNotFoundError(
            f"{path}: a training checkpoint, but its run folder holds no {RECIPE_FILE_NAME} ({recipe_file}), which says "
            "how to build its model"
        )
    recipe = load_run_recipe(recipe_file)
    if names is None:
        try:
            names = class_names(recipe.data_dir, recipe.synset_words or default_synset_words(recipe.data_dir))
        except ValueError as err:
            raise ValueError(f"{path}: the class names come from the run's data folder ({recipe_file}): {err}") from err
    model = build_model(recipe, names)
    # a checkpoint saved from a wrapped model may carry the wrappers' prefixes
    state = {bare_parameter_name(key): value for key, value in load_file(path / MODEL_FILE_NAME).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: its weights do not fit the model {recipe_file} builds with {len(names)} labels: "
            f"{' '.join(str(err).split())[:300]}"
        ) from err
    return model.to(torch.float32), build_image_processor(recipe)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from, or None when it is complete."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    manifest_path = path / MANIFEST_FILE_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST_FILE_NAME} (an interrupted save, or written by another tool)"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


@dataclass
class CheckpointChoice:
    """The checkpoint `--resume latest` takes, and the newer ones it skipped with the reason."""

    path: Path | None
    skipped: list[tuple[Path, str]]


def _iteration_of_any(path: Path) -> int | None:
    """The iteration of a `checkpoint_<N>` or `.incomplete-checkpoint_<N>` folder, or None."""
    return checkpoint_iteration(path.name.removeprefix(INCOMPLETE_PREFIX))


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> CheckpointChoice:
    """The complete checkpoint with the highest iteration under `output_dir` (None when there is none), and the newer
    folders it skipped: damaged ones and unfinished `.incomplete-*` writes."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return CheckpointChoice(None, [])
    found = sorted(
        ((_iteration_of_any(p), p) for p in folder.iterdir() if _iteration_of_any(p) is not None), reverse=True
    )
    skipped: list[tuple[Path, str]] = []
    for _, path in found:
        if path.name.startswith(INCOMPLETE_PREFIX):
            skipped.append((path, "an unfinished save"))
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return CheckpointChoice(path, skipped)
        skipped.append((path, problem))
    return CheckpointChoice(None, skipped)


def _fsync_tree(folder: Path) -> dict[str, int]:
    """Flush every file under `folder` to disk; return {relative path: size}."""
    sizes: dict[str, int] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, iteration: int, keep: int) -> Path:
    """Write `checkpoint_<iteration>` atomically (see the module docstring) on every process, then keep only the
    newest `keep` complete checkpoints (at least 1). Returns the checkpoint folder."""
    folder = checkpoints_dir(output_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{iteration}"
    if checkpoint_problem(final) is None:
        return final
    staging = folder / f"{INCOMPLETE_PREFIX}{CHECKPOINT_PREFIX}{iteration}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in (staging, final):  # a killed save of this iteration, or a damaged copy
            if leftover.exists():
                shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))  # every process writes its own RNG state; the main one the rest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from imagenets_hf.model.modeling_vit_fcn import weights_mode_as_umask

        weights_mode_as_umask(staging)
        files = _fsync_tree(staging)
        manifest = {"iteration": iteration, "files": files}
        (staging / MANIFEST_FILE_NAME).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(staging)
        os.replace(staging, final)
        _fsync_dir(folder)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Remove all but the newest `keep` (at least 1) complete checkpoints, and unfinished or damaged ones older than
    the newest complete one."""
    folder = checkpoints_dir(output_dir)
    complete, other = [], []
    for path in folder.iterdir():
        iteration = _iteration_of_any(path)
        if iteration is None:
            continue
        is_complete = not path.name.startswith(INCOMPLETE_PREFIX) and checkpoint_problem(path) is None
        (complete if is_complete else other).append((iteration, path))
    complete.sort(reverse=True)
    if not complete:
        return
    newest = complete[0][0]
    doomed = [path for _, path in complete[max(keep, 1) :]] + [path for it, path in other if it < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def bare_parameter_name(name: str) -> str:
    """`name` without the wrapper prefixes (`WRAPPER_PREFIXES`, in any order and number)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> None:
    """`accelerator.load_state(path)`, with the model's weights matched by their bare names (`bare_parameter_name`),
    so that a checkpoint saved from a wrapped model loads into a bare one and the reverse; and a checkpoint without
    gradient-scaler state (written where a recipe's fp16 ran in float32: on a CPU) resumed by a run with a scaler (on a
    GPU), which starts its scaler afresh where accelerate would stop on the missing file."""
    from accelerate.utils import SCALER_NAME, extract_model_from_parallel
    from safetensors.torch import load_file

    def load_model_weights(models: list, input_dir: str) -> None:
        weights = Path(input_dir) / MODEL_FILE_NAME
        if len(models) != 1 or not weights.is_file():
            return  # not what this project saves: accelerate's own loading says what is wrong
        model = extract_model_from_parallel(models[0], keep_torch_compile=False)
        state = {bare_parameter_name(name): tensor for name, tensor in load_file(weights).items()}
        model.load_state_dict(state, strict=True)
        models.clear()  # loaded: accelerate goes on with the optimizer, scheduler, scaler and random states

    handle = accelerator.register_load_state_pre_hook(load_model_weights)
    scaler = accelerator.scaler
    if not (Path(path) / SCALER_NAME).is_file():
        accelerator.scaler = None  # nothing to restore it from
    try:
        accelerator.load_state(str(path))
    finally:
        accelerator.scaler = scaler
        handle.remove()
