"""Import pre-trained ViT-family weights from the checkpoint layouts researchers hold into the model's timm encoder.

Two steps. `convert_state_dict` (pure: one state dict to another) unwraps the container (`teacher`, `model`,
`state_dict`, ...), strips wrapper prefixes (`module.`, `backbone.`, `vit.`, `encoder.`), flattens Meta's chunked
DINOv2 blocks, maps the names timm does not know (mmsegmentation; transformers ViT / ViTMAE / Dinov2, v4 on disk and
v5 in memory) to timm's or to Meta's release names, takes the final norm from `fc_norm` when a fine-tuned MAE
checkpoint has no `norm`, and drops what is not encoder (classification, projection and MIM heads, MAE decoders,
mask tokens). `load_pretrained_encoder` then hands the result to the `checkpoint_filter_fn` that timm keeps beside
the encoder's model class (`vision_transformer.checkpoint_filter_fn` knows Meta's DINOv2 release files: register
tokens, SwiGLU; `eva.checkpoint_filter_fn` knows Meta's DINOv3 files and EVA-02's), with the reference recipe's
plain bicubic resampling, fits the result to the encoder (final norm, position-embedding grid) and refuses a
checkpoint that does not fill every encoder tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .pos_embed import REFERENCE_RESAMPLING, resample_pos_embed

# Which sub-dict of a training checkpoint holds the weights, in order of preference. DINO's and iBOT's evaluation
# code (eval_linear.py, eval_knn.py: `--checkpoint_key teacher`) evaluates the teacher, the EMA network that the
# papers report, so `teacher` wins over `student` when a file holds both. MAE and ImageNetSegModel use `model`,
# timm and mmsegmentation `state_dict`.
CONTAINER_KEYS = ("teacher", "model", "state_dict", "module", "student")
# A Hub repository id: `owner/name` (transformers and timm repositories are always namespaced).
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")

# Wrappers around the backbone: DDP (`module.`), DINO/iBOT's MultiCropWrapper and mmseg segmentors (`backbone.`),
# transformers task models (`vit.`), this project's own segmentation model (`encoder.`).
WRAPPER_PREFIXES = ("backbone.", "vit.", "encoder.")

# Tensors that belong to heads, decoders or pre-training machinery, never to the encoder.
NON_ENCODER_PREFIXES = (
    "head.",  # classification head (MAE fine-tuned, timm) or DINO/iBOT projection head
    "head_dist.",
    "dino_head.",  # DINOv2 training checkpoints: the DINO and iBOT projection heads
    "ibot_head.",
    "lm_head.",  # EVA-02's masked-image-modelling head
    "fc_norm.",  # only reached when `norm` exists; otherwise it becomes `norm`
    "decoder",  # MAE decoder (`decoder_embed`, `decoder_blocks`, ...) and transformers' `decoder.`
    "mask_token",  # MAE, DINOv2, DINOv3, EVA-02 (handed to timm's filter as a layout marker, see MARKER_KEYS)
    "masked_embed",  # iBOT's masked-image-modelling token
    "pooler.",  # transformers ViTModel pooler
    "classifier.",  # transformers ViTForImageClassification
    "embeddings.mask_token",
    "decode_head.",
    "auxiliary_head.",
)

# Non-encoder tensors by which timm's checkpoint_filter_fn recognises a layout (Meta's DINOv2 files: `mask_token`;
# EVA-02's masked-image-modelling files: `mask_token`, whose final norm timm moves to fc_norm). Dropped from the
# converted state dict, but shown to the filter.
MARKER_KEYS = ("mask_token",)

# Meta's DINOv2 with block_chunks > 0 (training checkpoints): `blocks.<chunk>.<i>.` holds block i.
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+\.)")

_MMSEG_BLOCK_RENAMES = (
    ("ln1.", "norm1."),
    ("ln2.", "norm2."),
    ("attn.attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.attn.out_proj.", "attn.proj."),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
)

# transformers ViT / ViTMAE / Dinov2, per layer: v4 names (what save_pretrained writes, what the Hub holds) and v5
# names (what a v5 model's state_dict() returns in memory). Names timm shares (Dinov2's norm1, norm2, mlp.fc1,
# mlp.fc2) are kept as they are. Dinov2's layer scale and SwiGLU map to Meta's names, which timm's filter reads.
_HF_LAYER_RENAMES = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.w12."),
    ("mlp.weights_out.", "mlp.w3."),
)
# transformers Dinov2 embeddings -> Meta's DINOv2 names (the position embedding keeps its class-token slot there).
_HF_EMBEDDING_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",  # ViTMAE's are fixed sin-cos but stored: copied like any other
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
}
_HF_QKV_V4 = ("attention.attention.query.", "attention.attention.key.", "attention.attention.value.")
_HF_QKV_V5 = ("attention.q_proj.", "attention.k_proj.", "attention.v_proj.")
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")


@dataclass
class ConvertedStateDict:
    """A state dict in timm names (or the release names timm's `checkpoint_filter_fn` converts: Meta's DINOv2 and
    DINOv3, EVA-02), the layout it came from, the keys left out, and the left-out tensors that mark the layout for
    timm's filter (`MARKER_KEYS`)."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    ignored: list[str] = field(default_factory=list)
    markers: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EncoderLoadReport:
    """What `load_pretrained_encoder` did: the detected layout and the encoder keys loaded / missing, the checkpoint
    keys the encoder has no place for (unexpected), those dropped as non-encoder (ignored) and notes."""

    layout: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Pure conversion


class CheckpointKeyError(KeyError, ValueError):
    """`key` names no sub-dict of the checkpoint. A KeyError for callers that catch one, and a ValueError: a user
    error with a readable message (KeyError's own str() quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointTypeError(TypeError, ValueError):
    """The checkpoint holds something other than a dict of tensors where weights were expected."""


def looks_like_hub_repo_id(text: str) -> bool:
    """Whether `text` names a Hub repository rather than a local path: `owner/name` with no leading `.`, `~` or `/`
    and no local folder called `owner` (so a mistyped `outputs/demoo` is a missing folder, not a Hub id)."""
    return bool(HUB_REPO_ID.fullmatch(text)) and not Path(text.split("/")[0]).exists()


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrap(checkpoint: dict, key: str | None, source: str) -> tuple[dict, list[str], list[str]]:
    """Descend into the container dicts until the tensors; returns (state dict, keys taken, non-tensor keys left)."""
    taken: list[str] = []
    current = checkpoint
    while isinstance(current, dict) and not _is_tensor_dict(current):
        if key is not None and key in current:
            chosen = key
        else:
            chosen = next((k for k in CONTAINER_KEYS if isinstance(current.get(k), dict)), None)
        if chosen is None:
            break
        taken.append(chosen)
        current = current[chosen]
    if key is not None and key not in taken:
        raise CheckpointKeyError(
            f"{source}: no sub-dict {key!r} in the checkpoint; available keys: {sorted(map(str, checkpoint))[:20]}"
        )
    if not isinstance(current, dict):
        raise CheckpointTypeError(f"{source}: expected a dict of tensors, found {type(current).__name__}")
    dropped = [str(k) for k, v in current.items() if not isinstance(v, torch.Tensor)]
    tensors = {str(k): v for k, v in current.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"{source}: found no tensors (top-level keys: {sorted(map(str, checkpoint))[:20]}); "
            f"pass key= (--key) naming the sub-dict that holds the weights"
        )
    return tensors, taken, dropped


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove `module.` everywhere and select the backbone under wrapper prefixes; returns (dict, ignored keys)."""
    stripped = {}
    for name, tensor in state_dict.items():
        while name.startswith("module."):
            name = name[len("module.") :]
        stripped[name] = tensor
    ignored: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            inner = {k[len(prefix) :]: v for k, v in stripped.items() if k.startswith(prefix)}
            # Only a prefix under which a whole ViT sits: transformers' own `encoder.layer.*` must stay as it is.
            if inner and any(k.startswith(("patch_embed.", "embeddings.")) for k in inner):
                ignored += [k for k in stripped if not k.startswith(prefix)]
                stripped = inner
                changed = True
                break
    return stripped, ignored


def _flatten_chunked_blocks(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Meta's DINOv2 `blocks.<chunk>.<i>.` (BlockChunk: block i keeps its global index) -> `blocks.<i>.`."""
    if not any(_CHUNKED_BLOCK.match(k) for k in state_dict):
        return state_dict, False
    return {_CHUNKED_BLOCK.sub(r"blocks.\1", k): v for k, v in state_dict.items()}, True


def _detect_format(state_dict: dict[str, torch.Tensor], source: str) -> str:
    keys = state_dict.keys()
    if "embeddings.patch_embeddings.projection.weight" in keys:
        if any(".layer_scale1." in k for k in keys):
            return "transformers-dinov2"
        return "transformers-v5" if any(k.startswith("layers.") for k in keys) else "transformers"
    if "patch_embed.projection.weight" in keys or any(k.startswith("layers.") and ".ffn." in k for k in keys):
        return "mmseg"
    if "patch_embed.proj.weight" in keys:
        if "storage_tokens" in keys:
            return "dinov3"  # Meta's DINOv3 release (timm's eva.checkpoint_filter_fn converts it)
        mask_token = state_dict.get("mask_token")
        if "register_tokens" in keys or (mask_token is not None and mask_token.ndim == 2):
            return "dinov2"  # Meta's DINOv2 release (timm's vision_transformer.checkpoint_filter_fn converts it)
        if any(k.startswith("rope.freqs") or ".ffn_ln." in k or ".inner_attn_ln." in k for k in keys):
            return "eva02"  # BAAI's EVA-02 release (timm's eva.checkpoint_filter_fn converts it)
        return "timm"
    raise ValueError(
        f"{source}: unrecognised checkpoint layout (no ViT patch embedding found under timm, mmsegmentation or "
        f"transformers names); first keys: {list(keys)[:12]}"
    )


def _from_mmseg(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert mmsegmentation's vit2mmseg.py renaming (and its backbone's `ln_pre` pre-norm)."""
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith("layers."):
            name = "blocks." + name[len("layers.") :]
            for old, new in _MMSEG_BLOCK_RENAMES:
                name = name.replace(old, new)
        elif name.startswith("ln1."):
            name = "norm." + name[len("ln1.") :]
        elif name.startswith("ln_pre."):
            name = "norm_pre." + name[len("ln_pre.") :]
        elif name.startswith("patch_embed.projection."):
            name = "patch_embed.proj." + name[len("patch_embed.projection.") :]
        out[name] = tensor
    return out


def _from_transformers(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Map transformers ViT / ViTMAE / Dinov2 names (v4 on disk, v5 in memory) to timm (Dinov2: to Meta's DINOv2
    names, which timm's filter converts); q, k, v are stacked into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if name in _HF_EMBEDDING_RENAMES:
            out[_HF_EMBEDDING_RENAMES[name]] = tensor
        elif name.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith("layernorm."):
            out["norm." + name.rsplit(".", 1)[1]] = tensor
        elif match := _HF_LAYER.match(name):
            index, rest = int(match.group(1)), match.group(2)
            qkv_index = next(
                (i for i, prefix in enumerate(_HF_QKV_V4 + _HF_QKV_V5) if rest.startswith(prefix)),
                None,
            )
            if qkv_index is not None:
                param = rest.rsplit(".", 1)[1]
                qkv_parts.setdefault((index, param), {})[qkv_index % 3] = tensor
                continue
            for old, new in _HF_LAYER_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out[f"blocks.{index}.{rest}"] = tensor
        else:
            out[name] = tensor  # pooler / classifier / decoder: dropped later as non-encoder, or unexpected
    for (index, param), parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"{source}: layer {index} has only some of query/key/value {param}")
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def convert_state_dict(checkpoint: dict, key: str | None = None, source: str = "checkpoint") -> ConvertedStateDict:
    """Convert any supported checkpoint (container or bare state dict) to timm `VisionTransformer` names.

    `key` picks the sub-dict (`teacher`, `student`, `model`, `state_dict`, ...); without it the first of
    `CONTAINER_KEYS` present is taken (teacher before student). The layout name reads
    `[<key>/]<format>[+fc_norm]`, e.g. `model/timm+fc_norm` for a fine-tuned MAE file.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointTypeError(f"{source}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    tensors, taken, ignored = _unwrap(checkpoint, key, source)
    tensors, wrapper_ignored = _strip_wrappers(tensors)
    ignored += wrapper_ignored
    tensors, chunked = _flatten_chunked_blocks(tensors)
    fmt = _detect_format(tensors, source) + ("+chunks" if chunked else "")
    if fmt == "mmseg":
        tensors = _from_mmseg(tensors)
    elif fmt.startswith("transformers"):
        tensors = _from_transformers(tensors, source)
    layout = "/".join(taken + [fmt])
    # A fine-tuned MAE keeps its final LayerNorm as `fc_norm` (global pooling) and has no `norm`: use it instead of
    # leaving the encoder's final norm random, as mmsegmentation's conversion did.
    if "norm.weight" not in tensors and "fc_norm.weight" in tensors:
        tensors["norm.weight"] = tensors.pop("fc_norm.weight")
        if "fc_norm.bias" in tensors:
            tensors["norm.bias"] = tensors.pop("fc_norm.bias")
        layout += "+fc_norm"
    state_dict = {}
    for name, tensor in tensors.items():
        if name.startswith(NON_ENCODER_PREFIXES):
            ignored.append(name)
        else:
            state_dict[name] = tensor
    markers = {name: tensors[name] for name in MARKER_KEYS if name in tensors}
    return ConvertedStateDict(state_dict=state_dict, layout=layout, ignored=ignored, markers=markers)


def to_timm_state_dict(state_dict: dict, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Convert a checkpoint to timm names; returns `(timm_state_dict, layout_name)`. See `convert_state_dict` (Meta's
    DINOv2 / DINOv3 and EVA-02 release names are left for the encoder's timm `checkpoint_filter_fn`)."""
    converted = convert_state_dict(state_dict, key=key)
    return converted.state_dict, converted.layout


# ---------------------------------------------------------------------------------------------------------------
# Reading files, folders, URLs and Hub repositories


def _torch_load(path: Path) -> dict:
    # weights_only=True refuses arbitrary pickles; training checkpoints often carry an argparse.Namespace of args
    # (DINO, MAE), which is plain data and allowed here.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError and friends: name the file and the way out
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({error}). Re-save only the tensors, e.g. "
            "torch.save(checkpoint['model'], 'weights.pth'), from a trusted session."
        ) from error


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return _torch_load(path)


def _load_folder(folder: Path) -> dict:
    """A transformers (or this project's) `save_pretrained` folder: safetensors, sharded or not, else .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            merged: dict = {}
            for shard in shards:
                merged.update(_load_file(folder / shard))
            return merged
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_file(folder / name)
    raise FileNotFoundError(
        f"{folder}: no model.safetensors, pytorch_model.bin or sharded index in this folder "
        f"(found: {sorted(p.name for p in folder.iterdir())[:20]})"
    )


def _load_hub(repo_id: str) -> dict:
    """A Hub repository holding weights (timm `timm/vit_base_patch16_224.mae`, transformers `facebook/vit-mae-base`)."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return _load_file(Path(huggingface_hub.hf_hub_download(repo_id, filename)))
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"{repo_id}: the Hub repository has neither model.safetensors nor pytorch_model.bin")


def load_checkpoint(path_or_hub_id: str | Path) -> dict:
    """Read a checkpoint as a dict: a `.pth`/`.pt`/`.bin` file (`torch.load(weights_only=True)`), a `.safetensors`
    file, a transformers folder (config.json + model.safetensors / pytorch_model.bin), an http(s) URL, or a Hub
    repository id (`timm/vit_base_patch16_224.mae`, `hf-hub:` prefix allowed)."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _load_file(path)
    if text.startswith(("http://", "https://")):  # e.g. https://dl.fbaipublicfiles.com/mae/pretrain/...pth
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.hub.load_state_dict_from_url(text, map_location="cpu", weights_only=True)
    repo_id = text.removeprefix("hf-hub:").removeprefix("hf_hub:")
    explicit = repo_id != text  # an hf-hub: prefix says Hub even where a local folder shares the owner's name
    is_repo_id = HUB_REPO_ID.fullmatch(repo_id) if explicit else looks_like_hub_repo_id(repo_id)
    if is_repo_id and path.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        return _load_hub(repo_id)
    raise FileNotFoundError(
        f"no such file or folder: {text} (a checkpoint is a file, a folder, an http(s) URL or an owner/name Hub "
        "repository id)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading into an encoder


def _is_vit_family(module: Any) -> bool:
    return isinstance(module, torch.nn.Module) and hasattr(module, "patch_embed") and hasattr(module, "blocks")


def _encoder_of(model_or_encoder: torch.nn.Module) -> torch.nn.Module:
    if _is_vit_family(model_or_encoder):
        return model_or_encoder
    encoder = getattr(model_or_encoder, "encoder", None)
    if _is_vit_family(encoder):
        return encoder
    raise TypeError(
        "expected a timm ViT-family encoder (patch_embed, blocks) or a model whose .encoder is one, got "
        f"{type(model_or_encoder).__name__}"
    )


def timm_checkpoint_filter(encoder: torch.nn.Module):
    """The `checkpoint_filter_fn` timm keeps beside the encoder's model class (None if its module has none)."""
    return getattr(sys.modules.get(type(encoder).__module__), "checkpoint_filter_fn", None)


def _apply_timm_filter(
    converted: ConvertedStateDict, encoder: torch.nn.Module, source: str, notes: list[str]
) -> dict[str, torch.Tensor]:
    """Run the encoder family's timm `checkpoint_filter_fn` (with the reference recipe's plain bicubic resampling)
    on the converted state dict plus its layout markers; note what it renamed, dropped or resized."""
    filter_fn = timm_checkpoint_filter(encoder)
    if filter_fn is None:
        return converted.state_dict
    name = f"{type(encoder).__module__.rsplit('.', 1)[-1]}.checkpoint_filter_fn"
    parameters = inspect.signature(filter_fn).parameters
    kwargs = {k: v for k, v in REFERENCE_RESAMPLING.items() if k in parameters}
    given = {**converted.state_dict, **converted.markers}  # a copy: timm's DINOv2 conversion pops from its input
    printed = io.StringIO()
    with _timm_log_messages() as logged:  # timm logs each position / patch embedding it resizes
        try:
            with contextlib.redirect_stdout(printed):  # eva's filter prints when it skips a bias the model lacks
                filtered = dict(filter_fn(dict(given), encoder, **kwargs))
        except Exception as error:  # name the checkpoint and the filter, keep timm's reason
            raise ValueError(
                f"{source}: timm's {name} could not convert it: {type(error).__name__}: {error}"
            ) from error
    notes += [f"timm's {name}: {line.strip()}" for line in printed.getvalue().splitlines() if line.strip()]
    removed = [k for k in given if k not in filtered]
    added = [k for k in filtered if k not in given]
    if removed or added:
        notes.append(
            f"timm's {name} converted the release layout: removed [{_compact(removed)}], added [{_compact(added)}]"
        )
    for message in logged:
        if message.startswith("Resized position embedding"):
            shapes = f"from {tuple(given['pos_embed'].shape)} to {tuple(filtered['pos_embed'].shape)}"
            notes.append(f"pos_embed resized {shapes} by timm's {name} (plain bicubic; {message})")
        elif message.startswith("Resized patch embedding"):
            notes.append(f"patch_embed.proj.weight resampled by timm's {name} (FlexiViT; {message})")
    return filtered


@contextlib.contextmanager
def _timm_log_messages():
    """The INFO messages timm's loggers emit inside the block, as a list of strings."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("timm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _fit_to_encoder(
    state_dict: dict[str, torch.Tensor], encoder: torch.nn.Module, notes: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Encoder-dependent adjustments: where the final norm lives, the position-embedding grid."""
    target = encoder.state_dict()
    state_dict = dict(state_dict)
    ignored: list[str] = []
    if "norm.weight" in state_dict and "norm.weight" not in target:
        if "fc_norm.weight" in target:  # an encoder built with global pooling keeps its final norm as fc_norm
            for param in ("weight", "bias"):
                if f"norm.{param}" in state_dict:
                    state_dict[f"fc_norm.{param}"] = state_dict.pop(f"norm.{param}")
        else:  # encoder without a final norm (final_norm=False): the checkpoint's is not used
            ignored += [k for k in ("norm.weight", "norm.bias") if state_dict.pop(k, None) is not None]
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and "pos_embed" in target and pos_embed.shape != target["pos_embed"].shape:
        wanted = target["pos_embed"].shape
        if pos_embed.ndim == 3 and pos_embed.shape[-1] == wanted[-1]:
            num_prefix = 0 if getattr(encoder, "no_embed_class", False) else encoder.num_prefix_tokens
            state_dict["pos_embed"] = resample_pos_embed(pos_embed, tuple(encoder.patch_embed.grid_size), num_prefix)
            notes.append(
                f"pos_embed resized from {tuple(pos_embed.shape)} to {tuple(wanted)} (plain bicubic, grid "
                f"{tuple(encoder.patch_embed.grid_size)})"
            )
    return state_dict, ignored


def _config_notes(checkpoint: Any, encoder: torch.nn.Module) -> list[str]:
    """A transformers folder says its LayerNorm eps; ViT configs default to 1e-12 where timm's ViT uses 1e-6."""
    if isinstance(checkpoint, dict) or not (Path(str(checkpoint)) / "config.json").is_file():
        return []
    config = json.loads((Path(str(checkpoint)) / "config.json").read_text())
    eps = config.get("layer_norm_eps")
    encoder_eps = getattr(getattr(encoder, "norm", None), "eps", None)
    if eps is None or encoder_eps is None or abs(eps - encoder_eps) < 1e-15:
        return []
    return [f"the checkpoint's config uses LayerNorm eps {eps:g}; the encoder uses {encoder_eps:g}"]


def _compact(keys: list[str]) -> str:
    """`blocks.0.norm1.weight, blocks.1.norm1.weight` -> `blocks.{0,1}.norm1.weight`: readable lists of ViT keys."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        pattern = re.sub(r"^blocks\.(\d+)\.", "blocks.{}.", key)
        index = re.match(r"^blocks\.(\d+)\.", key)
        groups.setdefault(pattern, []).append(index.group(1) if index else "")
    parts = []
    for pattern, indices in groups.items():
        if "{}" in pattern:
            numbers = sorted(int(i) for i in indices)
            if len(numbers) > 1 and numbers == list(range(numbers[0], numbers[-1] + 1)):
                label = f"{numbers[0]}-{numbers[-1]}"
            else:
                label = ",".join(map(str, numbers))
            parts.append(pattern.replace("{}", "{" + label + "}" if len(numbers) > 1 else label))
        else:
            parts.append(pattern)
    return ", ".join(parts)


def load_pretrained_encoder(
    model_or_encoder: torch.nn.Module,
    checkpoint: str | Path | dict,
    allow_partial: bool = False,
    key: str | None = None,
    verbose: bool = True,
) -> EncoderLoadReport:
    """Load pre-trained weights into a timm ViT-family encoder (or a model's `.encoder`) and report what happened.

    `checkpoint` is anything `load_checkpoint` reads, or an already loaded dict. The checkpoint is converted with
    `convert_state_dict` (`key` picks `teacher` / `student` / ...), then by the encoder family's timm
    `checkpoint_filter_fn` (Meta's DINOv2 / DINOv3 and EVA-02 release layouts), the position embedding is resampled
    (plain bicubic) when its grid differs from the encoder's, and the tensors are copied. Raises `ValueError` on any
    shape mismatch, and, unless `allow_partial`, when an encoder tensor is missing from the checkpoint or a checkpoint
    tensor has no place in the encoder: nothing is loaded then. Prints the counts and names when `verbose`.
    """
    encoder = _encoder_of(model_or_encoder)
    source = "<state dict>" if isinstance(checkpoint, dict) else str(checkpoint)
    raw = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    converted = convert_state_dict(raw, key=key, source=source)
    notes: list[str] = []
    if converted.layout.endswith("+fc_norm") and "norm.weight" in encoder.state_dict():
        notes.append("final norm taken from fc_norm (fine-tuned MAE layout: the checkpoint has no norm.*)")
    if "+chunks" in converted.layout:
        notes.append("Meta's chunked blocks (blocks.<chunk>.<i>.) read as blocks.<i>.")
    notes += _config_notes(checkpoint, encoder)
    filtered = _apply_timm_filter(converted, encoder, source, notes)
    state_dict, fit_ignored = _fit_to_encoder(filtered, encoder, notes)
    ignored = converted.ignored + fit_ignored
    # The encoder's classification head (if it was built with one) is never used for segmentation.
    target = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs encoder {tuple(target[k].shape)}"
        for k in target
        if k in state_dict and state_dict[k].shape != target[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"{source} (layout {converted.layout}): shape mismatch for {len(mismatched)} tensor(s); is the encoder "
            f"the right architecture?\n  " + "\n  ".join(mismatched)
        )
    if (missing or unexpected) and not allow_partial:
        raise ValueError(
            f"{source} (layout {converted.layout}) does not fit the encoder exactly, so nothing was loaded: "
            f"{len(missing)} encoder tensor(s) missing from the checkpoint: [{_compact(missing)}]; "
            f"{len(unexpected)} checkpoint tensor(s) with no place in the encoder: [{_compact(unexpected)}]. "
            "Pass allow_partial=True (--allow-partial) to load what matches and keep the rest as initialised."
        )
    loadable = {k: v for k, v in state_dict.items() if k in target}
    result = encoder.load_state_dict(loadable, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith("head.") and k not in missing]
    if leftover or result.unexpected_keys:  # cannot happen unless the key bookkeeping above is wrong
        raise RuntimeError(f"{source}: load_state_dict disagreed: {leftover} / {result.unexpected_keys}")
    report = EncoderLoadReport(
        layout=converted.layout,
        loaded=list(loadable),
        missing=missing,
        unexpected=unexpected,
        ignored=ignored,
        notes=notes,
    )
    if verbose:
        print(format_load_report(report, source))
    return report


def format_load_report(report: EncoderLoadReport, source: str = "checkpoint") -> str:
    """The text `load_pretrained_encoder` prints: layout, counts and (compacted) key names."""
    lines = [
        f"Pre-trained encoder weights from {source}: layout {report.layout}",
        f"  loaded {len(report.loaded)} tensors: {_compact(report.loaded)}",
        f"  missing {len(report.missing)} (left as initialised): {_compact(report.missing) or '-'}",
        f"  unexpected {len(report.unexpected)} (not loaded): {_compact(report.unexpected) or '-'}",
        f"  ignored {len(report.ignored)} non-encoder entries: {_compact(report.ignored) or '-'}",
    ]
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Whole-model conversion


def convert_checkpoint(
    checkpoint: str | Path | dict,
    encoder_name: str,
    num_labels: int,
    out_dir: str | Path,
    allow_partial: bool = False,
    id2label: dict[int, str] | None = None,
    key: str | None = None,
    preset: str | None = "fcn",
    **config_kwargs,
):
    """Build a `ViTFCNForSemanticSegmentation` whose encoder holds the checkpoint's weights, save it to `out_dir`
    (safetensors, with its image processor) and return it. `preset` is `"fcn"` (mmsegmentation head), `"linear"`
    (ImageNetSegModel head), `"multilayer"` (DINOv2's 4-layer linear head) or None (config defaults);
    `config_kwargs` override config fields (`out_indices`, `encoder_forward`, ...)."""
    from .configuration_vit_fcn import ViTFCNConfig
    from .image_processing_vit_fcn import ViTFCNImageProcessor
    from .modeling_vit_fcn import ViTFCNForSemanticSegmentation

    fields: dict[str, Any] = {"encoder_name": encoder_name, "num_labels": int(num_labels), **config_kwargs}
    if id2label is not None:
        if len(id2label) != int(num_labels):
            raise ValueError(f"id2label has {len(id2label)} entries but num_labels is {num_labels}")
        fields["id2label"] = {int(i): str(name) for i, name in id2label.items()}
        fields["label2id"] = {str(name): int(i) for i, name in id2label.items()}
    config = ViTFCNConfig.from_preset(preset, **fields) if preset else ViTFCNConfig(**fields)
    model = ViTFCNForSemanticSegmentation(config)
    load_pretrained_encoder(model, checkpoint, allow_partial=allow_partial, key=key)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # transformers 5 writes safetensors
    ViTFCNImageProcessor().save_pretrained(out_dir)
    return model
