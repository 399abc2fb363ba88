"""One run per output folder, checkpoints that survive a kill, data made only where asked, Ctrl-C that says how to go on.

Training here is a 2-layer ViT 32 wide on 32 px crops of the mini dataset (seconds per run on CPU).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_runs import TINY_RECIPE, cli_args

from imagenets_hf.training.checkpoints import (
    MANIFEST_FILE_NAME,
    checkpoint_problem,
    newest_complete_checkpoint,
    prune_checkpoints,
)
from imagenets_hf.training.finetune import finetune
from imagenets_hf.training.recipes import load_recipe
from imagenets_hf.training.run_folder import RunFolderError, check_output_dir, resume_command

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "finetune.py"

TINY = TINY_RECIPE


def tiny_recipe(mini_dir: Path, output_dir: Path, **overrides):
    return load_recipe("demo", {**TINY, "data_dir": str(mini_dir), "output_dir": str(output_dir), **overrides})


def assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    expected, actual = load_file(expected_dir / "model.safetensors"), load_file(actual_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def straight_run(mini_dir, tmp_path_factory) -> Path:
    """The uninterrupted 6-iteration run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    finetune(tiny_recipe(mini_dir, out), progress=False)
    return out


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(mini_dir, straight_run, tmp_path):
    before = snapshot(straight_run)
    with pytest.raises(RunFolderError, match=r"already holds a run: pass --resume .* or --overwrite"):
        finetune(tiny_recipe(mini_dir, straight_run), progress=False)
    assert snapshot(straight_run) == before  # nothing written, nothing deleted

    # --overwrite deletes the old run first: no checkpoint of it survives into the new one
    copy = tmp_path / "copy"
    finetune(tiny_recipe(mini_dir, copy, max_iters=4, checkpoint_interval=1), progress=False)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["checkpoint_3", "checkpoint_4"]
    finetune(tiny_recipe(mini_dir, copy), overwrite=True, progress=False)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["checkpoint_4", "checkpoint_6"]
    assert_same_weights(straight_run, copy)

    with pytest.raises(RunFolderError, match="pass one of them"):
        finetune(tiny_recipe(mini_dir, copy), resume="latest", overwrite=True, progress=False)


def test_a_non_empty_folder_without_a_run_is_never_deleted(mini_dir, tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match="not empty and holds no run"):
            finetune(tiny_recipe(mini_dir, folder), overwrite=overwrite, progress=False)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_resume_refuses_another_recipe_naming_the_fields(mini_dir, straight_run, tmp_path):
    with pytest.raises(
        RunFolderError, match=r"different recipe \(crop_size: 32 there, 48 now; lr: 0\.002 there, 0\.01 now\)"
    ):
        finetune(tiny_recipe(mini_dir, straight_run, lr=0.01, crop_size=48), resume="latest", progress=False)
    with pytest.raises(RunFolderError, match="nothing to resume"):
        finetune(tiny_recipe(mini_dir, tmp_path / "empty"), resume="latest", progress=False)


def test_a_recipe_recorded_before_a_field_existed_keeps_the_behaviour_of_then(tmp_path):
    """A run folder whose recipe.yaml predates `drop_path_branches` trained with drop path on both branches (the field's
    later default is "mlp"): resuming it with today's default is refused naming the field, and evaluating one of its
    checkpoints builds the model as it trained."""
    from imagenets_hf.training.run_folder import load_run_recipe

    recipe = load_recipe("demo", {"output_dir": str(tmp_path / "old-run")})
    assert recipe.drop_path_branches == "mlp"
    recorded = recipe.to_dict()
    del recorded["drop_path_branches"]
    (tmp_path / "old-run").mkdir()
    (tmp_path / "old-run" / "recipe.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    assert load_run_recipe(tmp_path / "old-run" / "recipe.yaml").drop_path_branches == "both"
    with pytest.raises(RunFolderError, match=r"different recipe \(drop_path_branches: 'both' there, 'mlp' now\)"):
        check_output_dir(recipe, "latest", overwrite=False)
    check_output_dir(
        load_recipe("demo", {"output_dir": recipe.output_dir, "drop_path_branches": "both"}), "latest", False
    )


def test_resume_may_change_the_budget_and_the_intervals(mini_dir, straight_run, tmp_path):
    """Stopped at 3, resumed with other logging and checkpoint intervals: the straight run's weights (the intervals
    change nothing else). A larger iteration budget is accepted too (it extends the schedule)."""
    out = tmp_path / "budget"
    finetune(tiny_recipe(mini_dir, out), stop_after=3, progress=False)
    check_output_dir(tiny_recipe(mini_dir, out, max_iters=8), resume="latest", overwrite=False)
    finetune(tiny_recipe(mini_dir, out, log_interval=1, checkpoint_interval=3), resume="latest", progress=False)
    assert_same_weights(straight_run, out)


def test_ctrl_c_just_after_a_checkpoint_names_it(mini_dir, tmp_path, monkeypatch):
    """Ctrl-C after checkpoint_1 was renamed into place but before the loop recorded it: the message names that
    checkpoint and `--resume`, not "start again with --overwrite" (which would delete it). Seen once in a full run."""
    import imagenets_hf.training.finetune as finetune_module

    save = finetune_module.checkpoint

    def save_then_interrupt(run, done):
        save(run, done)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "checkpoint", save_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(finetune_module.TrainingInterrupted) as interrupted:
        finetune(tiny_recipe(mini_dir, out, checkpoint_interval=1), progress=False)
    message = str(interrupted.value)
    assert message.startswith("interrupted at iteration 1 of 6; last complete checkpoint ")
    assert str(out / "checkpoints" / "checkpoint_1") in message and message.endswith(" --resume")
    assert "--overwrite" not in message


def test_torn_newest_checkpoint_falls_back_to_the_previous_complete_one(mini_dir, straight_run, tmp_path, capsys):
    out = tmp_path / "torn"
    finetune(tiny_recipe(mini_dir, out, checkpoint_interval=1), stop_after=4, progress=False)
    newest = out / "checkpoints" / "checkpoint_4"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # what a kill during a copy leaves
    (out / "checkpoints" / ".incomplete-checkpoint_5").mkdir()  # a save killed before its rename
    assert "model.safetensors has" in checkpoint_problem(newest)
    choice = newest_complete_checkpoint(out)
    assert choice.path == out / "checkpoints" / "checkpoint_3"
    assert [p.name for p, _ in choice.skipped] == [".incomplete-checkpoint_5", "checkpoint_4"]

    capsys.readouterr()
    finetune(tiny_recipe(mini_dir, out, checkpoint_interval=1), resume="latest", progress=False)
    printed = capsys.readouterr().out
    assert "skipped checkpoint" in printed and "checkpoint_4: model.safetensors has" in printed
    assert "Resumed from" in printed and "checkpoint_3 at iteration 3" in printed
    assert_same_weights(straight_run, out)
    # the damaged and unfinished folders were cleaned up once newer complete checkpoints existed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_5", "checkpoint_6"]


def test_explicit_incomplete_checkpoint_is_refused(mini_dir, tmp_path):
    out = tmp_path / "explicit"
    finetune(tiny_recipe(mini_dir, out), stop_after=2, progress=False)
    checkpoint = out / "checkpoints" / "checkpoint_2"
    (checkpoint / MANIFEST_FILE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"cannot resume from {checkpoint}: no readable checkpoint.json"):
        finetune(tiny_recipe(mini_dir, out), resume=str(checkpoint), progress=False)


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    for iteration, complete in ((1, True), (2, True), (3, True), (4, False)):
        path = folder / f"checkpoint_{iteration}"
        path.mkdir(parents=True)
        (path / "a.bin").write_bytes(b"x" * iteration)
        if complete:
            (path / MANIFEST_FILE_NAME).write_text(json.dumps({"files": {"a.bin": iteration}}))
    (folder / ".incomplete-checkpoint_2").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    # checkpoint_4 is not complete, so it does not count and is kept (newer than the newest complete one)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_2", "checkpoint_3", "checkpoint_4"]


def test_the_demo_makes_data_only_where_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mistyped = tmp_path / "data" / "minii"
    with pytest.raises(FileNotFoundError, match=r"data folder .*minii does not exist: pass --data-dir"):
        finetune(load_recipe("demo", {**TINY, "data_dir": str(mistyped), "output_dir": "out1"}), progress=False)
    assert not mistyped.exists()
    assert not (tmp_path / "data" / "mini").exists()  # not at the default folder either
    recipe = load_recipe("demo", {**TINY, "data_dir": str(mistyped), "output_dir": "out2", "max_iters": 3})
    finetune(recipe, make_mini_dataset=True, progress=False)
    assert (mistyped / ".mini_complete").is_file()


def test_resume_command_replaces_the_start_only_flags(monkeypatch):
    argv = ["scripts/finetune.py", "--data-dir", "d", "--overwrite", "--stop-after", "3", "--lr=1e-3", "--resume"]
    assert resume_command(argv) == "python scripts/finetune.py --data-dir d --lr=1e-3 --resume"
    argv = ["scripts/finetune.py", "--resume", "out/checkpoints/checkpoint_2", "--make-mini-dataset", "--no-progress"]
    assert resume_command(argv) == "python scripts/finetune.py --no-progress --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command(["s.py", "--x", "a b"]) == "accelerate launch --num_processes 2 s.py --x 'a b' --resume"


# -- the command line, killed --------------------------------------------------------------------------------------

# Without --checkpoint-interval: the command-line tests give their own.
TINY_ARGS = [*cli_args({k: v for k, v in TINY.items() if k != "checkpoint_interval"}), "--no-progress"]


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    # A session of its own: `kill` below kills the whole process group, as a shell's kill of a job or a cluster
    # scheduler does (a lone SIGKILL would leave the evaluation's DataLoader workers behind, holding the pipe).
    # SIGINT back to its default: a test run started in the background by a shell without job control inherits it
    # ignored, and Python then installs no KeyboardInterrupt handler (Ctrl-C below would do nothing).
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_training(process: subprocess.Popen) -> list[str]:
    """Read the output up to the line that says training starts (or the end)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Fine-tuning"):
            break
    return lines


def run_to_the_end(args: list[str]) -> str:
    process = start(args)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def straight_cli_run(mini_dir, tmp_path_factory) -> Path:
    """The uninterrupted run from the command line, with the thread count of the interrupted ones (float sums
    depend on it)."""
    out = tmp_path_factory.mktemp("straight_cli") / "run"
    run_to_the_end(["--data-dir", str(mini_dir), "--output-dir", str(out), "--checkpoint-interval", "1", *TINY_ARGS])
    return out


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_finishes_bitwise_equal(mini_dir, straight_cli_run, tmp_path):
    """A checkpoint every iteration, so that many kills land during a save; after each kill `--resume latest` goes
    on from the newest complete checkpoint (or from 0 when none was completed)."""
    out = tmp_path / "killed"
    args = ["--data-dir", str(mini_dir), "--output-dir", str(out), "--checkpoint-interval", "1", *TINY_ARGS]
    chooser = random.Random(0)
    kills = 0
    for attempt in range(4):
        process = start(args + (["--resume"] if attempt else []))
        wait_for_training(process)
        time.sleep(chooser.uniform(0.0, 1.5))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.communicate(timeout=600)
        if (out / "results.json").exists():
            break
    assert kills >= 3
    run_to_the_end([*args, "--resume"])
    assert_same_weights(straight_cli_run, out)


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_resume_command_that_works(mini_dir, straight_cli_run, tmp_path):
    out = tmp_path / "interrupted"
    args = ["--data-dir", str(mini_dir), "--output-dir", str(out), "--checkpoint-interval", "1", *TINY_ARGS]
    process = start(args)
    wait_for_training(process)
    deadline = time.monotonic() + 120
    while newest_complete_checkpoint(out).path is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends (to the foreground group)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output
    assert "interrupted at iteration" in lines[-1] and "last complete checkpoint" in lines[-1], lines[-1]
    command = lines[-1].split("resume with: ")[1]
    assert command.startswith("python ") and command.endswith(" --resume")
    run_to_the_end(shlex.split(command)[2:])  # python SCRIPT ARGS...: the same interpreter and script here
    assert_same_weights(straight_cli_run, out)


@pytest.mark.parametrize("mistake", ["unknown encoder", "pretrained of another shape"])
def test_a_failed_start_leaves_the_folder_unclaimed(mistake, mini_dir, tmp_path, monkeypatch, capsys):
    """A start that fails on the model or its weights writes no recipe.yaml: the corrected command is not refused
    ("already holds a run"). An unknown encoder name is one line with the close timm names."""
    from script_runner import run_script

    from imagenets_hf.model.encoder import build_encoder
    from imagenets_hf.training.run_folder import holds_run

    out = tmp_path / "run"
    args = ["--data-dir", mini_dir, *cli_args(TINY), "--output-dir", out, "--no-progress"]
    if mistake == "unknown encoder":
        args += ["--encoder-name", "vit_smal_patch16_224"]
    else:
        wider = {**TINY["encoder_kwargs"], "embed_dim": 48}
        torch.save(build_encoder("vit_base_patch16_224", wider).state_dict(), tmp_path / "wider.pth")
        args += ["--pretrained", tmp_path / "wider.pth"]
    status, lines = run_script("finetune", *args, monkeypatch=monkeypatch, capsys=capsys)
    errors = [line for line in lines if line.startswith("finetune.py: error: ")]
    assert status == 1 and len(errors) == 1, lines
    if mistake == "unknown encoder":
        assert errors[0].startswith(
            "finetune.py: error: unknown timm encoder 'vit_smal_patch16_224' (encoder_name, --encoder-name); "
            "close timm names: vit_small_patch16_224, "
        ), errors
    else:
        assert "shape mismatch" in errors[0], errors
    assert not holds_run(out)
    check_output_dir(tiny_recipe(mini_dir, out), resume=None, overwrite=False)  # the corrected command may start
