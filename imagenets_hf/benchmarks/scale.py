"""The scale benchmark behind `scripts/bench_scale.py`: every heavy step of the pipeline timed on a full-size
(synthetic or real) ImageNet-S folder, with the peak memory of each.

Each stage runs in a fresh Python process (so the first load really is first, and one stage's memory does not
count in the next); its wall time and the peak resident memory of its process tree (the process and its DataLoader
workers and their fork server; the RSS of each process summed, sampled every `SAMPLE_S` seconds, and the PSS, which
counts the pages forked workers share once, every `PSS_SAMPLE_S`: reading it walks every mapping of every process,
which sampled as often cost a quarter of a core beside the stage it measured) are measured from outside. Stages, in order:

- `first_load`: `load_imagenets` building the Arrow cache of train_semi, validation and test (`num_proc` threads).
- `cached_load`: the same call with the cache there.
- `export`: `export_imagenets` of train_semi and validation to parquet.
- `train_start`: `finetune` with the demo recipe's model for `train_iters` iterations (mask packing, the DataLoader's
  start and the first batches), then stopped (`stop_after`: a checkpoint, no evaluation).
- `evaluate`: `evaluate_model` (extended metrics, as `evaluate.py`) over the first `eval_images` validation images,
  with a model of the demo recipe's size (random weights, the folder's labels: 920 at 919).
- `predict`: `run_prediction` (as `predict.py`) over `predict_images` test images spread over the classes (a folder
  of links to them).
- `submission`: `make_submission` of those predictions; `check`: `check_submission` of the zip against them.

The time of evaluation and prediction is also given per image, and extrapolated to the whole split.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

STAGES = ("first_load", "cached_load", "export", "train_start", "evaluate", "predict", "submission", "check")
SAMPLE_S = 0.1
PSS_SAMPLE_S = 1.0
RESULT_PREFIX = "SCALE-STAGE-RESULT "


def tree_memory_bytes(pid: int, cpu_seconds: dict[int, float] | None = None, pss: bool = True) -> tuple[int, int, int]:
    """(RSS summed over a process and all its descendants, PSS summed the same way, the process's own RSS) now;
    zeros once it has exited. PSS divides each shared page among the processes sharing it, so its sum is the
    tree's real footprint; the RSS sum counts the pages forked workers share with their parent in each of them.
    With `cpu_seconds`, each process's CPU time so far (user + system) is recorded there by pid. `pss` False: 0 for
    the PSS, which costs a walk of every mapping (the RSS is one read)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    rss = pss_sum = own = 0
    for process in processes:
        try:
            info = process.memory_full_info() if pss else process.memory_info()
            if cpu_seconds is not None:
                times = process.cpu_times()
                cpu_seconds[process.pid] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss_sum += getattr(info, "pss", info.rss) if pss else 0
        if process.pid == pid:
            own = info.rss
    return rss, pss_sum, own


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (links not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def run_stage_process(
    stage: str, arguments: dict[str, Any], cache_dir: str, timeout: float | None = None
) -> dict[str, Any]:
    """Run one stage in a fresh process whose datasets cache is `cache_dir`; return its own result with `wall_s`,
    `peak_rss_gb` and `peak_pss_gb` (its process tree, see `tree_memory_bytes`), `peak_main_rss_gb` (the stage's
    process alone) and `cpu_s` (the CPU time of its process tree as last sampled: on a machine shared with other
    jobs, the part of the wall time that is this stage's own work)."""
    command = [
        sys.executable,
        "-c",
        "import sys, json; from imagenets_hf.benchmarks.scale import stage_main; stage_main(sys.argv[1], sys.argv[2])",
        stage,
        json.dumps(arguments),
    ]
    start = time.perf_counter()
    env = {**os.environ, "HF_DATASETS_CACHE": cache_dir}  # training reads the default cache: make it this one
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = [0, 0, 0]
    cpu_seconds: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        pss_every = max(1, round(PSS_SAMPLE_S / SAMPLE_S))
        count = 0
        while not stop.wait(SAMPLE_S):
            count += 1
            for index, value in enumerate(tree_memory_bytes(process.pid, cpu_seconds, pss=count % pss_every == 1)):
                peaks[index] = max(peaks[index], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise TimeoutError(f"scale benchmark stage {stage} took more than {timeout} s") from None
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"scale benchmark stage {stage} failed (exit {process.returncode}):\n{tail}")
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else {}
    rss, pss, own = (round(peak / 1e9, 3) for peak in peaks)
    memory = {"peak_rss_gb": rss, "peak_pss_gb": pss, "peak_main_rss_gb": own}
    return {"wall_s": round(wall, 2), "cpu_s": round(sum(cpu_seconds.values()), 1), **memory, **result}


def stage_main(stage: str, arguments_json: str) -> None:
    """A stage's process: run it and print its result on one line (read by `run_stage_process`)."""
    import warnings

    warnings.simplefilter("ignore")  # the template method.txt warning and such: not the benchmark's output
    result = _STAGE_FUNCTIONS[stage](**json.loads(arguments_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- the stages (each in its own process) ------------------------------------------------------------------------------


def _load(data_dir: str, num_proc: int | None, copy_images: bool) -> dict[str, Any]:
    from imagenets_hf.data.imagenets import DEFAULT_SPLITS, load_imagenets, present_splits

    rows = {}
    for split in DEFAULT_SPLITS:
        if split in present_splits(data_dir):
            rows[split] = len(load_imagenets(data_dir, split, num_proc=num_proc, copy_images=copy_images))
    return {"rows": rows}


def _export(data_dir: str, out_dir: str, num_proc: int | None) -> dict[str, Any]:
    from imagenets_hf.data.export import export_imagenets

    counts = export_imagenets(data_dir, out_dir, splits=["train_semi", "validation"], num_proc=num_proc)
    return {"rows": counts}


def _demo_recipe(data_dir: str, output_dir: str, overrides: dict[str, Any]):
    from imagenets_hf.training.recipes import load_recipe

    settings = {"data_dir": data_dir, "output_dir": output_dir, **overrides}
    return load_recipe("demo", overrides=settings)


def _train_start(data_dir: str, output_dir: str, train_iters: int, overrides: dict[str, Any]) -> dict[str, Any]:
    from imagenets_hf.training.finetune import finetune

    overrides = {"val_interval": 0, "checkpoint_interval": 0, "log_interval": 0, **overrides}
    recipe = _demo_recipe(data_dir, output_dir, overrides)
    if train_iters >= recipe.max_iters:  # the run would end, and evaluate the whole validation split
        raise ValueError(f"train_iters ({train_iters}) must be below the recipe's max_iters ({recipe.max_iters})")
    started = time.perf_counter()
    result = finetune(recipe, stop_after=train_iters, progress=False, overwrite=True)
    return {"iterations": result["iterations"], "finetune_s": round(time.perf_counter() - started, 2)}


def _save_model(data_dir: str, model_dir: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The demo recipe's model (random weights) with the folder's labels, saved as evaluate.py/predict.py read it."""
    import torch

    from imagenets_hf.evaluation.loading import dataset_class_names
    from imagenets_hf.training.finetune import build_image_processor, build_model

    recipe = _demo_recipe(data_dir, model_dir, overrides)
    torch.manual_seed(0)
    names = dataset_class_names(data_dir)
    model = build_model(recipe, names)
    model.save_pretrained(model_dir)
    build_image_processor(recipe).save_pretrained(model_dir)
    return {"num_labels": len(names)}


def _evaluate(
    data_dir: str, model_dir: str, images: int, batch_size: int, copy_images: bool, num_workers: int
) -> dict[str, Any]:
    from imagenets_hf.data.imagenets import load_imagenets
    from imagenets_hf.evaluation.inference import evaluate_model
    from imagenets_hf.evaluation.loading import load_model_and_processor

    rows = load_imagenets(data_dir, "validation", copy_images=copy_images)
    total = len(rows)
    rows = rows.select(range(min(images, total)))
    model, processor = load_model_and_processor(model_dir, "cpu")
    started = time.perf_counter()
    metrics = evaluate_model(
        model, processor, rows, batch_size=batch_size, extended=True, progress=False, num_workers=num_workers
    )
    seconds = time.perf_counter() - started
    return {"images": len(rows), "split_images": total, "loop_s": round(seconds, 2), "mIoU": metrics["mIoU"]}


def _predict(model_dir: str, images_dir: str, out_dir: str, batch_size: int, num_workers: int) -> dict[str, Any]:
    from imagenets_hf.evaluation.run import run_prediction

    started = time.perf_counter()
    result = run_prediction(
        model_dir, images_dir, out_dir, batch_size=batch_size, progress=False, num_workers=num_workers
    )
    return {"images": result["predictions"], "loop_s": round(time.perf_counter() - started, 2)}


def _submission(predictions_dir: str, zip_path: str) -> dict[str, Any]:
    from imagenets_hf.evaluation.submission import PLACEHOLDER, default_method_text, make_submission

    method_file = Path(zip_path).with_name("method.txt")  # filled in, so that the check passes
    method_file.write_text(default_method_text().replace(PLACEHOLDER, "synthetic scale benchmark"), encoding="utf-8")
    make_submission(predictions_dir, zip_path, method_file)
    return {"zip_mb": round(os.path.getsize(zip_path) / 1e6, 1)}


def _check(zip_path: str, data_dir: str, num_classes: int) -> dict[str, Any]:
    from imagenets_hf.evaluation.submission import check_submission

    problems = check_submission(zip_path, data_dir, "test", num_classes=num_classes)
    return {"problems": len(problems), "first_problem": problems[0] if problems else None}


_STAGE_FUNCTIONS = {
    "first_load": _load,
    "cached_load": _load,
    "export": _export,
    "train_start": _train_start,
    "save_model": _save_model,
    "evaluate": _evaluate,
    "predict": _predict,
    "submission": _submission,
    "check": _check,
}


def spread(items: list, count: int) -> list:
    """`count` items spread evenly over the sorted list (all of them when it has no more)."""
    if count >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(1, count - 1))] for i in range(count)]


def link_test_share(data_dir: str | os.PathLike, share_dir: str | os.PathLike, count: int) -> int:
    """A folder `<share_dir>/test/<wnid>/<name>` of links to `count` test images spread over the classes: the share
    that prediction, the zip and its check run on. Returns the test split's size."""
    from imagenets_hf.evaluation.folders import list_images

    test_dir = Path(data_dir).resolve() / "test"
    images = list_images(test_dir)
    for relative in spread(images, count):
        link = Path(share_dir) / "test" / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(test_dir / relative)
    return len(images)


def run_scale_benchmark(
    data_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    eval_images: int = 200,
    predict_images: int = 200,
    batch_size: int = 8,
    num_workers: int = 2,
    train_iters: int = 2,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    copy_images: bool = True,
    recipe_overrides: dict[str, Any] | None = None,
    stages: tuple[str, ...] = STAGES,
    keep: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run the stages on `data_dir`, using `work_dir` (emptied first) for the cache, the export, the run folder, the
    model and the predictions; return the summary (`stages`: each stage's result; the cache's and the parquet's
    size; evaluation and prediction per image and extrapolated to their whole split). `work_dir` is deleted at the
    end unless `keep`. `recipe_overrides` change the demo recipe (the tests use a toy model). `num_workers`:
    evaluation's and prediction's DataLoader workers (the scripts' default 2). `cache_dir`: a datasets cache to use
    instead of `<work_dir>/cache` (kept: a cache built by an earlier run, so the later stages can be rerun alone)."""
    from imagenets_hf.data.imagenets import list_classes
    from imagenets_hf.runtime import describe_machine

    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; expected some of {', '.join(STAGES)}")
    data_dir = os.fspath(Path(data_dir).resolve())
    work = Path(work_dir)
    cache = None if cache_dir is None else Path(cache_dir).resolve()
    if cache is not None and cache.is_relative_to(work.resolve()):
        raise ValueError(f"cache folder {cache_dir} is inside the work folder {work_dir}, which is emptied first")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    paths = {name: os.fspath(work / name) for name in ("cache", "export", "run", "model", "share", "predictions")}
    if cache is not None:
        paths["cache"] = os.fspath(cache)
    zip_path = os.fspath(work / "submission.zip")
    overrides = dict(recipe_overrides or {})
    summary: dict[str, Any] = {
        "benchmark": "scale",
        "data_dir": data_dir,
        "classes": len(list_classes(data_dir)),
        "machine": describe_machine(),
        "num_proc": num_proc,
        "copy_images": copy_images,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "stages": {},
    }
    results = summary["stages"]

    def run(stage: str, name: str | None = None, **arguments: Any) -> dict[str, Any]:
        result = run_stage_process(stage, arguments, paths["cache"])
        results[name or stage] = result
        log(f"{name or stage}: {json.dumps(result)}")
        return result

    load_args = {"data_dir": data_dir, "num_proc": num_proc, "copy_images": copy_images}
    try:
        if "first_load" in stages:
            run("first_load", **load_args)
            summary["cache_gb"] = round(folder_bytes(paths["cache"]) / 1e9, 3)
        if "cached_load" in stages:
            run("cached_load", **load_args)
        if "export" in stages:
            run("export", data_dir=data_dir, out_dir=paths["export"], num_proc=num_proc)
            summary["parquet_gb"] = round(folder_bytes(paths["export"]) / 1e9, 3)
        if "train_start" in stages:
            run(
                "train_start",
                data_dir=data_dir,
                output_dir=paths["run"],
                train_iters=train_iters,
                overrides=overrides,
            )
        if {"evaluate", "predict"} & set(stages):
            run("save_model", data_dir=data_dir, model_dir=paths["model"], overrides=overrides)
        if "evaluate" in stages:
            result = run(
                "evaluate",
                data_dir=data_dir,
                model_dir=paths["model"],
                images=eval_images,
                batch_size=batch_size,
                copy_images=copy_images,
                num_workers=num_workers,
            )
            _per_image(result)
        if {"predict", "submission", "check"} & set(stages):
            test_images = link_test_share(data_dir, paths["share"], predict_images)
        if "predict" in stages:
            result = run(
                "predict",
                model_dir=paths["model"],
                images_dir=os.path.join(paths["share"], "test"),
                out_dir=paths["predictions"],
                batch_size=batch_size,
                num_workers=num_workers,
            )
            result["split_images"] = test_images
            _per_image(result)
        if "submission" in stages:
            run("submission", predictions_dir=paths["predictions"], zip_path=zip_path)
        if "check" in stages:
            run("check", zip_path=zip_path, data_dir=paths["share"], num_classes=summary["classes"])
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def _per_image(result: dict[str, Any]) -> None:
    """Seconds an image of the stage's loop and that rate over the whole split (hours); and the CPU seconds an image
    of the whole stage (start-up included), the cost that does not depend on what else the machine runs."""
    if result.get("images"):
        result["s_per_image"] = round(result["loop_s"] / result["images"], 4)
        result["split_hours"] = round(result["s_per_image"] * result["split_images"] / 3600, 2)
        result["cpu_s_per_image"] = round(result["cpu_s"] / result["images"], 4)
