"""ViT encoder (timm) + FCN decode head (mmsegmentation's) for semantic segmentation, as a transformers model.

Reading order: the decode head's building blocks, the `PreTrainedModel` base (weight init, flags), then the task
model with its encoder forward and loss.

This file is copied next to saved weights by `register_for_auto_class`, so it imports only torch, timm,
transformers and siblings (relative imports): a saved folder loads with `trust_remote_code=True` where imagenets_hf
is not installed.
"""

from __future__ import annotations

import functools
import math
import re

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_vit_fcn import ViTFCNConfig
from .pos_embed import resample_pos_embed


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


class FCNHead(nn.Module):
    """mmsegmentation's FCNHead (Long et al.) on one feature map: `num_convs` ConvBNReLU, optional concat with the
    input and a fusing ConvBNReLU, Dropout2d, then a 1x1 classifier `conv_seg`. Parameter names follow mmseg."""

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
    ):
        super().__init__()
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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.convs(features)
        if self.conv_cat is not None:
            x = self.conv_cat(torch.cat([features, x], dim=1))
        return self.conv_seg(self.dropout(x))


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

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but in float32 unless `dtype` is given, whatever dtype the weights
        were saved in (mixed-precision training wants float32 master weights)."""
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
        return super().from_pretrained(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """timm's ViT init for the encoder, mmcv's ConvModule init for the head convs, truncated normal (std
        `classifier_init_std`) for the classifier. Runs only on tensors not loaded from a checkpoint."""
        if isinstance(module, VisionTransformer):
            if module.pos_embed is not None:
                init.trunc_normal_(module.pos_embed, std=0.02)
            if module.cls_token is not None:
                init.normal_(module.cls_token, std=1e-6)
            if module.reg_token is not None:
                init.normal_(module.reg_token, std=1e-6)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            if module is getattr(getattr(self, "decode_head", None), "conv_seg", None):
                init.trunc_normal_(module.weight, std=self.config.classifier_init_std)
            elif module is getattr(getattr(getattr(self, "encoder", None), "patch_embed", None), "proj", None):
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
    r"""A timm VisionTransformer encoder and an FCN decode head on its last layer's patch-token map.

    Any input size: the input is padded bottom/right to a multiple of the patch size and the position embeddings
    are resized with plain bicubic interpolation (the reference recipe's, not timm's antialiased one). Logits come
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
        self.encoder: VisionTransformer = timm.create_model(
            config.encoder_name,
            pretrained=False,
            num_classes=0,
            drop_path_rate=config.drop_path_rate,
            **config.encoder_kwargs,
        )
        if not isinstance(self.encoder, VisionTransformer):
            raise ValueError(
                f"encoder_name {config.encoder_name!r} builds a {type(self.encoder).__name__}, "
                "not a timm VisionTransformer"
            )
        # Padding and position-embedding resizing happen here, so the patch embedding must accept any size.
        self.encoder.patch_embed.strict_img_size = False
        self.encoder.patch_embed.dynamic_img_pad = False
        embed_dim = self.encoder.embed_dim
        channels = config.channels or embed_dim
        self.decode_head = FCNHead(
            in_channels=embed_dim,
            channels=channels,
            num_labels=config.num_labels,
            num_convs=config.num_convs,
            kernel_size=config.kernel_size,
            concat_input=config.concat_input,
            dropout_ratio=config.dropout_ratio,
            use_batchnorm=config.use_batchnorm,
        )
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        self.post_init()

    # -- layer ids and checkpointing -------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Encoder depth (number of transformer blocks)."""
        return len(self.encoder.blocks)

    @property
    def patch_size(self) -> int:
        return int(self.encoder.patch_embed.patch_size[0])

    def get_layer_id(self, param_name: str) -> int:
        """Layer id for layer-wise lr decay: 0 for the encoder's tokens, position embedding and patch embedding,
        i + 1 for `encoder.blocks.i`, `num_layers + 1` for everything else (final norm, decode head)."""
        name = param_name.removeprefix("module.")
        if re.match(r"^encoder\.(cls_token|reg_token|pos_embed|patch_embed|norm_pre)", name):
            return 0
        match = re.match(r"^encoder\.blocks\.(\d+)\.", name)
        if match:
            return int(match.group(1)) + 1
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

    def forward_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Encoder forward at any input size: returns the last layer's patch-token map (B, C, ceil(H/p), ceil(W/p))
        and, if asked, the token sequences after the embedding and after each block."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
        self._sync_attn_implementation()
        encoder = self.encoder
        p = self.patch_size
        height, width = pixel_values.shape[-2:]
        # Ceil division, not `(-height) % p`: under torch.compile with dynamic sizes (evaluation, one image at a
        # time) a modulo of a symbolic size fails in inductor ("TensorReferenceAnalysis has no attribute python_mod").
        grid = ((height + p - 1) // p, (width + p - 1) // p)
        pad_h, pad_w = grid[0] * p - height, grid[1] * p - width
        # Bottom/right, zeros, as mmseg. Unconditional (a zero pad is a copy): branching on the padding would make
        # torch.compile compile one graph per case.
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))

        patch_embed = encoder.patch_embed
        if type(patch_embed) is PatchEmbed and patch_embed.flatten:
            # PatchEmbed.forward minus its divisibility check (the input is padded above), whose f-string message
            # makes torch.compile specialise on every input size
            x = patch_embed.norm(patch_embed.proj(pixel_values).flatten(2).transpose(1, 2))  # (B, h*w, C)
        else:
            x = patch_embed(pixel_values)
        prefix = []
        if encoder.cls_token is not None:
            prefix.append(encoder.cls_token.expand(x.shape[0], -1, -1))
        if encoder.reg_token is not None:
            prefix.append(encoder.reg_token.expand(x.shape[0], -1, -1))
        if encoder.pos_embed is not None:
            embed_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
            pos_embed = resample_pos_embed(
                encoder.pos_embed, grid, num_prefix_tokens=embed_prefix, old_grid=tuple(encoder.patch_embed.grid_size)
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
        use_checkpointing = encoder.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in encoder.blocks:
            x = self._gradient_checkpointing_func(block, x) if use_checkpointing else block(x)
            if hidden_states is not None:
                hidden_states.append(x)
        if self.config.final_norm:
            x = encoder.norm(x)

        patch_tokens = x[:, encoder.num_prefix_tokens :]
        feature_map = patch_tokens.transpose(1, 2).reshape(x.shape[0], x.shape[-1], grid[0], grid[1])
        return feature_map, (tuple(hidden_states) if hidden_states is not None else None)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross entropy (ignore `ignore_index`): labels (B, H, W) resized nearest to (H/d, W/d) (d =
        `loss_downsample`), logits upsampled bilinearly to that size; averaged over all pixels or non-ignored ones."""
        height, width = labels.shape[-2:]
        size = (max(1, height // self.config.loss_downsample), max(1, width // self.config.loss_downsample))
        if size != (height, width):
            # Through float: exact for ids below 2**24; "nearest" picks floor(i * scale) like cv2's INTER_NEAREST.
            labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
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
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalised images, any H and W.
        labels (`torch.LongTensor` of shape `(B, H, W)`, *optional*): class ids at input resolution
            (`config.ignore_index` = ignore); when given, the output holds the loss.
        output_hidden_states (`bool`, *optional*): also return the encoder's token sequences (embedding output and
            each block's output, prefix tokens included, before the final norm).
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

        features, hidden_states = self.forward_features(pixel_values, output_hidden_states=bool(output_hidden_states))
        logits = self.decode_head(features)
        loss = self.compute_loss(logits, labels) if labels is not None else None

        if not return_dict:
            output = (logits,) + ((hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


__all__ = ["ViTFCNForSemanticSegmentation", "ViTFCNPreTrainedModel", "FCNHead", "ConvBNReLU"]
