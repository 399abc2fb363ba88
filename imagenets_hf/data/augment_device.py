"""The published training augmentation on whole batches, on the training device (torch; CPU too).

The same draws (`augment.draw_params`), windows (`augment.crop_window`, `nearest_index`, `linear_index`), crop test
(`augment.crop_accepted`) and photometric tables (`augment.photometric_tables`) as the per-sample worker path, run
as batched tensor operations on a flat store of decoded images (`PixelStore`): the crop test on the masks of all
samples still undecided at once, one gather for the images (bilinear taps of the resize, combined as `interpolate`
does) and one for the masks, OpenCV's 8-bit HSV conversions in integer and float32 arithmetic (equal to OpenCV's on
every tested input), normalisation. With the same decoded pixels, the labels equal the worker path's and the images
differ from OpenCV's fixed-point bilinear sampling by at most a level or two.

Where each output pixel comes from is planned on the host with NumPy (B x crop numbers); the device only combines
those vectors and gathers. Per-pixel work sticks to what is fast on every device: int32 and float32 add, multiply,
clamp, floor, shifts and `index_select` (on CPU, int64 arithmetic, comparisons, `where` and `masked_fill` are many
times slower), so conditions are 0/1 numbers and selections are sums of products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imagenets_hf.data.augment import (
    MAX_ID,
    AugmentConfig,
    AugmentParams,
    CropWindow,
    crop_accepted,
    crop_window,
    linear_index,
    nearest_index,
    normalisation_tables,
    photometric_tables,
)

# -- the flat pixel store -------------------------------------------------------------------------------------------


@dataclass
class PixelStore:
    """Decoded images and masks in one flat store (see the module docstring): the two stores as tensors (on the
    device that augments), each sample's place and size as NumPy arrays. `subset` picks a batch without copying
    pixels. A JPEG decoded at a reduced scale has a smaller image than its mask: its pixels are then sampled as if
    that image were resized to the drawn size."""

    pixels: torch.Tensor  # (3, P) uint8 RGB planes (a gather a plane is much faster than one of 3-byte rows)
    ids: torch.Tensor  # (P',) int16 class ids
    pixel_offsets: np.ndarray  # (B,) int64: first pixel of each image in `pixels`
    pixel_heights: np.ndarray  # (B,) stored image sizes
    pixel_widths: np.ndarray
    id_offsets: np.ndarray  # (B,) first id of each mask in `ids`
    heights: np.ndarray  # (B,) original (mask) sizes
    widths: np.ndarray

    @classmethod
    def allocate(cls, pixel_sizes, mask_sizes) -> PixelStore:
        """An uninitialised store for images of `pixel_sizes` and masks of `mask_sizes` ((B, 2) heights and widths),
        filled with `put`: decoding straight into it needs no second copy of the pixels."""
        pixel_sizes = np.asarray(pixel_sizes, dtype=np.int64).reshape(-1, 2)
        mask_sizes = np.asarray(mask_sizes, dtype=np.int64).reshape(-1, 2)
        pixel_counts, id_counts = pixel_sizes.prod(1), mask_sizes.prod(1)
        return cls(
            pixels=torch.from_numpy(np.empty((3, int(pixel_counts.sum())), dtype=np.uint8)),
            ids=torch.from_numpy(np.empty(int(id_counts.sum()), dtype=np.int16)),
            pixel_offsets=_starts(pixel_counts),
            pixel_heights=pixel_sizes[:, 0],
            pixel_widths=pixel_sizes[:, 1],
            id_offsets=_starts(id_counts),
            heights=mask_sizes[:, 0],
            widths=mask_sizes[:, 1],
        )

    def put(self, index: int, image: np.ndarray, mask: np.ndarray, bgr: bool = False) -> None:
        """Write sample `index`'s (H, W, 3) uint8 image (RGB; BGR as OpenCV decodes it with `bgr`) and its (H', W')
        ids into their places in a host store (NumPy copies, which release the GIL: threads can fill a store)."""
        pixel_shape = (int(self.pixel_heights[index]), int(self.pixel_widths[index]))
        mask_shape = (int(self.heights[index]), int(self.widths[index]))
        if image.shape != (*pixel_shape, 3) or mask.shape != mask_shape:
            raise ValueError(
                f"sample {index}: image {image.shape} and mask {mask.shape} do not fit their places in the store "
                f"({(*pixel_shape, 3)} and {mask_shape})"
            )
        start, count = int(self.pixel_offsets[index]), pixel_shape[0] * pixel_shape[1]
        planes = image.reshape(-1, 3)
        self.pixels.numpy()[:, start : start + count] = (planes[:, ::-1] if bgr else planes).T
        id_start = int(self.id_offsets[index])
        self.ids.numpy()[id_start : id_start + mask.size] = mask.reshape(-1)

    @classmethod
    def pack(cls, images: list[np.ndarray], masks: list[np.ndarray]) -> PixelStore:
        """Store (H, W, 3) uint8 RGB images and their (H', W') id masks one after another."""
        store = cls.allocate([image.shape[:2] for image in images], [mask.shape for mask in masks])
        for index, (image, mask) in enumerate(zip(images, masks)):
            store.put(index, image, mask)
        return store

    def __len__(self) -> int:
        return len(self.heights)

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() + 2 * self.ids.numel()

    def to(self, device: torch.device | str) -> PixelStore:
        """The store on `device`."""
        return PixelStore(pixels=self.pixels.to(device), ids=self.ids.to(device), **self._sample_arrays())

    def subset(self, index: np.ndarray) -> PixelStore:
        """The samples at `index` (the stores are shared)."""
        arrays = {name: value[index] for name, value in self._sample_arrays().items()}
        return PixelStore(pixels=self.pixels, ids=self.ids, **arrays)

    def compact(self, device: torch.device | str, staging: HostStaging | None = None) -> PixelStore:
        """Only this batch's pixels, in a new store on `device` (for a store kept in host memory): gathered into
        `staging` (reused from batch to batch; pinned when the copy goes to a GPU, which makes it asynchronous) or,
        without one, into new host tensors. On the CPU the result shares the staging buffer (valid until its next
        gather)."""
        pixel_counts = self.pixel_heights * self.pixel_widths
        id_counts = self.heights * self.widths
        staging = staging if staging is not None else HostStaging()
        pixels, ids = staging.take(int(pixel_counts.sum()), int(id_counts.sum()))
        arrays = self._sample_arrays()
        arrays["pixel_offsets"], arrays["id_offsets"] = _starts(pixel_counts), _starts(id_counts)
        # Straight into the staging buffer (`out=`: no intermediate tensor).
        torch.cat([self.pixels[:, o : o + n] for o, n in zip(self.pixel_offsets, pixel_counts)], dim=1, out=pixels)
        torch.cat([self.ids[o : o + n] for o, n in zip(self.id_offsets, id_counts)], out=ids)
        pixels, ids = staging.send(pixels, ids, device)
        return PixelStore(pixels=pixels, ids=ids, **arrays)

    def _sample_arrays(self) -> dict[str, np.ndarray]:
        return {name: value for name, value in vars(self).items() if isinstance(value, np.ndarray)}


def _starts(counts: np.ndarray) -> np.ndarray:
    """Offsets of consecutive blocks of `counts` elements."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


class HostStaging:
    """A reusable host buffer that a store kept in host memory gathers each batch into before its copy to the
    device (`PixelStore.compact`).

    Pinned (page-locked) when `pin` is set: a `non_blocking` copy is asynchronous only from pinned memory (from
    pageable memory the driver stages it synchronously). Only this buffer is pinned, never the whole store: pinning a
    store of several GB through torch's caching host allocator rounds it up to a power of two, and page-locks memory
    that the CPU gather reads anyway. The buffer grows to the largest batch seen, in powers of two (the sizes that
    allocator rounds to). A CUDA event recorded after each copy out of it is waited for before the next gather
    overwrites it (one buffer suffices: `augment_batch` synchronises with the host within each batch anyway, when
    the crop test's class counts come back).
    """

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._pixels = torch.empty(0, dtype=torch.uint8)  # flat, so that every view taken is contiguous
        self._ids = torch.empty(0, dtype=torch.int16)
        self._copied = None  # torch.cuda.Event of the last copy out of the buffers
        self.gathers = 0

    def take(self, pixel_count: int, id_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, pixel_count) uint8 and (id_count,) int16 contiguous views of the buffers, free to overwrite."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        if 3 * pixel_count > self._pixels.numel():
            self._pixels = torch.empty(_power_of_two(3 * pixel_count), dtype=torch.uint8, pin_memory=self.pin)
        if id_count > self._ids.numel():
            self._ids = torch.empty(_power_of_two(id_count), dtype=torch.int16, pin_memory=self.pin)
        self.gathers += 1
        return self._pixels[: 3 * pixel_count].view(3, pixel_count), self._ids[:id_count]

    def send(self, pixels: torch.Tensor, ids: torch.Tensor, device: torch.device | str) -> tuple:
        """`pixels` and `ids` (views from `take`) on `device`; asynchronously from pinned buffers."""
        pixels = pixels.to(device, non_blocking=self.pin)
        ids = ids.to(device, non_blocking=self.pin)
        if self.pin:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(pixels.device))
        return pixels, ids

    @property
    def nbytes(self) -> int:
        return self._pixels.numel() + 2 * self._ids.numel()

    def is_pinned(self) -> bool:
        """Whether both buffers are page-locked (what a GPU check asserts after a batch; needs CUDA)."""
        return self._pixels.is_pinned() and self._ids.is_pinned()


def _power_of_two(count: int) -> int:
    return 1 << max(0, count - 1).bit_length()


def _inside(window: CropWindow, device) -> torch.Tensor | None:
    """(B, crop, crop) float 0/1 mask of real pixels, or None when no sample is padded."""
    if window.inside_rows.all() and window.inside_columns.all():
        return None
    rows = torch.as_tensor(window.inside_rows, dtype=torch.float32, device=device)
    columns = torch.as_tensor(window.inside_columns, dtype=torch.float32, device=device)
    return rows[:, :, None] * columns[:, None, :]


def _flat_index(offsets, widths, rows: np.ndarray, columns: np.ndarray, store: torch.Tensor) -> torch.Tensor:
    """(B * crop * crop,) indices of (rows x columns) in a flat store of row-major images, on the store's device."""
    dtype = torch.int32 if store.numel() < 2**31 else torch.int64
    row_starts = torch.as_tensor(offsets[:, None] + rows * widths[:, None], dtype=dtype, device=store.device)
    columns = torch.as_tensor(columns, dtype=dtype, device=store.device)
    return (row_starts[:, :, None] + columns[:, None, :]).reshape(-1)


def _gather_ids(source: PixelStore, params: AugmentParams, window: CropWindow, fill: int) -> torch.Tensor:
    """(B, crop, crop) int32 ids at the window's pixels, nearest; `fill` outside the crop."""
    rows = nearest_index(window.rows, source.heights, params.resized_height)
    columns = nearest_index(window.columns, source.widths, params.resized_width)
    flat = _flat_index(source.id_offsets, source.widths, rows, columns, source.ids)
    ids = source.ids.index_select(0, flat).reshape(len(params), rows.shape[1], -1).to(torch.int32)
    inside = _inside(window, source.device)
    return ids if inside is None else fill + inside.to(torch.int32) * (ids - fill)


def choose_crops(config: AugmentConfig, params: AugmentParams, source: PixelStore) -> np.ndarray:
    """Index of the crop draw each sample uses: the first of the `max_tries` checked draws whose largest class covers
    less than `cat_max_ratio` of its non-ignored pixels and that holds more than one class, else the last draw
    (mmseg's `RandomCrop`). Only the samples still undecided are checked, one draw at a time."""
    batch = len(params)
    if config.cat_max_ratio >= 1.0:
        return np.zeros(batch, dtype=np.int64)
    chosen = np.full(batch, config.max_tries, dtype=np.int64)
    pending = np.arange(batch)
    bins = MAX_ID + 1
    device = source.device
    for draw in range(config.max_tries):
        if len(pending) == 0:
            break
        sub, sub_source = (
            (params, source) if len(pending) == batch else (params.subset(pending), source.subset(pending))
        )
        window = crop_window(sub, draw, config.crop_size, flip=False)
        keys = _gather_ids(sub_source, sub, window, MAX_ID).reshape(len(pending), -1).clamp_(max=MAX_ID)
        if len(pending) > 1:
            keys = keys + torch.arange(len(pending), device=device, dtype=torch.int32)[:, None] * bins
        keys = keys.reshape(-1) if device.type == "cpu" else keys.reshape(-1).long()  # int64 for every backend
        counts = torch.bincount(keys, minlength=len(pending) * bins).reshape(len(pending), bins)
        accepted = crop_accepted(counts.cpu().numpy(), config)
        chosen[pending[accepted]] = draw
        pending = pending[~accepted]
    return chosen


def sample_crops(config: AugmentConfig, params: AugmentParams, source: PixelStore):
    """The chosen crops, flipped: (3, B, crop, crop) float32 channel-major images with values 0..255 (0 in the
    padding), (B, crop, crop) int32 labels (ignore in the padding) and the (B, crop, crop) float 0/1 mask of real
    pixels (None when nothing is padded). Bilinear taps as `interpolate` takes them, combined as it does: across
    columns, then across rows."""
    window = crop_window(params, params.chosen, config.crop_size, flip=True)
    labels = _gather_ids(source, params, window, config.ignore_index)
    y0, y1, wy = linear_index(window.rows, source.pixel_heights, params.resized_height)
    x0, x1, wx = linear_index(window.columns, source.pixel_widths, params.resized_width)
    device = source.device
    shape = (3, *labels.shape)

    def tap(y: np.ndarray, x: np.ndarray) -> torch.Tensor:
        flat = _flat_index(source.pixel_offsets, source.pixel_widths, y, x, source.pixels)
        return torch.stack([plane.index_select(0, flat) for plane in source.pixels]).reshape(shape).to(torch.float32)

    wy = torch.as_tensor(wy, device=device)[None, :, :, None]
    wx = torch.as_tensor(wx, device=device)[None, :, None, :]
    upper = torch.lerp(tap(y0, x0), tap(y0, x1), wx)
    lower = torch.lerp(tap(y1, x0), tap(y1, x1), wx)
    image = torch.lerp(upper, lower, wy).round_().clamp_(0, 255)  # the resized uint8 image, as float
    inside = _inside(window, device)
    return (image if inside is None else image.mul_(inside[None])), labels, inside


# -- photometric distortion (OpenCV's 8-bit HSV, emulated) ---------------------------------------------------------


def _apply_table(values: torch.Tensor, tables: np.ndarray) -> torch.Tensor:
    """Look up each sample's values (0..255; (..., B, H, W), sample on dim -3) in its row of `tables` (B, 256)."""
    batch = values.shape[-3]
    table = torch.as_tensor(tables, device=values.device).reshape(-1)
    index = values.to(torch.int32)
    if batch > 1:
        index = index + torch.arange(batch, device=values.device, dtype=torch.int32).view(-1, 1, 1) * 256
    return table.index_select(0, index.reshape(-1)).reshape(values.shape)


_HSV_SHIFT = 12
_HALF = 1 << (_HSV_SHIFT - 1)
# OpenCV's RGB2HSV_b tables (cvRound of the exact quotients; Python's round is the same half-to-even).
_SDIV = torch.tensor([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int32)
_HDIV = torch.tensor([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=torch.int32)
# OpenCV's HSV2RGB sector table as picks from (v, p, q, t): red, green and blue of each sixth of the hue circle.
_PICKS = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.int32)


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table.to(index.device).index_select(0, index.reshape(-1)).reshape(index.shape)


def rgb_to_hsv_8bit(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV's `cvtColor(..., COLOR_RGB2HSV)` for 8-bit images (`RGB2HSV_b`: 12-bit fixed-point tables) on
    channel-major (3, ...) values 0..255 (any dtype): int32 hue 0..179, saturation and value 0..255."""
    r, g, b = image.to(torch.int32).unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    s = (diff * _lookup(_SDIV, v) + _HALF) >> _HSV_SHIFT
    red_max = 1 - (v - r).clamp_(max=1)  # 1 where v == r (v >= r)
    green_max = (1 - red_max) * (1 - (v - g).clamp_(max=1))
    blue_max = 1 - red_max - green_max
    h = red_max * (g - b) + green_max * (b - r + 2 * diff) + blue_max * (r - g + 4 * diff)
    h = (h * _lookup(_HDIV, diff) + _HALF) >> _HSV_SHIFT  # arithmetic shift: floor, as in C
    return h - 180 * (h >> 31), s, v  # h >> 31 is -1 for negative hues


def hsv_to_rgb_8bit(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV's `cvtColor(..., COLOR_HSV2RGB)` for 8-bit images on int hue 0..179, saturation and value 0..255:
    channel-major (3, ...) float32 values 0..255.

    As OpenCV's vectorised path (`HSV2RGB_b` with `HSV2RGB_simd`, which converts all but the last few pixels of a
    row), as x86-64 builds run it: float32 arithmetic with 1 - s h and 1 - s (1 - h) fused (one rounding, as the
    compiler's FMA contraction gives; emulated in float64), the result x 255 truncated. Equal to OpenCV 4.8 and 5.0
    on every tested (h, s, v); OpenCV's scalar tail (the last pixels of a row) rounds instead of truncating."""
    hue = h.to(torch.float32) * (6.0 / 180.0)
    sat = s.to(torch.float32) * (1.0 / 255.0)
    val = v.to(torch.float32) * (1.0 / 255.0)
    sector = torch.floor(hue)
    frac = hue - sector
    sat64 = sat.to(torch.float64)
    q = val * (1 - sat64 * frac.to(torch.float64)).to(torch.float32)
    t = val * (1 - sat64 * (1 - frac).to(torch.float64)).to(torch.float32)
    table = torch.stack([val, val * (1 - sat), q, t]).reshape(-1)
    count = val.numel()
    position = torch.arange(count, device=val.device, dtype=torch.int32).reshape(val.shape)
    sector = sector.to(torch.int32)
    channels = [table.index_select(0, (_lookup(picks, sector) * count + position).reshape(-1)) for picks in _PICKS]
    return torch.floor(torch.stack(channels).reshape(3, *val.shape) * 255.0)


def photometric_distortion(image: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """mmseg `PhotoMetricDistortion` on channel-major (3, B, H, W) crops of 8-bit values (any dtype), with the drawn
    parameters; returns uint8."""
    tables = photometric_tables(params)
    image = image.to(torch.uint8)
    if (params.brightness_on | (params.contrast_first & params.contrast_on)).any():
        image = _apply_table(image, tables.before)
    for on, channel, table in ((params.saturation_on, 1, tables.saturation), (params.hue_on, 0, tables.hue)):
        if not on.any():
            continue
        index = np.flatnonzero(on)
        selected = image if len(index) == len(on) else image[:, torch.as_tensor(index, device=image.device)]
        hsv = list(rgb_to_hsv_8bit(selected))
        hsv[channel] = _apply_table(hsv[channel], table[index])
        converted = hsv_to_rgb_8bit(*hsv).to(torch.uint8)
        if len(index) == len(on):
            image = converted
        else:
            image = image.clone()
            image[:, torch.as_tensor(index, device=image.device)] = converted
    if (~params.contrast_first & params.contrast_on).any():
        image = _apply_table(image, tables.after)
    return image


# -- the whole pipeline ---------------------------------------------------------------------------------------------


def augment_batch(config: AugmentConfig, source: PixelStore, params: AugmentParams) -> dict[str, torch.Tensor]:
    """Augment the samples of `source` as `params` (from `draw_params`) says: {"pixel_values": (B, 3, crop, crop)
    float32 normalised, "labels": (B, crop, crop) int64}. Sets `params.chosen`."""
    params.chosen = choose_crops(config, params, source)
    image, labels, inside = sample_crops(config, params, source)
    if config.photometric_distortion:
        image = photometric_distortion(image, params).to(torch.float32)
    tables = torch.as_tensor(normalisation_tables(config), device=image.device)
    index = image.to(torch.int32).reshape(3, -1)
    pixel_values = torch.stack([tables[channel].index_select(0, index[channel]) for channel in range(3)])
    pixel_values = pixel_values.reshape(image.shape)
    if inside is not None:
        pixel_values.mul_(inside[None])  # 0 in the padding (mmseg pads after normalising)
    return {"pixel_values": pixel_values.permute(1, 0, 2, 3).contiguous(), "labels": labels.to(torch.int64)}
