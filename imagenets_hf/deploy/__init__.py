"""What leaves the machine after training and evaluation: an ONNX graph of a saved model with onnxruntime parity
(`onnx_export.py`), and a trained model folder pushed to the Hugging Face Hub (`hub.py`)."""
