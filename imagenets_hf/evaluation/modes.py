"""Inference modes: the official whole-image protocol, mmsegmentation's sliding windows, and multi-scale + flip
test-time augmentation (TTA), in one place. `inference.py` runs the model; this module says which inputs a mode
feeds it and how their logits become one class map.

- `whole` (default): the official ImageNet-S protocol (the image processor's short side, whole image, one forward,
  logits bilinear to the image, argmax). With the default scales and no flip, `inference.py` runs it exactly as
  before this module existed.
- `slide`: mmsegmentation's `EncoderDecoder.slide_inference` (0.x and 1.x place windows alike) on the processed
  image: `crop_size` windows every `stride` pixels, `h_grids = max(H - crop + stride - 1, 0) // stride + 1` rows (and
  columns alike), the last window of a row or column shifted back inside the image; a window larger than the image is
  clipped to it (decoded without padding, as mmsegmentation does); each window's logits are resized bilinearly to the
  window, summed, divided by the number of windows covering each pixel, and the result resized to the image.
- TTA (`scales`, `flip`): mmsegmentation's `SegTTAModel` with 0.x's `MultiScaleFlipAug` scales: a view per scale
  (the processor's short and long sides times the scale, truncated to int) and, with `flip`, its horizontal mirror;
  each view's logits are brought back to the image (flipped back), softmaxed and averaged; the argmax is the class.
  Combines with `slide` (windows are placed on each view's input).

Two deliberate differences from mmsegmentation, both so that the official protocol stays a special case: a view
that is one whole image (`whole`, or `slide` with a single window covering the image) resizes its logits to the
image in one step, where mmsegmentation resizes them to the model's input and then to the image; and a single view
(no TTA) takes the argmax of its logits (softmax does not change it).

Memory at 920 classes: nothing holds a view's logits of all classes at the image size. A single whole view uses
`resized_argmax` (the official path's bounded argmax); otherwise classes are processed in chunks of at most
`RESIZE_CHUNK_ELEMENTS` values per map into a running max and argmax, and TTA's softmax takes two passes over the
chunks (a per-pixel log-sum-exp per view first, then the averaged probabilities): each view's logits are resized
twice, and about three chunks are alive at once (the probability sum, a view's chunk, its exponential).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

WHOLE, SLIDE = "whole", "slide"
MODES = (WHOLE, SLIDE)
# mmsegmentation's usual multi-scale test ratios (its configs' `img_ratios`).
MMSEG_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

Window = tuple[int, int, int, int]  # (top, bottom, left, right) in input pixels, bottom/right exclusive


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or int(v) != v for v in pair):
        raise ValueError(f"{name} must be a whole number of pixels or (height, width), got {value!r}")
    pair = (int(pair[0]), int(pair[1]))
    if min(pair) < 1:
        raise ValueError(f"{name} must be at least 1 pixel, got {value!r}")
    return pair


def default_stride(crop_size: tuple[int, int]) -> tuple[int, int]:
    """Two thirds of the window, rounded down (mmsegmentation's ViT configs: crop 512, stride 341)."""
    return (max(1, 2 * crop_size[0] // 3), max(1, 2 * crop_size[1] // 3))


@dataclass(frozen=True)
class InferenceMode:
    """How a class map is made from an image (see the module docstring). Invalid values raise ValueError, one line.

    Args:
        mode: "whole" (default, the official protocol) or "slide".
        crop_size: slide's window, pixels of the processed image (an int or (height, width)); None until resolved
            from the model's recipe (`with_crop_size`).
        stride: slide's step; default two thirds of the window. Not more than the window (pixels between windows
            would get no prediction).
        scales: TTA scales of the processor's sizes; `MMSEG_SCALES` is mmsegmentation's usual list. (1.0,) is none.
        flip: also predict the horizontal mirror of each scale's input.
    """

    mode: str = WHOLE
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown inference mode {self.mode!r}; expected one of {', '.join(MODES)}")
        crop_size, stride = _pair(self.crop_size, "crop_size"), _pair(self.stride, "stride")
        if self.mode == WHOLE and (crop_size is not None or stride is not None):
            raise ValueError("crop_size and stride are for mode 'slide' (--mode slide); leave them out for whole")
        if stride is not None and crop_size is not None and (stride[0] > crop_size[0] or stride[1] > crop_size[1]):
            raise ValueError(
                f"stride {stride[0]}x{stride[1]} is larger than the window {crop_size[0]}x{crop_size[1]}: pixels "
                "between windows would get no prediction; give a stride of at most the crop size"
            )
        scales = (self.scales,) if isinstance(self.scales, (int, float)) else tuple(self.scales)
        if not scales:
            raise ValueError("scales is empty; give at least one scale (1.0: the processor's own size)")
        for scale in scales:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"every scale must be a number above 0, got {scale!r}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"scales {list(scales)} name a scale twice; give each once")
        object.__setattr__(self, "crop_size", crop_size)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))
        object.__setattr__(self, "flip", bool(self.flip))

    @property
    def official(self) -> bool:
        """The official protocol: whole image, one scale (1.0), no flip."""
        return self.mode == WHOLE and self.scales == (1.0,) and not self.flip

    @property
    def views(self) -> list[tuple[float, bool]]:
        """(scale, flipped) of each view, in the order they are predicted."""
        return [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]

    def with_crop_size(self, crop_size: int | Sequence[int] | None) -> InferenceMode:
        """This mode with the window filled in where it was left out (slide only), and the stride where it was."""
        if self.mode != SLIDE:
            return self
        crop = self.crop_size or _pair(crop_size, "crop_size")
        if crop is None:
            raise ValueError(
                "slide inference needs a window size: pass crop_size (--crop-size), e.g. the recipe's crop_size"
            )
        return InferenceMode(SLIDE, crop, self.stride or default_stride(crop), self.scales, self.flip)

    def to_dict(self) -> dict[str, Any]:
        """What the results JSON records."""
        return {
            "mode": self.mode,
            "crop_size": list(self.crop_size) if self.crop_size else None,
            "stride": list(self.stride) if self.stride else None,
            "scales": list(self.scales),
            "flip": self.flip,
        }

    def describe(self) -> str:
        """One line: "whole (official protocol)", "slide 96x96 every 64x64, scales 0.5, 1.0 + flip"."""
        if self.official:
            return "whole (official protocol)"
        text = self.mode
        if self.mode == SLIDE and self.crop_size:
            text += f" {self.crop_size[0]}x{self.crop_size[1]}"
            if self.stride:
                text += f" every {self.stride[0]}x{self.stride[1]}"
        if self.scales != (1.0,):
            text += ", scales " + ", ".join(f"{s:g}" for s in self.scales)
        return text + (" + flip" if self.flip else "")


def slide_windows(height: int, width: int, crop_size: tuple[int, int], stride: tuple[int, int]) -> list[Window]:
    """mmsegmentation's window placement (`slide_inference`, 0.x and 1.x): rows of windows top to bottom, each left
    to right; a window that would leave the image is shifted back inside it, one larger than the image is clipped."""
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * h_stride + h_crop, height), min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def scaled_processor(image_processor: Any, scale: float) -> Any:
    """The image processor with its short and long sides times `scale`, truncated (mmsegmentation 0.x's
    `MultiScaleFlipAug`: `(int(long * r), int(short * r))`); the processor itself at 1.0."""
    if scale == 1.0:
        return image_processor
    if not getattr(image_processor, "do_resize", True):
        raise ValueError("multi-scale inference needs an image processor that resizes (do_resize=True)")
    scaled = copy.copy(image_processor)
    scaled.short_side = int(image_processor.short_side * scale)
    scaled.max_long_side = int(image_processor.max_long_side * scale)
    if scaled.short_side < 1:
        raise ValueError(f"scale {scale:g} makes the short side {image_processor.short_side * scale:g} pixels")
    return scaled


@dataclass
class View:
    """One view of one image: its model input's size, where its windows lie in that input, whether the input was
    mirrored, and (once the model has run) each window's logits (C x h x w)."""

    size: tuple[int, int]
    windows: list[Window]
    flipped: bool = False
    logits: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def is_whole(self) -> bool:
        return self.windows == [(0, self.size[0], 0, self.size[1])]

    def scores(self, start: int, stop: int, size: tuple[int, int]) -> torch.Tensor:
        """Classes start..stop-1 of this view's logits at `size` (float32, (stop - start) x H x W), mirrored back."""
        if self.is_whole:  # one resize, as the official protocol
            chunk = self.logits[0][start:stop].float()[None].contiguous()
            scores = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)[0]
        else:
            summed = None
            count = torch.zeros(self.size, device=self.logits[0].device)
            for (top, bottom, left, right), logits in zip(self.windows, self.logits):
                chunk = logits[start:stop].float()[None].contiguous()
                resized = F.interpolate(chunk, size=(bottom - top, right - left), mode="bilinear", align_corners=False)
                if summed is None:
                    summed = torch.zeros((stop - start, *self.size), device=resized.device)
                summed[:, top:bottom, left:right] += resized[0]
                count[top:bottom, left:right] += 1
            summed /= count
            scores = F.interpolate(summed[None], size=size, mode="bilinear", align_corners=False)[0]
        return scores.flip(-1) if self.flipped else scores


class _RunningArgmax:
    """argmax over classes fed in chunks of ascending ids: ties go to the lowest id and a NaN wins, as
    `torch.argmax` (the rule of `resized_argmax`'s chunks)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def add(self, scores: torch.Tensor, first_class: int) -> None:
        value, index = scores.max(dim=0)
        index += first_class
        if self.value is None:
            self.value, self.index = value, index
            return
        better = (value > self.value) | (value.isnan() & ~self.value.isnan())
        torch.where(better, value, self.value, out=self.value)
        torch.where(better, index, self.index, out=self.index)


def combine_views(views: Sequence[View], size: tuple[int, int], chunk_elements: int | None = None) -> torch.Tensor:
    """The class map (int64, `size`) of an image from its views' logits: a single view's argmax, or the argmax of
    the mean of the views' softmax (TTA), computed over chunks of classes (see the module docstring)."""
    # Here: the scripts import this module to read their options before anything heavy is imported.
    from imagenets_hf.model.image_processing_vit_fcn import RESIZE_CHUNK_ELEMENTS, resized_argmax

    size = (int(size[0]), int(size[1]))
    if len(views) == 1 and views[0].is_whole and not views[0].flipped:
        return resized_argmax(views[0].logits[0], size, chunk_elements)
    num_classes = views[0].logits[0].shape[0]
    chunk_elements = RESIZE_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    # A chunk's largest map: the image's, or a sliding view's input where windows are summed (a scale above 1).
    pixels = max([size[0] * size[1]] + [view.size[0] * view.size[1] for view in views if not view.is_whole])
    step = max(1, min(num_classes, chunk_elements // max(1, pixels)))
    chunks = [(start, min(start + step, num_classes)) for start in range(0, num_classes, step)]
    best = _RunningArgmax()
    if len(views) == 1:
        for start, stop in chunks:
            best.add(views[0].scores(start, stop, size), start)
        return best.index
    if len(chunks) == 1:  # every class in one chunk: the softmax at once
        probabilities = sum(view.scores(0, num_classes, size).softmax(dim=0) for view in views)
        return (probabilities / len(views)).argmax(dim=0)
    # Pass 1: each view's per-pixel log-sum-exp over the classes, chunk by chunk (a running max and sum).
    normalisers = []
    for view in views:
        peak = total = None
        for start, stop in chunks:
            scores = view.scores(start, stop, size)
            chunk_peak = scores.amax(dim=0)
            if peak is None:
                peak, total = chunk_peak, (scores - chunk_peak).exp().sum(dim=0)
                continue
            new_peak = torch.maximum(peak, chunk_peak)
            total = total * (peak - new_peak).exp() + (scores - new_peak).exp().sum(dim=0)
            peak = new_peak
        normalisers.append(peak + total.log())
    # Pass 2: the mean of the views' probabilities, chunk by chunk, into the running argmax.
    for start, stop in chunks:
        probabilities = None
        for view, normaliser in zip(views, normalisers):
            view_probabilities = (view.scores(start, stop, size) - normaliser).exp()
            probabilities = view_probabilities if probabilities is None else probabilities.add_(view_probabilities)
        best.add(probabilities / len(views), start)
    return best.index
