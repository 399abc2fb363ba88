"""Pushing a trained model to the Hub (`imagenets_hf.deploy.hub`, `scripts/push_model.py`, `finetune.py
--push-to-hub`) with the Hub's two calls replaced (no network here): what is uploaded, the card's usage lines, private
by default, one-line errors; and at the end of a real tiny run, with `--report-to wandb` offline: the push, and a
failed push that keeps the run and says how to push again."""

from __future__ import annotations

import importlib.util
import json

import huggingface_hub
import pytest
import torch
from script_runner import run_script
from tiny_runs import TINY_RECIPE

from imagenets_hf.deploy.hub import HubPushError, push_model_folder
from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation, ViTFCNImageProcessor

TINY_ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
MODEL_CODE = {"configuration_vit_fcn.py", "encoder.py", "image_processing_vit_fcn.py", "modeling_vit_fcn.py"}
MODEL_CODE |= {"pos_embed.py"}
RUN_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "predictions.png"}
RUN_FILES |= {"recipe.yaml", "results.json"} | MODEL_CODE


class FakeHub:
    """HfApi.create_repo and HfApi.create_commit replaced: repositories are folders under `root`."""

    def __init__(self, root, fail_with: Exception | None = None):
        self.root, self.fail_with = root, fail_with
        self.created: list[tuple[str, bool]] = []
        self.commits: list[str] = []

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
            assert exist_ok and repo_type == "model"
            hub.created.append((repo_id, private))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
            if hub.fail_with is not None:
                raise hub.fail_with
            hub.commits.append(repo_id)
            for operation in operations:
                target = hub.root / repo_id / operation.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                with operation.as_file() as source:
                    target.write_bytes(source.read())

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # the login check looks for a token, never uses it
        return self


def saved_run_folder(folder):
    """A folder as a finished run leaves it: model, processor, model card, picture, recipe, results, checkpoints and
    logs."""
    torch.manual_seed(0)
    config = ViTFCNConfig.from_preset(
        "fcn", encoder_name="vit_small_patch16_224", encoder_kwargs=TINY_ENCODER, drop_path_rate=0.0, num_labels=5
    )
    ViTFCNForSemanticSegmentation(config).save_pretrained(folder)
    ViTFCNImageProcessor().save_pretrained(folder)
    card = "# run\n\n## Results\n\n| a |\n\n## Use\n\n```python\nfrom_pretrained('local')\n```\n\n## Recipe\n\nyaml\n"
    (folder / "README.md").write_text(card)
    for name in ("predictions.png", "recipe.yaml", "results.json"):
        (folder / name).write_text(name)
    for name in ("checkpoints/checkpoint_2/model.safetensors", "logs/demo/events.out"):
        (folder / name).parent.mkdir(parents=True)
        (folder / name).write_text("x")
    return folder


def test_push_uploads_the_model_card_and_recipe_not_checkpoints(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    folder = saved_run_folder(tmp_path / "run")
    url = push_model_folder(folder, "me/demo")
    assert url == "https://huggingface.co/me/demo"
    assert hub.created == [("me/demo", True)] and hub.commits == ["me/demo"]  # private unless asked, one commit
    uploaded = hub.root / "me" / "demo"
    assert {p.name for p in uploaded.iterdir()} == RUN_FILES  # no checkpoints/, no logs/
    card = (uploaded / "README.md").read_text()
    # the usage lines name the repository (with its code: trust_remote_code), the rest of the card is unchanged
    assert card == (
        "# run\n\n## Results\n\n| a |\n\n## Use\n\n```python\n"
        "from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation\n"
        'model = AutoModelForSemanticSegmentation.from_pretrained("me/demo", trust_remote_code=True)\n'
        'processor = AutoImageProcessor.from_pretrained("me/demo", trust_remote_code=True)\n'
        "```\n\n## Recipe\n\nyaml\n"
    )
    assert (uploaded / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()

    push_model_folder(folder, "me/public-demo", private=False)
    assert hub.created[-1] == ("me/public-demo", False)


def test_push_model_script_and_its_one_line_errors(tmp_path, monkeypatch, capsys):
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    folder = saved_run_folder(tmp_path / "run")
    capsys.readouterr()

    def push(*args):
        return run_script("push_model", *args, monkeypatch=monkeypatch, capsys=capsys)

    assert push("--model", folder, "--repo", "me/demo", "--public") == (
        0,
        [f"pushed {folder} to https://huggingface.co/me/demo (public if new)"],
    )
    assert hub.created == [("me/demo", False)]
    assert push("--model", tmp_path / "missing", "--repo", "me/demo") == (
        1,
        [f"push_model.py: error: no such model folder: {tmp_path / 'missing'}"],
    )
    (tmp_path / "empty").mkdir()
    status, lines = push("--model", tmp_path / "empty", "--repo", "me/demo")
    assert (status, len(lines)) == (1, 1) and lines[0].startswith(
        f"push_model.py: error: {tmp_path / 'empty'}: no saved model to push (config.json and .safetensors weights)"
    )
    status, lines = push("--model", folder, "--repo", "me/not a name")
    assert (status, len(lines)) == (1, 1)
    assert lines[0].startswith("push_model.py: error: me/not a name: not a Hub repository name (Repo id must use")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no stored token either
    assert push("--model", folder, "--repo", "me/demo") == (
        1,
        [
            "push_model.py: error: pushing to me/demo needs a Hub login: run `hf auth login` or set HF_TOKEN (a token "
            "with write access)"
        ],
    )
    assert hub.commits == ["me/demo"]  # only the first command pushed


def test_hub_public_needs_push_to_hub(tmp_path, monkeypatch, capsys):
    status, lines = run_script(
        "finetune", "--hub-public", "--output-dir", tmp_path / "run", monkeypatch=monkeypatch, capsys=capsys
    )
    assert (status, lines) == (2, ["finetune.py: error: --hub-public applies to --push-to-hub (see --help)"])
    assert not (tmp_path / "run").exists()


WANDB_MISSING = importlib.util.find_spec("wandb") is None


def tiny_recipe(mini_dir, output_dir, **overrides):
    from imagenets_hf.training.recipes import load_recipe

    values = {**TINY_RECIPE, "data_dir": str(mini_dir), "output_dir": str(output_dir), **overrides}
    return load_recipe("demo", values)


@pytest.mark.slow
@pytest.mark.skipif(WANDB_MISSING, reason="needs wandb (the wandb extra: pip install 'imagenets-hf[wandb]')")
def test_finetune_pushes_at_the_end_and_logs_to_wandb_offline(mini_dir, tmp_path, monkeypatch, capsys):
    from imagenets_hf.training.finetune import finetune

    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))  # where wandb would write unless told
    monkeypatch.setenv("WANDB_SILENT", "true")
    output_dir = tmp_path / "run"
    result = finetune(tiny_recipe(mini_dir, output_dir, report_to="wandb"), progress=False, push_to_hub="me/tiny")
    assert result["hub_url"] == "https://huggingface.co/me/tiny"
    assert f"pushed {output_dir} to https://huggingface.co/me/tiny (private if new)" in capsys.readouterr().out
    assert hub.created == [("me/tiny", True)] and hub.commits == ["me/tiny"]
    uploaded = hub.root / "me" / "tiny"
    assert {p.name for p in uploaded.iterdir()} == RUN_FILES
    card = (uploaded / "README.md").read_text()
    miou = json.loads((output_dir / "results.json").read_text())["mIoU"]
    assert f"**{miou:.2f}**" in card and "![predictions on validation images](predictions.png)" in card
    assert "## Recipe" in card and 'from_pretrained("me/tiny", trust_remote_code=True)' in card
    assert (uploaded / "recipe.yaml").read_text() == (output_dir / "recipe.yaml").read_text()
    assert "report_to: wandb" in (uploaded / "recipe.yaml").read_text()
    reloaded = ViTFCNForSemanticSegmentation.from_pretrained(uploaded).eval()
    saved = ViTFCNForSemanticSegmentation.from_pretrained(output_dir).eval()
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name

    # wandb ran offline in the run's logs folder (not WANDB_DIR); its one record file (protobuf; wandb 0.31 has no
    # Python reader for it) holds the recipe's fields as config, the loss, and the final mIoU as logged: a history
    # item is key (field 2) then value_json (field 16, tag bytes 0x82 0x01), each length-prefixed.
    (record_file,) = (output_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    assert not (tmp_path / "wandb-default").exists()
    records = record_file.read_bytes()
    value = json.dumps(miou).encode()
    assert b"\x12\x08val/mIoU\x82\x01" + bytes([len(value)]) + value in records
    assert b"train/loss" in records and b"report_to" in records and b"global_batch_size" in records


@pytest.mark.slow
def test_a_failed_push_keeps_the_run_and_says_how_to_push_again(mini_dir, tmp_path, monkeypatch, capsys):
    from imagenets_hf.training.finetune import finetune

    hub = FakeHub(tmp_path / "hub", fail_with=ConnectionError("Hub unreachable")).install(monkeypatch)
    output_dir = tmp_path / "run"
    with pytest.raises(HubPushError) as error:
        finetune(tiny_recipe(mini_dir, output_dir, report_to="none"), progress=False, push_to_hub="me/tiny")
    command = f"python scripts/push_model.py --model {output_dir} --repo me/tiny"
    assert str(error.value) == (
        f"the run finished and is kept in {output_dir}, but pushing it to me/tiny failed (ConnectionError: Hub "
        f"unreachable); push it again with: {command}"
    )
    assert error.value.result["metrics"]["mIoU"] == json.loads((output_dir / "results.json").read_text())["mIoU"]
    assert RUN_FILES <= {p.name for p in output_dir.iterdir()}
    assert not (output_dir / "logs").exists()  # report_to none: no tracker wrote anything

    hub.fail_with = None  # the network is back: the printed command pushes the kept run
    assert command.split()[:2] == ["python", "scripts/push_model.py"]
    capsys.readouterr()
    status, lines = run_script("push_model", *command.split()[2:], monkeypatch=monkeypatch, capsys=capsys)
    assert (status, lines[-1]) == (0, f"pushed {output_dir} to https://huggingface.co/me/tiny (private if new)")
    assert {p.name for p in (hub.root / "me" / "tiny").iterdir()} == RUN_FILES


def test_report_to_chooses_the_tracker(tmp_path, monkeypatch):
    from imagenets_hf.training import finetune as finetune_module
    from imagenets_hf.training.recipes import RecipeError, load_recipe

    def recipe(report_to):
        return load_recipe("demo", {"report_to": report_to, "output_dir": str(tmp_path / "run")})

    assert load_recipe("demo").report_to == "tensorboard"  # the default, as before the field
    assert [finetune_module.tracker(recipe(name)) for name in ("tensorboard", "wandb", "none")] == [
        "tensorboard",
        "wandb",
        None,
    ]
    assert finetune_module.tracker_init_kwargs(recipe("wandb")) == {"wandb": {"dir": str(tmp_path / "run" / "logs")}}
    assert finetune_module.tracker_init_kwargs(recipe("tensorboard")) == {}
    with pytest.raises(RecipeError, match=r"overrides: report_to \('mlflow'\) must be one of tensorboard, wandb, none"):
        recipe("mlflow")
    monkeypatch.setattr(finetune_module.importlib.util, "find_spec", lambda name: None)  # wandb not installed
    with pytest.raises(ImportError, match=r"needs wandb: pip install 'imagenets-hf\[wandb\]'"):
        finetune_module.tracker(recipe("wandb"))
