"""ViT + FCN segmentation model: config, model, image processor; registered with the transformers Auto classes on
import, and marked for `register_for_auto_class` so saved folders load with `trust_remote_code=True`.

`import imagenets_hf` alone also registers them (as soon as transformers is imported): see imagenets_hf/__init__.py.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, AutoVideoProcessor
from transformers.models.auto import image_processing_auto

from .configuration_vit_fcn import PRESETS, ViTFCNConfig
from .image_processing_vit_fcn import ViTFCNImageProcessor
from .modeling_vit_fcn import ViTFCNForSemanticSegmentation, ViTFCNPreTrainedModel

AutoConfig.register(ViTFCNConfig.model_type, ViTFCNConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(ViTFCNConfig, ViTFCNForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(ViTFCNConfig, image_processor_classes={"pil": ViTFCNImageProcessor}, exist_ok=True)

# The processor is a PIL one (PIL bilinear resizing, as mmcv). AutoImageProcessor asks for the torchvision backend
# whenever torchvision is installed and logs "Requested torchvision backend is not available. Falling back to pil
# backend"; this list is transformers' own "default to PIL" declaration (backend=None resolves to "pil" for these).
# An explicit backend="torchvision" still gets the PIL processor with transformers' (true) fallback warning.
if isinstance(getattr(image_processing_auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", None), list):
    if ViTFCNImageProcessor.__name__ not in image_processing_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS:
        image_processing_auto.DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS.append(ViTFCNImageProcessor.__name__)

# No video processor. Pipelines also try AutoVideoProcessor on the folder (softly); it reads
# preprocessor_config.json, turns its AutoImageProcessor auto_map into a remote "ViTFCNVideoProcessor" and, with no
# local entry for this config, asks "Do you wish to run the custom code? [y/N]" (15 s wait in a terminal). An
# empty entry says "local, and none": AutoVideoProcessor then fails quietly and the pipeline goes on without one.
AutoVideoProcessor.register(ViTFCNConfig, video_processor_classes={}, exist_ok=True)

# save_pretrained copies the modeling/config/processor files (and their relative imports) next to the weights
# and writes an auto_map, so the folder or Hub repo loads where this package is not installed.
ViTFCNConfig.register_for_auto_class()
ViTFCNForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
ViTFCNImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PRESETS",
    "ViTFCNConfig",
    "ViTFCNForSemanticSegmentation",
    "ViTFCNImageProcessor",
    "ViTFCNPreTrainedModel",
]
