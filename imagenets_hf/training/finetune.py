"""Semi-supervised fine-tuning on ImageNet-S train-semi with Accelerate: the published recipes and the CPU demo.

One iteration = one optimizer step over a global batch of `recipe.global_batch_size` samples: each process runs
`gradient_accumulation_steps` micro-batches of `per_device_batch_size` (DDP gradient sync only on the last one), then
the optimizer and the scheduler step once. The scheduler is not handed to `accelerator.prepare`, so it steps once
per optimizer step whatever the process count. Run it with `accelerate launch scripts/finetune.py` (or `python`).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from imagenets_hf.data.transforms import train_transform_from_recipe
from imagenets_hf.training.data import build_train_dataloader
from imagenets_hf.training.optim import WarmupCosineLR, build_optimizer
from imagenets_hf.training.recipes import Recipe

DEMO_DATA_DIR = "data/mini"
RECIPE_FILE_NAME = "recipe.yaml"
RESULTS_FILE_NAME = "results.json"
SYNSET_WORDS_FILE_NAME = "LOC_synset_mapping.txt"  # ImageNet's synset-words file, used for class names when present


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


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    """Where `save_state` writes `checkpoint_<iteration>` folders."""
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder with the highest iteration under `output_dir`, or None."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("_")[-1]), p) for p in folder.glob("checkpoint_*") if p.name.split("_")[-1].isdigit()]
    return max(found)[1] if found else None


def prepare_data(recipe: Recipe, accelerator: Accelerator | None = None) -> tuple[Any, Any, list[str]]:
    """(train_semi rows, validation rows, class names) of `recipe.data_dir`; makes the mini dataset there first for
    the demo recipe. The main process builds the Arrow cache, the others then read it."""
    from imagenets_hf.data.imagenets import class_names, load_imagenets

    context = accelerator.main_process_first() if accelerator is not None else nullcontext()
    with context:
        if recipe.subset == "mini" and not Path(recipe.data_dir).exists():
            from imagenets_hf.data.mini import ensure_mini_dataset

            ensure_mini_dataset(recipe.data_dir)
        if not Path(recipe.data_dir).is_dir():
            raise FileNotFoundError(
                f"data_dir {recipe.data_dir} does not exist; prepare ImageNet-S there or pass --data-dir"
            )
        subset = None if recipe.subset == "mini" else recipe.subset
        train_rows = load_imagenets(recipe.data_dir, "train_semi", subset=subset)
        val_rows = load_imagenets(recipe.data_dir, "validation", subset=subset)
        synset_words = recipe.synset_words
        if synset_words is None and (Path(recipe.data_dir) / SYNSET_WORDS_FILE_NAME).is_file():
            synset_words = str(Path(recipe.data_dir) / SYNSET_WORDS_FILE_NAME)
        names = class_names(recipe.data_dir, synset_words=synset_words)
    if recipe.num_labels is not None and len(names) != recipe.num_labels:
        raise ValueError(
            f"{recipe.data_dir} holds {len(names)} labels but recipe subset {recipe.subset!r} expects "
            f"{recipe.num_labels}; pass --subset matching the data"
        )
    return train_rows, val_rows, names


def build_model(recipe: Recipe, names: list[str]):
    """A `ViTFCNForSemanticSegmentation` from the recipe (random init; see `load_pretrained`)."""
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation

    config = ViTFCNConfig.from_preset(
        recipe.head,
        encoder_name=recipe.encoder_name,
        encoder_kwargs=dict(recipe.encoder_kwargs),
        drop_path_rate=recipe.drop_path_rate,
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


def evaluate(model, image_processor, rows, accelerator: Accelerator, recipe: Recipe) -> dict[str, Any]:
    """mIoU on `rows` with the official protocol, split across processes (exact)."""
    from imagenets_hf.evaluation.inference import evaluate_model

    model = accelerator.unwrap_model(model)  # no DDP wrapper: each process runs its own share of the images
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
            progress=accelerator.is_main_process,
        )
    model.train(was_training)
    return metrics


def write_model_card(
    output_dir: Path, recipe: Recipe, metrics: dict[str, Any] | None, table: str | None, runtime: dict[str, Any]
) -> Path:
    """README.md next to the weights: what was trained, the resolved recipe and the results."""
    miou = f"{metrics['mIoU']:.2f}" if metrics else "n/a"
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
        f"- data: `{recipe.data_dir}` (subset {recipe.subset}), trained on train-semi, evaluated on validation",
        f"- encoder: `{recipe.encoder_name}` {recipe.encoder_kwargs or ''}, head `{recipe.head}`, "
        f"pre-trained weights: `{recipe.pretrained or 'none (from scratch)'}`",
        f"- {runtime.get('iterations')} iterations at a global batch of {recipe.global_batch_size} "
        f"({runtime.get('num_processes')} process(es) x {recipe.per_device_batch_size} x "
        f"{runtime.get('gradient_accumulation_steps')} accumulation), mixed precision {recipe.mixed_precision}, "
        f"{runtime.get('train_seconds', 0):.0f} s",
        "",
        "## Results (validation, official protocol)",
        "",
        f"mIoU: **{miou}**",
        "",
    ]
    if table:
        lines += ["```", table, "```", ""]
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


def finetune(
    recipe: Recipe,
    resume: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune as `recipe` says; return {"metrics", "output_dir", "iterations", ...}.

    Args:
        recipe: the resolved recipe (see `load_recipe`).
        resume: a checkpoint folder, or "latest" for the newest under `recipe.output_dir/checkpoints`.
        stop_after: stop (and checkpoint) after this many iterations in total, as if killed; the schedule still
            runs to `recipe.max_iters`, and `resume` continues exactly.
        progress: show the tqdm bar (main process only).
    """
    output_dir = Path(recipe.output_dir)
    accelerator = Accelerator(
        mixed_precision=recipe.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=max(recipe.checkpoints_total_limit, 1),
        ),
        dynamo_backend="inductor" if recipe.compile else None,
        step_scheduler_with_optimizer=False,
        cpu=_multi_process_without_accelerator(),
    )
    accumulation = recipe.gradient_accumulation_steps(accelerator.num_processes)
    print_main = accelerator.print
    if recipe.mixed_precision == "fp16" and not accelerator.native_amp:
        # accelerate enables fp16 autocast + GradScaler only on GPUs; say so rather than silently train in fp32
        print_main(f"note: fp16 needs a GPU; on {accelerator.device.type} this run trains in float32")
    set_seed(recipe.seed)  # same initial weights on every process

    train_rows, val_rows, names = prepare_data(recipe, accelerator)
    model = build_model(recipe, names)
    if recipe.pretrained and resume is None:
        from imagenets_hf.model.convert import load_pretrained_encoder

        with accelerator.main_process_first():
            load_pretrained_encoder(
                model,
                recipe.pretrained,
                allow_partial=recipe.pretrained_allow_partial,
                key=recipe.pretrained_key,
                verbose=accelerator.is_main_process,
            )
    if accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            # torch's SyncBatchNorm has no CPU kernel; DDP broadcasts rank 0's BN buffers instead.
            print_main("note: SyncBatchNorm needs GPUs; on CPU processes keep per-process BatchNorm statistics")
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    image_processor = build_image_processor(recipe)

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
    model, optimizer = accelerator.prepare(model, optimizer)
    training_progress = TrainingProgress()
    # Not prepared: the scheduler steps exactly once per optimizer step; checkpointed alongside.
    accelerator.register_for_checkpointing(scheduler, training_progress)

    if resume:
        checkpoint = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
        if checkpoint is None or not checkpoint.is_dir():
            raise FileNotFoundError(f"no checkpoint to resume from: {resume} (looked in {checkpoints_dir(output_dir)})")
        accelerator.load_state(str(checkpoint))
        print_main(f"Resumed from {checkpoint} at iteration {training_progress.iteration}")
    start_iteration = training_progress.iteration
    end_iteration = recipe.max_iters if stop_after is None else min(stop_after, recipe.max_iters)

    transform = train_transform_from_recipe(recipe)
    loader = build_train_dataloader(
        train_rows,
        transform,
        batch_size=recipe.per_device_batch_size,
        seed=recipe.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=recipe.num_workers,
    )
    # Skip what the interrupted run consumed (indices only: nothing is decoded).
    loader = accelerator.skip_first_batches(loader, start_iteration * accumulation)
    batches = iter(loader)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(output_dir / RECIPE_FILE_NAME)
    hparams = {k: v for k, v in recipe.to_dict().items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(recipe.name, config=hparams)
    print_main(
        f"Fine-tuning {recipe.name}: {len(train_rows)} train-semi images, {len(val_rows)} validation images, "
        f"{len(names)} labels; {accelerator.num_processes} process(es) x {recipe.per_device_batch_size} per device x "
        f"{accumulation} accumulation = global batch {recipe.global_batch_size}; iterations "
        f"{start_iteration}->{end_iteration} of {recipe.max_iters}; mixed precision {recipe.mixed_precision}"
    )

    def save_checkpoint(iteration: int) -> Path:
        training_progress.iteration = iteration
        accelerator.project_configuration.iteration = iteration  # folder checkpoint_<iteration>
        path = checkpoints_dir(output_dir) / f"checkpoint_{iteration}"
        if not path.exists():
            accelerator.save_state()
        return path

    metrics: dict[str, Any] | None = None
    last_checkpoint = latest_checkpoint(output_dir)
    bar = tqdm(
        total=end_iteration,
        initial=start_iteration,
        desc=recipe.name,
        disable=not (progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    model.train()
    started = time.perf_counter()
    for iteration in range(start_iteration, end_iteration):
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro_step in range(accumulation):
            batch = next(batches)
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            labels = batch["labels"].to(accelerator.device, non_blocking=True)
            last_micro_step = micro_step == accumulation - 1
            sync_context = nullcontext() if last_micro_step else accelerator.no_sync(model)
            with sync_context:
                loss = model(pixel_values=pixel_values, labels=labels).loss
                accelerator.backward(loss / accumulation)
            loss_sum += loss.detach()
        loss_value = accelerator.reduce(loss_sum / accumulation, reduction="mean").item()
        if not math.isfinite(loss_value):
            bar.close()
            accelerator.end_training()
            raise NonFiniteLossError(
                f"loss is {loss_value} at iteration {iteration + 1}; training stopped. Last good checkpoint: "
                f"{last_checkpoint or 'none'} (resume with --resume latest after lowering --lr or using bf16/no)"
            )
        if recipe.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = iteration + 1
        lr = optimizer.param_groups[-1]["lr"]  # the head's group: scale 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if recipe.log_interval and (done % recipe.log_interval == 0 or done == end_iteration):
            accelerator.log({"train/loss": loss_value, "train/lr": lr}, step=done)
        if recipe.checkpoint_interval and done % recipe.checkpoint_interval == 0:
            last_checkpoint = save_checkpoint(done)
        if recipe.val_interval and done % recipe.val_interval == 0 and done < recipe.max_iters:
            metrics = evaluate(model, image_processor, val_rows, accelerator, recipe)
            accelerator.log({"val/mIoU": metrics["mIoU"]}, step=done)
            if accelerator.is_main_process:
                bar.write(f"iteration {done}: validation mIoU {metrics['mIoU']:.2f}")
    bar.close()
    train_seconds = time.perf_counter() - started

    result: dict[str, Any] = {
        "output_dir": str(output_dir),
        "iterations": end_iteration,
        "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": accumulation,
        "train_seconds": train_seconds,
    }
    if end_iteration < recipe.max_iters:  # stopped early: checkpoint so that --resume continues
        result["checkpoint"] = str(save_checkpoint(end_iteration))
        print_main(f"Stopped after {end_iteration} iterations; checkpoint {result['checkpoint']}")
        accelerator.end_training()
        return result

    from imagenets_hf.evaluation.inference import format_iou_table

    metrics = evaluate(model, image_processor, val_rows, accelerator, recipe)
    accelerator.log({"val/mIoU": metrics["mIoU"]}, step=end_iteration)
    table = format_iou_table(metrics, names)
    result["metrics"] = metrics
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if isinstance(final, torch.nn.SyncBatchNorm) or any(
            isinstance(m, torch.nn.SyncBatchNorm) for m in final.modules()
        ):
            final = _revert_sync_batchnorm(final)
        final.to(torch.float32).save_pretrained(output_dir)
        image_processor.save_pretrained(output_dir)
        write_model_card(output_dir, recipe, metrics, table, result)
        (output_dir / RESULTS_FILE_NAME).write_text(
            json.dumps({"mIoU": metrics["mIoU"], "per_class_iou": metrics.get("per_class_iou"), **result}, indent=2)
        )
        print(table)
        print(f"mIoU {metrics['mIoU']:.2f} on {len(val_rows)} validation images; model saved to {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _multi_process_without_accelerator() -> bool:
    """True under a multi-process launcher on a machine without GPUs: accelerate only selects its gloo
    (MULTI_CPU) mode when asked for the CPU, otherwise each process would train alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return world_size > 1 and not has_accelerator


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
