"""ViT encoder (timm) + decode head for semantic segmentation, as a transformers model.

Reading order: the decode heads (mmsegmentation's FCN head, ImageNetSegModel's linear head, DINOv2's multi-layer
linear head; each owns its initialisation), the `PreTrainedModel` base (weight init, flags), then the task model with
its loss. The encoder (a timm model, run at any input size) lives in `encoder.py`.

This file is copied next to saved weights by `register_for_auto_class`, so it imports only torch, timm,
transformers and siblings (relative imports): a saved folder loads with `trust_remote_code=True` where imagenets_hf
is not installed.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_vit_fcn import ViTFCNConfig
from .encoder import (
    build_encoder,
    encoder_depth,
    encoder_layer_id,
    encoder_patch_size,
    encoder_width,
    feature_maps,
    resolve_encoder_forward,
    resolve_out_indices,
)


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)`; under torch's deterministic algorithms, with
    a gradient that needs no atomic adds (`_DeterministicBilinear`): CUDA's own bilinear backward has no
    deterministic kernel, and `torch.use_deterministic_algorithms(True)` refuses it."""
    if torch.are_deterministic_algorithms_enabled() and x.requires_grad and torch.is_grad_enabled():
        return _DeterministicBilinear.apply(x, tuple(int(s) for s in size))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _bilinear_weights(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix of `interpolate`'s bilinear taps along one axis (align_corners=False, scale
    in/out): row i holds 1 - l at floor(s) and l at floor(s) + 1 (clamped to the edge), s = max(0, (i + 0.5) in/out
    - 0.5), l = s - floor(s)."""
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.to(device=like.device, dtype=like.dtype)


class _DeterministicBilinear(torch.autograd.Function):
    """Bilinear resize (align_corners=False) with `interpolate`'s forward and a backward of two matrix products with
    the taps' weights, W_h^T g W_w: deterministic (cuBLAS with a fixed workspace), equal to the atomic-add backward up
    to the order of its sums."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        ctx.in_size = tuple(x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_h, out_w = grad.shape[-2:]
        rows = _bilinear_weights(ctx.in_size[0], out_h, grad)
        columns = _bilinear_weights(ctx.in_size[1], out_w, grad)
        return rows.T @ grad @ columns, None


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule as the FCN head uses it: conv (no bias when followed by BN), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, use_batchnorm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not use_batchnorm)
        # A plain nn.BatchNorm2d so that torch.nn.SyncBatchNorm.convert_sync_batchnorm swaps it under DDP.
        self.bn = nn.BatchNorm2d(out_channels) if use_batchnorm else nn.Identity()
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _init_batchnorm(module: nn.Module) -> None:
    """Unit scale, zero shift, fresh running statistics (mmcv's constant_init of norm layers)."""
    init.ones_(module.weight)
    init.zeros_(module.bias)
    init.zeros_(module.running_mean)
    init.ones_(module.running_var)
    init.zeros_(module.num_batches_tracked)


def _init_classifier(conv: nn.Conv2d, std: float) -> None:
    """Truncated normal (bounds +-2 absolute, as mmcv's trunc_normal_init) with `std`, zero bias."""
    init.trunc_normal_(conv.weight, std=std)
    init.zeros_(conv.bias)


def complementary_dropout_masks(batch: int, channels: int, fraction: float) -> torch.Tensor:
    """(batch, channels) channel multipliers of UniMatch V2's complementary dropout (`model/semseg/dpt.py`,
    `comp_drop`) for a batch made of two halves, view 1 then view 2 of the same images: for each image pair, view 1
    keeps a random half of the channels (each with probability 0.5) doubled and view 2 the other channels doubled,
    so the two masks add up to 2 everywhere; `fraction` of the pairs get such masks, the others are left whole (1).
    Drawn from torch's global generator on the CPU, as UniMatch V2 does."""
    if batch % 2:
        raise ValueError(f"complementary dropout needs a batch of two halves (view 1, view 2), got {batch} images")
    pairs = batch // 2
    first = torch.bernoulli(torch.full((pairs, channels), 0.5)) * 2.0
    second = 2.0 - first
    kept = torch.randperm(pairs)[: int(pairs * (1 - fraction))]  # UniMatch V2: int(bs // 2 * (1 - dropout_prob))
    first[kept] = 1.0
    second[kept] = 1.0
    return torch.cat((first, second))


def _last_map(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return features if isinstance(features, torch.Tensor) else features[-1]


class FCNHead(nn.Module):
    """mmsegmentation's FCNHead (Long et al.) on one feature map: `num_convs` ConvBNReLU, optional concat with the
    input and a fusing ConvBNReLU, Dropout2d, then a 1x1 classifier `conv_seg`. Parameter names follow mmseg.

    Takes a map (B, C, h, w) or the encoder's list of maps (it reads the last one)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_labels: int,
        num_convs: int = 0,
        kernel_size: int = 3,
        concat_input: bool = True,
        dropout_ratio: float = 0.0,
        use_batchnorm: bool = True,
        classifier_init_std: float = 2e-5,
    ):
        super().__init__()
        self.classifier_init_std = classifier_init_std
        if num_convs == 0 and channels != in_channels:
            raise ValueError(
                f"with num_convs=0 the head width must equal the encoder width ({in_channels}), got channels={channels}"
            )
        self.concat_input = concat_input
        layers = [
            ConvBNReLU(in_channels if i == 0 else channels, channels, kernel_size, use_batchnorm)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*layers)  # empty Sequential is the identity, as mmseg's num_convs=0
        self.conv_cat = (
            ConvBNReLU(in_channels + channels, channels, kernel_size, use_batchnorm) if concat_input else None
        )
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_labels, kernel_size=1)

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        features = _last_map(features)
        x = self.convs(features)
        if self.conv_cat is not None:
            x = self.conv_cat(torch.cat([features, x], dim=1))
        return self.conv_seg(self.dropout(x))

    def init_weights(self) -> None:
        """mmcv's ConvModule init for the convs (Kaiming normal, fan_out, ReLU), BatchNorm to identity, the classifier
        truncated normal with `classifier_init_std` (2e-5 in the reference recipe)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.conv_seg:
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                _init_batchnorm(module)
        _init_classifier(self.conv_seg, self.classifier_init_std)


class LinearHead(FCNHead):
    """ImageNetSegModel's head: only the 1x1 classifier `conv_seg` on the last feature map (the FCN head without
    convs or concat, so checkpoints of either name load alike)."""

    def __init__(
        self, in_channels: int, num_labels: int, dropout_ratio: float = 0.0, classifier_init_std: float = 2e-5
    ):
        super().__init__(
            in_channels,
            in_channels,
            num_labels,
            num_convs=0,
            concat_input=False,
            dropout_ratio=dropout_ratio,
            classifier_init_std=classifier_init_std,
        )


class MultiLayerHead(nn.Module):
    """DINOv2's linear segmentation head over several layers (`BNHead` with `resize_concat`, the "4-layer" / "+ms"
    evaluation's head): the maps concatenated along channels (resized bilinearly to the first one's size if they
    differ), BatchNorm, Dropout2d, then a 1x1 classifier `conv_seg`."""

    def __init__(
        self,
        in_channels: int,
        num_inputs: int,
        num_labels: int,
        dropout_ratio: float = 0.0,
        classifier_init_std: float = 0.01,
    ):
        super().__init__()
        self.num_inputs = num_inputs
        self.classifier_init_std = classifier_init_std
        channels = in_channels * num_inputs
        # A plain nn.BatchNorm2d so that torch.nn.SyncBatchNorm.convert_sync_batchnorm swaps it under DDP (DINOv2's
        # BNHead uses SyncBatchNorm).
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_labels, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(features, torch.Tensor) or len(features) != self.num_inputs:
            got = 1 if isinstance(features, torch.Tensor) else len(features)
            raise ValueError(f"the multi-layer head takes a list of {self.num_inputs} feature maps, got {got}")
        size = features[0].shape[-2:]
        maps = [x if x.shape[-2:] == size else resize_bilinear(x, size) for x in features]
        return self.conv_seg(self.dropout(self.bn(torch.cat(maps, dim=1))))

    def init_weights(self) -> None:
        """BatchNorm to identity; the classifier with mmseg's decode-head init (normal, std 0.01 in DINOv2's configs)."""
        _init_batchnorm(self.bn)
        _init_classifier(self.conv_seg, self.classifier_init_std)


def build_head(config: ViTFCNConfig, in_channels: int) -> nn.Module:
    """The decode head `config.head` names, on maps of `in_channels` channels."""
    if config.head == "fcn":
        return FCNHead(
            in_channels=in_channels,
            channels=config.channels or in_channels,
            num_labels=config.num_labels,
            num_convs=config.num_convs,
            kernel_size=config.kernel_size,
            concat_input=config.concat_input,
            dropout_ratio=config.dropout_ratio,
            use_batchnorm=config.use_batchnorm,
            classifier_init_std=config.classifier_init_std,
        )
    if config.head == "linear":
        return LinearHead(in_channels, config.num_labels, config.dropout_ratio, config.classifier_init_std)
    if config.head == "multilayer":
        return MultiLayerHead(
            in_channels, len(config.out_indices), config.num_labels, config.dropout_ratio, config.classifier_init_std
        )
    raise ValueError(f"unknown head {config.head!r}")


def weights_mode_as_umask(folder: str | os.PathLike) -> None:
    """Give the `.safetensors` files in `folder` the mode a new file gets under the umask (0644 under 022), as
    config.json has: safetensors writes through a private temporary file and leaves its weights at 0600."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).glob("*.safetensors"):
        os.chmod(path, mode)


def _umask() -> int:
    try:  # Linux says it without changing it (setting it, even back, races with threads creating files)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


class ViTFCNPreTrainedModel(PreTrainedModel):
    """Weight init and the transformers flags shared by the ViT + FCN models."""

    config_class = ViTFCNConfig
    base_model_prefix = "vit_fcn"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # timm's Attention calls F.scaled_dot_product_attention when its `fused_attn` flag is on; the model sets the
    # flag from config._attn_implementation ("sdpa" by default, "eager" for the explicit softmax).
    _supports_sdpa = True
    _no_split_modules = ["Block"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, with the weight files' mode what the umask gives the other files."""
        super().save_pretrained(save_directory, *args, **kwargs)
        weights_mode_as_umask(save_directory)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but in float32 unless `dtype` is given, whatever dtype the weights
        were saved in (mixed-precision training wants float32 master weights)."""
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
        return super().from_pretrained(*args, **kwargs)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' pass over the modules (`_init_weights`: the encoder), then the decode head's own
        `init_weights` (transformers calls `_init_weights` only on modules that hold parameters themselves, never on
        the head as a whole). Both skip tensors loaded from a checkpoint.

        Then timm's non-persistent buffers (rotary-embedding tables, EVA's zero k bias) are computed again:
        `from_pretrained` builds the model without running timm's constructors' arithmetic, and the checkpoint does
        not hold them."""
        super().initialize_weights()
        head = getattr(self, "decode_head", None)
        if head is not None:
            head.init_weights()
        encoder = getattr(self, "encoder", None)
        for module in encoder.modules() if encoder is not None else ():
            if hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """timm's ViT init for the encoder. Runs only on tensors not loaded from a checkpoint."""
        head = getattr(self, "decode_head", None)
        if head is not None and any(module is part for part in head.modules()):
            return  # one of the head's layers: the head's own init_weights covers it (see initialize_weights)
        if module is getattr(self, "encoder", None):
            if getattr(module, "pos_embed", None) is not None:
                init.trunc_normal_(module.pos_embed, std=0.02)
            if getattr(module, "cls_token", None) is not None:
                init.normal_(module.cls_token, std=1e-6)
            if getattr(module, "reg_token", None) is not None:
                init.normal_(module.reg_token, std=1e-6)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            if module is getattr(getattr(getattr(self, "encoder", None), "patch_embed", None), "proj", None):
                # timm leaves the patch projection at PyTorch's default conv init
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            else:
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


class ViTFCNForSemanticSegmentation(ViTFCNPreTrainedModel):
    r"""A timm ViT-family encoder and a decode head on its feature maps at `config.out_indices`.

    Any input size: the input is padded bottom/right to a multiple of the patch size; the published ViT-S/B resize
    their position embeddings with plain bicubic interpolation (the reference recipe's, not timm's antialiased one),
    other families (DINOv2, DINOv3, EVA-02, ...) run timm's own dynamic-size forward (see `encoder.py`). Logits come
    at stride p (the patch size): (B, num_labels, ceil(H/p), ceil(W/p)).

    Example:

    ```python
    >>> import torch
    >>> from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation
    >>> config = ViTFCNConfig.from_preset(
    ...     "fcn", encoder_name="vit_small_patch16_224", num_labels=51, drop_path_rate=0.0,
    ...     encoder_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32},
    ... )
    >>> model = ViTFCNForSemanticSegmentation(config).eval()
    >>> out = model(torch.randn(1, 3, 40, 56), labels=torch.zeros(1, 40, 56, dtype=torch.long))
    >>> tuple(out.logits.shape), out.loss.ndim
    ((1, 51, 5, 7), 0)
    ```
    """

    def __init__(self, config: ViTFCNConfig):
        super().__init__(config)
        self.encoder = build_encoder(
            config.encoder_name, config.encoder_kwargs, config.drop_path_rate, config.drop_path_branches
        )
        # The forward actually run is written back, so a saved config.json says it and later rules cannot change it.
        config.encoder_forward = resolve_encoder_forward(self.encoder, config.encoder_forward)
        if config.encoder_forward == "reference":
            # Padding and position-embedding resizing happen in encoder.py, so the patch embedding takes any size.
            self.encoder.patch_embed.strict_img_size = False
            self.encoder.patch_embed.dynamic_img_pad = False
        self.out_indices = resolve_out_indices(config.out_indices, encoder_depth(self.encoder))
        self.decode_head = build_head(config, in_channels=encoder_width(self.encoder))
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        self.post_init()

    # -- layer ids and checkpointing -------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Encoder depth (number of transformer blocks)."""
        return encoder_depth(self.encoder)

    @property
    def patch_size(self) -> int:
        return encoder_patch_size(self.encoder)

    def get_layer_id(self, param_name: str) -> int:
        """Layer id for layer-wise lr decay: 0 for the encoder's tokens (class, register, mask), position, patch and
        rotary embedding, i + 1 for `encoder.blocks.i` (layer scale included), `num_layers + 1` for everything else
        (final norm, decode head). The rule: `encoder.encoder_layer_id`."""
        name = param_name.removeprefix("module.")
        if name.startswith("encoder."):
            return encoder_layer_id(name.removeprefix("encoder."), self.num_layers)
        return self.num_layers + 1

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers=1):
        # timm's own flag is the single switch, so `model.encoder.set_grad_checkpointing()` works as well.
        self.gradient_checkpointing = enable
        if gradient_checkpointing_func is not None:
            self._gradient_checkpointing_func = gradient_checkpointing_func
        self.encoder.set_grad_checkpointing(enable)

    def _sync_attn_implementation(self) -> None:
        fused = self.config._attn_implementation != "eager"
        for block in self.encoder.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = fused

    # -- forward ---------------------------------------------------------------------------------------------

    def forward_feature_maps(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        """Encoder forward at any input size: the feature maps (B, C, ceil(H/p), ceil(W/p)) at `config.out_indices`
        and, if asked, the token sequences (see `encoder.feature_maps`)."""
        self._sync_attn_implementation()
        return feature_maps(
            self.encoder,
            pixel_values,
            self.out_indices,
            final_norm=self.config.final_norm,
            forward=self.config.encoder_forward,
            output_hidden_states=output_hidden_states,
            checkpoint_fn=self._gradient_checkpointing_func,
        )

    def forward_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The last selected layer's map (B, C, ceil(H/p), ceil(W/p)) (the FCN and linear heads' input) and, if
        asked, the token sequences after the embedding and after each block."""
        maps, hidden_states = self.forward_feature_maps(pixel_values, output_hidden_states)
        return maps[-1], hidden_states

    def loss_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B, H, W) at the loss's resolution (H/d, W/d) (d = `loss_downsample`), resized nearest, as long."""
        height, width = labels.shape[-2:]
        size = (max(1, height // self.config.loss_downsample), max(1, width // self.config.loss_downsample))
        if size != (height, width):
            # Through float: exact for ids below 2**24; "nearest" picks floor(i * scale) like cv2's INTER_NEAREST.
            return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return labels.long()

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy (ignore `ignore_index`): labels (B, H, W) resized nearest to (H/d, W/d) (d =
        `loss_downsample`), logits upsampled bilinearly to that size; averaged over all pixels or non-ignored ones."""
        labels = self.loss_labels(labels)
        logits = resize_bilinear(logits.float(), tuple(labels.shape[-2:]))
        pixel_losses = F.cross_entropy(logits, labels, ignore_index=self.config.ignore_index, reduction="none")
        if self.config.loss_average == "all":
            return pixel_losses.sum() / pixel_losses.numel()
        num_valid = (labels != self.config.ignore_index).sum().clamp(min=1)
        return pixel_losses.sum() / num_valid

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        complementary_dropout: float = 0.0,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalised images, any H and W.
        labels (`torch.LongTensor` of shape `(B, H, W)`, *optional*): class ids at input resolution
            (`config.ignore_index` = ignore); when given, the output holds the loss.
        output_hidden_states (`bool`, *optional*): also return the encoder's token sequences, prefix tokens
            included, before the final norm: the embedding output and each block's output (the timm forward: each
            block's output), up to the last of `config.out_indices`.
        complementary_dropout (`float`, *optional*, defaults to 0): for semi-supervised training (UniMatch V2's
            `comp_drop`): the batch holds two views of the same images (first half, second half) and this fraction of
            the image pairs gets complementary channel dropout on the feature maps the head reads
            (`complementary_dropout_masks`). 0: off, the forward is unchanged.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and tuple(labels.shape[-2:]) != tuple(pixel_values.shape[-2:]):
            raise ValueError(
                f"labels must be (B, H, W) at the input resolution {tuple(pixel_values.shape[-2:])}, "
                f"got shape {tuple(labels.shape)}"
            )

        maps, hidden_states = self.forward_feature_maps(pixel_values, output_hidden_states=bool(output_hidden_states))
        if complementary_dropout:
            masks = complementary_dropout_masks(maps[-1].shape[0], maps[-1].shape[1], complementary_dropout)
            masks = masks.to(device=maps[-1].device, dtype=maps[-1].dtype)[:, :, None, None]
            maps = [feature_map * masks for feature_map in maps]  # one mask for every map, as UniMatch V2
        logits = self.decode_head(maps)
        loss = self.compute_loss(logits, labels) if labels is not None else None

        if not return_dict:
            output = (logits,) + ((hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


__all__ = [
    "ViTFCNForSemanticSegmentation",
    "ViTFCNPreTrainedModel",
    "FCNHead",
    "LinearHead",
    "MultiLayerHead",
    "ConvBNReLU",
    "build_head",
    "complementary_dropout_masks",
]


def _list_in_segmentation_pipeline() -> None:
    """Name the model among the image-segmentation pipeline's supported models (also from a trust_remote_code copy).

    The pipeline checks the model's class name against copies of transformers' MODEL_FOR_*_SEGMENTATION_MAPPING_NAMES
    tables; the copy drops the link to classes registered with `AutoModelForSemanticSegmentation.register`, so a
    registered model ran but was logged as "not supported for image-segmentation" (an error-level record). Adding
    the model type to the names table is what that check reads; the Auto mappings skip model types that have no
    transformers config, so nothing else changes.
    """
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", None)
    if names is not None:
        names.setdefault(ViTFCNConfig.model_type, ViTFCNForSemanticSegmentation.__name__)


_list_in_segmentation_pipeline()
