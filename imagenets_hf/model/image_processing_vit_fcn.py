"""Image processor of the ViT + FCN model: the ImageNet-S evaluation preprocessing and post-processing.

Preprocessing (mmsegmentation's test pipeline for ImageNet-S): resize keeping the aspect ratio so that the short
side is 256 and the long side at most 1024, scale to [0, 1], normalise with the ImageNet mean/std. Images with more
than 1000 x 1000 pixels are first brought to long side 1000 (the official protocol), and their prediction is brought
back to the original size with nearest upsampling. Segmentation maps are always resized nearest (never bicubic,
which would invent class ids).

This file is copied next to saved weights by `register_for_auto_class`, so it imports only numpy, PIL, torch and
transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def rescale_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(height, width) after a keep-ratio resize to short side `short_side` with the long side at most
    `max_long_side` (mmcv's `rescale_size` with scale (max_long_side, short_side), rounding half up)."""
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def long_side_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) after a keep-ratio resize to the given long side."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


# Most float32 elements of one resized chunk of logits (64 MiB): bounds post-processing's memory at any class count.
RESIZE_CHUNK_ELEMENTS = 2**24
# torch's CPU bilinear kernel for outputs with height + width <= 128 is another one, whose values for a channel depend
# on how many channels are resized with it (1 to 7 against 8 or more): outputs up to twice that are resized in one
# call (at most 256 x 256 / 4 pixels: 60 MB of float32 at 920 classes), the very call of the reference.
SMALL_OUTPUT_SIDES = 256


def resized_argmax(
    logits: torch.Tensor, size: tuple[int, int], chunk_elements: int | None = None, method: str = "auto"
) -> torch.Tensor:
    """`F.interpolate(logits[None].float(), size, mode="bilinear", align_corners=False).argmax(dim=1)[0]`, bit for
    bit, without holding the resized logits of all classes. Returns int64 class ids of shape `size`.

    `logits`: C x h x w of any float dtype and layout, upcast to float32 as the protocol always did. The reference
    is the contiguous (NCHW) kernel's, whatever the layout: the logits of a batch of several images come out
    channels-last, and the channels-last kernel rounds differently, so a class map would depend on its batch.

    `method`: "chunks" resizes chunks of classes, at most `chunk_elements` resized values each (default
    `RESIZE_CHUNK_ELEMENTS`, at least one class), one after the other into a running max and argmax. Exact because
    the contiguous kernel computes each channel on its own (a chunk's channels come out as in the whole tensor),
    `max` keeps the first of equal values as `argmax` does, and a later chunk replaces the running max only where it
    is strictly greater, or NaN where the running max is not (argmax takes the first NaN): ties go to the lowest id.
    "bounds" (`_bounded_argmax`) resizes exactly only the classes of the pixels where two classes come within
    rounding of each other, and decides every other pixel from bounds; finite logits only. "auto": "bounds" on the
    CPU for finite logits upsampled from at most 64 x 64 (a model's; there the resize of every class is most of
    evaluation's time), else "chunks" (on a GPU the chunked resize is cheap and one pass). Small outputs (height +
    width <= `SMALL_OUTPUT_SIDES`) are resized for all classes in one call, whatever `method`.
    tests/test_eval_post_processing.py holds every path equal to the reference.
    """
    if logits.ndim != 3:
        raise ValueError(f"expected C x h x w logits, got shape {tuple(logits.shape)}")
    if method not in ("auto", "chunks", "bounds"):
        raise ValueError(f"method must be auto, chunks or bounds, got {method!r}")
    size = (int(size[0]), int(size[1]))
    logits = logits.float()
    if size[0] + size[1] <= SMALL_OUTPUT_SIDES:
        return F.interpolate(logits[None].contiguous(), size=size, mode="bilinear", align_corners=False).argmax(1)[0]
    if method == "auto":
        # bounds loops over cells of 4 logits in Python: for logits upsampled (as a model's are), up to 64 x 64 cells
        height, width = logits.shape[1:]
        upsampled = size[0] >= height and size[1] >= width and height * width <= 4096
        method = "bounds" if logits.device.type == "cpu" and logits.shape[0] > 1 and upsampled else "chunks"
    if method == "bounds":
        result = _bounded_argmax(logits.contiguous(), size, chunk_elements)
        if result is not None:
            return result
    return _chunked_argmax(logits, size, chunk_elements)


def _chunked_argmax(
    logits: torch.Tensor,
    size: tuple[int, int],
    chunk_elements: int | None,
    classes: torch.Tensor | None = None,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The "chunks" method: argmax over `classes` (ascending ids; default all) of the resized logits, at the flat
    `pixels` indices (default all, returned as `size`); the ids returned are class ids."""
    chunk_elements = RESIZE_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    num_classes = logits.shape[0] if classes is None else len(classes)
    step = max(1, min(num_classes, chunk_elements // max(1, size[0] * size[1])))
    best_value = best_index = None
    for start in range(0, num_classes, step):
        if classes is None:
            chunk = logits[None, start : start + step].contiguous()
        else:
            chunk = logits[classes[start : start + step]][None]
        resized = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)[0]
        del chunk
        if pixels is not None:
            resized = resized.reshape(resized.shape[0], -1)[:, pixels]
        value, index = resized.max(dim=0)
        del resized  # before the next chunk is resized: one chunk alive at a time
        index = index + start if classes is None else classes[start : start + step][index]
        if best_value is None:
            best_value, best_index = value, index
            continue
        better = (value > best_value) | (value.isnan() & ~best_value.isnan())
        torch.where(better, value, best_value, out=best_value)
        torch.where(better, index, best_index, out=best_index)
        del value, index, better
    return best_index


def _source_coordinates(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices the bilinear kernel (align_corners False) blends and the weight
    of the second, computed as torch does in float32 (scale in/out, (i + 0.5) * scale - 0.5, clamped at 0)."""
    scale = np.float32(in_size) / np.float32(out_size)
    real = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    first = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    return first, second, np.clip(real - first, 0, 1).astype(np.float32)


def _runs(first: np.ndarray, second: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(start, stop, first, second) of each run of output indices that blend the same two input indices."""
    starts = [0] + [i for i in range(1, len(first)) if first[i] != first[i - 1]]
    stops = starts[1:] + [len(first)]
    return [(start, stop, int(first[start]), int(second[start])) for start, stop in zip(starts, stops)]


def _bounded_argmax(logits: torch.Tensor, size: tuple[int, int], chunk_elements: int | None) -> torch.Tensor | None:
    """The "bounds" method; None for logits that are not all finite (or too large for the bound).

    Each output pixel's resized value of a class is a convex combination of the class's logits at the 4 input pixels
    around it (non-negative weights summing to 1), computed by torch within `tolerance` of that combination:
    `tolerance` = 2^-18 * max|logit| * (max(h, w) + 2) covers float32 rounding of the weights, products and sums and
    of the source coordinate (which moves the value by at most its error times twice the largest logit), with a
    margin of about 5. Per cell of 4 input pixels: a class whose largest corner is below the largest smallest
    corner by more than 2 * tolerance cannot be the argmax of any pixel of the cell; the others are blended here
    (within tolerance of torch's values too). Where the best blend beats the second by more than 2 * tolerance it is
    torch's argmax, strictly. The other pixels (near ties) get their argmax from torch's own resize of the classes
    that came within 2 * tolerance of the best there: every class tied for torch's maximum is among them.
    """
    num_classes, height, width = logits.shape
    largest = float(logits.abs().max()) if logits.numel() else 0.0
    if not math.isfinite(largest) or largest > 1e30:
        return None
    margin = 2 * 2.0**-18 * largest * (max(height, width) + 2)
    rows = _source_coordinates(height, size[0])
    cols = _source_coordinates(width, size[1])
    device = logits.device
    row_weight, col_weight = torch.from_numpy(rows[2]).to(device), torch.from_numpy(cols[2]).to(device)
    prediction = torch.empty(size, dtype=torch.int64, device=device)
    near = torch.zeros(size, dtype=torch.bool, device=device)
    near_classes = torch.zeros(num_classes, dtype=torch.bool, device=device)
    col_runs = _runs(cols[0], cols[1])
    # The cells' tensors are small (a few hundred classes x a few hundred pixels): with several threads each op
    # spends more on waking and joining them than on its work (7 ms against 0.03 ms on a busy 2-core machine). As
    # `imagenets_hf.runtime.one_thread`, written out here because this file stands alone.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row_start, row_stop, top_row, bottom_row in _runs(rows[0], rows[1]):
            top, bottom = logits[:, top_row], logits[:, bottom_row]
            wy = row_weight[row_start:row_stop, None]
            for col_start, col_stop, left, right in col_runs:
                corners = torch.stack((top[:, left], top[:, right], bottom[:, left], bottom[:, right]))
                low, high = corners.amin(0), corners.amax(0)
                candidates = (high >= low.max() - margin).nonzero()[:, 0]
                if len(candidates) == 1:
                    prediction[row_start:row_stop, col_start:col_stop] = candidates[0]
                    continue
                wx = col_weight[col_start:col_stop]
                corners = corners[:, candidates, None]
                upper = torch.lerp(corners[0], corners[1], wx)  # K x cols
                lower = torch.lerp(corners[2], corners[3], wx)
                blend = torch.lerp(upper[:, None], lower[:, None], wy)  # K x rows x cols
                best, index = blend.max(dim=0)
                prediction[row_start:row_stop, col_start:col_stop] = candidates[index]
                blend.scatter_(0, index[None], -math.inf)
                tied = best - blend.amax(dim=0) <= margin
                if tied.any():
                    near[row_start:row_stop, col_start:col_stop] |= tied
                    close = (blend[:, tied] >= best[tied] - margin).any(dim=1)
                    near_classes[candidates[close]] = True
                    near_classes[candidates[index[tied]]] = True
    finally:
        torch.set_num_threads(threads)
    if near.any():
        pixels = near.view(-1).nonzero()[:, 0]
        exact = _chunked_argmax(logits, size, chunk_elements, near_classes.nonzero()[:, 0], pixels)
        prediction.view(-1)[pixels] = exact
    return prediction


def _to_rgb_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3:
        raise ValueError(f"an image must be HxW, HxWxC or CxHxW, got shape {array.shape}")
    return to_pil_image(array).convert("RGB")


def _to_label_array(mask) -> np.ndarray:
    """Class ids (int64, HxW) of a segmentation map: a copy of `imagenets_hf.data.masks.mask_to_ids`, the project's
    one mask rule (this file must stand alone; tests/test_data_mask_decoding.py holds the copies equal). RGB / RGBA
    (opaque) images and HxWx3 / HxWx4 arrays: id = R + 256 * G; L / I / I;16 images and HxW integer arrays: ids as
    they are; palette images, float arrays and anything else: ValueError."""
    if hasattr(mask, "getbands"):  # a PIL image, recognised without importing PIL (the copies stand alone)
        if mask.mode == "P":
            raise ValueError(
                "palette image (PIL mode 'P'): its values are palette indices, not class ids; save the mask as RGB "
                "(ImageNet-S encoding, id = R + 256 * G) or as 8/16-bit single-channel ids"
            )
        if mask.mode not in ("RGB", "RGBA", "L", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise ValueError(
                f"PIL mode {mask.mode!r} is not a mask: expected RGB or RGBA (id = R + 256 * G) or single-channel "
                "ids (L, I, I;16)"
            )
        array = np.asarray(mask)
    elif hasattr(mask, "detach"):  # a torch tensor, recognised without importing torch
        array = mask.detach().cpu().numpy()
    else:
        array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[0] == 1:
        if array.shape[-1] in (3, 4):  # 1xHxW ids of width 3 or 4, or a 1-pixel-high colour mask: no safe guess
            raise ValueError(f"ambiguous mask shape {array.shape}: pass HxW ids or HxWx3 RGB")
        array = array[0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        channels = "RGB" if array.shape[-1] == 3 else "RGBA"
        if array.dtype.kind not in "iu":
            raise ValueError(
                f"an HxWx{array.shape[-1]} {channels} mask holds integer channels, got dtype {array.dtype}"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"an HxWx{array.shape[-1]} {channels} mask holds 8-bit channels (0..255), got values "
                f"{array.min()}..{array.max()}"
            )
        if channels == "RGBA" and (array[..., 3] != 255).any():
            raise ValueError(
                f"RGBA mask with {int((array[..., 3] != 255).sum())} transparent pixel(s) (alpha < 255): they have "
                "no class id; save the mask as RGB (id = R + 256 * G)"
            )
        # Widen before multiplying: uint8 * 256 overflows (NumPy 2 raises).
        return array[..., 0].astype(np.int64) + 256 * array[..., 1].astype(np.int64)
    if array.ndim != 2:
        raise ValueError(f"a mask is HxW class ids, HxWx3 RGB or HxWx4 RGBA; got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"class ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _as_list(inputs) -> list:
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4:
        return list(inputs)
    return [inputs]


class ViTFCNImageProcessor(BaseImageProcessor):
    r"""ImageNet-S evaluation preprocessing and semantic-segmentation post-processing.

    Args:
        do_resize (`bool`): resize keeping the ratio (short side `short_side`, long side at most `max_long_side`).
        short_side (`int`), max_long_side (`int`): the resize targets (256 and 1024 in the official protocol).
        resample (`int`): PIL resampling filter for images (bilinear); masks always use nearest.
        do_rescale (`bool`), rescale_factor (`float`): multiply pixel values (1/255).
        do_normalize (`bool`), image_mean, image_std: normalisation (ImageNet mean/std).
        max_pixels (`int`): images with more pixels than this are handled at long side `large_image_long_side`.
        large_image_long_side (`int`): see `max_pixels` (1000).
        do_pad (`bool`): pad a batch of differently sized images bottom/right (images with 0, labels with
            `ignore_index`) so they stack; off by default because padding changes a ViT's output, so the official
            protocol processes one image at a time.
        ignore_index (`int`): label used for padded mask pixels.

    Example:

    ```python
    >>> from PIL import Image
    >>> processor = ViTFCNImageProcessor()
    >>> processor(Image.new("RGB", (640, 480)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 256, 341])
    ```
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        short_side: int = 256,
        max_long_side: int = 1024,
        resample: int = PILImageResampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        max_pixels: int = 1000 * 1000,
        large_image_long_side: int = 1000,
        do_pad: bool = False,
        ignore_index: int = 1000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.short_side = int(short_side)
        self.max_long_side = int(max_long_side)
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = do_normalize
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.max_pixels = int(max_pixels)
        self.large_image_long_side = int(large_image_long_side)
        self.do_pad = do_pad
        self.ignore_index = int(ignore_index)

    # -- sizes -------------------------------------------------------------------------------------------------

    def is_large(self, height: int, width: int) -> bool:
        """Whether an image of this size is handled at long side `large_image_long_side` (official protocol)."""
        return height * width > self.max_pixels

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """Size at which a prediction is made for an original image of (height, width): the original size, or the
        long-side-`large_image_long_side` size for large images."""
        if self.is_large(height, width):
            return long_side_size(height, width, self.large_image_long_side)
        return height, width

    def model_input_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of the processed image fed to the model for an original image of (height, width)."""
        height, width = self.working_size(height, width)
        if not self.do_resize:
            return height, width
        return rescale_size(height, width, self.short_side, self.max_long_side)

    # -- preprocessing -----------------------------------------------------------------------------------------

    def _process_image(self, image: Image.Image) -> np.ndarray:
        working = self.working_size(image.height, image.width)
        if working != (image.height, image.width):
            image = image.resize((working[1], working[0]), resample=self.resample)
        size = self.model_input_size(image.height, image.width)
        if size != (image.height, image.width):
            image = image.resize((size[1], size[0]), resample=self.resample)
        array = np.asarray(image, dtype=np.float32)
        if self.do_rescale:
            array = array * self.rescale_factor
        if self.do_normalize:
            array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def _process_segmentation_map(self, ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if tuple(ids.shape) == tuple(size):
            return ids
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= 2**31:
            raise ValueError(f"segmentation map ids must lie in [0, 2**31), got [{ids.min()}, {ids.max()}]")
        resized = Image.fromarray(ids.astype(np.int32), mode="I").resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(resized).astype(np.int64)

    def _pad(self, arrays: list[np.ndarray], value: float) -> list[np.ndarray]:
        height = max(a.shape[-2] for a in arrays)
        width = max(a.shape[-1] for a in arrays)
        padded = []
        for a in arrays:
            pad = [(0, 0)] * (a.ndim - 2) + [(0, height - a.shape[-2]), (0, width - a.shape[-1])]
            padded.append(np.pad(a, pad, constant_values=value))
        return padded

    def preprocess(
        self,
        images,
        segmentation_maps=None,
        return_tensors: str | None = None,
        do_pad: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Preprocess images (and optionally their segmentation maps, resized nearest to the same size).

        Returns a `BatchFeature` with `pixel_values` (and `labels`, int64 class ids). Images of different processed
        sizes are only stacked with `do_pad=True`.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments to ViTFCNImageProcessor.preprocess: {sorted(kwargs)}")
        do_pad = self.do_pad if do_pad is None else do_pad
        images = [_to_rgb_pil(image) for image in _as_list(images)]
        pixel_values = [self._process_image(image) for image in images]
        labels = None
        if segmentation_maps is not None:
            maps = _as_list(segmentation_maps)
            if len(maps) != len(images):
                raise ValueError(f"got {len(images)} images but {len(maps)} segmentation maps")
            labels = []
            for i, (image, seg) in enumerate(zip(images, maps)):
                ids = _to_label_array(seg)
                if tuple(ids.shape) != (image.height, image.width):
                    raise ValueError(
                        f"segmentation map {i} has size {tuple(ids.shape)} but its image is {(image.height, image.width)}"
                    )
                labels.append(self._process_segmentation_map(ids, pixel_values[i].shape[-2:]))

        sizes = {tuple(p.shape[-2:]) for p in pixel_values}
        if return_tensors is not None and len(sizes) > 1:
            if not do_pad:
                raise ValueError(
                    f"the processed images have different sizes {sorted(sizes)}: process them one at a time "
                    "(the official protocol) or pass do_pad=True to pad them bottom/right"
                )
            pixel_values = self._pad(pixel_values, 0.0)
            if labels is not None:
                labels = self._pad(labels, self.ignore_index)
        data = {"pixel_values": pixel_values}
        if labels is not None:
            data["labels"] = labels
        if return_tensors is not None:
            data = {key: np.stack(value) for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, segmentation_maps=segmentation_maps, **kwargs)

    # -- post-processing ---------------------------------------------------------------------------------------

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[torch.Tensor]:
        """Class-id maps (int64 tensors) from model outputs.

        With `target_sizes` (the original (height, width) of each image), the logits are resized bilinearly
        (align_corners False) to each size and argmaxed (`resized_argmax`: the same map as resizing all classes at
        once, without holding them, so that memory stays bounded at any number of classes); for images with more
        than `max_pixels` pixels the logits go to the long-side-`large_image_long_side` size and the argmax is
        upsampled nearest to the original size.
        Without `target_sizes`, the argmax at the logits' resolution.
        """
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if len(target_sizes) != len(logits):
            raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {len(logits)} logits")
        results = []
        for image_logits, target_size in zip(logits, target_sizes):
            height, width = (int(v) for v in target_size)
            working = self.working_size(height, width)
            prediction = resized_argmax(image_logits, working)
            if working != (height, width):
                prediction = F.interpolate(prediction[None, None].float(), size=(height, width), mode="nearest")
                prediction = prediction[0, 0].long()
            results.append(prediction)
        return results


__all__ = ["ViTFCNImageProcessor", "rescale_size", "long_side_size", "resized_argmax"]
