"""imagenets-hf: semi-supervised semantic segmentation on ImageNet-S with the Hugging Face stack.

The flow is data -> model -> training -> evaluation, one subpackage each. The names below are imported lazily so
that `import imagenets_hf` stays cheap (no torch, no transformers).

Importing the package also registers the model with the transformers Auto classes and the image-segmentation
pipeline (what importing `imagenets_hf.model` does), so that `AutoModelForSemanticSegmentation.from_pretrained`,
`AutoImageProcessor.from_pretrained` and `pipeline("image-segmentation", model=folder)` load a saved folder with the
local classes, without asking about its custom code. The registration needs transformers, which imports torch, so
it waits for transformers: done at once when transformers is already imported, otherwise right after the first
`import transformers` finishes (a one-shot post-import hook on `sys.meta_path`). A process that never imports
transformers never pays for it.
"""

import importlib
import importlib.util
import sys
import threading

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
    "InferenceMode": "imagenets_hf.evaluation.modes",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imagenets_hf' has no attribute {name!r}")


# -- registration with transformers, once transformers is imported ------------------------------------------------


def _register_with_transformers() -> None:
    """Import `imagenets_hf.model`, which registers the config, model and image processor with the Auto classes."""
    if "imagenets_hf.model" in sys.modules:  # imported or being imported: it registers itself
        return
    try:
        importlib.import_module("imagenets_hf.model")
    except Exception as err:  # never break the caller's `import transformers` (e.g. timm missing)
        import warnings

        warnings.warn(
            f"imagenets_hf: the ViT + FCN model is not registered with the transformers Auto classes ({err}); "
            "import imagenets_hf.model to see the error",
            stacklevel=2,
        )


class _RegisterAfterImport:
    """Loader wrapper: runs transformers' own loader, puts it back on the module spec, then registers."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _remove_import_hook()
        module.__spec__.loader = module.__loader__ = self._loader
        self._loader.exec_module(module)
        _register_with_transformers()


class _TransformersImportHook:
    """A `sys.meta_path` finder that only watches for `transformers`: it lets the other finders find the package
    and wraps its loader, so that the registration runs when the package is actually imported (a spec asked for by
    `importlib.util.find_spec`, as availability checks do, is never executed and changes nothing). The hook removes
    itself on that import."""

    _busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders; None if transformers is not installed
        finally:
            self._busy.active = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


def _remove_import_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != "_TransformersImportHook"]


if "transformers" in sys.modules:
    _register_with_transformers()
else:
    _remove_import_hook()  # one hook, also after importlib.reload
    sys.meta_path.insert(0, _TransformersImportHook())
