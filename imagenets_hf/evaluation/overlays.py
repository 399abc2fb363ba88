"""Pictures of predictions: class colours over the image, a legend naming the classes shown, and a grid of a few
images of a split (rows: image, ground truth over the image, prediction over the image).

`make_overlay` is what `predict.py --overlay` writes for each image; `write_prediction_grid` is what
`scripts/make_overlays.py` and the model card (`predictions.png` next to the weights) draw. Both take the class names
from the model's `id2label` and draw their legend with `draw_legend`.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imagenets_hf.data.masks import IGNORE_INDEX, decode_mask
from imagenets_hf.data.mini import MINI_CLASSES

OVERLAY_ALPHA = 0.55  # weight of the class colour over the image (predict.py --overlay)
GRID_ALPHA = 0.75  # the grid's small cells: colours close to the legend's swatches, the shapes still visible
IGNORE_NAME = "ignore (not scored)"
GAP = 4  # white pixels between panels
FONT_SIZE = 12
MAX_LEGEND_ENTRIES = 24  # a noisy 920-class prediction would otherwise list hundreds
IGNORE_COLOUR = (128, 128, 128)  # apart from black "other" and from every class colour (the mini set has a white one)
# The mini dataset's classes are named after their colour: overlays draw them in it (a "red solid disc" in red).
MINI_COLOURS = {c.name: c.colour for c in MINI_CLASSES}


def label_palette(num_ids: int = IGNORE_INDEX + 1, id2label: Mapping[Any, str] | None = None) -> np.ndarray:
    """(num_ids, 3) uint8 colours: 0 ("other") black, 1000 (ignore) grey, the rest well-separated hues; with
    `id2label`, a class named as one of the mini dataset's ("red solid disc") takes the colour it is drawn in."""
    palette = np.zeros((num_ids, 3), dtype=np.uint8)
    for i in range(1, num_ids):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbouring ids apart
        saturation = 0.65 + 0.35 * ((i * 7) % 3) / 2
        palette[i] = [int(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, 0.95)]
    if num_ids > IGNORE_INDEX:
        palette[IGNORE_INDEX] = IGNORE_COLOUR
    for class_id, name in (id2label or {}).items():
        colour = MINI_COLOURS.get(str(name))
        if colour is not None and 0 <= int(class_id) < num_ids:
            palette[int(class_id)] = colour
    return palette


def colorize(ids: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 colours of an id map (ids beyond the palette wrap around)."""
    palette = label_palette() if palette is None else palette
    return palette[np.asarray(ids, dtype=np.int64) % len(palette)]


def blend(
    rgb: np.ndarray, ids: np.ndarray, alpha: float = OVERLAY_ALPHA, palette: np.ndarray | None = None
) -> np.ndarray:
    """The class colours of `ids` (`palette`, default `label_palette()`) laid over an HxWx3 image with weight `alpha`
    (float32)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return (1 - alpha) * rgb + alpha * colorize(ids, palette).astype(np.float32)


def label_name(class_id: int, id2label: Mapping[Any, str] | None) -> str:
    """The name of a class id: `id2label`'s (int or str keys, as configs hold them), "ignore (not scored)" for 1000,
    else the id itself."""
    if id2label:
        for key in (class_id, str(class_id)):
            if key in id2label:
                return str(id2label[key])
    return IGNORE_NAME if class_id == IGNORE_INDEX else str(class_id)


def legend_entries(
    id_maps: Sequence[np.ndarray | None],
    id2label: Mapping[Any, str] | None,
    max_entries: int = MAX_LEGEND_ENTRIES,
) -> tuple[list[tuple[int, str]], int]:
    """The classes shown in `id_maps` (ground truths and predictions; None entries are skipped) as (id, name) in id
    order, and how many more were left out: beyond `max_entries`, only the largest (by pixels over all maps) are
    kept."""
    counts: dict[int, int] = {}
    for ids in id_maps:
        if ids is None:
            continue
        values, numbers = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            counts[value] = counts.get(value, 0) + number
    shown = sorted(counts, key=lambda i: (-counts[i], i))[:max_entries]
    return [(i, label_name(i, id2label)) for i in sorted(shown)], len(counts) - len(shown)


def legend_font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` pixels (its fixed bitmap font where Pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def draw_legend(entries: Sequence[tuple[int, str]], width: int, more: int = 0) -> Image.Image:
    """A white strip `width` pixels wide: a colour swatch and the name of each (id, name) entry, wrapped into lines,
    then "+N more classes" when `more` were left out. The one legend of every picture this package draws."""
    font = legend_font()
    palette = label_palette(id2label=dict(entries))
    line_height = FONT_SIZE + 6
    swatch = FONT_SIZE
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(palette[i % len(palette)], name) for i, name in entries]
    if more:
        items.append((None, f"+{more} more classes"))
    # Lay the items out first (x, y of each), wrapping at `width`, then draw them on a strip of the height needed.
    positions, x, y = [], GAP, GAP
    for colour, name in items:
        item_width = (swatch + 4 if colour is not None else 0) + int(measure.textlength(name, font=font)) + 12
        if x > GAP and x + item_width > width:
            x, y = GAP, y + line_height
        positions.append((x, y))
        x += item_width
    legend = Image.new("RGB", (max(width, 1), y + line_height + GAP), "white")
    draw = ImageDraw.Draw(legend)
    for (colour, name), (x, y) in zip(items, positions):
        if colour is not None:
            top = y + (line_height - swatch) // 2
            draw.rectangle([x, top, x + swatch - 1, top + swatch - 1], fill=tuple(int(c) for c in colour))
            draw.rectangle([x, top, x + swatch - 1, top + swatch - 1], outline=(128, 128, 128))  # black, white show
            x += swatch + 4
        draw.text((x, y + line_height // 2), name, fill="black", font=font, anchor="lm")
    return legend


def stack_vertically(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """`top` above `bottom`, left-aligned, on white."""
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def make_overlay(
    image: Image.Image,
    prediction: np.ndarray,
    ground_truth: np.ndarray | None = None,
    id2label: Mapping[Any, str] | None = None,
) -> Image.Image:
    """Side by side: the image | ground truth over the image (when given) | prediction over the image. With
    `id2label` (the model's class names), a legend of the classes shown goes below."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = label_palette(id2label=id2label)
    maps = ([ground_truth] if ground_truth is not None else []) + [prediction]
    panels = [rgb] + [blend(rgb, ids, palette=palette) for ids in maps]
    gap = np.full((rgb.shape[0], GAP, 3), 255, dtype=np.float32)
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gap, panel]
    strip = Image.fromarray(np.concatenate(row, axis=1).round().astype(np.uint8))
    if id2label is None:
        return strip
    entries, more = legend_entries([ground_truth, prediction], id2label)
    return stack_vertically(strip, draw_legend(entries, strip.width, more))


def _fit(image: Image.Image, ids: list[np.ndarray | None], height: int) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The image (bilinear) and its id maps (nearest) at `height` rows, keeping the aspect ratio."""
    width = max(1, round(image.width * height / image.height))
    rgb = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    resized = []
    for id_map in ids:
        if id_map is None:
            resized.append(None)
            continue
        # int32 keeps ids up to 1000 exact through PIL's nearest resize (mode "I")
        small = Image.fromarray(np.asarray(id_map, dtype=np.int32)).resize((width, height), Image.Resampling.NEAREST)
        resized.append(np.asarray(small, dtype=np.int64))
    return rgb, resized


def make_prediction_grid(
    images: Sequence[Image.Image],
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray | None],
    id2label: Mapping[Any, str] | None,
    cell_height: int = 112,
    title: str | None = None,
    alpha: float = GRID_ALPHA,
) -> Image.Image:
    """One picture: a column per image, rows image | ground truth over it | prediction over it (class colours at
    `alpha`; a ground truth that is None leaves its cell white), row names on the left, and a legend of the classes
    shown (names from `id2label`) below."""
    if not images or not (len(images) == len(predictions) == len(ground_truths)):
        raise ValueError(
            f"make_prediction_grid needs as many predictions and ground truths as images, at least one; got "
            f"{len(images)} images, {len(predictions)} predictions, {len(ground_truths)} ground truths"
        )
    font = legend_font()
    row_names = ["image", "ground truth", "prediction"]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(measure.textlength(name, font=font)) for name in row_names) + 2 * GAP
    palette = label_palette(id2label=id2label)
    columns = []
    for image, prediction, ground_truth in zip(images, predictions, ground_truths):
        rgb, (gt, pred) = _fit(image, [ground_truth, prediction], cell_height)
        white = np.full_like(rgb, 255)
        gt_panel = blend(rgb, gt, alpha, palette) if gt is not None else white
        columns.append([rgb, gt_panel, blend(rgb, pred, alpha, palette)])
    title_height = FONT_SIZE + 2 * GAP if title else 0
    width = label_width + sum(column[0].shape[1] + GAP for column in columns)
    height = title_height + 3 * (cell_height + GAP)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((GAP, GAP), title, fill="black", font=font)
    for row, name in enumerate(row_names):
        top = title_height + row * (cell_height + GAP)
        draw.text((GAP, top + cell_height // 2), name, fill="black", font=font, anchor="lm")
    x = label_width
    for column in columns:
        for row, panel in enumerate(column):
            grid.paste(Image.fromarray(panel.round().astype(np.uint8)), (x, title_height + row * (cell_height + GAP)))
        x += column[0].shape[1] + GAP
    entries, more = legend_entries(list(ground_truths) + list(predictions), id2label)
    return stack_vertically(grid, draw_legend(entries, grid.width, more))


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included (all of them when total <= count)."""
    if total <= count:
        return list(range(total))
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def write_prediction_grid(
    model_name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    num_images: int = 6,
    split: str = "validation",
    cell_height: int = 112,
    device: str | None = None,
    title: str | None = None,
) -> Path:
    """Predict `num_images` images of `<data_dir>/<split>` (spread evenly over the sorted file list, so over the
    classes) with a saved model and write `make_prediction_grid`'s picture to `out` (PNG; folders created).

    Args:
        model_name_or_path: a saved model folder (what finetune.py or convert_checkpoint.py wrote) or Hub id.
        data_dir: a prepared ImageNet-S folder (official layout: `<split>/` and `<split>-segmentation/`).
        split: "validation" or "train_semi" (the splits with masks), or "test" (no ground truth); "train-semi" too.
        device: where the model runs (default: the first GPU when there is one, else the CPU).
        title: a line above the grid (default: "<model folder name> on <data folder name>/<split>").
    """
    import torch
    from transformers.utils import logging as transformers_logging

    from imagenets_hf.data.imagenets import SPLIT_FOLDERS, split_name
    from imagenets_hf.evaluation.folders import default_masks_dir, list_images, prediction_path
    from imagenets_hf.evaluation.inference import predict_segmentation
    from imagenets_hf.evaluation.loading import load_model_and_processor

    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    split = split_name(split)
    images_dir = Path(data_dir) / SPLIT_FOLDERS[split][0]
    relative_paths = list_images(images_dir)  # says which folder when it is missing or empty
    chosen = [relative_paths[i] for i in spread_indices(len(relative_paths), num_images)]
    masks_dir = default_masks_dir(images_dir)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # No "Loading weights" bar: the picture is a side product (of training, in the model card).
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model, processor = load_model_and_processor(model_name_or_path, device)
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()
    images, ground_truths = [], []
    for relative in chosen:
        with Image.open(images_dir / relative) as image:
            images.append(image.convert("RGB"))
        mask = masks_dir / prediction_path(relative) if masks_dir is not None else None
        ground_truths.append(decode_mask(mask) if mask is not None and mask.is_file() else None)
    predictions = predict_segmentation(model, processor, images, device=device)
    if title is None:
        title = f"{Path(os.fspath(model_name_or_path)).name} on {Path(data_dir).resolve().name}/{split}"
    grid = make_prediction_grid(images, predictions, ground_truths, model.config.id2label, cell_height, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    return out
