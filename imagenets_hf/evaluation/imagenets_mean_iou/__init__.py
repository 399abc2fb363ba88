"""The `imagenets_mean_iou` evaluate module: load it with `evaluate.load(imagenets_hf.evaluation.METRIC_PATH)`.

The module file is self-contained (publishable as a Hub metric); this package only ships it with the wheel.
"""
