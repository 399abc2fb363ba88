"""Runs that change set-up on the way (process count, `--compile`), heads on early blocks under DDP, and the
settings a launcher's environment must not change (`ACCELERATE_DYNAMO_BACKEND`, `ACCELERATE_MIXED_PRECISION`)."""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from test_train_finetune import TINY_OVERRIDES, free_port, run_finetune
from tiny_runs import TINY_RECIPE, cli_args

from imagenets_hf.training.finetune import build_model, finetune, prepare_data
from imagenets_hf.training.recipes import load_recipe

# The tiny recipe at a global batch of 8 (1 process x 4 x 2 accumulation, or 2 processes x 4), with a head on the
# first of the 2 blocks. No drop path and no BatchNorm: the drop-path masks come from each process's random stream and
# BatchNorm normalises over each process's share of the batch, so only without them does a run on 2 processes compute
# what one on 1 process does (up to the order of the floating-point sums). Runs stop after iteration 6 of 7 (and
# checkpoint), so no final evaluation is spent.
EARLY_HEAD = {
    **TINY_OVERRIDES,
    "drop_path_rate": 0.0,
    "model_kwargs": {"out_indices": [0], "use_batchnorm": False},
    "checkpoint_interval": 0,
    "max_iters": 7,
}


def launch_two_processes() -> list[str]:
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not on PATH")
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip


@pytest.mark.slow
def test_resume_on_two_processes_then_on_one_with_a_head_on_an_early_block(mini_dir, tmp_path):
    """Iterations 0-2 on 1 process, 2-4 on 2 processes (DDP, gloo), 4-6 on 1 again: the weights equal an
    uninterrupted 1-process run's (to float rounding: DDP averages two half-batch gradients where one process
    accumulates them). The head reads block 0, so block 1 gets no gradient: DDP trained with it until the second
    iteration ("Expected to have finished reduction"); now it is frozen and stays as initialised."""
    overrides = {**EARLY_HEAD, "data_dir": str(mini_dir)}
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    finetune(load_recipe("demo", {**overrides, "output_dir": str(straight)}), stop_after=6, progress=False)
    finetune(load_recipe("demo", {**overrides, "output_dir": str(changed)}), stop_after=2, progress=False)
    args = ["--data-dir", str(mini_dir), *cli_args(EARLY_HEAD), "--output-dir", str(changed)]
    completed = run_finetune([*args, "--resume", "--stop-after", "4"], launcher=launch_two_processes())
    assert "2 process(es) x 4 per device x 1 accumulation" in completed.stdout
    assert "Resumed from" in completed.stdout and "at iteration 2" in completed.stdout
    finetune(
        load_recipe("demo", {**overrides, "output_dir": str(changed)}), resume="latest", stop_after=6, progress=False
    )

    expected = load_file(straight / "checkpoints" / "checkpoint_6" / "model.safetensors")
    actual = load_file(changed / "checkpoints" / "checkpoint_6" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # block 1 never trained: it equals the initial weights (the model as setup_run builds it)
    recipe = load_recipe("demo", overrides)
    _, _, names = prepare_data(recipe)
    set_seed(recipe.seed)
    untrained = build_model(recipe, names).state_dict()
    block_1 = [name for name in expected if name.startswith("encoder.blocks.1.")]
    assert block_1
    for name in block_1:
        assert torch.equal(actual[name], untrained[name]), name
    trained = [name for name in expected if name.startswith("encoder.blocks.0.")]
    assert all(not torch.equal(actual[name], untrained[name]) for name in trained if name.endswith("weight"))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide AcceleratorState forgotten before and after: the environment variables it reads
    are read again, whatever ran earlier in this process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def tiny_model(**kwargs) -> torch.nn.Module:
    from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation

    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn",
        encoder_name="vit_small_patch16_224",
        encoder_kwargs=TINY_RECIPE["encoder_kwargs"],
        **{"num_labels": 5, **kwargs},
    )
    return ViTFCNForSemanticSegmentation(config)


@pytest.mark.parametrize("saved_wrapped", [True, False])
def test_a_checkpoint_resumes_whatever_wraps_the_model(tmp_path, fresh_accelerate_state, saved_wrapped):
    """A checkpoint of a model compiled before `prepare` (its weights named `_orig_mod.*`, here with SyncBatchNorm as
    on GPUs) resumes into a bare model, and a bare model's checkpoint into a compiled one: same weights, optimizer
    state and scheduler. (Before, accelerate's strict load refused either: missing and unexpected keys.)"""
    from accelerate import Accelerator

    from imagenets_hf.training.checkpoints import load_checkpoint, save_checkpoint

    def prepared(wrapped: bool, lr: float):
        model = tiny_model()
        if wrapped:
            model = torch.compile(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), backend="eager")
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        accelerator = Accelerator(cpu=True)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        return accelerator, model, optimizer, scheduler

    accelerator, model, optimizer, scheduler = prepared(saved_wrapped, lr=1e-3)
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    model(pixel_values=pixel_values, labels=labels).loss.backward()  # eager "compile": no inductor time
    optimizer.step()
    scheduler.step()
    folder = save_checkpoint(accelerator, tmp_path, iteration=1, keep=1)
    names = list(load_file(folder / "model.safetensors"))
    assert all(name.startswith("_orig_mod.") for name in names) == saved_wrapped

    expected = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
    other, other_model, other_optimizer, other_scheduler = prepared(not saved_wrapped, lr=5.0)
    load_checkpoint(other, folder)
    actual = other.unwrap_model(other_model, keep_torch_compile=False).state_dict()
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert other_optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert other_scheduler.last_epoch == 1
    expected_state, actual_state = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert actual_state.keys() == expected_state.keys()
    for index in expected_state:
        assert torch.equal(actual_state[index]["exp_avg"], expected_state[index]["exp_avg"])


def test_a_checkpoint_without_a_gradient_scaler_resumes_with_one(tmp_path, fresh_accelerate_state):
    """A run whose recipe says fp16, checkpointed on a CPU (float32, no GradScaler, no scaler.pt), resumes on a GPU
    (fp16 with a GradScaler, stood in for here by a CPU one) with a fresh scaler. (Before, accelerate stopped on the
    missing scaler.pt.)"""
    from accelerate import Accelerator

    from imagenets_hf.training.checkpoints import load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    folder = save_checkpoint(accelerator, tmp_path, iteration=1, keep=1)
    assert not (folder / "scaler.pt").exists()
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_checkpoint(accelerator, folder)
    assert accelerator.scaler is scaler and scaler.get_scale() == 1024.0


@pytest.mark.slow
def test_resume_with_compile_switched_on_and_off(mini_dir, tmp_path, monkeypatch):
    """3 iterations compiled, 3 more not, and the reverse: the weights after 6 iterations equal an uninterrupted
    uncompiled run's (torch.compile's "eager" backend keeps the arithmetic of the uncompiled model, so equality is
    exact here; inductor rounds differently). Before, `--resume` refused a run whose recipe differed in `compile`.
    Each run stops after iteration 6 of 7, so that no final evaluation is spent."""
    import imagenets_hf.training.finetune as finetune_module

    monkeypatch.setattr(finetune_module, "COMPILE_BACKEND", "eager")
    overrides = {**TINY_OVERRIDES, "data_dir": str(mini_dir), "num_workers": 0, "max_iters": 7}

    def run(name: str, compile: bool, stop_after: int, resume: str | None = None) -> dict:
        recipe = load_recipe("demo", {**overrides, "output_dir": str(tmp_path / name), "compile": compile})
        return finetune(recipe, progress=False, stop_after=stop_after, resume=resume)

    def weights(name: str) -> dict[str, torch.Tensor]:
        return load_file(tmp_path / name / "checkpoints" / "checkpoint_6" / "model.safetensors")

    run("straight", compile=False, stop_after=6)
    expected = weights("straight")
    for first, then in ((True, False), (False, True)):
        name = f"compile-{first}-then-{then}"
        assert run(name, compile=first, stop_after=3)["compiled"] is first
        assert run(name, compile=then, stop_after=6, resume="latest")["compiled"] is then
        actual = weights(name)
        assert actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), (name, key)


@pytest.mark.parametrize("earlier", ["environment", "earlier accelerator"])
def test_the_recipe_decides_compile_and_precision(mini_dir, tmp_path, monkeypatch, fresh_accelerate_state, earlier):
    """`compile: false`, `mixed_precision: no` train uncompiled in float32 although `accelerate launch` put the
    user's accelerate config (inductor, bf16) into the environment, or an Accelerator made earlier in the process
    compiled: accelerate reads ACCELERATE_DYNAMO_BACKEND when given no backend, and keeps the first AcceleratorState of
    a process. (Before, both runs compiled.)"""
    from accelerate import Accelerator
    from accelerate.utils import DynamoBackend, is_compiled_module

    from imagenets_hf.training.finetune import setup_run

    if earlier == "environment":
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    else:
        Accelerator(cpu=True, dynamo_backend="eager")
    overrides = {**TINY_OVERRIDES, "data_dir": str(mini_dir), "num_workers": 0, "output_dir": str(tmp_path / "run")}
    run = setup_run(load_recipe("demo", overrides), resume=None, overwrite=False, make_mini_dataset=False)
    try:
        assert run.accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
        assert not is_compiled_module(run.model)
        assert run.accelerator.mixed_precision == "no" and not run.accelerator.native_amp
        assert run.settings == {"mixed_precision": "no", "compiled": False, "tf32": False}
    finally:
        run.accelerator.end_training()


def test_evaluation_runs_and_records_its_own_precision(mini_dir, tmp_path, monkeypatch, fresh_accelerate_state):
    """Under `accelerate launch` with an fp16 accelerate config (ACCELERATE_MIXED_PRECISION=fp16) the evaluation
    script's Accelerator stays in full precision, so on a GPU it does not autocast in fp16 while its JSON says fp32;
    `--dtype` alone sets the precision, and the JSON records it. (Before, the Accelerator took fp16.)"""
    import json

    import imagenets_hf.evaluation.inference as inference
    from imagenets_hf.data.imagenets import class_names
    from imagenets_hf.evaluation.run import run_evaluation
    from imagenets_hf.model import ViTFCNImageProcessor

    names = class_names(mini_dir, synset_words=mini_dir / "LOC_synset_mapping.txt")
    model = tiny_model(num_labels=len(names), id2label=dict(enumerate(names)), drop_path_rate=0.0)
    model.save_pretrained(tmp_path / "model")
    ViTFCNImageProcessor(short_side=32, max_long_side=64).save_pretrained(tmp_path / "model")
    seen = []
    evaluate_model = inference.evaluate_model

    def spy(model, processor, dataset, accelerator=None, dtype=None, **kwargs):
        seen.append((accelerator.mixed_precision, dtype))
        return evaluate_model(model, processor, list(dataset)[:4], accelerator=accelerator, dtype=dtype, **kwargs)

    monkeypatch.setattr(inference, "evaluate_model", spy)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    for dtype, recorded in ((None, "fp32"), ("bf16", "bf16")):
        output = tmp_path / f"{recorded}.json"
        run_evaluation(
            tmp_path / "model", mini_dir, output=output, dtype=dtype, extended=False, num_workers=0, progress=False
        )
        assert seen.pop() == ("no", dtype)
        assert json.loads(output.read_text())["dtype"] == recorded


def test_the_model_card_says_what_ran(tmp_path):
    """A recipe's fp16 that ran as float32 (on a CPU), compiled: the card's results table says so. (Before, it said
    the recipe's "mixed precision fp16".)"""
    from imagenets_hf.training.finetune import write_model_card

    recipe = load_recipe("demo", {"mixed_precision": "fp16", "output_dir": str(tmp_path)})
    ran = {"mixed_precision": "no", "compiled": True, "tf32": False}
    runtime = {"iterations": 6, "num_processes": 1, "gradient_accumulation_steps": 1, "train_seconds": 1.0, **ran}
    card = write_model_card(tmp_path, recipe, None, None, runtime).read_text()
    assert "global batch of 16, mixed precision no (recipe: fp16), compiled, 1 s |" in card
    runtime.update(mixed_precision="bf16", compiled=False, tf32=True)
    recipe.mixed_precision = "bf16"
    card = write_model_card(tmp_path, recipe, None, None, runtime).read_text()
    assert "global batch of 16, mixed precision bf16, TF32 matmuls, 1 s |" in card


@pytest.mark.parametrize(
    ("model_kwargs", "expected_prefixes"),
    [({}, ()), ({"out_indices": [0]}, ("encoder.blocks.1.",)), ({"final_norm": False}, ("encoder.norm.",))],
)
def test_the_parameters_the_loss_cannot_reach_are_frozen(model_kwargs, expected_prefixes):
    """Exactly the parameters without a gradient after a training step are frozen (block 1 when the head reads
    block 0, the final norm when it is not applied, none by default); the probe leaves the mode, the BatchNorm
    statistics and the random state as they were."""
    from imagenets_hf.training.finetune import freeze_unreached_parameters

    model = tiny_model(**model_kwargs).train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    random_state = torch.get_rng_state()
    frozen = freeze_unreached_parameters(model)
    assert model.training and torch.equal(torch.get_rng_state(), random_state)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    names = [name for name, _ in model.named_parameters()]
    assert frozen == [name for name in names if name.startswith(expected_prefixes)]
    assert all(not param.requires_grad for name, param in model.named_parameters() if name in frozen)
    model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.randint(0, 5, (2, 32, 32))).loss.backward()
    assert [name for name, param in model.named_parameters() if param.grad is None] == frozen
