"""imagenets-hf: semi-supervised semantic segmentation on ImageNet-S with the Hugging Face stack.

The flow is data -> model -> training -> evaluation, one subpackage each. The names below are imported lazily so
that `import imagenets_hf` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_imagenets": "imagenets_hf.data.imagenets",
    "class_names": "imagenets_hf.data.imagenets",
    "make_mini_dataset": "imagenets_hf.data.mini",
    "ViTFCNConfig": "imagenets_hf.model",
    "ViTFCNForSemanticSegmentation": "imagenets_hf.model",
    "ViTFCNImageProcessor": "imagenets_hf.model",
    "load_pretrained_encoder": "imagenets_hf.model.convert",
    "convert_checkpoint": "imagenets_hf.model.convert",
    "load_recipe": "imagenets_hf.training.recipes",
    "finetune": "imagenets_hf.training.finetune",
    "SegmentationEvaluator": "imagenets_hf.evaluation.metrics",
    "evaluate_model": "imagenets_hf.evaluation.inference",
    "predict_segmentation": "imagenets_hf.evaluation.inference",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imagenets_hf' has no attribute {name!r}")
