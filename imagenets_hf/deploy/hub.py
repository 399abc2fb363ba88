"""Push a trained model folder to the Hugging Face Hub: what `finetune.py --push-to-hub REPO` does at the end of a
successful run, and `scripts/push_model.py --model DIR --repo REPO` does for a folder already written (again after a
failed push, or for an older run). One function, `push_model_folder`, does both.

What goes up: the folder's top-level model files (`config.json`, the `.safetensors` weights, the modeling and
configuration files `save_pretrained` copies for `trust_remote_code`, `preprocessor_config.json`), the model card
(`README.md`: the results table, the picture of predictions, the per-class table and the recipe; its usage lines name
the repository instead of the local folder), `predictions.png`, `recipe.yaml` and `results.json`. Checkpoints and logs
stay local. One commit; a new repository is private unless asked otherwise.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from pathlib import Path
from typing import Any

PUSHED_FILES = ("*.json", "*.safetensors", "*.py", "README.md", "*.png", "recipe.yaml")
MODEL_CARD = "README.md"


class HubPushError(OSError):
    """The run finished and its folder is complete, but pushing it failed; `result` is the run's result."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result


def check_push_target(repo_id: str, token: str | None = None) -> None:
    """Refuse, before any work, a repository name the Hub would refuse and a machine with no Hub login."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id}: not a Hub repository name ({err})") from None
    if token is None and get_token() is None:
        raise PermissionError(
            f"pushing to {repo_id} needs a Hub login: run `hf auth login` or set HF_TOKEN (a token with write access)"
        )


def files_to_push(model_dir: str | os.PathLike) -> list[Path]:
    """The folder's files that `push_model_folder` uploads (sorted); refuses a folder without a saved model."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such model folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in PUSHED_FILES))
    names = {p.name for p in files}
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        raise FileNotFoundError(
            f"{folder}: no saved model to push (config.json and .safetensors weights); a run saves its model when it "
            "finishes (one stopped with --stop-after: continue it with --resume)"
        )
    return files


def hub_model_card(card: str, repo_id: str) -> str:
    """The model card with its "## Use" section loading from `repo_id` (trust_remote_code: the repository holds
    the model's code, so imagenets_hf need not be installed) instead of the local folder."""
    use = "\n".join(
        [
            "## Use",
            "",
            "```python",
            "from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation",
            f'model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id}", trust_remote_code=True)',
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
            "```",
            "",
            "",
        ]
    )
    return re.sub(r"^## Use\n.*?(?=^## )", lambda _: use, card, count=1, flags=re.MULTILINE | re.DOTALL)


def push_model_folder(
    model_dir: str | os.PathLike, repo_id: str, private: bool = True, token: str | None = None
) -> str:
    """Upload a saved model folder (`files_to_push`) to the Hub model repository `repo_id` in one commit, creating
    it (private unless `private=False`; an existing repository keeps its visibility). Returns the repository URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = files_to_push(model_dir)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = []
    for path in files:
        content: str | bytes = str(path)
        if path.name == MODEL_CARD:
            content = hub_model_card(path.read_text(), url.repo_id).encode()
        operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=content))
    api.create_commit(
        url.repo_id, operations, commit_message=f"Upload {Path(model_dir).name} with imagenets-hf", repo_type="model"
    )
    return str(url)


def push_command(model_dir: str | os.PathLike, repo_id: str, private: bool = True) -> str:
    """The command that pushes `model_dir` again."""
    command = ["python", "scripts/push_model.py", "--model", os.fspath(model_dir), "--repo", repo_id]
    return shlex.join(command + ([] if private else ["--public"]))


def push_after_training(
    model_dir: str | os.PathLike, repo_id: str, private: bool = True, result: dict[str, Any] | None = None
) -> str:
    """`push_model_folder` at the end of a successful run: a failure (network, login, rights) keeps the run and
    raises `HubPushError` saying how to push it again."""
    try:
        return push_model_folder(model_dir, repo_id, private=private)
    except Exception as err:  # whatever stopped the upload, the trained model is on disk: say how to finish the job
        why = " ".join(f"{type(err).__name__}: {err}".split())
        raise HubPushError(
            f"the run finished and is kept in {model_dir}, but pushing it to {repo_id} failed ({why}); push it "
            f"again with: {push_command(model_dir, repo_id, private)}",
            result,
        ) from err
