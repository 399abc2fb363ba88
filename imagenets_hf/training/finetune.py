"""Semi-supervised fine-tuning on ImageNet-S train-semi with Accelerate: the published recipes and the CPU demo.

One iteration = one optimizer step over a global batch of `recipe.global_batch_size` samples: each process runs
`gradient_accumulation_steps` micro-batches of `per_device_batch_size` (DDP gradient sync only on the last one), then
the optimizer and the scheduler step once. The scheduler is not handed to `accelerator.prepare`, so it steps once
per optimizer step whatever the process count. Run it with `accelerate launch scripts/finetune.py` (or `python`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, is_compiled_module, set_seed
from tqdm.auto import tqdm

from imagenets_hf.data.transforms import train_augmentation_from_recipe
from imagenets_hf.evaluation.modes import InferenceMode
from imagenets_hf.runtime import bounded_batches, describe_machine, make_accelerator, set_deterministic, set_tf32
from imagenets_hf.training.checkpoints import (
    checkpoint_problem,
    checkpoints_dir,
    load_checkpoint,
    newest_complete_checkpoint,
    save_checkpoint,
)
from imagenets_hf.training.data import build_device_stream, build_train_dataloader
from imagenets_hf.training.label_budget import apply_label_budget, budget_seed
from imagenets_hf.training.optim import WarmupCosineLR, build_optimizer
from imagenets_hf.training.recipes import Recipe, load_recipe
from imagenets_hf.training.run_folder import check_output_dir, claim_output_dir, resume_command
from imagenets_hf.training.semi import broadcast_teacher_buffers, make_teacher, semi_losses, update_teacher

RESULTS_FILE_NAME = "results.json"
# Training's validation runs the official protocol; results.json and the model card say so (evaluate.py --mode
# gives the other modes' numbers of the saved model).
TRAINING_EVALUATION_MODE = InferenceMode()
# The torch.compile backend of `--compile true` (tests swap in "eager", which compiles in seconds on a CPU).
COMPILE_BACKEND = "inductor"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainingProgress:
    """Checkpointed with `accelerator.register_for_checkpointing`: the number of finished iterations."""

    iteration: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])


def prepare_data(
    recipe: Recipe, accelerator: Accelerator | None = None, make_mini_dataset: bool = False
) -> tuple[Any, Any, list[str]]:
    """(train_semi rows, validation rows, class names) of `recipe.data_dir`. The synthetic mini dataset is made there
    only when asked (`make_mini_dataset`) or at the demo recipe's own default folder; any other missing folder is an
    error. The main process builds the Arrow cache, the others then read it (waiting for it at most
    `recipe.prepare_timeout` seconds)."""
    from imagenets_hf.data.imagenets import class_names, default_synset_words, load_imagenets

    data_dir = Path(recipe.data_dir)
    with main_process_first(accelerator, recipe.prepare_timeout, f"the data of {data_dir}"):
        is_demo_dir, unlabelled_per_class = _demo_data_dir(recipe)
        if not data_dir.exists() and (make_mini_dataset or is_demo_dir):
            from imagenets_hf.data.mini import ensure_mini_dataset

            ensure_mini_dataset(data_dir, unlabelled_per_class=unlabelled_per_class)
        if not data_dir.is_dir():
            raise FileNotFoundError(
                f"data folder {data_dir} does not exist: pass --data-dir with a prepared ImageNet-S folder "
                "(or --make-mini-dataset to write the synthetic mini dataset there)"
            )
        subset = None if recipe.subset == "mini" else recipe.subset
        train_rows = load_imagenets(data_dir, "train_semi", subset=subset)
        val_rows = load_imagenets(data_dir, "validation", subset=subset)
        names = class_names(data_dir, synset_words=recipe.synset_words or default_synset_words(data_dir))
    if recipe.num_labels is not None and len(names) != recipe.num_labels:
        raise ValueError(
            f"{data_dir} holds {len(names)} labels but recipe subset {recipe.subset!r} expects "
            f"{recipe.num_labels}; pass --subset matching the data"
        )
    return train_rows, val_rows, names


@contextmanager
def main_process_first(accelerator: Accelerator | None, timeout: float, what: str) -> Iterator[None]:
    """`accelerator.main_process_first()` with the other processes' wait bounded by `timeout` seconds of its own
    (a barrier of a gloo group made for it), not by the collectives' timeout: building the Arrow cache of a full
    split can take longer than that (minutes on one core, more on a slow disk). A wait past `timeout` ends in one
    line naming `what`."""
    if accelerator is None or accelerator.num_processes == 1:
        yield
        return
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))

    def wait() -> None:
        started = time.monotonic()
        try:
            dist.barrier(group=group)
        except RuntimeError as err:  # gloo's timeout (DistBackendError), or a process gone
            if time.monotonic() - started < timeout:  # not the bound: the process on the other side stopped
                other = "the other processes" if accelerator.is_main_process else "the main process"
                raise ConnectionError(
                    f"process {accelerator.process_index}: {other} stopped while preparing {what} (its own error "
                    f"says why; {type(err).__name__})"
                ) from None
            if accelerator.is_main_process:
                happened = f"the other processes stopped waiting while it prepared {what} (over {timeout:g} s)"
            else:
                happened = f"the main process did not finish preparing {what} within {timeout:g} s"
            raise TimeoutError(
                f"process {accelerator.process_index}: {happened} ({type(err).__name__}); raise prepare_timeout "
                "(--prepare-timeout) if it can take that long"
            ) from None

    if not accelerator.is_main_process:
        wait()
    yield
    if accelerator.is_main_process:
        wait()
    dist.destroy_process_group(group)


# The demo recipes whose mini dataset is made at their own data folder when absent, and its unlabelled (train/)
# images a class: None is the mini dataset's default (6); demo-semi's 60 give the unlabelled stream enough to learn
# from (docs/semi_supervised.md).
DEMO_MINI_DATA = {"demo": None, "demo-semi": 60}


def _demo_data_dir(recipe: Recipe) -> tuple[bool, int | None]:
    """(whether `recipe` reads the mini subset at the folder a demo recipe names, where that recipe makes its data;
    the unlabelled images a class that folder holds)."""
    if recipe.subset == "mini":
        for name, unlabelled_per_class in DEMO_MINI_DATA.items():
            if Path(recipe.data_dir).resolve() == Path(load_recipe(name).data_dir).resolve():
                return True, unlabelled_per_class
    return False, None


def build_model(recipe: Recipe, names: list[str]):
    """A `ViTFCNForSemanticSegmentation` from the recipe (random init; see `load_pretrained`)."""
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation

    config = ViTFCNConfig.from_preset(
        recipe.head,
        encoder_name=recipe.encoder_name,
        encoder_kwargs=dict(recipe.encoder_kwargs),
        drop_path_rate=recipe.drop_path_rate,
        drop_path_branches=recipe.drop_path_branches,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        **recipe.model_kwargs,
    )
    return ViTFCNForSemanticSegmentation(config)


def build_image_processor(recipe: Recipe):
    """The evaluation image processor (short side / long side from the recipe)."""
    from imagenets_hf.model import ViTFCNImageProcessor

    return ViTFCNImageProcessor(short_side=recipe.eval_short_side, max_long_side=recipe.eval_max_long_side)


def evaluate(
    model, image_processor, rows, accelerator: Accelerator, recipe: Recipe, progress: bool = True
) -> dict[str, Any]:
    """mIoU on `rows` with the official protocol, split across processes (exact)."""
    from imagenets_hf.evaluation.inference import evaluate_model

    # No DDP wrapper: each process runs its own share of the images. No torch.compile wrapper either: the official
    # protocol feeds one image at a time at varying sizes, so a compiled model would recompile for new size patterns
    # (minutes of inductor time per evaluation, up to dynamo's recompile limit) to save little on whole-image forwards.
    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    was_training = model.training
    model.eval()
    # Evaluation must not consume the training random state (its DataLoader draws a seed), or a run resumed from a
    # checkpoint written just before a validation would diverge from the uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        metrics = evaluate_model(
            model,
            image_processor,
            rows,
            accelerator=accelerator,
            batch_size=recipe.eval_batch_size,
            extended=False,
            progress=progress and accelerator.is_main_process,
            timeout=recipe.worker_timeout,
        )
    model.train(was_training)
    return metrics


def write_model_card(
    output_dir: Path, recipe: Recipe, metrics: dict[str, Any] | None, table: str | None, runtime: dict[str, Any]
) -> Path:
    """README.md next to the weights: a results table (this model's mIoU, its recipe, what the published recipe
    reported, the machine), a picture of its predictions (`predictions.png`, drawn from the saved weights by
    `imagenets_hf.evaluation.overlays.write_prediction_grid` when they are there), the per-class table and the
    resolved recipe."""
    import re

    from imagenets_hf.training.recipes import RECIPES_DIR

    miou = f"**{metrics['mIoU']:.2f}**" if metrics else "n/a"
    images = f", {metrics['num_images']} images" if metrics and "num_images" in metrics else ""
    # What the published recipe of this name reported: the header line of its YAML file (the one home of the figure).
    reported = "-"
    published = RECIPES_DIR / f"{recipe.name}.yaml"
    if published.is_file():
        found = re.search(r"^# Reported mIoU on ([^:]+): (.+)$", published.read_text(), flags=re.MULTILINE)
        if found:
            reported = f"{found.group(2)} on {found.group(1)}"
    processes = runtime.get("num_processes") or 1
    machine = f"{processes} process(es) on {describe_machine()}"
    encoder = f"`{recipe.encoder_name}`" + (f" {dict(recipe.encoder_kwargs)}" if recipe.encoder_kwargs else "")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-segmentation",
        "tags: [image-segmentation, imagenet-s, vit, fcn, imagenets-hf]",
        "---",
        "",
        f"# {recipe.name}: ViT + FCN semantic segmentation fine-tuned on ImageNet-S",
        "",
        recipe.description or "",
        "",
        f"## Results (validation, inference: {TRAINING_EVALUATION_MODE.describe()})",
        "",
        "| model | recipe | encoder, head | pre-trained weights | mIoU, this model | reported for the published recipe "
        "| trained on |",
        "|---|---|---|---|---|---|---|",
        f"| `{output_dir.name}` | `{recipe.name}` | {encoder}, {recipe.head} | "
        f"`{recipe.pretrained or 'none (from scratch)'}` | {miou} on `{recipe.data_dir}` (subset {recipe.subset}"
        f"{images}) | {reported} | {machine}, {runtime.get('iterations')} iterations at a global batch of "
        f"{recipe.global_batch_size}, {describe_settings(recipe, runtime)}, {runtime.get('train_seconds', 0):.0f} s |",
        "",
        f"Trained on {describe_training_data(recipe)}; {runtime.get('num_processes')} process(es) x "
        f"{recipe.per_device_batch_size} per "
        f"device x {runtime.get('gradient_accumulation_steps')} accumulation. mIoU is the official one: the mean "
        'IoU over all classes, "other" included, in percent.',
        "",
    ]
    picture = output_dir / "predictions.png"
    if (output_dir / "config.json").is_file():
        from imagenets_hf.evaluation.overlays import write_prediction_grid

        num_images = 4
        try:
            write_prediction_grid(output_dir, recipe.data_dir, picture, num_images=num_images, title=recipe.name)
        except Exception as err:  # a picture must not cost the run its card and results.json
            print(f"note: no predictions.png in the model card ({type(err).__name__}: {err})")
        else:
            lines += [
                "![predictions on validation images](predictions.png)",
                "",
                f"Predictions on {num_images} validation images of `{recipe.data_dir}`, spread over its classes "
                "(rows: image, ground truth, prediction; the colours are named below the grid). The same picture: "
                f"`python scripts/make_overlays.py --model {output_dir} --data-dir {recipe.data_dir} "
                f"--out {picture} --num-images {num_images} --title {recipe.name}`.",
                "",
            ]
    if table:
        lines += ["Per class:", "", "```", table, "```", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import imagenets_hf.model  # registers the classes (or pass trust_remote_code=True)",
        "from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation",
        f'model = AutoModelForSemanticSegmentation.from_pretrained("{output_dir}")',
        f'processor = AutoImageProcessor.from_pretrained("{output_dir}")',
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the iteration reached, the last complete checkpoint and the command
    that resumes."""


@dataclass
class TrainingRun:
    """What `setup_run` builds and the loop uses."""

    recipe: Recipe
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineLR
    progress: TrainingProgress
    batches: Iterator[dict[str, torch.Tensor]]
    image_processor: Any
    val_rows: Any
    names: list[str]
    num_train_rows: int
    accumulation: int
    last_checkpoint: Path | None
    settings: dict[str, Any]  # how it runs: `what_runs`
    # semi-supervised runs (recipe.semi_supervised): the EMA teacher and this process's unlabelled micro-batches
    teacher: torch.nn.Module | None = None
    unlabelled: Iterator[dict[str, torch.Tensor]] | None = None
    semi_log: dict[str, float] = field(default_factory=dict)  # the last step's loss_x, loss_u, confident ratio

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def final_model(self) -> torch.nn.Module:
        """The model evaluated during training and saved at the end: the student, or a semi-supervised run's teacher
        when `recipe.semi_final_model` says so."""
        if self.teacher is not None and self.recipe.semi_final_model == "teacher":
            return self.teacher
        return self.model


def finetune(
    recipe: Recipe,
    resume: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    make_mini_dataset: bool = False,
    push_to_hub: str | None = None,
    hub_private: bool = True,
) -> dict[str, Any]:
    """Fine-tune as `recipe` says; return {"metrics", "output_dir", "iterations", ...}.

    Args:
        recipe: the resolved recipe (see `load_recipe`).
        resume: continue the run in `recipe.output_dir`: "latest" (its newest complete checkpoint, or iteration 0
            when none was completed) or a checkpoint folder. The recipe must equal the one the run was started with,
            up to `run_folder.RESUMABLE_FIELDS`.
        stop_after: stop (and checkpoint) after this many iterations in total, as if killed; the schedule still
            runs to `recipe.max_iters`, and `resume` continues exactly.
        progress: show the tqdm bars (main process only).
        overwrite: delete the run already in `recipe.output_dir` first (without it, and without `resume`, a folder
            holding a run is refused).
        make_mini_dataset: make the synthetic mini dataset at `recipe.data_dir` when that folder does not exist (the
            demo recipe does so at its own default folder without being asked).
        push_to_hub: at the end of a successful run, the main process pushes the saved folder (model, image
            processor, model card, picture, recipe) to this Hub model repository (`deploy.hub.push_model_folder`);
            a failed push keeps the run and raises `HubPushError` with the command that pushes it again.
        hub_private: create that repository private (default) or public.
    """
    if push_to_hub is not None:
        from imagenets_hf.deploy.hub import check_push_target

        check_push_target(push_to_hub)  # a bad name or no login: said now, not after the training
    run = setup_run(recipe, resume, overwrite, make_mini_dataset, progress)
    accelerator = run.accelerator
    end_iteration = recipe.max_iters if stop_after is None else min(stop_after, recipe.max_iters)
    start_iteration = run.progress.iteration
    accelerator.print(
        f"Fine-tuning {recipe.name}: {run.num_train_rows} train-semi images, {len(run.val_rows)} validation images, "
        f"{len(run.names)} labels; {accelerator.num_processes} process(es) x {recipe.per_device_batch_size} per "
        f"device x {run.accumulation} accumulation = global batch {recipe.global_batch_size}; iterations "
        f"{start_iteration}->{end_iteration} of {recipe.max_iters}; {describe_settings(recipe, run.settings)}"
    )
    bar = tqdm(
        total=end_iteration,
        initial=start_iteration,
        desc=recipe.name,
        disable=not (progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    run.model.train()
    started = time.perf_counter()
    done = start_iteration
    try:
        for iteration in range(start_iteration, end_iteration):
            loss_value, lr = train_step(run, iteration)
            done = iteration + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if recipe.log_interval and (done % recipe.log_interval == 0 or done == end_iteration):
                accelerator.log({"train/loss": loss_value, "train/lr": lr, **run.semi_log}, step=done)
            if recipe.checkpoint_interval and done % recipe.checkpoint_interval == 0:
                run.last_checkpoint = checkpoint(run, done)
            if recipe.val_interval and done % recipe.val_interval == 0 and done < recipe.max_iters:
                metrics = evaluate(run.final_model, run.image_processor, run.val_rows, accelerator, recipe, progress)
                accelerator.log({"val/mIoU": metrics["mIoU"]}, step=done)
                if accelerator.is_main_process:
                    bar.write(f"iteration {done}: validation mIoU {metrics['mIoU']:.2f}")
    except KeyboardInterrupt:
        bar.close()
        accelerator.end_training()
        # From the disk, not from `run.last_checkpoint`: Ctrl-C may land after a checkpoint was renamed into place and
        # before `checkpoint()` returned, and "start again with --overwrite" would then delete a complete checkpoint.
        last_complete = newest_complete_checkpoint(run.output_dir).path
        if last_complete is None:
            where = f"no checkpoint was completed; start again with {resume_command()[: -len(' --resume')]} --overwrite"
        else:
            where = f"last complete checkpoint {last_complete}; resume with: {resume_command()}"
        raise TrainingInterrupted(f"interrupted at iteration {done} of {recipe.max_iters}; {where}") from None
    bar.close()
    result: dict[str, Any] = {
        "output_dir": str(run.output_dir),
        "iterations": end_iteration,
        "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": run.accumulation,
        **run.settings,
        "train_seconds": time.perf_counter() - started,
    }
    if end_iteration < recipe.max_iters:  # stopped early: checkpoint so that --resume continues
        result["checkpoint"] = str(checkpoint(run, end_iteration))
        accelerator.print(f"Stopped after {end_iteration} iterations; checkpoint {result['checkpoint']}")
        if push_to_hub is not None:
            accelerator.print(f"not pushed to {push_to_hub}: the model is saved (and pushed) when the run finishes")
        accelerator.end_training()
        return result
    result = finish_run(run, result, progress)
    if push_to_hub is not None and accelerator.is_main_process:
        from imagenets_hf.deploy.hub import push_after_training

        result["hub_url"] = push_after_training(run.output_dir, push_to_hub, private=hub_private, result=result)
        print(f"pushed {run.output_dir} to {result['hub_url']} ({'private' if hub_private else 'public'} if new)")
    return result


def build_batches(recipe: Recipe, train_rows: Any, accelerator: Accelerator, skip: int) -> Iterator[dict]:
    """This process's endless stream of training batches, the first `skip` (what a resumed run consumed) skipped by
    index: made on the training device (`recipe.augment_on_device`) or in DataLoader workers."""
    augmentation = train_augmentation_from_recipe(recipe)
    common = dict(
        batch_size=recipe.per_device_batch_size,
        seed=recipe.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    if recipe.augment_on_device:
        if recipe.pipeline != "mmseg":
            raise ValueError(
                f"augment_on_device runs the published mmseg pipeline; recipe pipeline is {recipe.pipeline!r} "
                "(pass --augment-on-device false or --pipeline mmseg)"
            )
        # The store's place (GPU or host memory) is decided after the first optimizer step, when the model, the
        # optimizer's state and a step's peak are on the device (see DeviceBatchStream).
        stream = build_device_stream(
            train_rows,
            augmentation,
            device=accelerator.device,
            log=accelerator.print,
            place_after=recipe.gradient_accumulation_steps(accelerator.num_processes),
            **common,
        )
        return stream.skip(skip)
    loader = build_train_dataloader(
        train_rows,
        augmentation,
        num_workers=recipe.num_workers,
        log=accelerator.print,
        timeout=recipe.worker_timeout,
        pin_memory=accelerator.device.type == "cuda",  # else `.to(device, non_blocking=True)` copies synchronously
        **common,
    )
    hint = "if a batch can take that long, raise worker_timeout (--worker-timeout)"
    return bounded_batches(accelerator.skip_first_batches(loader, skip), recipe.worker_timeout, "training data", hint)


def setup_run(
    recipe: Recipe, resume: str | None, overwrite: bool, make_mini_dataset: bool, progress: bool = True
) -> TrainingRun:
    """Build the data, model and weights, claim the output folder, build the optimizer and schedule, and restore a
    checkpoint to resume."""
    check_output_dir(recipe, resume, overwrite)  # on every process, before anything is written
    set_deterministic(recipe.deterministic)  # before the first cuBLAS call (see runtime.set_deterministic)
    accelerator = make_accelerator(
        # Both explicit: left unset, accelerate takes ACCELERATE_MIXED_PRECISION and ACCELERATE_DYNAMO_BACKEND from
        # the environment (`accelerate launch` sets them from the user's `accelerate config`), not from the recipe.
        mixed_precision=recipe.mixed_precision,
        log_with=tracker(recipe),
        project_config=ProjectConfiguration(
            project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")
        ),
        dynamo_backend=COMPILE_BACKEND if recipe.compile else "no",
        step_scheduler_with_optimizer=False,
        cpu=_multi_process_without_accelerator(),
        # Every collective waits at most this long (torch's default: 10 min for NCCL, 30 for gloo), then fails.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.collective_timeout))],
    )
    tf32 = set_tf32(recipe.tf32, accelerator.device)
    accumulation = recipe.gradient_accumulation_steps(accelerator.num_processes)
    train_rows, val_rows, names = prepare_data(recipe, accelerator, make_mini_dataset)
    budget = apply_label_budget(recipe, train_rows)  # budget.unlabelled: the images whose masks it dropped
    train_rows = budget.labelled
    print_main = accelerator.print
    if recipe.mixed_precision == "fp16" and not accelerator.native_amp:
        # accelerate enables fp16 autocast + GradScaler only on GPUs; say so rather than silently train in fp32
        print_main(f"note: fp16 needs a GPU; on {accelerator.device.type} this run trains in float32")
    set_seed(recipe.seed)  # same initial weights on every process
    model = build_model(recipe, names)
    if recipe.pretrained and resume is None:
        from imagenets_hf.model.convert import load_pretrained_encoder

        with main_process_first(accelerator, recipe.prepare_timeout, f"the pretrained weights {recipe.pretrained}"):
            load_pretrained_encoder(
                model,
                recipe.pretrained,
                allow_partial=recipe.pretrained_allow_partial,
                key=recipe.pretrained_key,
                verbose=accelerator.is_main_process,
            )
    frozen = freeze_unreached_parameters(model)
    if frozen:
        print_main(
            f"note: {len(frozen)} parameters never reach the loss ({frozen[0]} ... {frozen[-1]}); they are frozen, "
            "so that DDP does not wait for their gradients"
        )
    # Claimed only now that the data, the model and its weights are ready: a start that fails on one of them (a
    # wrong folder, an unknown encoder, a checkpoint of another shape) leaves the folder as it was.
    if accelerator.is_main_process:
        claim_output_dir(recipe, resume, overwrite)
        listed = budget.write(recipe.output_dir)
        if listed is not None:
            print_main(f"{budget.describe()}; listed in {listed}")
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            # torch's SyncBatchNorm has no CPU kernel; DDP broadcasts rank 0's BN buffers instead.
            print_main("note: SyncBatchNorm needs GPUs; on CPU processes keep per-process BatchNorm statistics")
        else:
            model = convert_sync_batchnorm(model, compiling=recipe.compile)

    optimizer, scheduler = build_optimizer_and_schedule(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    training_progress = TrainingProgress()
    # Not prepared: the scheduler steps exactly once per optimizer step; checkpointed alongside (and the teacher,
    # not trained by the optimizer, so not prepared either).
    teacher = None
    if recipe.semi_supervised != "none":
        teacher = make_teacher(accelerator.unwrap_model(model, keep_torch_compile=False))
    accelerator.register_for_checkpointing(scheduler, training_progress, *([teacher] if teacher is not None else []))
    last_checkpoint = restore_checkpoint(accelerator, recipe, resume, training_progress) if resume else None

    skip = training_progress.iteration * accumulation
    batches = build_batches(recipe, train_rows, accelerator, skip=skip)
    # The unlabelled stream starts at iteration unsupervised_start_iter: its micro-batches used so far.
    skip_unlabelled = max(0, training_progress.iteration - recipe.unsupervised_start_iter) * accumulation
    unlabelled = (
        build_unlabelled(recipe, accelerator, skip_unlabelled, budget.unlabelled) if teacher is not None else None
    )

    hparams = {k: v for k, v in recipe.to_dict().items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(recipe.name, config=hparams, init_kwargs=tracker_init_kwargs(recipe))
    return TrainingRun(
        recipe=recipe,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=training_progress,
        batches=batches,
        image_processor=build_image_processor(recipe),
        val_rows=val_rows,
        names=names,
        num_train_rows=len(train_rows),
        accumulation=accumulation,
        last_checkpoint=last_checkpoint,
        settings=what_runs(accelerator, model, tf32),
        teacher=teacher,
        unlabelled=unlabelled,
    )


def tracker(recipe: Recipe) -> str | None:
    """accelerate's `log_with` for `recipe.report_to` (None: no tracker); a missing wandb is named before any work."""
    if recipe.report_to == "none":
        return None
    if recipe.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ImportError(
            "report_to wandb (--report-to wandb) needs wandb: pip install 'imagenets-hf[wandb]' (or --report-to "
            "tensorboard)"
        )
    return recipe.report_to


def tracker_init_kwargs(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """wandb writes its run files into <output_dir>/logs (beside TensorBoard's), not ./wandb in the current folder."""
    if recipe.report_to != "wandb":
        return {}
    logs = Path(recipe.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return {"wandb": {"dir": str(logs)}}


def build_unlabelled(recipe: Recipe, accelerator: Accelerator, skip: int, extra_pool: Any) -> Iterator[dict]:
    """This process's endless stream of unlabelled micro-batches (one per labelled micro-batch), the first `skip`
    skipped: the unlabelled folders of `recipe` and `extra_pool` (the train-semi images a label budget took the masks
    of; see `unlabelled_data.build_unlabelled_batches`)."""
    from imagenets_hf.training.unlabelled_data import build_unlabelled_batches

    return build_unlabelled_batches(recipe, accelerator, skip, extra_pool=extra_pool)


def build_optimizer_and_schedule(
    model: torch.nn.Module, recipe: Recipe
) -> tuple[torch.optim.Optimizer, WarmupCosineLR]:
    """AdamW with the recipe's layer-wise lr decay and weight-decay rules, and its warmup + cosine schedule."""
    optimizer = build_optimizer(
        model,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        layer_decay=recipe.layer_decay,
        betas=recipe.betas,
        eps=recipe.eps,
        no_weight_decay_tokens=recipe.no_weight_decay_tokens,
    )
    scheduler = WarmupCosineLR(optimizer, recipe.max_iters, recipe.warmup_iters, recipe.warmup_ratio, recipe.min_lr)
    return optimizer, scheduler


def restore_checkpoint(
    accelerator: Accelerator, recipe: Recipe, resume: str, progress: TrainingProgress
) -> Path | None:
    """Load the checkpoint `resume` names ("latest": the newest complete one of the run) into the prepared objects;
    return it (None: "latest" found no complete checkpoint, so the run starts again from iteration 0)."""
    if resume == "latest":
        choice = newest_complete_checkpoint(recipe.output_dir)
        for path, why in choice.skipped:
            accelerator.print(f"note: skipped checkpoint {path}: {why}")
        if choice.path is None:
            accelerator.print(f"note: no complete checkpoint in {checkpoints_dir(recipe.output_dir)}; starting at 0")
            return None
        path = choice.path
    else:
        path = Path(resume)
        problem = checkpoint_problem(path)
        if problem is not None:
            raise FileNotFoundError(f"cannot resume from {path}: {problem}; pass --resume latest or another folder")
    load_checkpoint(accelerator, path)
    accelerator.print(f"Resumed from {path} at iteration {progress.iteration}")
    return path


def freeze_unreached_parameters(model: torch.nn.Module) -> list[str]:
    """Turn off `requires_grad` for the parameters the loss cannot reach, and return their names: the encoder blocks
    after the last one the head reads (`out_indices` before the last block; `encoder.feature_maps` does not run
    them), the final norm when `final_norm` is off. They would never get a gradient, which DDP takes for an error at
    the second iteration ("Expected to have finished reduction") unless told to search the graph for them on every
    iteration (`find_unused_parameters`); frozen, DDP leaves them out of its buckets, and AdamW (which skips a
    parameter without gradient, as it did under mmcv) trains the same. They stay in the model, so the saved weights
    keep the configured depth and load like any other.

    Found by one backward pass of a 2 x 2 patch input in eval mode (no random draws, no BatchNorm statistics
    updated), so it covers every encoder family and head."""
    patch = int(model.patch_size)
    was_training = model.training
    model.eval()
    try:
        logits = model(pixel_values=torch.zeros(1, 3, 2 * patch, 2 * patch)).logits
    finally:
        model.train(was_training)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    grads = torch.autograd.grad(logits.sum(), [param for _, param in named], allow_unused=True)
    unreached = [(name, param) for (name, param), grad in zip(named, grads) if grad is None]
    for _, param in unreached:
        param.requires_grad_(False)
    return [name for name, _ in unreached]


def what_runs(accelerator: Accelerator, model: torch.nn.Module, tf32: bool) -> dict[str, Any]:
    """How the run really trains, recorded in results.json and the model card: the mixed precision accelerate applies
    ("no" for fp16 asked on a CPU), whether the model is compiled, whether float32 matmuls use TF32."""
    return {
        "mixed_precision": accelerator.mixed_precision if accelerator.native_amp else "no",
        "compiled": is_compiled_module(model),
        "tf32": tf32,
    }


def describe_training_data(recipe: Recipe) -> str:
    """What a run learns from, for its model card: "train-semi", with its label budget, and for a semi-supervised run
    the unlabelled images and how they are pseudo-labelled."""
    words = "train-semi"
    if recipe.labels_per_class is not None:
        words += f" ({recipe.labels_per_class} labelled image(s) a class, labels_seed {budget_seed(recipe)})"
    if recipe.semi_supervised != "none":
        from imagenets_hf.training.unlabelled_data import unlabelled_folders

        folders = ", ".join(f"`{folder}`" for folder in unlabelled_folders(recipe))
        classes = (
            "the class from each image's folder, object against other from the teacher"
            if recipe.pseudo_label_classes == "image_class"
            else "the teacher's argmax"
        )
        words += (
            f" and the unlabelled images of {folders} (semi-supervised, {recipe.semi_supervised}: pseudo-labels "
            f"{classes}, confidence >= {recipe.confidence_threshold:g}; the {recipe.semi_final_model} is saved)"
        )
    return words


def describe_settings(recipe: Recipe, settings: dict[str, Any]) -> str:
    """ "mixed precision no (recipe: fp16), compiled, TF32 matmuls" from `what_runs` (the recipe's where unknown)."""
    precision = settings.get("mixed_precision", recipe.mixed_precision)
    words = f"mixed precision {precision}"
    if precision != recipe.mixed_precision:
        words += f" (recipe: {recipe.mixed_precision})"
    if settings.get("compiled"):
        words += ", compiled"
    if settings.get("tf32"):
        words += ", TF32 matmuls"
    return words


def train_step(run: TrainingRun, iteration: int) -> tuple[float, float]:
    """One optimizer step over a global batch (accumulating micro-batches); returns (mean loss, head lr). A
    semi-supervised run adds an unlabelled micro-batch to each labelled one, moves the teacher after the step and
    keeps the step's mean loss_x, loss_u and confident-pixel ratio in `run.semi_log`."""
    accelerator, model = run.accelerator, run.model
    sums = torch.zeros(4, device=accelerator.device)  # loss, loss_x, loss_u, confident ratio
    for micro_step in range(run.accumulation):
        batch = next(run.batches)
        pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        labels = batch["labels"].to(accelerator.device, non_blocking=True)
        last_micro_step = micro_step == run.accumulation - 1
        with nullcontext() if last_micro_step else accelerator.no_sync(model):
            if run.teacher is None or iteration < run.recipe.unsupervised_start_iter:
                loss = model(pixel_values=pixel_values, labels=labels).loss
                parts = [loss.detach()]
            else:
                unlabelled = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(run.unlabelled).items()}
                losses = semi_losses(
                    model, run.teacher, run.recipe, pixel_values, labels, unlabelled, accelerator.autocast
                )
                loss = losses.loss
                parts = [loss.detach(), losses.loss_x, losses.loss_u, losses.confident_ratio]
            accelerator.backward(loss / run.accumulation)
        sums[: len(parts)] += torch.stack(parts).float()
    means = accelerator.reduce(sums / run.accumulation, reduction="mean").tolist()
    loss_value = means[0]
    if run.teacher is not None:
        run.semi_log = {"train/loss_x": means[1], "train/loss_u": means[2], "train/confident_ratio": means[3]}
    if not math.isfinite(loss_value):
        accelerator.end_training()
        raise NonFiniteLossError(
            f"loss is {loss_value} at iteration {iteration + 1}; training stopped. Last good checkpoint: "
            f"{run.last_checkpoint or 'none'} (resume with --resume latest after lowering --lr or using bf16/no)"
        )
    if run.recipe.grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), run.recipe.grad_clip)
    lr = run.optimizer.param_groups[-1]["lr"]  # the head's group (scale 1), as used by this step (mmcv logs this one)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.teacher is not None:
        student = accelerator.unwrap_model(model, keep_torch_compile=False)
        update_teacher(run.teacher, student, iteration, run.recipe.ema_momentum)
        broadcast_teacher_buffers(run.teacher)
    return loss_value, lr


def checkpoint(run: TrainingRun, iteration: int) -> Path:
    """Save the complete training state after `iteration` iterations (atomically; see `checkpoints.py`)."""
    run.progress.iteration = iteration
    return save_checkpoint(run.accelerator, run.output_dir, iteration, keep=run.recipe.checkpoints_total_limit)


def finish_run(run: TrainingRun, result: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Final evaluation; the main process saves the model, image processor, model card and results."""
    from imagenets_hf.evaluation.inference import format_iou_table

    accelerator, recipe, output_dir = run.accelerator, run.recipe, run.output_dir
    final_model = run.final_model
    if run.teacher is not None:
        # UniMatch V2 evaluates both; the recipe's semi_final_model is the one saved (and reported as mIoU).
        other, other_name = (run.model, "student") if final_model is run.teacher else (run.teacher, "teacher")
        other_metrics = evaluate(other, run.image_processor, run.val_rows, accelerator, recipe, progress)
        result[f"mIoU_{other_name}"] = other_metrics["mIoU"]
        accelerator.log({f"val/mIoU_{other_name}": other_metrics["mIoU"]}, step=result["iterations"])
        result["saved_model"] = recipe.semi_final_model
    metrics = evaluate(final_model, run.image_processor, run.val_rows, accelerator, recipe, progress)
    if run.teacher is not None:
        result[f"mIoU_{recipe.semi_final_model}"] = metrics["mIoU"]
    accelerator.log({"val/mIoU": metrics["mIoU"]}, step=result["iterations"])
    table = format_iou_table(metrics, run.names)
    result["metrics"] = metrics
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(final_model, keep_torch_compile=False)  # the module itself, not its wrapper
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in final.modules()):
            final = _revert_sync_batchnorm(final)
        final.to(torch.float32).save_pretrained(output_dir)
        run.image_processor.save_pretrained(output_dir)
        write_model_card(output_dir, recipe, metrics, table, result)
        (output_dir / RESULTS_FILE_NAME).write_text(
            json.dumps(
                {
                    "mIoU": metrics["mIoU"],
                    "per_class_iou": metrics.get("per_class_iou"),
                    "inference": TRAINING_EVALUATION_MODE.to_dict(),
                    **result,
                },
                indent=2,
            )
        )
        print(table)
        print(f"mIoU {metrics['mIoU']:.2f} on {len(run.val_rows)} validation images; model saved to {output_dir}")
        if run.teacher is not None:
            print(
                f"semi-supervised: teacher mIoU {result['mIoU_teacher']:.2f}, student mIoU "
                f"{result['mIoU_student']:.2f}; saved the {recipe.semi_final_model} (semi_final_model)"
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _multi_process_without_accelerator() -> bool:
    """True under a multi-process launcher on a machine without GPUs: accelerate only selects its gloo
    (MULTI_CPU) mode when asked for the CPU, otherwise each process would train alone."""
    from imagenets_hf.runtime import accelerator_available

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not accelerator_available()


def convert_sync_batchnorm(model: torch.nn.Module, compiling: bool) -> torch.nn.Module:
    """BatchNorm -> SyncBatchNorm (DDP on GPUs). For a compiled model the SyncBatchNorm layers run eagerly
    (`torch.compiler.disable`): dynamo cannot trace their process-group collectives (pytorch/pytorch#107372 and
    #100239: compile + DDP + SyncBatchNorm failures; #161302: dynamo breaks the graph there; #156680: fullgraph
    fails), so the graph breaks at the head's norm on purpose, with the BN statistics still synchronised. Only
    GPUs can run SyncBatchNorm in training (`scripts/check_gpu.py` compiles on one GPU; the multi-GPU compiled run
    is not yet measured)."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if compiling:
        for module in model.modules():
            if isinstance(module, torch.nn.SyncBatchNorm):
                module.forward = torch.compiler.disable(module.forward)
    return model


def _revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm -> BatchNorm2d (same tensors), so the saved model loads in a single process."""
    converted = module
    if isinstance(module, torch.nn.SyncBatchNorm):
        converted = torch.nn.BatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        converted.add_module(name, _revert_sync_batchnorm(child))
    return converted
