"""One mask decoding rule: `imagenets_hf.data.masks.mask_to_ids` (its home) and the copies the image processor and the
evaluate module carry (they must stand alone) give identical ids or the identical refusal on every input kind."""

from __future__ import annotations

import ast
import inspect
import textwrap

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image

from imagenets_hf.data import masks
from imagenets_hf.evaluation import METRIC_PATH
from imagenets_hf.evaluation.imagenets_mean_iou import imagenets_mean_iou as metric_module
from imagenets_hf.model import ViTFCNImageProcessor
from imagenets_hf.model import image_processing_vit_fcn as processor_module

# Hand-picked ids: "other", classes, the 8-bit edge (255/256), the last 919 class, "ignore", the largest 16-bit id.
# Width 5: a 1xHxW map of width 3 or 4 would be ambiguous with a 1-pixel-high colour mask (refused, tested below).
IDS = np.array([[0, 1, 255, 256, 65535], [919, 1000, 7, 1023, 512]], dtype=np.int64)
IDS_8BIT = np.array([[0, 1, 255, 3, 9], [200, 17, 7, 128, 64]], dtype=np.int64)
DECODERS = {
    "masks.mask_to_ids": masks.mask_to_ids,
    "image processor": processor_module._to_label_array,
    "evaluate module": metric_module._mask_to_ids,
}


def rgb_of(ids: np.ndarray, blue: int = 0) -> np.ndarray:
    """The ImageNet-S encoding written out by hand: R = id % 256, G = id // 256, B = `blue`."""
    return np.stack([ids % 256, ids // 256, np.full_like(ids, blue)], axis=-1).astype(np.uint8)


def rgba_of(ids: np.ndarray, alpha: np.ndarray | int = 255) -> np.ndarray:
    return np.concatenate([rgb_of(ids), np.broadcast_to(alpha, ids.shape)[..., None].astype(np.uint8)], axis=-1)


def image_of_mode(mode: str, ids: np.ndarray) -> Image.Image:
    """A PIL image of a single-channel mode holding `ids`, built from raw bytes (no conversion that could clip)."""
    dtype = {"L": "u1", "I": "<i4", "I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    return Image.frombytes(mode, (ids.shape[1], ids.shape[0]), ids.astype(dtype).tobytes())


def one_transparent(ids: np.ndarray) -> np.ndarray:
    alpha = np.full(ids.shape, 255)
    alpha[1, 2] = 0  # one pixel
    return rgba_of(ids, alpha)


# (input kind, input, expected ids, or the fragment the refusal must contain)
ACCEPTED = [
    ("PIL RGB", Image.fromarray(rgb_of(IDS), mode="RGB"), IDS),
    ("PIL RGB, blue not 0 (not read)", Image.fromarray(rgb_of(IDS, blue=9), mode="RGB"), IDS),
    ("PIL RGBA opaque", Image.fromarray(rgba_of(IDS), mode="RGBA"), IDS),
    ("PIL L", image_of_mode("L", IDS_8BIT), IDS_8BIT),
    ("PIL I", image_of_mode("I", IDS), IDS),
    ("PIL I;16", image_of_mode("I;16", IDS), IDS),
    ("PIL I;16L", image_of_mode("I;16L", IDS), IDS),
    ("PIL I;16B", image_of_mode("I;16B", IDS), IDS),
    ("uint8 HxW", IDS_8BIT.astype(np.uint8), IDS_8BIT),
    ("uint16 HxW", IDS.astype(np.uint16), IDS),
    ("int32 HxW", IDS.astype(np.int32), IDS),
    ("int64 HxW", IDS, IDS),
    ("int16 HxW with negative ids (kept: the metrics count them in no class)", -IDS_8BIT.astype(np.int16), -IDS_8BIT),
    ("uint16 HxWx1", IDS.astype(np.uint16)[..., None], IDS),
    ("int64 1xHxW", IDS[None], IDS),
    ("uint8 HxWx3", rgb_of(IDS), IDS),
    ("int64 HxWx3 (widened RGB)", rgb_of(IDS).astype(np.int64), IDS),
    ("uint8 HxWx4 opaque", rgba_of(IDS), IDS),
    ("nested list HxW", IDS.tolist(), IDS),
    ("torch int64 HxW", torch.from_numpy(IDS), IDS),
    ("torch uint8 HxWx3", torch.from_numpy(rgb_of(IDS)), IDS),
    ("torch int64 1xHxW", torch.from_numpy(IDS)[None], IDS),
]
REFUSED = [
    ("PIL P", Image.fromarray(IDS_8BIT.astype(np.uint8), mode="L").convert("P"), "palette image (PIL mode 'P')"),
    ("PIL RGBA transparent", Image.fromarray(one_transparent(IDS), mode="RGBA"), "1 transparent pixel(s)"),
    ("int64 1xHx3", IDS[None, :, :3], "ambiguous mask shape (1, 2, 3)"),
    ("uint8 1xWx4", rgba_of(IDS)[:1], "ambiguous mask shape (1, 5, 4)"),
    ("PIL 1", Image.new("1", (4, 2)), "PIL mode '1' is not a mask"),
    ("PIL LA", Image.new("LA", (4, 2)), "PIL mode 'LA' is not a mask"),
    ("PIL F", Image.new("F", (4, 2)), "PIL mode 'F' is not a mask"),
    ("PIL CMYK", Image.new("CMYK", (4, 2)), "PIL mode 'CMYK' is not a mask"),
    ("PIL YCbCr", Image.new("YCbCr", (4, 2)), "PIL mode 'YCbCr' is not a mask"),
    ("uint8 HxWx4 transparent", one_transparent(IDS), "1 transparent pixel(s)"),
    ("uint16 HxWx3 beyond 8 bits", np.full((2, 4, 3), 300, np.uint16), "8-bit channels (0..255), got values 300..300"),
    ("float32 HxWx3", rgb_of(IDS).astype(np.float32), "holds integer channels, got dtype float32"),
    ("float32 HxW", IDS.astype(np.float32), "class ids must be integers, got dtype float32"),
    ("bool HxW", IDS > 300, "class ids must be integers, got dtype bool"),
    ("uint8 HxWx2", np.zeros((2, 4, 2), np.uint8), "got shape (2, 4, 2)"),
    ("1-D", np.zeros(8, np.int64), "got shape (8,)"),
    ("BxHxW stack", np.zeros((2, 2, 5), np.int64), "got shape (2, 2, 5)"),
    ("4-D", np.zeros((1, 2, 4, 3), np.uint8), "got shape (1, 2, 4, 3)"),
    ("torch float HxW", torch.zeros(2, 4), "class ids must be integers, got dtype float32"),
    ("torch bool HxW", torch.zeros(2, 4, dtype=torch.bool), "class ids must be integers, got dtype bool"),
]


def outcome(decode, mask):
    """("ids", int64 array) or ("refused", exception type, message)."""
    try:
        ids = decode(mask)
    except Exception as err:  # compare whatever is raised, whatever its type
        return ("refused", type(err), str(err))
    return ("ids", ids)


@pytest.mark.parametrize("kind, mask, expected", ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_every_decoder_gives_the_hand_computed_ids(kind, mask, expected):
    for name, decode in DECODERS.items():
        result = outcome(decode, mask)
        assert result[0] == "ids", f"{name} refused {kind}: {result}"
        assert result[1].dtype == np.int64 and result[1].shape == expected.shape, name
        assert np.array_equal(result[1], expected), name  # integers: exact


@pytest.mark.parametrize("kind, mask, fragment", REFUSED, ids=[case[0] for case in REFUSED])
def test_every_decoder_gives_the_same_refusal(kind, mask, fragment):
    results = {name: outcome(decode, mask) for name, decode in DECODERS.items()}
    home = results["masks.mask_to_ids"]
    assert home[0] == "refused" and home[1] is ValueError and fragment in home[2], home
    for name, result in results.items():
        assert result == home, name


def _body_without_docstring(function) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    body = (
        tree.body[1:]
        if isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)
        else tree.body
    )
    return ast.dump(ast.Module(body=[*body], type_ignores=[])) + ast.dump(tree.args)


def test_the_copies_are_the_same_code():
    # Behaviour on the kinds above could agree by chance; the code itself must be the home's, docstring aside.
    home = _body_without_docstring(masks.mask_to_ids)
    assert _body_without_docstring(processor_module._to_label_array) == home
    assert _body_without_docstring(metric_module._mask_to_ids) == home


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16", "P"])
def test_decode_mask_reads_png_files_by_the_same_rule(tmp_path, mode):
    ids = IDS_8BIT if mode in ("L", "P") else IDS
    image = {
        "RGB": Image.fromarray(rgb_of(ids), mode="RGB"),
        "RGBA": Image.fromarray(rgba_of(ids), mode="RGBA"),
        "L": image_of_mode("L", ids),
        "I;16": image_of_mode("I;16", ids),
        "P": Image.fromarray(ids.astype(np.uint8), mode="L").convert("P"),
    }[mode]
    path = tmp_path / f"{mode.replace(';', '')}.png"
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode  # PNG keeps each of these modes, so the file path meets the same rule
    if mode == "P":
        with pytest.raises(ValueError) as info:
            masks.decode_mask(path)
        assert str(info.value) == f"{path}: {outcome(masks.mask_to_ids, image)[2]}"  # the file is named first
    else:
        assert np.array_equal(masks.decode_mask(path), ids)


def test_public_entry_points_use_the_rule():
    # The processor's labels (no resize: the image already has the processed size) and the evaluate module's
    # inputs go through the copies.
    processor = ViTFCNImageProcessor(short_side=2, max_long_side=5)
    image = Image.new("RGB", (5, 2))
    labels = processor(image, segmentation_maps=Image.fromarray(rgba_of(IDS), mode="RGBA"), return_tensors="np")
    assert np.array_equal(labels["labels"][0], IDS)
    palette = Image.fromarray(IDS_8BIT.astype(np.uint8), mode="L").convert("P")
    with pytest.raises(ValueError, match=r"palette image \(PIL mode 'P'\)"):
        processor(image, segmentation_maps=palette)

    metric = evaluate.load(METRIC_PATH)
    with pytest.raises(ValueError, match=r"^prediction: palette image \(PIL mode 'P'\)"):
        metric.add(prediction=palette, reference=IDS_8BIT)
    results = metric.compute(
        predictions=[image_of_mode("I;16", IDS)], references=[Image.fromarray(rgb_of(IDS), mode="RGB")], num_labels=1024
    )
    # Every pixel right, 1000 ignored, 65535 beyond num_labels: the 8 ids present score TP / (TP + 1e-10) * 100,
    # which is 100 to 1e-10 relative.
    present = [0, 1, 7, 255, 256, 512, 919, 1023]
    np.testing.assert_allclose(results["per_class_iou"][present], 100.0, rtol=1e-9)
    assert results["num_images"] == 1
