"""What the evaluation scripts run: evaluate a split, predict a folder, write a submission (the top of
`imagenets_hf.evaluation`: nothing in the package imports this module)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from imagenets_hf.evaluation.loading import (  # also importable from here, as before loading.py
    check_model_location,
    dataset_class_names,
    load_model_and_processor,
    resolve_mode,
)
from imagenets_hf.evaluation.modes import InferenceMode


def run_evaluation(
    model_name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "validation",
    output: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    extended: bool = True,
    num_workers: int = 2,
    synset_words: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    mode: InferenceMode | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model on a split by the official protocol (or `mode`: sliding windows, multi-scale + flip);
    print the per-class table and summary, write the JSON (which records the mode) and the chart (main process
    only). Runs under `accelerate launch` as well (exact across processes)."""
    # The inputs first: a wrong folder is said before anything heavy is imported or loaded.
    names = dataset_class_names(data_dir, synset_words)
    check_model_location(os.fspath(model_name_or_path))
    mode = resolve_mode(mode, model_name_or_path)
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            "the per-class IoU chart needs matplotlib: pip install matplotlib (or leave --plot out)"
        )

    from imagenets_hf.data.imagenets import load_imagenets
    from imagenets_hf.evaluation.inference import evaluate_model, format_iou_table
    from imagenets_hf.evaluation.report import plot_per_class_iou, write_metrics_json
    from imagenets_hf.runtime import accelerator_available, make_accelerator

    # mixed_precision "no": the precision is `dtype` alone (recorded below), never ACCELERATE_MIXED_PRECISION, which
    # `accelerate launch` sets from the user's accelerate config. Several CPU processes need cpu=True.
    accelerator = make_accelerator(mixed_precision="no", cpu=not accelerator_available())
    model, processor = load_model_and_processor(model_name_or_path, accelerator.device, names=names)
    with accelerator.main_process_first():  # one process builds the Arrow cache, the others reuse it
        dataset = load_imagenets(data_dir, split=split, cache_dir=cache_dir)
    if len(names) != model.config.num_labels:
        raise ValueError(
            f"{model_name_or_path}: the model predicts {model.config.num_labels} labels but {data_dir} has "
            f"{len(names)} (with 'other')"
        )
    metrics = evaluate_model(
        model,
        processor,
        dataset,
        accelerator=accelerator,
        batch_size=batch_size,
        extended=extended,
        progress=progress,
        dtype=dtype,
        num_workers=num_workers,
        mode=mode,
    )
    if accelerator.is_main_process:
        print(format_iou_table(metrics, names))
        print(f"inference: {mode.describe()}")
        info = {
            "model": os.fspath(model_name_or_path),
            "data_dir": os.fspath(data_dir),
            "split": split,
            "dtype": dtype or "fp32",
            "num_processes": accelerator.num_processes,
            "inference": mode.to_dict(),
        }
        if output is not None:
            print(f"metrics written to {write_metrics_json(metrics, output, names, **info)}")
        if plot is not None:
            title = f"{Path(os.fspath(model_name_or_path)).name} on {split}: per-class IoU"
            print(f"chart written to {plot_per_class_iou(metrics, plot, names, title=title)}")
    end_processes(accelerator)
    return metrics


def run_prediction(
    model_name_or_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    submission: str | os.PathLike | None = None,
    method_file: str | os.PathLike | None = None,
    overlay: bool = False,
    overlay_dir: str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    num_workers: int = 2,
    progress: bool = True,
    skip_bad: bool = False,
    mode: InferenceMode | None = None,
) -> dict[str, Any]:
    """Predict a folder (`<wnid>/<name>.JPEG` -> `<out_dir>/<wnid>/<name>.png`), optionally with overlays (in
    `<out_dir>_overlays` unless `overlay_dir` is given) and a test-server zip. Files that are not images (by
    extension) are counted and named; an unreadable image raises, or with `skip_bad` is skipped and listed (also in
    `<out_dir>/skipped_images.txt`). `mode`: as `run_evaluation`."""
    from imagenets_hf.evaluation.folders import list_images, scan_image_folder
    from imagenets_hf.evaluation.predict import SKIPPED_FILE_NAME, predict_folder

    # The inputs first: a wrong folder or file is said before anything heavy is imported, loaded or predicted.
    list_images(images_dir)
    check_model_location(os.fspath(model_name_or_path))
    if submission is not None and method_file is not None and not Path(method_file).is_file():
        raise FileNotFoundError(f"no such method file: {method_file}")
    mode = resolve_mode(mode, model_name_or_path)

    from imagenets_hf.evaluation.submission import make_submission
    from imagenets_hf.runtime import accelerator_available, make_accelerator

    # As run_evaluation: the precision is `dtype` alone; several CPU processes need cpu=True.
    accelerator = make_accelerator(mixed_precision="no", cpu=not accelerator_available())
    others = scan_image_folder(images_dir)[1]
    if others and accelerator.is_main_process:
        print(f"note: left out {_counted_list(others, 'file')} of {images_dir}: not images by their extension")
    model, processor = load_model_and_processor(model_name_or_path, accelerator.device)
    if overlay and overlay_dir is None:
        overlay_dir = Path(out_dir).with_name(Path(out_dir).name + "_overlays")
    done = predict_folder(
        model,
        processor,
        images_dir,
        out_dir,
        batch_size=batch_size,
        dtype=dtype,
        overlay_dir=overlay_dir if overlay else None,
        masks_dir=masks_dir,
        num_workers=num_workers,
        progress=progress,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        skip_bad=skip_bad,
        mode=mode,
    )
    accelerator.wait_for_everyone()
    skipped = [line for lines in _gather_lists(accelerator, done.skipped) for line in lines]
    result: dict[str, Any] = {
        "predictions": len(done.written),
        "out_dir": os.fspath(out_dir),
        "skipped": skipped,
        "inference": mode.to_dict(),
    }
    if accelerator.is_main_process:
        print(f"{len(done.written)} predictions written to {out_dir} (this process; inference: {mode.describe()})")
        if skipped:
            skipped_file = Path(out_dir) / SKIPPED_FILE_NAME
            skipped_file.parent.mkdir(parents=True, exist_ok=True)
            skipped_file.write_text("".join(f"{line}\n" for line in sorted(skipped)), encoding="utf-8")
            print(f"skipped {len(skipped)} unreadable image(s) (listed in {skipped_file}):")
            for line in sorted(skipped):
                print(f"  {line}")
        if overlay:
            print(f"overlays written to {overlay_dir}")
            result["overlay_dir"] = os.fspath(overlay_dir)
        if submission is not None:
            zip_path = make_submission(out_dir, submission, method_file)
            print(f"submission written to {zip_path}")
            result["submission"] = os.fspath(zip_path)
    end_processes(accelerator)
    return result


def end_processes(accelerator) -> None:
    """Under a multi-process launch: wait for every process, then destroy the process group. A process that exits
    with its gloo/NCCL group alive can abort at interpreter shutdown ("terminate called without an active exception",
    exit status -6) after its work is done, failing a run that succeeded."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()


def _counted_list(paths: list[str], noun: str, shown: int = 10) -> str:
    """ "3 files (a.txt, b.json, c)", the first `shown` named."""
    names = ", ".join(paths[:shown]) + (f", ... and {len(paths) - shown} more" if len(paths) > shown else "")
    return f"{len(paths)} {noun}{'s' if len(paths) != 1 else ''} ({names})"


def _gather_lists(accelerator, items: list[str]) -> list[list[str]]:
    """Every process's list (one process: just this one's)."""
    if accelerator.num_processes == 1:
        return [items]
    from accelerate.utils import gather_object

    return gather_object([items])
