"""The tiny variant of the demo recipe that the training tests run: a 2-layer ViT 32 wide, 32 px crops, 6 iterations."""

from __future__ import annotations

import json

TINY_RECIPE = {
    "encoder_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    "crop_size": 32,
    "resize_scale": [128, 32],
    "eval_short_side": 32,
    "eval_max_long_side": 128,
    "per_device_batch_size": 4,
    "global_batch_size": 4,
    "max_iters": 6,
    "warmup_iters": 2,
    "checkpoint_interval": 2,
    "checkpoints_total_limit": 2,
    "val_interval": 0,
    "num_workers": 0,
    "drop_path_rate": 0.1,  # exercises the restored random state on resume
}


def cli_args(overrides: dict) -> list[str]:
    """The same settings as `finetune.py` options (JSON values are YAML, which the command line reads)."""
    return [arg for key, value in overrides.items() for arg in (f"--{key.replace('_', '-')}", json.dumps(value))]
