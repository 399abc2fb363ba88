"""ViT + FCN segmentation model: config, model, image processor; registered with the transformers Auto classes on
import, and marked for `register_for_auto_class` so saved folders load with `trust_remote_code=True`."""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from .configuration_vit_fcn import PRESETS, ViTFCNConfig
from .image_processing_vit_fcn import ViTFCNImageProcessor
from .modeling_vit_fcn import ViTFCNForSemanticSegmentation, ViTFCNPreTrainedModel

AutoConfig.register(ViTFCNConfig.model_type, ViTFCNConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(ViTFCNConfig, ViTFCNForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(ViTFCNConfig, image_processor_classes={"pil": ViTFCNImageProcessor}, exist_ok=True)

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
