"""Post-processing in channel chunks (`resized_argmax`): the class map of a full bilinear resize + argmax, bit for bit,
with ties, NaN, low-precision logits and batches of several images, and memory bounded by the chunk size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from imagenets_hf.model import image_processing_vit_fcn
from imagenets_hf.model.image_processing_vit_fcn import ViTFCNImageProcessor, resized_argmax


def full_resize_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The reference: all classes resized at once (NCHW, float32), then torch's argmax (first maximum wins)."""
    return F.interpolate(logits[None].float().contiguous(), size=size, mode="bilinear", align_corners=False).argmax(1)[
        0
    ]


@pytest.mark.parametrize(
    "num_classes, low, size, chunk_classes",
    [
        (920, (12, 16), (120, 160), 89),  # the 375x500 step at a third of the size
        (100, (12, 16), (110, 150), 1),  # one class at a time
        (920, (9, 7), (140, 131), 100),  # odd chunk, last chunk short
        (5, (16, 21), (148, 164), 2),
        (1, (4, 4), (130, 130), 1),
        (7, (300, 320), (129, 131), 3),  # downsampling
        (40, (8, 9), (33, 55), 3),  # a small output (height + width <= 256): one call for all classes
    ],
)
@pytest.mark.parametrize("scale", [1.0, 3e-4])  # 3e-4: the spread of a random model's logits
@pytest.mark.parametrize("method", ["chunks", "bounds"])
def test_resized_argmax_equals_the_full_resize(num_classes, low, size, chunk_classes, scale, method):
    torch.manual_seed(num_classes + size[0])
    logits = torch.randn(num_classes, *low) * scale
    result = resized_argmax(logits, size, chunk_elements=chunk_classes * size[0] * size[1], method=method)
    assert result.dtype == torch.int64 and result.shape == size
    assert torch.equal(result, full_resize_argmax(logits, size))


@pytest.mark.parametrize("method", ["chunks", "bounds"])
@pytest.mark.parametrize(
    "low, size",
    [
        ((8, 9), (33, 55)),  # height + width <= 128: torch's other kernel, whose values depend on the channel count
        ((8, 8), (11, 54)),
        ((20, 20), (9, 11)),
        ((8, 9), (64, 65)),  # just above it: the per-channel kernel
        ((12, 16), (90, 120)),
    ],
)
def test_integer_logits_tie_everywhere_and_still_match(low, size, method):
    """Logits in {-2, ..., 2}: blends tie exactly or within a rounding step all over the map, where one kernel's
    rounding against another's decides the argmax (found by a random search over shapes)."""
    torch.manual_seed(6)
    logits = torch.randint(-2, 3, (130, *low)).float()
    for chunk_classes in (1, 3, 5):
        result = resized_argmax(logits, size, chunk_elements=chunk_classes * size[0] * size[1], method=method)
        assert torch.equal(result, full_resize_argmax(logits, size))


@pytest.mark.parametrize("method", ["chunks", "bounds"])
def test_ties_go_to_the_lowest_class_across_chunks(method):
    torch.manual_seed(1)
    logits = torch.randn(64, 6, 8)
    logits[40] = logits[3]  # an exact copy in a later chunk: class 3 must win wherever it is the maximum
    logits[41] = logits[3] + 10  # ... and a later class, tied with its own copy at 63, strictly above everything
    logits[63] = logits[41]
    size = (130, 140)
    result = resized_argmax(logits, size, chunk_elements=16 * 130 * 140, method=method)  # chunks of 16: 41, 63 apart
    assert torch.equal(result, full_resize_argmax(logits, size))
    assert (result == 41).all()  # by hand: 41 is 10 above every other class except its copy 63
    logits[41] = logits[63] = -100
    result = resized_argmax(logits, size, chunk_elements=16 * 130 * 140, method=method)
    assert torch.equal(result, full_resize_argmax(logits, size))
    assert not (result == 40).any() and (result == 3).any()  # 3 and its copy 40 tie: 3 everywhere they lead

    constant = torch.zeros(920, 5, 5)
    assert (resized_argmax(constant, (130, 130), chunk_elements=7 * 130 * 130, method=method) == 0).all()
    offset = torch.randn(920, 5, 5) * 1e-3 + 1000  # large logits close together: the bound is wide, ties many
    assert torch.equal(resized_argmax(offset, (130, 130), method=method), full_resize_argmax(offset, (130, 130)))


@pytest.mark.parametrize("method", ["chunks", "bounds"])  # bounds: not for NaN, falls back to chunks
def test_nan_logits_give_torchs_argmax(method):
    torch.manual_seed(2)
    logits = torch.randn(48, 5, 6)
    logits[30, 2, 3] = float("nan")  # a later chunk: NaN counts as the maximum, as in torch.argmax
    logits[35, 2, 3] = float("nan")
    logits[5, 0, 0] = float("nan")
    size = (120, 144)
    result = resized_argmax(logits, size, chunk_elements=8 * 120 * 144, method=method)
    assert torch.equal(result, full_resize_argmax(logits, size))
    assert (result == 30).any() and (result == 5).any()


@pytest.mark.parametrize("method", ["chunks", "bounds"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_upcast_first(dtype, method):
    torch.manual_seed(3)
    logits = torch.randn(100, 8, 10).to(dtype)  # low precision: many exact ties between classes
    result = resized_argmax(logits, (133, 141), chunk_elements=13 * 133 * 141, method=method)
    assert torch.equal(result, full_resize_argmax(logits.float(), (133, 141)))


def _near_tie_batch() -> torch.Tensor:
    """Two images whose classes come in pairs one float32 step apart: the channels-last and the contiguous bilinear
    kernels round differently, which flips such near ties."""
    torch.manual_seed(4)
    base = torch.randn(2, 16, 6, 8)
    logits = torch.empty(2, 32, 6, 8)
    logits[:, 0::2] = base
    logits[:, 1::2] = torch.nextafter(base, torch.tensor(float("inf")))
    return logits.contiguous(memory_format=torch.channels_last)  # as the model returns a batch of several images


@pytest.mark.parametrize("method", ["chunks", "bounds"])
def test_near_ties_one_float_step_apart(method):
    logits = _near_tie_batch()[0]
    assert torch.equal(resized_argmax(logits, (120, 160), method=method), full_resize_argmax(logits, (120, 160)))


def test_a_channels_last_batch_gives_each_image_its_single_image_map():
    logits = _near_tie_batch()
    processor = ViTFCNImageProcessor()
    outputs = transformers.modeling_outputs.SemanticSegmenterOutput(logits=logits)
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(120, 160), (120, 160)])
    for image_logits, prediction in zip(logits, maps):
        alone = processor.post_process_semantic_segmentation(image_logits[None].contiguous(), target_sizes=[(120, 160)])
        assert torch.equal(prediction, alone[0])
        assert torch.equal(prediction, full_resize_argmax(image_logits, (120, 160)))


def test_post_processing_never_resizes_more_than_a_chunk(monkeypatch):
    torch.manual_seed(5)
    logits = torch.randn(2, 40, 4, 5)
    sizes = [(30, 40), (1200, 1000)]  # the second goes through long side 1000 (1000 x 833)
    monkeypatch.setattr(image_processing_vit_fcn, "RESIZE_CHUNK_ELEMENTS", 2**20)
    largest = []
    interpolate = F.interpolate

    def recording_interpolate(tensor, *args, **kwargs):
        output = interpolate(tensor, *args, **kwargs)
        if kwargs.get("mode") == "bilinear":  # not the nearest upsampling of the large image's class map
            largest.append(output.numel())
        return output

    monkeypatch.setattr(F, "interpolate", recording_interpolate)
    maps = ViTFCNImageProcessor().post_process_semantic_segmentation(logits, target_sizes=sizes)
    monkeypatch.undo()
    assert max(largest) <= 2**20  # chunks of at most 2**20 floats, never 40 x 1000 x 833 of them
    assert torch.equal(maps[0], full_resize_argmax(logits[0], (30, 40)))
    working = full_resize_argmax(logits[1], (1000, 833))
    expected = F.interpolate(working[None, None].float(), size=(1200, 1000), mode="nearest")[0, 0].long()
    assert torch.equal(maps[1], expected)
