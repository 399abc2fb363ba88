"""The GPU acceptance check behind `scripts/check_gpu.py`: the CUDA and multi-process paths that CPU tests cannot see,
in one command (at most about 10 minutes on one modern GPU), with a table and one JSON line.

Steps (each one's failure is recorded and the others still run; `run_checks` reports `ok` only when none failed):
- `demo_fp16`, `demo_bf16`: the demo recipe (the main job) in that precision; its mIoU must clear `DEMO_LEARNS_BAR`.
- `device_path`: the device path (`augment_on_device`) against the worker path for the same draws on realistic images:
  labels equal, images within one grey level on average (`GREY_LEVEL_BOUND`).
- `resume`: a run stopped after half its iterations and resumed ends with the weights of the uninterrupted run, bit
  for bit, with deterministic algorithms on.
- `ddp_resume_2_to_1`: `accelerate launch --multi_gpu --num_processes 2` stops half-way, one process resumes and
  finishes (skipped, saying so, with fewer than two GPUs; at toy size one process launched the same way).
- `compile`: the demo with `compile: true` trains and evaluates.
- `bench_recipe`: `run_recipe_benchmark` for the four published recipes: peak training memory at batch 32 in fp16
  (the README's Mem column), evaluation fps (Inf time), the device path's samples/s and the projected wall time.
- `eval_scale`: `run_eval_scale_benchmark` at 920 classes (16 images of 375x500 and 2 of 1000x1000, batches of 8):
  both post-processing methods give the former full resize's class maps on this device, with their time and peak
  GPU memory; the GPU default ("chunks") peaks under `EVAL_SCALE_CUDA_PEAK_GB` of CUDA memory.

Without CUDA (or with `toy=True`) every step runs at toy sizes on the CPU (a 2-block ViT, a few iterations, no mIoU
bar), so that CI runs the same code (`tests/test_bench_check_gpu.py`).

The demos and the compile step fine-tune in this process, one after the other. Two steps use child processes of
this module (`_child_main`): the resume step (`python -m imagenets_hf.benchmarks.check_gpu resume JOB_JSON`, the
recipe's `deterministic: true`, with CUBLAS_WORKSPACE_CONFIG set for it alone) and the DDP step's first half, under
`accelerate launch` (`... check_gpu finetune RECIPE_JSON --stop-after N`); its second half runs here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The bar the demo must clear (mIoU, percent; chance on 11 classes is about 9, "other" everywhere 6.57, the demo scores
# about 72 on CPU); tests/test_docs_examples.py holds the main job to it too.
DEMO_LEARNS_BAR = 45.0
# The device path's images against the worker path's for the same draws: mean absolute difference in levels of 255
# (measured 0.3 on CPU, from the worker path's reduced JPEG decode; tests/test_data_augment.py).
GREY_LEVEL_BOUND = 1.0
# The GPU counterpart of evaluation's CPU target at 920 classes (peak RSS under 1.5 GB at any batch size): the GPU
# default post-processing ("chunks") peaks under this many GB of CUDA memory, model and batch of 8 included, where the
# former full resize needed 3.4 GiB for one 1000x1000 image alone (docs/benchmarks.md).
EVAL_SCALE_CUDA_PEAK_GB = 1.5
STEPS = (
    "demo_fp16",
    "demo_bf16",
    "device_path",
    "resume",
    "ddp_resume_2_to_1",
    "compile",
    "bench_recipe",
    "eval_scale",
)

# Toy sizes (CPU, CI): the tests' tiny demo (tests/tiny_runs.py), fewer iterations.
TOY_DEMO: dict[str, Any] = {
    "encoder_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    "crop_size": 32,
    "resize_scale": [128, 32],
    "eval_short_side": 32,
    "eval_max_long_side": 128,
    "per_device_batch_size": 4,
    "global_batch_size": 4,
    "max_iters": 2,
    "warmup_iters": 1,
    "num_workers": 0,
}


@dataclass(frozen=True)
class Sizes:
    """What each step runs: demo overrides (and whether the bar applies), resume and DDP iteration counts, the device
    path's image count, the compile step's overrides and the recipe benchmark's arguments."""

    demo: dict[str, Any]
    demo_bar: float | None
    resume: dict[str, Any]
    device_path_images: int
    compile: dict[str, Any]
    bench: dict[str, Any]
    processes: int  # for the DDP step
    eval_scale: dict[str, Any] = field(default_factory=dict)


def full_sizes() -> Sizes:
    resume = {"max_iters": 40, "warmup_iters": 10, "checkpoint_interval": 20, "drop_path_rate": 0.1}
    return Sizes(
        demo={},
        demo_bar=DEMO_LEARNS_BAR,
        resume=resume,
        device_path_images=32,
        compile={"max_iters": 100, "warmup_iters": 10, "checkpoint_interval": 0},
        bench={"iters": 10, "warmup": 3, "eval_iters": 20},
        processes=2,
        eval_scale={"num_images": 16, "large_images": 2, "batch_size": 8},
    )


def toy_sizes() -> Sizes:
    resume = {**TOY_DEMO, "max_iters": 4, "checkpoint_interval": 2, "drop_path_rate": 0.1}
    return Sizes(
        demo=TOY_DEMO,
        demo_bar=None,
        resume=resume,
        device_path_images=4,
        # inductor compile time grows with the graph (minutes on a CPU for larger ones): one block
        compile={**TOY_DEMO, "encoder_kwargs": {**TOY_DEMO["encoder_kwargs"], "depth": 1}},
        bench={"iters": 1, "warmup": 1, "eval_iters": 1, "data_images": 2, "toy": True},
        processes=1,
        eval_scale={
            **{"num_images": 2, "height": 40, "width": 60, "large_images": 1, "large_size": (70, 50)},
            **{"batch_size": 2, "num_labels": 40},
        },
    )


@dataclass
class StepResult:
    """One step: status "pass", "fail" or "skip", its seconds, a one-line summary and its figures."""

    name: str
    status: str
    seconds: float = 0.0
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class CheckFailed(AssertionError):
    """A step ran and its result is wrong (its message is the table's summary)."""


def _demo_recipe(data_dir: Path, output_dir: Path, overrides: dict[str, Any]):
    from imagenets_hf.training.recipes import load_recipe

    return load_recipe("demo", {**overrides, "data_dir": str(data_dir), "output_dir": str(output_dir)})


def _finetune(recipe, resume: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """One fine-tuning in this process. accelerate keeps one AcceleratorState a process and refuses another precision
    (the fp16 demo, then the bf16 one): start each run from a fresh state, as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    from imagenets_hf.training.finetune import finetune

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()  # the compile step's graphs hold its model
    # overwrite: a --work-dir given again holds the previous check's runs
    return finetune(recipe, resume=resume, stop_after=stop_after, progress=False, overwrite=resume is None)


def check_demo(data_dir: Path, work: Path, sizes: Sizes, precision: str) -> StepResult:
    recipe = _demo_recipe(data_dir, work / f"demo_{precision}", {**sizes.demo, "mixed_precision": precision})
    result = _finetune(recipe)
    miou = float(result["metrics"]["mIoU"])
    details = {"mIoU": round(miou, 2), "iterations": result["iterations"], "bar": sizes.demo_bar}
    details["train_s"] = round(result.get("train_seconds", float("nan")), 1)
    if not math.isfinite(miou):
        raise CheckFailed(f"mIoU {miou}")
    if sizes.demo_bar is not None and miou <= sizes.demo_bar:
        raise CheckFailed(f"mIoU {miou:.2f} after {result['iterations']} iterations: not above {sizes.demo_bar}")
    bar = f" > {sizes.demo_bar}" if sizes.demo_bar is not None else " (toy: no bar)"
    return StepResult("", "pass", summary=f"mIoU {miou:.2f}{bar}, {result['iterations']} iterations", details=details)


def check_device_path(device: torch.device, sizes: Sizes) -> StepResult:
    """The device path on `device` against the worker path (OpenCV, CPU) for the same draws; as
    tests/test_data_augment.py's test_the_paths_agree_on_realistic_images, with the store on `device`."""
    from imagenets_hf.benchmarks.data import realistic_samples
    from imagenets_hf.data.augment import AugmentConfig, augment_encoded_samples, draw_params
    from imagenets_hf.data.augment_device import augment_batch
    from imagenets_hf.training.data import decode_store

    rows = realistic_samples(sizes.device_path_images, seed=3)
    config = AugmentConfig()
    positions = np.arange(len(rows)) * 7 + 1000
    store = decode_store(rows, threads=1).to(device)
    params = draw_params(config, 0, positions, store.heights, store.widths)
    on_device = augment_batch(config, store, params)
    worker = augment_encoded_samples(config, 0, positions, [r["image"] for r in rows], [r["annotation"] for r in rows])
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    a = worker["pixel_values"].float() * std + mean
    b = on_device["pixel_values"].float().cpu() * std + mean
    labels_equal = torch.equal(worker["labels"], on_device["labels"].cpu())
    differing = int((worker["labels"] != on_device["labels"].cpu()).sum())
    mean_diff = float((a - b).abs().mean())
    details = {
        "device": str(device),
        "images": len(rows),
        "labels_equal": labels_equal,
        "labels_differing_pixels": differing,
        "mean_abs_grey_levels": round(mean_diff, 4),
        "max_abs_grey_levels": round(float((a - b).abs().max()), 2),
        "bound": GREY_LEVEL_BOUND,
    }
    summary = f"on {device}: labels {'equal' if labels_equal else 'DIFFER'}, images {mean_diff:.3f} levels apart"
    if not labels_equal or not mean_diff < GREY_LEVEL_BOUND:
        raise CheckFailed(f"{summary} (need equal labels, < {GREY_LEVEL_BOUND} levels)")
    return StepResult("", "pass", summary=summary + f" (< {GREY_LEVEL_BOUND})", details=details)


def _weights_difference(a: Path, b: Path) -> tuple[int, float]:
    """(number of tensors that differ, largest absolute difference) between two saved models."""
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if first.keys() != second.keys():
        raise CheckFailed(f"the saved models hold different tensors: {sorted(first.keys() ^ second.keys())[:5]}")
    differing, largest = 0, 0.0
    for name, tensor in first.items():
        if not torch.equal(tensor, second[name]):
            differing += 1
            largest = max(largest, float((tensor.float() - second[name].float()).abs().max()))
    return differing, largest


def resume_runs(data_dir: Path, work: Path, overrides: dict[str, Any]) -> None:
    """The resume step's three fine-tunings, with the recipe's deterministic algorithms on (CUDA's default backward
    kernels are not bit-reproducible): `max_iters` in one go into work/resume_straight; half of them, stop, resume into
    work/resume_resumed."""
    overrides = {**overrides, "deterministic": True}
    _finetune(_demo_recipe(data_dir, work / "resume_straight", overrides))
    resumed = _demo_recipe(data_dir, work / "resume_resumed", overrides)
    _finetune(resumed, stop_after=overrides["max_iters"] // 2)
    _finetune(resumed, resume="latest")


def check_resume(data_dir: Path, work: Path, sizes: Sizes, precision: str) -> StepResult:
    """`resume_runs` in a child process: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts, and this process's
    other steps (the benchmark's timings and memory) should run with cuBLAS's default workspace."""
    overrides = {**sizes.resume, "mixed_precision": precision}
    total = overrides["max_iters"]
    half = total // 2
    job = json.dumps({"data_dir": str(data_dir), "work": str(work), "overrides": overrides})
    command = [sys.executable, "-m", "imagenets_hf.benchmarks.check_gpu", "resume", job]
    _child(command, work / "resume.log", env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    differing, largest = _weights_difference(work / "resume_straight", work / "resume_resumed")
    details = {"iterations": total, "stopped_at": half, "differing_tensors": differing, "max_abs_diff": largest}
    if differing:
        raise CheckFailed(f"{differing} tensors differ after stop at {half} + resume (max |diff| {largest:.3g})")
    return StepResult("", "pass", summary=f"stop at {half} of {total} + resume: weights equal", details=details)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(command: list[str], log_path: Path, timeout: float = 600, env: dict[str, str] | None = None) -> None:
    """Run `command` (output to `log_path`); a non-zero exit fails the step with the output's last line."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
    with open(log_path, "w") as log:
        completed = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if completed.returncode:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"exit status {completed.returncode} ({log_path.name}): {tail[0][:200]}")


def check_ddp_resume(data_dir: Path, work: Path, sizes: Sizes, precision: str, toy: bool) -> StepResult:
    gpus = torch.cuda.device_count()
    processes = sizes.processes
    if not toy and gpus < processes:
        return StepResult("", "skip", summary=f"needs {processes} GPUs, {gpus} here", details={"gpus": gpus})
    out = work / "ddp"
    overrides = {**sizes.resume, "mixed_precision": precision, "data_dir": str(data_dir), "output_dir": str(out)}
    total = overrides["max_iters"]
    half = total // 2
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(_free_port())]
    launcher += ["--multi_gpu"] if processes > 1 else ["--cpu"] if toy else []
    child = ["-m", "imagenets_hf.benchmarks.check_gpu", "finetune", json.dumps(overrides)]
    _child([*launcher, *child, "--stop-after", str(half)], work / "ddp_first_half.log")
    _finetune(_demo_recipe(data_dir, out, sizes.resume | {"mixed_precision": precision}), resume="latest")
    results = json.loads((out / "results.json").read_text())
    miou = float(results["mIoU"])
    details = {"processes_then": processes, "processes_resumed": 1, "iterations": results.get("iterations")}
    details["mIoU"] = round(miou, 2)
    if results.get("iterations") != total or not math.isfinite(miou):
        raise CheckFailed(f"the resumed run ended at iteration {results.get('iterations')} of {total}, mIoU {miou}")
    note = "" if processes > 1 else " (toy: 1 process launched)"
    return StepResult(
        "", "pass", summary=f"{processes} -> 1 process at {half} of {total}: finished{note}", details=details
    )


def check_compile(data_dir: Path, work: Path, sizes: Sizes, precision: str) -> StepResult:
    recipe = _demo_recipe(data_dir, work / "compile", {**sizes.compile, "compile": True, "mixed_precision": precision})
    result = _finetune(recipe)
    miou = float(result["metrics"]["mIoU"])
    if not math.isfinite(miou):
        raise CheckFailed(f"mIoU {miou}")
    details = {"iterations": result["iterations"], "mIoU": round(miou, 2)}
    return StepResult(
        "", "pass", summary=f"{result['iterations']} compiled iterations, mIoU {miou:.2f}", details=details
    )


def check_bench_recipe(device: torch.device, sizes: Sizes) -> StepResult:
    from imagenets_hf.benchmarks.recipe import PUBLISHED_RECIPES, run_recipe_benchmark

    summary = run_recipe_benchmark(PUBLISHED_RECIPES, device=str(device), **sizes.bench)
    rows = {}
    for row in summary["results"]:
        rows[row["recipe"]] = {
            "precision": row["precision"],
            "batch_size": row["batch_size"],
            "mem_gib": row["train_peak_mem_gib"],
            "eval_fps": row["eval_fps"],
            "train_samples_per_s": row["train_samples_per_s"],
            "device_path_samples_per_s": row.get("data_device_samples_per_s"),
            "projected_3600_iter_h": round(row["projected_train_s"] / 3600, 2),
            "projected_3600_iter_h_on_recipe_gpus": round(row["projected_train_s"] / 3600 / row["recipe_devices"], 2),
            "recipe_gpus": row["recipe_devices"],
        }
    bad = [name for name, row in rows.items() if not all(math.isfinite(v) and v > 0 for v in _numbers(row))]
    if bad:
        raise CheckFailed(f"non-finite or zero figures for {', '.join(bad)}")
    line = f"{len(rows)} recipes measured (table below)"
    return StepResult("", "pass", summary=line, details={"machine": summary["machine"], "recipes": rows})


def check_eval_scale(device: torch.device, sizes: Sizes) -> StepResult:
    from imagenets_hf.benchmarks.eval_scale import run_eval_scale_benchmark

    result = run_eval_scale_benchmark(device=str(device), **sizes.eval_scale)
    if not result["maps_equal"]:
        raise CheckFailed(f"class maps differ from the full resize's: {result['pixels_differing']} pixels")
    methods = {
        name: {key: result[name][key] for key in ("s_per_image", "peak_rss_gb", "cuda_peak_gb") if key in result[name]}
        for name in ("bounds", "chunks", "former")
    }
    chunks_peak = result["chunks"].get("cuda_peak_gb")
    if chunks_peak is not None and chunks_peak > EVAL_SCALE_CUDA_PEAK_GB:
        raise CheckFailed(f"chunks peaked at {chunks_peak:.2f} GB of CUDA memory (bar {EVAL_SCALE_CUDA_PEAK_GB} GB)")
    line = "maps equal; s an image " + ", ".join(f"{name} {row['s_per_image']:.3f}" for name, row in methods.items())
    return StepResult("", "pass", summary=line, details={"machine": result["machine"], "methods": methods})


def _numbers(row: dict[str, Any]) -> list[float]:
    return [v for v in row.values() if isinstance(v, float | int) and not isinstance(v, bool)]


def run_checks(
    data_dir: str | os.PathLike,
    *,
    toy: bool | None = None,
    work_dir: str | os.PathLike | None = None,
    steps: tuple[str, ...] | list[str] = STEPS,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `steps` (see the module docstring); returns the summary (the script's JSON line): check, ok, toy, device,
    machine, gpus, torch, cuda, seconds, steps {name: {status, seconds, summary, ...figures}}.

    `toy` None: toy sizes on the CPU when CUDA is not available. `data_dir`: the mini dataset (made when the folder
    does not exist; a folder holding anything else is refused).
    `work_dir`: where the runs write (default a temporary folder, removed at the end)."""
    from imagenets_hf.data.mini import is_mini_dataset_complete, make_mini_dataset
    from imagenets_hf.runtime import describe_machine

    log = log or (lambda line: None)
    unknown = [name for name in steps if name not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}: expected some of {', '.join(STEPS)}")
    cuda = torch.cuda.is_available()
    toy = (not cuda) if toy is None else toy
    device = torch.device("cuda" if cuda and not toy else "cpu")
    sizes = toy_sizes() if toy else full_sizes()
    data_dir = Path(data_dir)
    if not data_dir.exists():
        make_mini_dataset(data_dir)
    elif not is_mini_dataset_complete(data_dir):  # never rewrite a folder that is not ours (a real dataset, say)
        raise ValueError(
            f"--data-dir {data_dir} does not hold the mini dataset: the check trains the demo on it; pass a folder "
            "that holds it or does not exist yet (it is made there)"
        )
    machine = describe_machine(device)
    log(f"check_gpu on {device} ({machine}){': toy sizes, no CUDA here' if toy and not cuda else ''}")
    if toy:
        log("toy sizes: tiny models and a few iterations, no mIoU bar, 1 process where the check wants 2 GPUs")
    owned = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="check_gpu_")) if owned else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    precision = "fp16" if device.type == "cuda" else "no"
    runners: dict[str, Callable[[], StepResult]] = {
        "demo_fp16": lambda: check_demo(data_dir, work, sizes, "fp16"),
        "demo_bf16": lambda: check_demo(data_dir, work, sizes, "bf16"),
        "device_path": lambda: check_device_path(device, sizes),
        "resume": lambda: check_resume(data_dir, work, sizes, precision),
        "ddp_resume_2_to_1": lambda: check_ddp_resume(data_dir, work, sizes, precision, toy),
        "compile": lambda: check_compile(data_dir, work, sizes, precision),
        "bench_recipe": lambda: check_bench_recipe(device, sizes),
        "eval_scale": lambda: check_eval_scale(device, sizes),
    }
    started = time.perf_counter()
    results: dict[str, StepResult] = {}
    try:
        for name in steps:
            step_started = time.perf_counter()
            log(f"{name} ...")
            try:
                result = runners[name]()
            except Exception as err:  # noqa: BLE001 - a failing step is reported and the others still run
                message = str(err).strip().splitlines()[0] if str(err).strip() else ""
                summary = message if isinstance(err, CheckFailed) else f"{type(err).__name__}: {message}"[:300]
                details = {} if isinstance(err, CheckFailed) else {"traceback": traceback.format_exc()[-2000:]}
                result = StepResult(name, "fail", summary=summary, details=details)
            result.name = name
            result.seconds = round(time.perf_counter() - step_started, 1)
            results[name] = result
            log(f"{name}: {result.status} ({result.seconds:.0f} s) {result.summary}")
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "check": "check_gpu",
        "ok": all(result.status != "fail" for result in results.values()),
        "toy": toy,
        "device": str(device),
        "machine": machine,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seconds": round(time.perf_counter() - started, 1),
        "steps": {
            name: {"status": r.status, "seconds": r.seconds, "summary": r.summary, **r.details}
            for name, r in results.items()
        },
    }


def format_check_table(summary: dict[str, Any]) -> list[str]:
    """The human table of a `run_checks` result: one line a step, then the verdict."""
    lines = [f"{'step':<20}{'status':<8}{'seconds':>8}  summary"]
    for name, step in summary["steps"].items():
        lines.append(f"{name:<20}{step['status'].upper():<8}{step['seconds']:>8.1f}  {step['summary']}")
    bench = summary["steps"].get("bench_recipe", {}).get("recipes")
    if bench:
        lines.append(
            f"{'recipe':<24}{'prec':>5}{'batch':>6}{'Mem GiB':>9}{'Inf fps':>9}{'device path/s':>14}"
            f"{'h for 3600 it, 1 GPU':>22}"
        )
        for recipe, row in bench.items():
            device_rate = row["device_path_samples_per_s"]
            lines.append(
                f"{recipe:<24}{row['precision']:>5}{row['batch_size']:>6}{row['mem_gib']:>9.3f}{row['eval_fps']:>9.1f}"
                f"{device_rate if device_rate is not None else float('nan'):>14.1f}{row['projected_3600_iter_h']:>22.2f}"
            )
    failed = [name for name, step in summary["steps"].items() if step["status"] == "fail"]
    verdict = "all steps passed" if not failed else f"FAILED: {', '.join(failed)}"
    where = f"{summary['device']} ({summary['machine']}){', toy sizes' if summary['toy'] else ''}"
    lines.append(f"{verdict}; {where}; {summary['seconds']:.0f} s")
    return lines


def _child_main(argv: list[str]) -> None:
    """The child processes: `resume JOB_JSON` (`resume_runs`), or `finetune OVERRIDES_JSON --stop-after N` (one
    fine-tuning of the demo, as `accelerate launch` starts it for the DDP step)."""
    if argv[0] == "resume":
        job = json.loads(argv[1])
        resume_runs(Path(job["data_dir"]), Path(job["work"]), job["overrides"])
        return
    overrides = json.loads(argv[1])
    stop_after = int(argv[argv.index("--stop-after") + 1]) if "--stop-after" in argv else None
    from imagenets_hf.training.finetune import finetune
    from imagenets_hf.training.recipes import load_recipe

    finetune(load_recipe("demo", overrides), stop_after=stop_after, progress=False, overwrite=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
