"""imagenets-hf: semi-supervised semantic segmentation on ImageNet-S with the Hugging Face stack."""

__version__ = "0.1.0"
