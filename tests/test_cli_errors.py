"""Every script's mistakes end in one line and a non-zero exit status, and write nothing (`imagenets_hf.cli`).

Most cases run a script in this process exactly as `python scripts/X.py ARGS` would (`runpy` with `__main__`, the
script's own `sys.exit(main())`), so that torch is imported once; a few run as real subprocesses to check the wiring.
"""

from __future__ import annotations

import dataclasses
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from script_runner import run_script

from imagenets_hf import cli
from imagenets_hf.training.recipes import Recipe, RecipeError

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
WNID = "n01000001"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


def run_subprocess(name: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """An ImageNet-S-shaped folder: what the scripts check before they load a model (one class, one image)."""
    root = tmp_path / "data"
    for folder in ("validation", "test"):
        (root / folder / WNID).mkdir(parents=True)
        (root / folder / WNID / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"not decoded by these checks")
    return root


# -- usage errors: exit 2, `<script>: error: <what> (see --help)` ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--recipe", "nope"],
            "finetune.py: error: unknown recipe 'nope'; available: demo, demo-semi, mae-base-finetuned, "
            "mae-base-pretrained, mae-base-pretrained-semi, sere-small-finetuned, sere-small-pretrained, "
            "sere-small-pretrained-semi; not published for ImageNet-S: dinov2-base-fcn, dinov2-base-fcn-semi, "
            "dinov2-small-linear (or a YAML file) (see --help)",
        ),
        (
            ["--max-iters", "2"],
            "finetune.py: error: --max-iters 2: warmup_iters (35, from recipe demo) must be smaller than max_iters (2) "
            "(see --help)",
        ),
        (
            ["--warmup-iters", "800"],
            "finetune.py: error: --warmup-iters 800: warmup_iters (800) must be smaller than max_iters (700, from "
            "recipe demo) (see --help)",
        ),
        (["--lr", "abc"], "finetune.py: error: --lr abc: field 'lr' expects a number, got 'abc' (see --help)"),
        (["--set", "foo=1"], "finetune.py: error: --set foo=1: unknown recipe field 'foo' (see --help)"),
        (
            ["--set", "max_iter=10"],
            "finetune.py: error: --set max_iter=10: unknown recipe field 'max_iter'; did you mean 'max_iters'? "
            "(see --help)",
        ),
        (
            ["--pipeline", "mine"],
            "finetune.py: error: --pipeline mine: pipeline ('mine') must be one of mmseg, imagenetsegmodel "
            "(see --help)",
        ),
        (["--config", "missing.yaml"], "finetune.py: error: no such recipe file: missing.yaml (see --help)"),
        (["--stop-after", "x"], "finetune.py: error: argument --stop-after: invalid int value: 'x' (see --help)"),
    ],
    ids=["recipe", "max-iters", "warmup-iters", "lr", "set-unknown", "set-close", "choice", "config", "argparse"],
)
def test_finetune_usage_errors(args, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, lines = run_script(
        "finetune", *args, "--output-dir", tmp_path / "run", monkeypatch=monkeypatch, capsys=capsys
    )
    assert (status, lines) == (2, [line])
    assert sorted(os.listdir(tmp_path)) == []  # no run folder, no data/mini


def test_other_usage_errors(data_dir, tmp_path, monkeypatch, capsys):
    status, lines = run_script("evaluate", monkeypatch=monkeypatch, capsys=capsys)
    assert (status, lines) == (
        2,
        ["evaluate.py: error: the following arguments are required: --model, --data-dir (see --help)"],
    )
    status, lines = run_script("export_dataset", "--data-dir", data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert (status, lines) == (2, ["export_dataset.py: error: give --out, --push-to-hub, or both (see --help)"])
    out = tmp_path / "converted"
    args = ["--checkpoint", "x.pth", "--encoder", "vit_small_patch16_224", "--num-labels", "3", "--out", out]
    status, lines = run_script(
        "convert_checkpoint", *args, "--encoder-kwargs", "{depth: 1}", monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("convert_checkpoint.py: error: argument --encoder-kwargs: not valid JSON")
    assert lines[0].endswith("'{depth: 1}' (see --help)") and not out.exists()


@pytest.mark.parametrize(
    ("script", "args", "line"),
    [
        ("bench_data", ["--images", "0"], "argument --images: expected an integer of at least 1, got 0"),
        ("bench_data", ["--repeats", "x"], "argument --repeats: expected an integer, got 'x'"),
        ("bench_recipe", ["--toy", "--iters", "0"], "argument --iters: expected an integer of at least 1, got 0"),
        ("bench_recipe", ["--toy", "--warmup", "-1"], "argument --warmup: expected an integer of at least 0, got -1"),
        ("bench_model", ["--batch-size", "0"], "argument --batch-size: expected an integer of at least 1, got 0"),
        ("bench_metric", ["--images", "-5"], "argument --images: expected an integer of at least 1, got -5"),
        ("bench_eval_scale", ["--images", "0"], "argument --images: expected an integer of at least 1, got 0"),
        (
            "bench_modes",
            ["--model", "m", "--data-dir", "d", "--images", "0"],
            "argument --images: expected an integer of at least 1, got 0",
        ),
    ],
)
def test_benchmarks_refuse_counts_that_measure_nothing(script, args, line, monkeypatch, capsys):
    """Zero images or iterations used to end in a division by zero reported as an unexpected error."""
    status, lines = run_script(script, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert (status, lines) == (2, [f"{script}.py: error: {line} (see --help)"])


# -- runtime errors: exit 1, `<script>: error: <message>`, nothing written -------------------------------------------


def test_evaluate_and_predict_errors(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # `outputs/demoo` is then a mistyped folder, not a Hub repository
    (tmp_path / "not-a-model").mkdir()
    metrics = tmp_path / "metrics.json"

    def evaluate(*args) -> tuple[int, list[str]]:
        return run_script("evaluate", *args, "--output", metrics, monkeypatch=monkeypatch, capsys=capsys)

    missing = tmp_path / "missing-model"
    assert evaluate("--model", missing, "--data-dir", data_dir) == (
        1,
        [f"evaluate.py: error: no such model folder: {missing}"],
    )
    assert evaluate("--model", "outputs/demoo", "--data-dir", data_dir) == (
        1,
        ["evaluate.py: error: no such model folder: outputs/demoo"],
    )
    assert evaluate("--model", "./demoo", "--data-dir", data_dir) == (
        1,
        ["evaluate.py: error: no such model folder: ./demoo"],
    )
    assert evaluate("--model", "not-a-model", "--data-dir", data_dir) == (
        1,
        [
            "evaluate.py: error: not-a-model: not a saved model folder (no config.json); give the folder that "
            "finetune.py or convert_checkpoint.py wrote, or a training checkpoint (<run>/checkpoints/checkpoint_<N>)"
        ],
    )
    from imagenets_hf.model.convert import looks_like_hub_repo_id

    # a plain owner/name still goes to the Hub; what looks local never does
    assert looks_like_hub_repo_id("someone/vit-fcn") and looks_like_hub_repo_id("timm/vit_base_patch16_224.mae")
    assert not any(map(looks_like_hub_repo_id, ["outputs/demoo", "./demoo", "~/demoo", "/abs/demoo", "a/b/c", "demo"]))
    # In a fresh clone `outputs/` does not exist yet, so `outputs/demoo` has the shape of a Hub id: where the Hub
    # cannot be reached, the line says so at once (no retries, no connection error). (.invalid never resolves.)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://hub.invalid")
    assert evaluate("--model", "runs/demoo", "--data-dir", data_dir) == (
        1,
        [
            "evaluate.py: error: no such model folder: runs/demoo (and the Hugging Face Hub cannot be reached from "
            "here to look for a repository of that name)"
        ],
    )
    # the data folder is checked first: these say so even with a model that does not exist
    status, lines = evaluate("--model", missing, "--data-dir", tmp_path / "no-data")
    assert (status, lines) == (
        1,
        [
            f"evaluate.py: error: no such data folder: {tmp_path / 'no-data'} (a prepared "
            f"ImageNet-S folder; `python scripts/make_mini_dataset.py --out {tmp_path / 'no-data'}` writes the synthetic mini one)"
        ],
    )
    status, lines = evaluate("--model", missing, "--data-dir", tmp_path / "outputs")
    assert (status, lines) == (
        1,
        [
            f"evaluate.py: error: {tmp_path / 'outputs'}: not an ImageNet-S folder: none of train-semi/, validation/, "
            "test/, train/ is there"
        ],
    )
    assert not metrics.exists()

    out = tmp_path / "predictions"

    def predict(model, images, *args) -> tuple[int, list[str]]:
        args = ["--model", model, "--images", images, "--out", out, "--submission", tmp_path / "s.zip", *args]
        return run_script("predict", *args, monkeypatch=monkeypatch, capsys=capsys)

    assert predict(missing, tmp_path / "no-images") == (
        1,
        [f"predict.py: error: no such image folder: {tmp_path / 'no-images'}"],
    )
    assert predict(missing, data_dir / "test") == (1, [f"predict.py: error: no such model folder: {missing}"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # enough for the checks made before loading
    assert predict("model", data_dir / "test", "--method-file", "method.txt") == (
        1,
        ["predict.py: error: no such method file: method.txt"],
    )
    assert sorted(os.listdir(tmp_path)) == ["data", "model", "not-a-model", "outputs"]


def test_submission_checkpoint_export_prepare_and_mini_errors(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def run(name, *args) -> tuple[int, list[str]]:
        return run_script(name, *args, monkeypatch=monkeypatch, capsys=capsys)

    assert run("check_submission", "missing.zip", "--data-dir", data_dir) == (
        1,
        ["check_submission.py: error: no such submission zip: missing.zip"],
    )
    Path("notzip.zip").write_text("hello")
    assert run("check_submission", "notzip.zip", "--data-dir", data_dir) == (
        1,
        [
            "check_submission.py: error: notzip.zip: not a zip file (File is not a zip file); give the zip "
            "predict.py --submission wrote"
        ],
    )

    tiny = '{"depth": 1, "embed_dim": 32, "num_heads": 2}'
    convert = [
        "--encoder",
        "vit_small_patch16_224",
        "--encoder-kwargs",
        tiny,
        "--num-labels",
        "3",
        "--out",
        "converted",
    ]
    for checkpoint in ("missing.pth", "./nope"):
        assert run("convert_checkpoint", "--checkpoint", checkpoint, *convert) == (
            1,
            [
                f"convert_checkpoint.py: error: no such file or folder: {checkpoint} (a checkpoint is a file, a "
                "folder, an http(s) URL or an owner/name Hub repository id)"
            ],
        )

    status, lines = run("export_dataset", "--data-dir", "no-data", "--out", "exported")
    assert (
        status == 1
        and len(lines) == 1
        and lines[0].startswith("export_dataset.py: error: no such data folder: no-data (")
    )

    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    prepare = ["--subset", "50", "--out", "prepared", "--lists", "lists"]
    assert run("prepare_imagenets", "--imagenet", "no-imagenet", "--annotations", "a.zip", *prepare) == (
        1,
        [
            "prepare_imagenets.py: error: no such ImageNet folder: no-imagenet (the ImageNet-1k root with train/ and val/)"
        ],
    )
    assert run("prepare_imagenets", "--imagenet", "imagenet", "--annotations", "ImageNetS50.zip", *prepare) == (
        1,
        ["prepare_imagenets.py: error: no such annotation archive or folder: ImageNetS50.zip"],
    )

    kept = data_dir / "test" / WNID / "ILSVRC2012_val_00000001.JPEG"
    before = kept.read_bytes()
    assert run("make_mini_dataset", "--out", data_dir) == (
        1,
        [
            f"make_mini_dataset.py: error: {data_dir} already holds validation: pass overwrite=True (--overwrite) to "
            "delete the mini dataset's folders there and write it again, or choose another folder"
        ],
    )
    assert kept.read_bytes() == before and sorted(os.listdir(data_dir)) == ["test", "validation"]
    assert sorted(os.listdir(tmp_path)) == ["data", "imagenet", "notzip.zip"]


# -- Ctrl-C, unexpected errors, --debug ------------------------------------------------------------------------------


def test_ctrl_c_prints_the_interruption_message_and_exits_130(tmp_path, monkeypatch, capsys):
    import imagenets_hf.training.finetune as finetune_module

    message = "interrupted at iteration 3 of 700; last complete checkpoint c; resume with: python x --resume"
    for raised, line in (
        (KeyboardInterrupt(message), f"finetune.py: {message}"),
        (KeyboardInterrupt(), "finetune.py: interrupted"),
    ):

        def interrupted(*args, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr(finetune_module, "finetune", interrupted)
        status, lines = run_script("finetune", "--output-dir", tmp_path / "run", monkeypatch=monkeypatch, capsys=capsys)
        assert (status, lines) == (130, [line])


def test_an_unexpected_error_is_one_line_naming_its_type(tmp_path, monkeypatch, capsys):
    import imagenets_hf.evaluation.submission as submission

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(submission, "check_submission", broken)
    status, lines = run_script(
        "check_submission", "s.zip", "--data-dir", tmp_path, monkeypatch=monkeypatch, capsys=capsys
    )
    assert (status, lines) == (
        1,
        [
            "check_submission.py: error: RuntimeError: boom second line (unexpected error; rerun with --debug for the traceback)"
        ],
    )


def test_debug_shows_the_traceback(data_dir, tmp_path, monkeypatch, capsys):
    completed = run_subprocess("make_mini_dataset", "--out", data_dir, "--debug")
    assert completed.returncode == 1
    assert completed.stderr.startswith("Traceback (most recent call last):"), completed.stderr
    assert (
        completed.stderr.rstrip().splitlines()[-1].startswith(f"FileExistsError: {data_dir} already holds validation")
    )
    # IMAGENETS_DEBUG=1 does the same, also for a library error a script turns into a usage error
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "finetune.py"), "--max-iters", "2"])
    with pytest.raises(RecipeError, match=r"--max-iters 2: warmup_iters \(35, from recipe demo\)"):
        runpy.run_path(str(SCRIPTS / "finetune.py"), run_name="__main__")


def test_real_processes_print_one_line(tmp_path):
    usage = run_subprocess("finetune", "--max-iters", "2", "--output-dir", tmp_path / "run")
    assert usage.returncode == 2 and usage.stdout == ""
    assert usage.stderr.splitlines() == [
        "finetune.py: error: --max-iters 2: warmup_iters (35, from recipe demo) must be smaller than max_iters (2) "
        "(see --help)"
    ]
    (tmp_path / "data" / "train").mkdir(parents=True)
    runtime = run_subprocess("make_mini_dataset", "--out", tmp_path / "data")
    assert runtime.returncode == 1 and runtime.stdout == ""
    assert runtime.stderr.splitlines() == [
        f"make_mini_dataset.py: error: {tmp_path / 'data'} already holds train: pass overwrite=True (--overwrite) to "
        "delete the mini dataset's folders there and write it again, or choose another folder"
    ]
    assert sorted(os.listdir(tmp_path)) == ["data"] and os.listdir(tmp_path / "data") == ["train"]


# -- finetune: a missing data folder ----------------------------------------------------------------------------------


def run_finetune_without_data(tmp_path, monkeypatch, capsys) -> tuple[int, list[str]]:
    args = ["--data-dir", tmp_path / "missing", "--output-dir", tmp_path / "run", "--no-progress", "--num-workers", "0"]
    return run_script("finetune", *args, monkeypatch=monkeypatch, capsys=capsys)


def test_finetune_missing_data_folder_is_one_line(tmp_path, monkeypatch, capsys):
    assert run_finetune_without_data(tmp_path, monkeypatch, capsys) == (
        1,
        [
            f"finetune.py: error: data folder {tmp_path / 'missing'} does not exist: pass --data-dir with a prepared "
            "ImageNet-S folder (or --make-mini-dataset to write the synthetic mini dataset there)"
        ],
    )


def test_finetune_missing_data_folder_writes_nothing(tmp_path, monkeypatch, capsys):
    run_finetune_without_data(tmp_path, monkeypatch, capsys)
    assert not (tmp_path / "run").exists()


# -- --help and the message formatting -------------------------------------------------------------------------------


def test_finetune_help_describes_every_recipe_field(monkeypatch, capsys):
    status, lines = run_script("finetune", "--help", monkeypatch=monkeypatch, capsys=capsys)
    text = "\n".join(lines)
    assert status == 0 and "<class" not in text and "--debug" in text

    def squeeze(value: str) -> str:  # argparse wraps (and breaks at hyphens) to the terminal width
        return re.sub(r"\s+", "", value)

    for f in dataclasses.fields(Recipe):
        flag = f"--{f.name.replace('_', '-')}"
        # the flag, its type (INT, NUMBER, BOOL, TEXT, LIST, MAPPING) or choices, then what it is
        shown = re.escape(squeeze(flag)) + r"(\{[\w,]+\}|[A-Z]+)" + re.escape(squeeze(f.metadata["help"]))
        assert len(f.metadata["help"]) > 10 and re.search(shown, squeeze(text)), f.name


def test_error_lines():
    from torch._utils import ExceptionWrapper

    try:
        raise ValueError("/data/x.JPEG: cannot read image (truncated)")
    except ValueError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ValueError) as from_worker:
        wrapper.reraise()
    assert "Original Traceback" in str(from_worker.value)
    assert cli.error_lines(from_worker.value) == ["/data/x.JPEG: cannot read image (truncated)"]
    listing = FileNotFoundError("ImageNetS50: expected files not found: 2 missing (first 2 listed)\n  a.JPEG\n  b.png")
    assert cli.error_lines(listing) == [
        "ImageNetS50: expected files not found: 2 missing (first 2 listed)",
        "  a.JPEG",
        "  b.png",
    ]
    assert cli.error_lines(OSError("We couldn't connect.\nCheck your connection.")) == [
        "We couldn't connect. Check your connection."
    ]
    assert cli.error_lines(KeyError("k")) == ["KeyError: k (unexpected error; rerun with --debug for the traceback)"]
    assert cli.debug_requested(["--lr", "1", "--deb"]) and not cli.debug_requested(["--", "--debug"])


@pytest.mark.parametrize(
    ("script", "args", "line"),
    [
        ("finetune", ["--max_iters", "10"], "unrecognized arguments: --max_iters 10; did you mean --max-iters?"),
        ("finetune", ["--lr-rate", "0.1"], "unrecognized arguments: --lr-rate 0.1; did you mean --lr?"),
        (
            "predict",
            ["--model", "m", "--images", "i", "--out", "o", "--batch_size=2", "--skip_bad"],
            "unrecognized arguments: --batch_size=2 --skip_bad; did you mean --batch_size -> --batch-size, "
            "--skip_bad -> --skip-bad?",
        ),
        ("evaluate", ["--model", "m", "--data-dir", "d", "--zebra"], "unrecognized arguments: --zebra"),
    ],
    ids=["underscore", "close", "two", "nothing-close"],
)
def test_unknown_options_suggest_close_ones(script, args, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, lines = run_script(script, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert (status, lines) == (2, [f"{script}.py: error: {line} (see --help)"])


def test_split_names_in_either_spelling(data_dir, tmp_path, monkeypatch, capsys):
    """`train_semi` (documented) and `train-semi` (the folder's name) both reach the library in every script."""
    for spelling in ("train_semi", "train-semi"):
        status, lines = run_script(
            "evaluate", "--model", tmp_path / "nope", "--data-dir", data_dir, "--split", spelling,
            monkeypatch=monkeypatch, capsys=capsys,
        )  # fmt: skip
        assert (status, lines) == (1, [f"evaluate.py: error: no such model folder: {tmp_path / 'nope'}"])
        status, lines = run_script(
            "make_overlays", "--model", tmp_path / "nope", "--data-dir", data_dir, "--out", tmp_path / "o.png",
            "--split", spelling, monkeypatch=monkeypatch, capsys=capsys,
        )  # fmt: skip
        assert (status, lines) == (1, [f"make_overlays.py: error: no such image folder: {data_dir / 'train-semi'}"])
    status, lines = run_script(
        "evaluate", "--model", "m", "--data-dir", data_dir, "--split", "test", monkeypatch=monkeypatch, capsys=capsys
    )
    assert (status, lines) == (
        2,
        ["evaluate.py: error: argument --split: unknown split 'test'; expected one of validation, train_semi "
         "(see --help)"],
    )  # fmt: skip


def test_torch_and_torchvision_mismatch_is_named(tmp_path, monkeypatch, capsys):
    """What a CPU torch meeting a CUDA torchvision raises on `import torchvision`, wrapped as transformers wraps it."""
    from importlib.metadata import version

    import imagenets_hf.evaluation.submission as submission

    def mismatched(*args, **kwargs):
        try:
            raise RuntimeError("operator torchvision::nms does not exist")
        except RuntimeError as err:
            raise RuntimeError("Failed to import transformers.models.vit because of the following error") from err

    monkeypatch.setattr(submission, "check_submission", mismatched)
    status, lines = run_script(
        "check_submission", "s.zip", "--data-dir", tmp_path, monkeypatch=monkeypatch, capsys=capsys
    )
    assert status == 1 and len(lines) == 1
    assert lines[0].startswith(
        f"check_submission.py: error: torch {version('torch')} and torchvision {version('torchvision')} do not match "
        "(operator torchvision::nms does not exist): install matching builds"
    )
