"""One run per output folder: a folder that holds a run is continued (`--resume`) or deleted (`--overwrite`), never
mixed with another run.

A run folder is recognised by `recipe.yaml`, the resolved recipe it was started with (written before anything else).
`--resume` continues it only with the same recipe, up to the fields in `RESUMABLE_FIELDS` (the iteration budget and
what only changes logging, evaluation, checkpointing, loading speed or compilation).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from imagenets_hf.training.checkpoints import checkpoints_dir
from imagenets_hf.training.recipes import Recipe, load_recipe, read_overrides

RECIPE_FILE_NAME = "recipe.yaml"
RESUMABLE_FIELDS = frozenset(
    {
        "max_iters",
        "log_interval",
        "report_to",
        "val_interval",
        "checkpoint_interval",
        "checkpoints_total_limit",
        "eval_batch_size",
        "num_workers",  # the samples do not depend on the worker count (see training/data.py)
        "compile",  # the same model and arithmetic; checkpoints hold the uncompiled module's names either way
        "worker_timeout",
        "collective_timeout",
        "prepare_timeout",
        # a run stopped by an undecodable unlabelled file resumes skipping it; every other sample stays the same
        "skip_bad_unlabelled",
        "semi_final_model",  # which of the two trained models is saved at the end; both train the same either way
    }
)


# What a `recipe.yaml` written before a field existed stands for: the behaviour runs had then (a later default must not
# be read into an older run; a resumed run would otherwise change it half-way without a word).
VALUES_BEFORE_FIELD = {"drop_path_branches": "both"}


def load_run_recipe(recipe_file: str | os.PathLike) -> Recipe:
    """The recipe a run folder recorded (`recipe.yaml`), with `VALUES_BEFORE_FIELD` for the fields it predates."""
    recorded = read_overrides(recipe_file)
    predated = {name: value for name, value in VALUES_BEFORE_FIELD.items() if name not in recorded}
    return load_recipe(recipe_file, predated, {name: f"{recipe_file} (written before {name})" for name in predated})


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (it holds another run, or nothing to resume)."""


def holds_run(output_dir: str | os.PathLike) -> bool:
    """True when `output_dir` holds a run of this project (its recipe, checkpoints or final weights)."""
    output_dir = Path(output_dir)
    return any(
        (output_dir / name).exists()
        for name in (RECIPE_FILE_NAME, checkpoints_dir(output_dir).name, "model.safetensors")
    )


def recipe_differences(recorded: Recipe, current: Recipe) -> dict[str, tuple[Any, Any]]:
    """{field: (recorded value, current value)} for the fields outside `RESUMABLE_FIELDS` that differ."""
    before, after = recorded.to_dict(), current.to_dict()
    return {
        name: (before[name], after[name])
        for name in before
        if name not in RESUMABLE_FIELDS and before[name] != after[name]
    }


def check_output_dir(recipe: Recipe, resume: str | None, overwrite: bool) -> None:
    """Raise `RunFolderError` when `recipe.output_dir` cannot be used as asked; changes nothing (every process runs it
    before the main one claims the folder)."""
    output_dir = Path(recipe.output_dir)
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite deletes it: pass one of them")
    if resume:
        recipe_file = output_dir / RECIPE_FILE_NAME
        if resume == "latest" and not holds_run(output_dir):
            raise RunFolderError(f"nothing to resume in {output_dir}: it holds no run (start one without --resume)")
        if not recipe_file.is_file():
            if resume == "latest":
                raise RunFolderError(
                    f"{output_dir} holds no {RECIPE_FILE_NAME}, so it cannot be resumed safely; "
                    "start again with --overwrite"
                )
            return  # a checkpoint folder given explicitly, into a new run folder
        differences = recipe_differences(load_run_recipe(recipe_file), recipe)
        if differences:
            listed = "; ".join(f"{name}: {old!r} there, {new!r} now" for name, (old, new) in differences.items())
            raise RunFolderError(
                f"{output_dir} was started with a different recipe ({listed}); resume with the settings it was "
                "started with, or start a new run with another --output-dir or --overwrite"
            )
        return
    if holds_run(output_dir):
        if not overwrite:
            raise RunFolderError(
                f"{output_dir} already holds a run: pass --resume to continue it, or --overwrite to delete it and "
                "start again"
            )
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise RunFolderError(
            f"{output_dir} is not empty and holds no run of this project; choose another --output-dir "
            "(nothing is deleted there, even with --overwrite)"
        )


def claim_output_dir(recipe: Recipe, resume: str | None, overwrite: bool) -> Path:
    """Main process, after `check_output_dir` passed everywhere: delete the old run when overwriting, then record the
    recipe (a resumed run records the current one: it differs at most in `RESUMABLE_FIELDS`)."""
    output_dir = Path(recipe.output_dir)
    if overwrite and not resume and holds_run(output_dir):
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return recipe.save(output_dir / RECIPE_FILE_NAME)


# Flags of scripts/finetune.py that do not belong in the command that resumes a run (with how many values they take).
_START_ONLY_FLAGS = {"--resume": None, "--overwrite": 0, "--stop-after": 1, "--make-mini-dataset": 0}


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the one that started it, with `--resume` instead of the start-only
    flags (`--overwrite`, `--stop-after`, `--make-mini-dataset`)."""
    argv = list(sys.argv if argv is None else argv)
    kept: list[str] = []
    index = 1
    while index < len(argv):
        arg = argv[index]
        flag = arg.split("=", 1)[0]
        if flag in _START_ONLY_FLAGS:
            values = _START_ONLY_FLAGS[flag]
            if "=" in arg:
                values = 0
            elif values is None:  # --resume takes an optional value
                values = 1 if index + 1 < len(argv) and not argv[index + 1].startswith("--") else 0
            index += 1 + values
            continue
        kept.append(arg)
        index += 1
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["accelerate", "launch", "--num_processes", str(world_size)] if world_size > 1 else ["python"]
    return shlex.join([*launcher, argv[0], *kept, "--resume"])
