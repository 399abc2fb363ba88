"""The tiny variant of the demo recipe that the training tests run: a 2-layer ViT 32 wide, 32 px crops, 6 iterations."""

from __future__ import annotations

import json

from imagenets_hf.benchmarks.check_gpu import TOY_DEMO

# The GPU check's toy demo (the same tiny model, crops and batches), with the tests' budget and checkpointing.
TINY_RECIPE = {
    **TOY_DEMO,
    "max_iters": 6,
    "warmup_iters": 2,
    "checkpoint_interval": 2,
    "checkpoints_total_limit": 2,
    "val_interval": 0,
    "drop_path_rate": 0.1,  # exercises the restored random state on resume
}


def cli_args(overrides: dict) -> list[str]:
    """The same settings as `finetune.py` options (JSON values are YAML, which the command line reads; text as it is,
    since a text field takes its flag's value verbatim)."""
    return [
        arg
        for key, value in overrides.items()
        for arg in (f"--{key.replace('_', '-')}", value if isinstance(value, str) else json.dumps(value))
    ]
