"""Evaluation: the metric core, the evaluate module, the official inference protocol, predictions and submissions.

Heavy parts (inference, predictions, submissions) import the model and data layers: import them from their
submodules, e.g. `from imagenets_hf.evaluation.inference import evaluate_model`.
"""

from pathlib import Path

from .metrics import SegmentationEvaluator

# The evaluate module's folder: `evaluate.load(METRIC_PATH)` works offline.
METRIC_PATH = str(Path(__file__).resolve().parent / "imagenets_mean_iou")

__all__ = ["METRIC_PATH", "SegmentationEvaluator"]
