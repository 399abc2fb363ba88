"""ImageNet-S data: mask encoding, the datasets builder, export, preparation from ImageNet-1k, the mini dataset and
the training augmentation. Import the heavier parts from their submodules (e.g. `imagenets_hf.data.prepare`)."""

from .imagenets import ImageNetS, class_names, detect_subset, load_imagenets
from .masks import IGNORE_INDEX, OTHER_ID, decode_mask, encode_mask, num_labels
from .mini import ensure_mini_dataset, make_mini_dataset

__all__ = [
    "IGNORE_INDEX",
    "OTHER_ID",
    "ImageNetS",
    "class_names",
    "decode_mask",
    "detect_subset",
    "encode_mask",
    "ensure_mini_dataset",
    "load_imagenets",
    "make_mini_dataset",
    "num_labels",
]
