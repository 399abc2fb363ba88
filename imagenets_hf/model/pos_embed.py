"""Position-embedding resampling as the reference recipe does it.

mmsegmentation resizes the position-embedding grid with plain bicubic interpolation (align_corners=False, no
antialiasing). timm's dynamic image size uses antialiased bicubic, whose kernel differs (a = -0.5 instead of -0.75,
and wider when downsampling), so the encoder features would drift from the reference (up to ~0.45 at 256x320).

This module is the one place that says how the reference resizes (`REFERENCE_RESAMPLING`); the interpolation itself
is timm's `resample_abs_pos_embed` with those arguments, which a test holds bitwise equal to a plainly written
`F.interpolate(..., mode="bicubic", align_corners=False)` on square and non-square grids with 0, 1 and 5 prefix
tokens. Checkpoint import passes the same arguments to timm's `checkpoint_filter_fn`.
"""

from __future__ import annotations

import math

import torch
from timm.layers import resample_abs_pos_embed

# Plain bicubic, align_corners False, no antialiasing: mmsegmentation's `resize_pos_embed`.
REFERENCE_RESAMPLING = {"interpolation": "bicubic", "antialias": False}


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize a (1, prefix + h*w, C) position embedding to `new_grid` (h', w') with plain bicubic interpolation.

    `old_grid` defaults to a square grid. Prefix tokens (class token) are kept as they are.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected a position embedding of shape (1, N, C), got {tuple(pos_embed.shape)}")
    num_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.isqrt(num_tokens))
        if side * side != num_tokens:
            raise ValueError(
                f"position embedding has {num_tokens} grid tokens (after {num_prefix_tokens} prefix tokens), "
                "which is not a square grid; pass old_grid"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_tokens:
        raise ValueError(f"old_grid {old_grid} does not match {num_tokens} grid tokens")
    # timm computes in float32 and casts back, keeps the prefix tokens and returns the input when the grid is unchanged
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        **REFERENCE_RESAMPLING,
    )
