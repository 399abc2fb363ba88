"""Metric reports: the JSON file (every number) and the per-class IoU chart."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _json_ready(value: Any) -> Any:
    """NaN and infinities become null (strict JSON has no NaN); tuples and arrays become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if hasattr(value, "tolist"):
        return _json_ready(value.tolist())
    return value


def write_metrics_json(
    metrics: dict[str, Any], path: str | os.PathLike, class_names: Sequence[str] | None = None, **info: Any
) -> Path:
    """Write the metrics (plus `class_names` and any `info`, e.g. model and split) as JSON; NaN is written null."""
    payload = dict(info)
    if class_names is not None:
        payload["class_names"] = list(class_names)
    payload.update(metrics)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_ready(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def plot_per_class_iou(
    metrics: dict[str, Any],
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    max_classes: int = 60,
) -> Path:
    """A bar chart of per-class IoU (official, percent), sorted, with the mIoU line; with more than `max_classes`
    classes, the best and the worst halves of `max_classes` are shown around a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ious = list(metrics["per_class_iou"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(ious))]
    order = sorted(range(len(ious)), key=lambda i: (-ious[i], i))
    shown = order if len(order) <= max_classes else order[: max_classes // 2] + [None] + order[-max_classes // 2 :]
    labels = [names[i] if i is not None else "..." for i in shown]
    values = [ious[i] if i is not None else 0.0 for i in shown]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.28 * len(shown) + 2), 4.8), constrained_layout=True)
    colours = plt.cm.viridis([v / 100 for v in values])
    axes.bar(range(len(values)), values, color=colours)
    axes.axhline(metrics["mIoU"], color="crimson", linestyle="--", linewidth=1.2, label=f"mIoU {metrics['mIoU']:.2f}")
    axes.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
    axes.set_ylabel("IoU (%)")
    axes.set_ylim(0, 100)
    axes.set_xlim(-0.6, len(values) - 0.4)
    axes.set_title(title or f"Per-class IoU ({len(ious)} classes, sorted)")
    axes.legend(loc="upper right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
