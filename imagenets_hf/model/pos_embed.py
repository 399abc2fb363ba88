"""Position-embedding resampling as the reference recipe does it.

mmsegmentation resizes the position-embedding grid with plain bicubic interpolation (align_corners=False, no
antialiasing). timm's dynamic image size uses antialiased bicubic, whose kernel differs when downsampling, so the
encoder features would drift from the reference (up to ~0.45 at 256x320). This module is the one place that resizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    num_tokens, dim = grid.shape[1], grid.shape[2]
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
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed
    orig_dtype = pos_embed.dtype
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(orig_dtype)
    return torch.cat([prefix, grid], dim=1)
