"""Configuration of the ViT + FCN segmentation model (the ImageNet-S reference recipe).

This file is copied next to saved weights by `register_for_auto_class`, so it imports only transformers and
siblings (relative imports): a saved folder loads with `trust_remote_code=True` where imagenets_hf is not installed.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# ImageNet-S919: 919 classes plus "other".
DEFAULT_NUM_LABELS = 920

# The decode heads (`head`) and the feature maps each reads by default (`out_indices`; -1 = the last block).
HEADS = ("fcn", "linear", "multilayer")
DEFAULT_OUT_INDICES = {"fcn": [-1], "linear": [-1], "multilayer": [-4, -3, -2, -1]}
# How the encoder runs (encoder.py): the reference recipe's ViT forward, timm's, or chosen by the encoder's kind.
ENCODER_FORWARDS = ("auto", "reference", "timm")
# Which residual branches of each encoder block stochastic depth drops (encoder.py): timm's and DINOv2's blocks drop
# both (attention and MLP); mmsegmentation's ViT (TransformerEncoderLayer), which the published recipes ran on, only
# the MLP branch (its attention's dropout_layer is a zero-rate Dropout).
DROP_PATH_BRANCHES = ("both", "mlp")

# The published decoders and DINOv2's. "fcn": mmsegmentation's fcn_*_3600_imagenets919 head (one 3x3 conv on
# cat([x, x]) + BatchNorm + ReLU, then a 1x1 classifier; loss averaged over all pixels). "linear":
# ImageNetSegModel's head (only the 1x1 classifier; loss averaged over non-ignored pixels). "multilayer" (not
# published for ImageNet-S): DINOv2's linear segmentation evaluation head over the last four layers (BNHead:
# concatenated maps, BatchNorm, 1x1 classifier initialised with std 0.01; loss averaged over all pixels).
PRESETS: dict[str, dict] = {
    "fcn": {
        "head": "fcn",
        "final_norm": True,
        "num_convs": 0,
        "kernel_size": 3,
        "concat_input": True,
        "channels": None,
        "dropout_ratio": 0.0,
        "use_batchnorm": True,
        "classifier_init_std": 2e-5,
        "loss_average": "all",
    },
    "linear": {
        "head": "linear",
        "final_norm": True,
        "num_convs": 0,
        "kernel_size": 3,
        "concat_input": False,
        "channels": None,
        "dropout_ratio": 0.0,
        "use_batchnorm": True,
        "classifier_init_std": 2e-5,
        "loss_average": "valid",
    },
    "multilayer": {
        "head": "multilayer",
        "out_indices": None,
        "final_norm": True,
        "dropout_ratio": 0.0,
        "classifier_init_std": 0.01,
        "loss_average": "all",
    },
}

LOSS_AVERAGES = ("all", "valid")


class ViTFCNConfig(PretrainedConfig):
    r"""Configuration of [`ViTFCNForSemanticSegmentation`]: a timm ViT-family encoder and a decode head.

    Args:
        encoder_name (`str`): timm model name of the encoder, e.g. `"vit_small_patch16_224"`, `"vit_base_patch16_224"`,
            `"vit_small_patch14_reg4_dinov2"`, `"vit_small_patch16_dinov3"`, `"eva02_small_patch14_224"`.
        encoder_kwargs (`dict`): overrides passed to `timm.create_model` (the model class's arguments), e.g.
            `{"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}` for a tiny model.
        encoder_forward (`str`): `"reference"` (the ImageNet-S reference recipe's ViT forward: plain bicubic
            position-embedding resize), `"timm"` (timm's `forward_intermediates` with dynamic image size) or
            `"auto"` (reference for a plain ViT like the published ones, timm for DINOv2, DINOv3, EVA-02, ...; the
            model writes back the one it runs). See `encoder.py`.
        drop_path_rate (`float`): stochastic depth rate, linearly spaced over the blocks (timm and mmsegmentation
            alike: block i of n gets drop_path_rate * i / (n - 1)).
        drop_path_branches (`str`): the residual branches stochastic depth drops: `"both"` (attention and MLP, as
            timm, DINOv2 and BEiT do; the default, so configs saved before this field load unchanged) or `"mlp"`
            (only the MLP branch, as mmsegmentation's ViT that the published recipes ran on).
        head (`str`): decode head: `"fcn"` (mmsegmentation's FCNHead), `"linear"` (ImageNetSegModel's 1x1
            classifier) or `"multilayer"` (DINOv2's BatchNorm + 1x1 classifier over concatenated layers).
        out_indices (`list[int]` or `None`): the encoder blocks whose outputs the head reads (-1: the last);
            `None` means the head's default (`[-1]`; `[-4, -3, -2, -1]` for `"multilayer"`). The fcn and linear
            heads read one map.
        final_norm (`bool`): apply the encoder's final norm to the patch tokens of every selected block.
        num_convs (`int`): number of conv + BN + ReLU layers before the classifier (mmseg FCNHead `num_convs`).
        kernel_size (`int`): kernel size of those convs and of the concat conv.
        concat_input (`bool`): concatenate the input features with the convs' output and fuse them with one more conv.
        channels (`int` or `None`): width of the head's convs; `None` means the encoder width.
        dropout_ratio (`float`): `Dropout2d` probability before the classifier.
        use_batchnorm (`bool`): BatchNorm after each head conv (it becomes SyncBatchNorm with
            `torch.nn.SyncBatchNorm.convert_sync_batchnorm`); without it the convs have a bias.
        classifier_init_std (`float`): std of the truncated-normal init of the 1x1 classifier (2e-5 in the reference
            recipe, 0.01 in DINOv2's).
        ignore_index (`int`): label id excluded from the loss.
        loss_downsample (`int`): labels are resized (nearest) to 1/`loss_downsample` of the input for the loss and
            the logits upsampled (bilinear) to that size; 1 computes the loss at full input resolution.
        loss_average (`str`): `"all"` divides the summed loss by the number of pixels (mmseg avg_non_ignore=False),
            `"valid"` by the number of non-ignored pixels.

    Example:

    ```python
    >>> from imagenets_hf.model import ViTFCNConfig, ViTFCNForSemanticSegmentation
    >>> config = ViTFCNConfig.from_preset("fcn", encoder_name="vit_small_patch16_224", num_labels=920)
    >>> model = ViTFCNForSemanticSegmentation(config)
    ```
    """

    model_type = "imagenets_vit_fcn"

    def __init__(
        self,
        encoder_name: str = "vit_base_patch16_224",
        encoder_kwargs: dict | None = None,
        encoder_forward: str = "auto",
        drop_path_rate: float = 0.1,
        drop_path_branches: str = "both",
        head: str = "fcn",
        out_indices: list[int] | None = None,
        final_norm: bool = True,
        num_convs: int = 0,
        kernel_size: int = 3,
        concat_input: bool = True,
        channels: int | None = None,
        dropout_ratio: float = 0.0,
        use_batchnorm: bool = True,
        classifier_init_std: float = 2e-5,
        ignore_index: int = 1000,
        loss_downsample: int = 8,
        loss_average: str = "all",
        **kwargs,
    ):
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = DEFAULT_NUM_LABELS
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if encoder_forward not in ENCODER_FORWARDS:
            raise ValueError(f"encoder_forward must be one of {ENCODER_FORWARDS}, got {encoder_forward!r}")
        if drop_path_branches not in DROP_PATH_BRANCHES:
            raise ValueError(f"drop_path_branches must be one of {DROP_PATH_BRANCHES}, got {drop_path_branches!r}")
        out_indices = [int(i) for i in (DEFAULT_OUT_INDICES[head] if out_indices is None else out_indices)]
        if not out_indices:
            raise ValueError("out_indices must name at least one encoder block")
        if head in ("fcn", "linear") and len(out_indices) != 1:
            raise ValueError(
                f"the {head} head reads one feature map; out_indices must hold one index, got {out_indices}"
            )
        if head == "linear" and (int(num_convs) or concat_input):
            raise ValueError(
                "the linear head is only the 1x1 classifier (num_convs 0, concat_input false); use head 'fcn' for convs"
            )
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
        if int(num_convs) < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs}")
        if int(kernel_size) % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        if int(loss_downsample) < 1:
            raise ValueError(f"loss_downsample must be >= 1, got {loss_downsample}")
        self.encoder_name = encoder_name
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.encoder_forward = encoder_forward
        self.drop_path_rate = float(drop_path_rate)
        self.drop_path_branches = drop_path_branches
        self.head = head
        self.out_indices = out_indices
        self.final_norm = bool(final_norm)
        self.num_convs = int(num_convs)
        self.kernel_size = int(kernel_size)
        self.concat_input = bool(concat_input)
        self.channels = None if channels is None else int(channels)
        self.dropout_ratio = float(dropout_ratio)
        self.use_batchnorm = bool(use_batchnorm)
        self.classifier_init_std = float(classifier_init_std)
        self.ignore_index = int(ignore_index)
        self.loss_downsample = int(loss_downsample)
        self.loss_average = loss_average
        super().__init__(**kwargs)
        if self.id2label is not None and not self.label2id:
            self.label2id = {name: int(index) for index, name in self.id2label.items()}

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> ViTFCNConfig:
        """Config of a decoder: `"fcn"` (mmsegmentation, published), `"linear"` (ImageNetSegModel, published) or
        `"multilayer"` (DINOv2's 4-layer linear head).

        Keyword arguments override the preset (e.g. `encoder_name`, `num_labels`, `id2label`).
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[preset], **kwargs})
