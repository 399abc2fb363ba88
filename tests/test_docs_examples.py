"""Every command in README.md and docs/*.md runs as written.

Each fenced ```bash / ```sh block runs in bash (`-e -o pipefail`: every command must succeed) and each ```python block
in a Python subprocess. First the main job runs exactly as README.md writes it (`python scripts/finetune.py`: it
writes `data/mini` and `outputs/demo`, which the other examples use), in a temporary folder holding a copy of the
repository's `scripts/`; a doc block with the same text is checked against that run rather than run again. Then each
document's blocks run in document order (later blocks may use what earlier ones wrote) in a folder of the document's
own, where the main job's `data/mini` and `outputs/demo` are linked in; two documents at a time.

A block that cannot run here (it needs ImageNet-1k, the network, a GPU, hours, or it installs packages) is a ```text
block introduced by a sentence saying why it is not run and which test covers it. Such a block that holds a command
must be listed in NOT_RUN (by its first line), and every NOT_RUN entry must still be in the docs: nothing is skipped
silently.

The device-path demo of docs/training.md doubles as the test that the demo learns on that path
(`test_the_device_path_example_learns`); the main job is the test that it learns on the worker path.

Cost on the shared 2-core x86_64 CPU machine: the main job about 4 minutes (one thread per process, set below), then
about 30 blocks of 2-90 s each (a Python process start, about 9 s with torch, timm and transformers, is most of a
short one), two at a time. The structural test alone takes a second (`-m "not slow"`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagenets_hf.benchmarks.check_gpu import DEMO_LEARNS_BAR  # the demo's mIoU bar, also the GPU check's

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}
MAIN_JOB = "python scripts/finetune.py"
BLOCK_TIMEOUT_S = 900
# pytest-timeout's limit for a test here: the first one to need `doc_runs` also waits for the main job and every
# document (several minutes on 2 cores, more on a busy machine), beyond the suite's 600 s a test.
pytestmark = pytest.mark.timeout(2400)
LANES = 2  # documents run at the same time (the CI machine has 2 cores)

# Blocks shown but not run, by their first line: why not, and what runs the same code instead. The sentence before
# each block in the docs says the same.
NOT_RUN = {
    'python -m pip install -e ".[dev]"': "installs packages into the environment; CI runs it (.ci/run)",
    "python -m pytest": "the test suite itself, this file included; CI runs it (.ci/run)",
    "python scripts/prepare_imagenets.py --imagenet /data/imagenet --annotations ImageNetS919.zip --subset 919 --out "
    "/data": "needs ImageNet-1k, the annotation archives, the weights and 8 GPUs (front page's real-data steps)",
    "python scripts/export_dataset.py --data-dir /data/ImageNetS919 --push-to-hub me/imagenets919 [--public] "
    "[--annotations-only]": "network and a Hub login; tests/test_data_export.py replaces the upload",
    "python scripts/prepare_imagenets.py --imagenet /data/imagenet --annotations ImageNetS919.zip \\": "needs "
    "ImageNet-1k and the archives; tests/test_data_prepare.py prepares a fake ImageNet",
    "python scripts/convert_checkpoint.py --checkpoint mae_pretrain_vit_base.pth \\": "downloads of the published "
    "checkpoints; tests/test_model_convert.py converts synthetic ones of every layout",
    "from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation": "needs the published checkpoint "
    "files; tests/test_model_convert.py",
    "accelerate launch --multi_gpu --num_processes 8 scripts/finetune.py \\": "ImageNet-S919, MAE weights, 8 GPUs; "
    "tests/test_train_finetune.py runs the loop on the mini dataset",
    "python scripts/finetune.py --recipe sere-small-pretrained --data-dir ImageNetS300 --subset 300 \\": "needs "
    "ImageNet-S300 and the SERE weights; tests/test_train_recipes.py",
    "python scripts/bench_model.py                                     # ViT-S/16 and ViT-B/16 at 224, batch 4, 3 "
    "iterations": "minutes on a CPU, the second line a GPU; the quick bench_model block runs the same code",
    "python scripts/bench_recipe.py              # the four published recipes, batch 32 per GPU, fp16 + "
    "GradScaler": "needs a GPU; the toy bench_recipe block and tests/test_train_bench_recipe.py",
    "accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --model outputs/demo --data-dir data/mini": "two "
    "more processes to start; tests/test_eval_distributed.py checks the two-process numbers",
    "accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py --output-dir outputs/demo-2proc": "a third "
    "demo run; tests/test_train_finetune.py trains on 2 CPU processes",
    "python scripts/finetune.py --output-dir outputs/demo-hub --push-to-hub me/imagenets-demo": "network and a Hub "
    "login; tests/test_deploy_hub.py pushes a tiny run and the printed push_model.py command with the upload replaced",
    "WANDB_MODE=offline python scripts/finetune.py --output-dir outputs/demo-wandb --report-to wandb": "a third demo "
    "run; tests/test_deploy_hub.py runs a tiny run with wandb offline",
    "python scripts/app.py --model outputs/demo": "serves until Ctrl-C; tests/test_app_browser.py drives it in "
    "headless Chromium",
    "python scripts/bench_data.py --images 64 --repeats 5": "a minute of a shared CPU; the quick bench_data block "
    "runs the same code",
    "python scripts/bench_eval_scale.py                   # 16 images of 375x500 and 2 of 1000x1000, batches of 8, "
    "CPU": "minutes of a shared CPU (the former path), the second line a GPU; the quick bench_eval_scale block and "
    "tests/test_bench_eval_scale.py run the same code",
    "python scripts/make_mini_dataset.py --out data/ImageNetS919 --scale 919 && python scripts/bench_scale.py "
    "--data-dir data/ImageNetS919 --work-dir /tmp/bench-scale": "writes 4.9 GB and takes tens of minutes; "
    "tests/test_bench_scale.py runs every stage at a toy scale",
    "python scripts/make_mini_dataset.py --out data/ImageNetS919 --scale 919   # 49,032 labelled and test images, "
    "4.9 GB": "writes 4.9 GB in minutes; the --scale 3 block above and tests/test_data_scale.py run the same code",
    "python scripts/bench_semi.py --labels-per-class 1 2 10 --seeds 0 1 2": "18 training runs, many minutes of a "
    "2-core CPU; tests/test_bench_semi.py runs the script at toy size and the demo-semi block runs the recipe",
    "python scripts/check_gpu.py                  # on a CUDA machine": "a GPU and minutes (its second line, toy "
    "sizes on the CPU, minutes of CI); tests/test_bench_check_gpu.py runs that second line",
}

# A line of a non-run block that a reader would type: a command (environment assignments before it included), or Python.
COMMAND_LINE = re.compile(
    r"^\s*(\$\s+)?([A-Z_][A-Z0-9_]*=\S*\s+)*(python3?|accelerate|pip3?|torchrun|tensorboard|hf|huggingface-cli|git|wget|curl|bash|sh|cd|"
    r"export|mkdir|cp|mv|rm|cat|printf)(\s|$)"
    r"|^\s*(import\s+\w|from\s+[\w.]+\s+import\s)"
)
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    before: str  # the paragraph before the opening fence

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO).as_posix()}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES

    @property
    def looks_like_a_command(self) -> bool:
        return any(COMMAND_LINE.match(line) for line in self.text.splitlines())


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with their language (empty when none) and the paragraph before them."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{index + 1}: a fenced block that is never closed")
        body = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[index + 1 : end])
        paragraph, back = [], index - 1
        while back >= 0 and not lines[back].strip():  # the blank line(s) between the paragraph and the fence
            back -= 1
        while back >= 0 and lines[back].strip():
            paragraph.insert(0, lines[back].strip())
            back -= 1
        blocks.append(Block(path, index + 1, language.lower(), body + "\n", " ".join(paragraph)))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in read_blocks(path)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.runs]


def test_every_block_runs_or_is_listed_as_not_run():
    """bash/sh/python blocks run (below); a text or unlabelled block holding a command must be on NOT_RUN, be
    introduced by a sentence saying it is not run and which test covers it, and every NOT_RUN entry must exist."""
    assert (REPO / "docs").is_dir() and len(DOC_FILES) >= 6, DOC_FILES
    main_jobs = [b for b in RUN_BLOCKS if b.path.name == "README.md" and b.text.strip() == MAIN_JOB]
    assert len(main_jobs) == 1, f"README.md must show the main job `{MAIN_JOB}` once as a bash block"
    problems = []
    listed_and_found = set()
    for block in ALL_BLOCKS:
        if block.runs or not block.looks_like_a_command:
            continue
        if block.first_line not in NOT_RUN:
            problems.append(f"{block.name}: a ```{block.language or ''} block holds a command but is not in NOT_RUN")
            continue
        listed_and_found.add(block.first_line)
        if block.language != "text":
            problems.append(f"{block.name}: a block that is not run is a ```text block, not ```{block.language}")
        intro = block.before.lower()
        if "not run" not in intro or not ("tests/test_" in intro or ".ci/run" in intro):
            problems.append(f"{block.name}: the sentence before it must say it is not run and which test covers it")
    for first_line in sorted(set(NOT_RUN) - listed_and_found):
        problems.append(f"NOT_RUN lists a block no longer in the docs: {first_line!r}")
    unknown = sorted({b.language for b in ALL_BLOCKS} - {"", "text", "yaml", "json", *RUN_LANGUAGES})
    if unknown:
        problems.append(f"fenced blocks in languages this test does not know: {unknown}")
    assert not problems, "\n".join(problems)


def _environment(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python`, `accelerate` of this venv
        HF_DATASETS_CACHE=str(work.parent / "hf-datasets-cache"),  # not the user's cache
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",  # the docs' runnable examples are CPU examples
        PYTHONUNBUFFERED="1",
    )
    # One thread per process, as the other end-to-end tests, whatever the caller's setting: beside the other test
    # workers, processes of 2 OpenMP threads that wait on each other slow everything down many times over (with
    # OMP_NUM_THREADS=2 the main job once ran past 15 minutes). The command lines stay exactly as the docs write them.
    env["OMP_NUM_THREADS"] = "1"
    env.pop("IMAGENETS_DEBUG", None)
    return env


def run_block(block_text: str, language: str, work: Path, scratch: Path) -> subprocess.CompletedProcess:
    if RUN_LANGUAGES[language] == "python":
        script = scratch / "block.py"
        script.write_text(block_text, encoding="utf-8")
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block_text]
    return subprocess.run(
        command, cwd=work, env=_environment(work), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )


def _failure(name: str, text: str, completed: subprocess.CompletedProcess) -> str:
    return (
        f"{name} failed (exit {completed.returncode}):\n{text}\n--- stdout (end) ---\n{completed.stdout[-3000:]}"
        f"\n--- stderr (end) ---\n{completed.stderr[-3000:]}"
    )


@dataclass
class DocRuns:
    """The main job's run and, by block name, the run of every other block."""

    main_work: Path
    main_command: str
    main_completed: subprocess.CompletedProcess
    works: dict[str, Path]  # document name -> its working folder
    blocks: dict[str, subprocess.CompletedProcess]


def copy_scripts(work: Path) -> None:
    # A copy, not a link: scripts/evaluate.py and bench_metric.py keep their own folder off sys.path by its path, and
    # Python puts a linked script's resolved folder there.
    shutil.copytree(REPO / "scripts", work / "scripts", ignore=shutil.ignore_patterns("__pycache__"))


def document_work(root: Path, main_work: Path, document: Path) -> Path:
    """A working folder for one document: scripts/, and the main job's data/mini and outputs/demo linked in (the
    only things the documents share); what its blocks write stays there."""
    work = root / document.stem
    copy_scripts(work)
    for shared in ("data/mini", "outputs/demo"):
        (work / shared).parent.mkdir(parents=True, exist_ok=True)
        (work / shared).symlink_to(main_work / shared, target_is_directory=True)
    return work


def run_document(blocks: list[Block], work: Path, scratch: Path) -> dict[str, subprocess.CompletedProcess]:
    results = {}
    for index, block in enumerate(blocks):
        block_scratch = scratch / f"block{index}"
        block_scratch.mkdir(parents=True)
        results[block.name] = run_block(block.text, block.language, work, block_scratch)
    return results


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory) -> DocRuns:
    """The README's main job exactly as written, then every other block: each document's blocks in order in a folder
    of its own, LANES documents at a time (a block is one process with one thread; the documents share only what
    the main job wrote)."""
    root = tmp_path_factory.mktemp("docs")
    main_work = root / "main"
    copy_scripts(main_work)
    readme_main_job = next(b for b in RUN_BLOCKS if b.path.name == "README.md" and b.text.strip() == MAIN_JOB)
    completed = run_block(readme_main_job.text, readme_main_job.language, main_work, root)
    assert completed.returncode == 0, _failure(readme_main_job.name, readme_main_job.text, completed)

    by_document: dict[Path, list[Block]] = {}
    for block in RUN_BLOCKS:
        if block.text.strip() != MAIN_JOB:  # the same command line as the main job (README's) is not run twice
            by_document.setdefault(block.path, []).append(block)
    works = {path.name: document_work(root / "documents", main_work, path) for path in by_document}
    blocks: dict[str, subprocess.CompletedProcess] = {}
    # the documents with the most blocks first, so that the short ones fill the lanes at the end
    order = sorted(by_document, key=lambda path: -len(by_document[path]))
    with ThreadPoolExecutor(max_workers=LANES) as pool:
        futures = [
            pool.submit(run_document, by_document[path], works[path.name], root / "scratch" / path.stem)
            for path in order
        ]
        for future in futures:
            blocks.update(future.result())
    return DocRuns(main_work, readme_main_job.text.strip(), completed, works, blocks)


@pytest.mark.slow
def test_main_job_as_written_trains_the_demo(doc_runs):
    """The README's main job made the mini dataset and a demo model that learned, with its card and picture."""
    assert doc_runs.main_command == MAIN_JOB
    out = doc_runs.main_work / "outputs" / "demo"
    results = json.loads((out / "results.json").read_text())
    stdout = doc_runs.main_completed.stdout
    assert results["mIoU"] > DEMO_LEARNS_BAR, results["mIoU"]
    assert f"mIoU {results['mIoU']:.2f} on 50 validation images" in stdout
    assert "mIoU (official, mean over all classes)" in stdout and "red solid disc" in stdout  # the synset file's names
    assert (doc_runs.main_work / "data" / "mini" / ".mini_complete").is_file()
    card = (out / "README.md").read_text()
    assert f"**{results['mIoU']:.2f}**" in card and "![predictions on validation images](predictions.png)" in card
    assert (out / "predictions.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[block.name for block in RUN_BLOCKS])
def test_doc_block_runs(block, doc_runs):
    if block.text.strip() == MAIN_JOB:
        # The fixture ran this very command line (README's); it is not run twice.
        assert doc_runs.main_command == block.text.strip() and doc_runs.main_completed.returncode == 0
        return
    completed = doc_runs.blocks[block.name]
    assert completed.returncode == 0, _failure(block.name, block.text, completed)


@pytest.mark.slow
def test_the_device_path_example_learns(doc_runs):
    """docs/training.md's demo on the device path (`--augment-on-device true`, a third of the demo's iterations)
    learns as the demo has to: the same bar as the main job, with no DataLoader workers."""
    block = next(b for b in RUN_BLOCKS if "--augment-on-device true" in b.text and "outputs/demo-device" in b.text)
    completed = doc_runs.blocks[block.name]
    assert completed.returncode == 0, _failure(block.name, block.text, completed)
    assert "no DataLoader workers" in completed.stdout
    results = json.loads((doc_runs.works[block.path.name] / "outputs" / "demo-device" / "results.json").read_text())
    assert results["mIoU"] > DEMO_LEARNS_BAR, completed.stdout[-3000:]
