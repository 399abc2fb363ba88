"""The encoder: pixel values in, feature maps (B, C, h, w) at chosen layers (`out_indices`) out, at any input size.

The encoder is a timm model kept as it is (`model.encoder`, timm parameter names, so timm checkpoints and
`checkpoint_filter_fn` apply unchanged); this module builds it and runs it. Two forwards, one per kind of encoder:

- `"reference"`: the ImageNet-S reference recipe's ViT (mmsegmentation; MAE, SERE, DINO, DeiT weights): the input is
  padded bottom/right to a multiple of the patch size and the position embedding resized with plain bicubic
  interpolation (`pos_embed.resample_pos_embed`), then timm's blocks run. timm's own dynamic size would resize with
  antialiased bicubic, whose kernel differs (features up to ~0.45 apart at 256x320).
- `"timm"`: every other timm ViT-family model (DINOv2 with and without registers, DINOv3 and EVA-02 (timm's `Eva`,
  rotary embeddings), DeiT-III, ...): the same padding, then timm's own
  `forward_intermediates(x, indices=..., output_fmt="NCHW", intermediates_only=True)` with dynamic image size, so the
  model runs as its family's authors and timm run it (timm's position-embedding resize, RoPE).

`"auto"` picks `"reference"` for a timm `VisionTransformer` shaped like the reference recipe's (class token, absolute
position embedding that covers it, no register tokens, no layer scale) and `"timm"` for everything else.

Padding is computed by ceiling division with no branch on the input size, so `torch.compile(dynamic=True)` traces one
graph for all sizes (a modulo of a symbolic size once crashed inductor).

This file is copied next to saved weights (a relative import of the modeling file), so it imports only torch, timm
and siblings: a saved folder loads with `trust_remote_code=True` where imagenets_hf is not installed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .configuration_vit_fcn import DROP_PATH_BRANCHES, ENCODER_FORWARDS
from .pos_embed import resample_pos_embed

# Encoder parameters that come before the first block: tokens, position and patch embedding, pre-norm.
_EMBEDDING_PARAMETERS = re.compile(
    r"^(cls_token|reg_token|storage_tokens|mask_token|dist_token|pos_embed|patch_embed|norm_pre|rope)(\.|$)"
)
_BLOCK_PARAMETER = re.compile(r"^blocks\.(\d+)\.")


def build_encoder(
    encoder_name: str,
    encoder_kwargs: dict | None = None,
    drop_path_rate: float = 0.0,
    drop_path_branches: str = "both",
) -> nn.Module:
    """`timm.create_model(encoder_name, pretrained=False, num_classes=0, dynamic_img_size=True, ...)`: random
    weights, no classifier; `encoder_kwargs` override the model's arguments (e.g. a tiny `depth` / `embed_dim`).

    Dynamic image size lets timm's `forward_intermediates` take any (padded) input; the reference forward does not
    use timm's embedding step, so it is unaffected. `drop_path_branches="mlp"` keeps stochastic depth on the MLP
    branch only (`drop_path_only_on_mlp`)."""
    if drop_path_branches not in DROP_PATH_BRANCHES:
        raise ValueError(f"drop_path_branches must be one of {DROP_PATH_BRANCHES}, got {drop_path_branches!r}")
    kwargs = {
        "pretrained": False,
        "num_classes": 0,
        "drop_path_rate": drop_path_rate,
        "dynamic_img_size": True,
        **dict(encoder_kwargs or {}),
    }
    check_encoder_name(encoder_name)
    try:
        encoder = timm.create_model(encoder_name, **kwargs)
    except TypeError as error:  # a family whose constructor has no dynamic_img_size cannot take any input size
        raise ValueError(
            f"timm model {encoder_name!r} cannot be built with {kwargs}: {error}. The encoder must be a timm "
            "ViT-family model that takes dynamic_img_size (VisionTransformer, Eva, ...)."
        ) from error
    missing = [name for name in ("patch_embed", "blocks", "forward_intermediates") if not hasattr(encoder, name)]
    if missing:
        raise ValueError(
            f"timm model {encoder_name!r} builds a {type(encoder).__name__} without {', '.join(missing)}: not a "
            "ViT-family encoder (patch embedding, blocks, forward_intermediates)"
        )
    if drop_path_branches == "mlp":
        drop_path_only_on_mlp(encoder)
    return encoder


def drop_path_only_on_mlp(encoder: nn.Module) -> None:
    """Take stochastic depth off every block's attention branch, keeping the MLP branch's rate (linearly spaced over
    the blocks, as timm and mmsegmentation both space it): mmsegmentation's ViT `TransformerEncoderLayer` (0.x and
    1.x) gives only its FFN a DropPath; its attention's `dropout_layer` is a zero-rate Dropout. DropPath holds no
    weights, so the state dict is unchanged."""
    for index, block in enumerate(encoder.blocks):
        if not (hasattr(block, "drop_path1") and hasattr(block, "drop_path2")):
            raise ValueError(
                f"drop_path_branches 'mlp' needs blocks with an attention (drop_path1) and an MLP (drop_path2) branch; "
                f"block {index} is a {type(block).__name__}: use 'both'"
            )
        block.drop_path1 = nn.Identity()


def check_encoder_name(encoder_name: str) -> None:
    """ValueError naming the closest timm model names when `encoder_name` is not one (timm's own error is a bare
    "Unknown model"). Names with a scheme (`hf-hub:...`, `local-dir:...`) are left to timm."""
    if ":" in encoder_name or timm.is_model(encoder_name):
        return
    close = difflib.get_close_matches(encoder_name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close timm names: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown timm encoder {encoder_name!r} (encoder_name, --encoder-name){hint}")


def is_reference_vit(encoder: nn.Module) -> bool:
    """Whether `encoder` is the reference recipe's ViT: a timm `VisionTransformer` with a class token, an absolute
    position embedding that covers it, a plain `PatchEmbed`, no register tokens and no layer scale."""
    return (
        type(encoder) is VisionTransformer
        and type(encoder.patch_embed) is PatchEmbed
        and encoder.cls_token is not None
        and encoder.reg_token is None
        and encoder.pos_embed is not None
        and not encoder.no_embed_class
        and all(isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity) for block in encoder.blocks)
    )


def resolve_encoder_forward(encoder: nn.Module, requested: str = "auto") -> str:
    """`"reference"` or `"timm"` for `encoder` (see the module docstring); refuses a reference forward for an encoder
    it cannot run."""
    if requested not in ENCODER_FORWARDS:
        raise ValueError(f"encoder_forward must be one of {ENCODER_FORWARDS}, got {requested!r}")
    if requested == "auto":
        return "reference" if is_reference_vit(encoder) else "timm"
    if requested == "reference" and not (
        isinstance(encoder, VisionTransformer) and type(encoder.patch_embed) is PatchEmbed
    ):
        raise ValueError(
            f"encoder_forward 'reference' runs a timm VisionTransformer with a PatchEmbed; this encoder is a "
            f"{type(encoder).__name__}: use 'timm' (or 'auto')"
        )
    return requested


def encoder_depth(encoder: nn.Module) -> int:
    """Encoder depth: the number of transformer blocks."""
    return len(encoder.blocks)


def encoder_patch_size(encoder: nn.Module) -> int:
    return int(encoder.patch_embed.patch_size[0])


def encoder_width(encoder: nn.Module) -> int:
    """Channels of each feature map (the token width)."""
    return int(getattr(encoder, "embed_dim", None) or encoder.num_features)


def resolve_out_indices(out_indices: Sequence[int], depth: int) -> list[int]:
    """Absolute block indices (negative ones count from the end, -1 = last block); strictly increasing, in range."""
    resolved = [int(i) + depth if int(i) < 0 else int(i) for i in out_indices]
    if not resolved or any(not 0 <= i < depth for i in resolved):
        raise ValueError(f"out_indices {list(out_indices)} must select blocks of an encoder of depth {depth}")
    if any(b <= a for a, b in zip(resolved, resolved[1:])):
        raise ValueError(f"out_indices {list(out_indices)} must be strictly increasing (resolved: {resolved})")
    return resolved


def encoder_layer_id(name: str, depth: int) -> int:
    """Layer id of an encoder parameter (name relative to the encoder) for layer-wise lr decay: 0 for what comes
    before the first block (class / register / mask tokens, position and patch embedding, pre-norm, rotary
    embedding), i + 1 for block i (layer scale included), depth + 1 for what comes after (final norm, fc_norm)."""
    if _EMBEDDING_PARAMETERS.match(name):
        return 0
    match = _BLOCK_PARAMETER.match(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def pad_to_patch_multiple(pixel_values: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, C, H, W) bottom/right to (ceil(H/p) p, ceil(W/p) p) (as mmsegmentation); returns it and the
    patch grid. Both paths pad here (timm's own `dynamic_img_pad` would pad the same way, by a modulo)."""
    # Ceiling division, not `(-height) % p`: under torch.compile with dynamic sizes (evaluation, one image at a time)
    # a modulo of a symbolic size fails in inductor ("TensorReferenceAnalysis has no attribute python_mod").
    # Unconditional (a zero pad is a copy): branching on the padding would compile one graph per case.
    height, width_ = pixel_values.shape[-2:]
    grid = ((height + patch - 1) // patch, (width_ + patch - 1) // patch)
    return F.pad(pixel_values, (0, grid[1] * patch - width_, 0, grid[0] * patch - height)), grid


def feature_maps(
    encoder: nn.Module,
    pixel_values: torch.Tensor,
    out_indices: Sequence[int],
    final_norm: bool = True,
    forward: str = "reference",
    output_hidden_states: bool = False,
    checkpoint_fn: Callable | None = None,
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
    """Feature maps (B, C, ceil(H/p), ceil(W/p)) after the blocks `out_indices` (absolute, increasing), each through
    the encoder's final norm when `final_norm` (as DINOv2's `get_intermediate_layers(norm=True)` and timm's
    `forward_intermediates(norm=True)`).

    Blocks after the last index are not run (their parameters get no gradient: under DDP such `out_indices` need
    `find_unused_parameters`). With `output_hidden_states`, also the token sequences (prefix tokens
    included, before the final norm): the embedding output and each block's output on the reference forward, each
    block's output on the timm forward (timm does not expose the embedding output). `checkpoint_fn` (e.g.
    `torch.utils.checkpoint.checkpoint`) recomputes the reference forward's blocks in the backward pass when the
    encoder's `grad_checkpointing` is on; timm's forward uses its own checkpointing under the same flag.
    """
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
    pixel_values, grid = pad_to_patch_multiple(pixel_values, encoder_patch_size(encoder))
    if forward == "reference":
        return _reference_feature_maps(
            encoder, pixel_values, grid, out_indices, final_norm, output_hidden_states, checkpoint_fn
        )
    if forward != "timm":
        raise ValueError(f"forward must be 'reference' or 'timm', got {forward!r}")
    if not output_hidden_states:
        maps = encoder.forward_intermediates(
            pixel_values,
            indices=list(out_indices),
            norm=final_norm,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        return list(maps), None
    # Every block's tokens (prefix included), then the selected ones normed and laid out as maps.
    num_prefix = int(getattr(encoder, "num_prefix_tokens", 0))
    outputs = encoder.forward_intermediates(
        pixel_values,
        indices=list(range(max(out_indices) + 1)),
        norm=False,
        stop_early=True,
        output_fmt="NLC",
        intermediates_only=True,
        return_prefix_tokens=num_prefix > 0,
    )
    hidden_states = (
        tuple(torch.cat([prefix, tokens], dim=1) for tokens, prefix in outputs) if num_prefix else tuple(outputs)
    )
    maps = [_tokens_to_map(encoder, hidden_states[i], grid, final_norm) for i in out_indices]
    return maps, hidden_states


def _tokens_to_map(encoder: nn.Module, tokens: torch.Tensor, grid: tuple[int, int], final_norm: bool) -> torch.Tensor:
    if final_norm:
        tokens = encoder.norm(tokens)
    patch_tokens = tokens[:, encoder.num_prefix_tokens :]
    return patch_tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], grid[0], grid[1])


def _reference_feature_maps(
    encoder: VisionTransformer,
    pixel_values: torch.Tensor,
    grid: tuple[int, int],
    out_indices: Sequence[int],
    final_norm: bool,
    output_hidden_states: bool,
    checkpoint_fn: Callable | None,
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
    """The reference recipe's ViT forward on an input already padded to the patch grid."""
    patch_embed = encoder.patch_embed
    # PatchEmbed.forward minus its divisibility check (the input is padded), whose f-string message makes
    # torch.compile specialise on every input size, and whatever output format dynamic_img_size chose.
    x = patch_embed.norm(patch_embed.proj(pixel_values).flatten(2).transpose(1, 2))  # (B, h*w, C)
    prefix = []
    if encoder.cls_token is not None:
        prefix.append(encoder.cls_token.expand(x.shape[0], -1, -1))
    if encoder.reg_token is not None:
        prefix.append(encoder.reg_token.expand(x.shape[0], -1, -1))
    if encoder.pos_embed is not None:
        embed_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
        pos_embed = resample_pos_embed(
            encoder.pos_embed, grid, num_prefix_tokens=embed_prefix, old_grid=tuple(patch_embed.grid_size)
        )
        if encoder.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
    else:
        x = torch.cat(prefix + [x], dim=1)
    x = encoder.pos_drop(x)
    x = encoder.patch_drop(x)
    x = encoder.norm_pre(x)

    hidden_states = [x] if output_hidden_states else None
    use_checkpointing = checkpoint_fn is not None and encoder.grad_checkpointing and encoder.training
    use_checkpointing = use_checkpointing and torch.is_grad_enabled()
    wanted = set(out_indices)
    maps = []
    for index, block in enumerate(encoder.blocks[: max(out_indices) + 1]):
        x = checkpoint_fn(block, x) if use_checkpointing else block(x)
        if hidden_states is not None:
            hidden_states.append(x)
        if index in wanted:
            maps.append(_tokens_to_map(encoder, x, grid, final_norm))
    return maps, (tuple(hidden_states) if hidden_states is not None else None)
