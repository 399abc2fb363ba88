"""The GPU acceptance check (`scripts/check_gpu.py`) at toy sizes on the CPU, as CI runs it, so that it cannot rot;
and its verdict: a failing step fails the command (exit status 1) and hides none of the others."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from imagenets_hf.benchmarks import check_gpu
from imagenets_hf.benchmarks.check_gpu import STEPS, CheckFailed, StepResult
from imagenets_hf.benchmarks.recipe import PUBLISHED_RECIPES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_gpu.py"


def run_script(args: list[str], capsys) -> tuple[int, list[str], dict]:
    spec = importlib.util.spec_from_file_location("check_gpu_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines, json.loads(lines[-1])


@pytest.mark.slow
def test_every_step_passes_at_toy_size(mini_dir, tmp_path, monkeypatch, capsys):
    """All eight steps on the CPU at toy sizes (the DDP step as one launched process): each passes with its figures."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --cpu-toy sets it; restored after the test
    code, lines, summary = run_script(["--cpu-toy", "--data-dir", str(mini_dir), "--work-dir", str(tmp_path)], capsys)
    steps = summary["steps"]
    assert code == 0, {name: step["summary"] for name, step in steps.items() if step["status"] != "pass"}
    assert summary["check"] == "check_gpu" and summary["ok"] is True and summary["toy"] is True
    assert summary["device"] == "cpu" and list(steps) == list(STEPS)
    assert all(step["status"] == "pass" for step in steps.values())
    for name in STEPS:  # the table: one line a step
        assert any(line.startswith(f"{name} ") and "PASS" in line for line in lines), name
    assert lines[-2].startswith("all steps passed; cpu")
    for demo in ("demo_fp16", "demo_bf16"):
        assert steps[demo]["iterations"] == 2 and math.isfinite(steps[demo]["mIoU"]) and steps[demo]["bar"] is None
    device_path = steps["device_path"]
    assert device_path["labels_equal"] and device_path["labels_differing_pixels"] == 0
    assert 0 < device_path["mean_abs_grey_levels"] < 1.0  # the worker path's reduced JPEG decode: not identical
    assert steps["resume"]["differing_tensors"] == 0 and steps["resume"]["stopped_at"] == 2
    assert steps["ddp_resume_2_to_1"]["iterations"] == 4 and steps["ddp_resume_2_to_1"]["processes_then"] == 1
    assert steps["compile"]["iterations"] == 2
    recipes = steps["bench_recipe"]["recipes"]
    assert list(recipes) == list(PUBLISHED_RECIPES)
    for row in recipes.values():
        assert row["mem_gib"] > 0 and row["eval_fps"] > 0 and row["device_path_samples_per_s"] > 0
        assert row["projected_3600_iter_h"] == pytest.approx(3600 * 256 / row["train_samples_per_s"] / 3600, rel=0.02)
    assert set(steps["eval_scale"]["methods"]) == {"bounds", "chunks", "former"}


def test_eval_scale_step_fails_when_a_method_changes_the_class_map(monkeypatch):
    """The step's verdict (the all-steps test above runs it for real): maps that differ from the full resize's fail
    it, naming the pixels; equal maps pass with each method's figures."""
    from imagenets_hf.benchmarks import eval_scale

    row = {"s_per_image": 0.5, "peak_rss_gb": 1.0}
    result = {"machine": "m", "bounds": row, "chunks": row, "former": row, "maps_equal": False}
    result["pixels_differing"] = {"bounds": 3, "chunks": 0}
    monkeypatch.setattr(eval_scale, "run_eval_scale_benchmark", lambda **kwargs: result)
    with pytest.raises(CheckFailed, match="class maps differ from the full resize's: .*'bounds': 3"):
        check_gpu.check_eval_scale(torch.device("cpu"), check_gpu.toy_sizes())
    result.update(maps_equal=True, pixels_differing={"bounds": 0, "chunks": 0})
    step = check_gpu.check_eval_scale(torch.device("cpu"), check_gpu.toy_sizes())
    assert step.status == "pass" and step.summary == "maps equal; s an image bounds 0.500, chunks 0.500, former 0.500"
    assert step.details["methods"]["bounds"] == row


def test_eval_scale_step_fails_when_the_gpu_default_holds_too_much_memory(monkeypatch):
    """On CUDA the chunked post-processing must stay under the bar (the former full resize needs 3.4 GiB for one
    1000x1000 image); the CPU runs report no CUDA peak and are not held to it."""
    from imagenets_hf.benchmarks import eval_scale

    row = {"s_per_image": 0.5, "peak_rss_gb": 1.0}
    chunks = {**row, "cuda_peak_gb": check_gpu.EVAL_SCALE_CUDA_PEAK_GB + 0.2}
    result = {"machine": "m", "bounds": row, "chunks": chunks, "former": row, "maps_equal": True}
    monkeypatch.setattr(eval_scale, "run_eval_scale_benchmark", lambda **kwargs: result)
    with pytest.raises(CheckFailed, match=r"chunks peaked at 1.70 GB of CUDA memory \(bar 1.5 GB\)"):
        check_gpu.check_eval_scale(torch.device("cpu"), check_gpu.toy_sizes())
    chunks["cuda_peak_gb"] = 0.4
    assert check_gpu.check_eval_scale(torch.device("cpu"), check_gpu.toy_sizes()).status == "pass"


def test_a_failing_step_fails_the_command_and_hides_no_other(mini_dir, monkeypatch, capsys):
    """Without CUDA the check picks toy sizes by itself and says so; a step that finds a wrong result and one that
    raises are both reported (the raised one with its traceback), the next step still runs, and the exit status is 1."""

    def wrong(*args):
        raise CheckFailed("labels differ on 12 pixels")

    def crashing(*args):
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    def fine(*args):
        return StepResult("", "pass", summary="compiled", details={"iterations": 1})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(check_gpu, "check_demo", crashing)
    monkeypatch.setattr(check_gpu, "check_device_path", wrong)
    monkeypatch.setattr(check_gpu, "check_compile", fine)
    args = ["--data-dir", str(mini_dir), "--steps", "demo_fp16,device_path,compile"]
    code, lines, summary = run_script(args, capsys)
    assert code == 1 and summary["ok"] is False and summary["toy"] is True
    assert any("toy sizes, no CUDA here" in line for line in lines)
    steps = summary["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "demo_fp16": "fail",
        "device_path": "fail",
        "compile": "pass",
    }
    assert steps["demo_fp16"]["summary"] == "RuntimeError: CUDA error: an illegal memory access"
    assert "Traceback" in steps["demo_fp16"]["traceback"]
    assert steps["device_path"]["summary"] == "labels differ on 12 pixels" and "traceback" not in steps["device_path"]
    assert steps["compile"]["iterations"] == 1
    assert lines[-2].startswith("FAILED: demo_fp16, device_path; cpu")


def test_unknown_step_is_a_usage_error(capsys):
    spec = importlib.util.spec_from_file_location("check_gpu_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--steps", "demo_fp16,warp_drive"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "error: argument --steps: expected a comma-separated list of demo_fp16" in err and "warp_drive" in err
    assert len(err.splitlines()) == 1


def test_ddp_step_is_skipped_saying_so_with_one_gpu(tmp_path, monkeypatch):
    """At full size with one GPU the DDP step runs nothing and says why; a skip does not fail the check."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = check_gpu.check_ddp_resume(tmp_path, tmp_path, check_gpu.full_sizes(), "fp16", toy=False)
    assert (result.status, result.summary, result.details) == ("skip", "needs 2 GPUs, 1 here", {"gpus": 1})
    summary = {"steps": {"ddp_resume_2_to_1": {"status": "skip", "seconds": 0.0, "summary": result.summary}}}
    lines = check_gpu.format_check_table({**summary, "device": "cuda", "machine": "GPU", "toy": False, "seconds": 1})
    assert "SKIP" in lines[1] and lines[-1].startswith("all steps passed")


def test_a_failing_child_process_fails_its_step_with_its_last_line(tmp_path):
    command = [sys.executable, "-c", "import sys; print('working'); sys.exit('RuntimeError: no deterministic kernel')"]
    with pytest.raises(CheckFailed, match=r"^exit status 1 \(child.log\): RuntimeError: no deterministic kernel$"):
        check_gpu._child(command, tmp_path / "child.log", env={"CHECK_GPU_TEST": "1"})
    assert (tmp_path / "child.log").read_text().startswith("working")


def test_a_data_dir_that_is_not_the_mini_dataset_is_refused_untouched(tmp_path, monkeypatch, capsys):
    """`--data-dir` at a real dataset by mistake: one line, exit status 1, nothing deleted (the mini dataset's maker
    would replace its train-semi and validation folders)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # --cpu-toy sets it; restored after the test
    (tmp_path / "train-semi" / "n01443537").mkdir(parents=True)
    (tmp_path / "train-semi" / "n01443537" / "keep.JPEG").write_bytes(b"not ours")
    spec = importlib.util.spec_from_file_location("check_gpu_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--cpu-toy", "--data-dir", str(tmp_path), "--steps", "device_path"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"error: --data-dir {tmp_path} does not hold the mini dataset: the check trains the demo on "
        "it; pass a folder that holds it or does not exist yet (it is made there)"
    )
    assert (tmp_path / "train-semi" / "n01443537" / "keep.JPEG").read_bytes() == b"not ours"
