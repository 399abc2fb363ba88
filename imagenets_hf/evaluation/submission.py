"""ImageNet-S test-server submissions: write the zip and check it.

The zip's root holds `<wnid>/ILSVRC2012_val_X.png` for every test image (RGB, original size, id = R + 256 * G,
ids 0..N) and a `method.txt` with the lines `Method name:`, `Training data:`, `Training scheme:`, `Networks:`,
`Paper/Project link:`, `Method description:`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from imagenets_hf.data.masks import decode_mask
from imagenets_hf.evaluation.folders import list_images, prediction_path

METHOD_FILE_NAME = "method.txt"
METHOD_FIELDS = (
    "Method name",
    "Training data",
    "Training scheme",
    "Networks",
    "Paper/Project link",
    "Method description",
)
# The template's mark for a value the user must write (case-sensitive, as a word).
PLACEHOLDER = "TODO"
DEFAULT_METHOD_VALUES = {
    "Method name": "imagenets-hf ViT-FCN",
    "Training data": "ImageNet-S train-semi (10 labelled images per class)",
    "Training scheme": "semi-supervised fine-tuning of a self-supervised pre-trained ViT",
    "Networks": "ViT encoder + FCN head",
    "Paper/Project link": PLACEHOLDER,
    "Method description": f"{PLACEHOLDER}: describe the method",
}


def default_method_text() -> str:
    """A method.txt template with every required field (edit the values before submitting)."""
    return "\n".join(f"{field}: {DEFAULT_METHOD_VALUES[field]}" for field in METHOD_FIELDS) + "\n"


def parse_method_text(text: str) -> dict[str, str]:
    """Field -> value of a method.txt; a field's value runs until the next field line."""
    values: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        field = next((f for f in METHOD_FIELDS if line.strip().lower().startswith(f.lower() + ":")), None)
        if field is not None:
            current = field
            values[field] = line.strip()[len(field) + 1 :].strip()
        elif current is not None and line.strip():
            values[current] = (values[current] + " " + line.strip()).strip()
    return values


def method_problems(text: str) -> list[str]:
    """What a method.txt lacks: missing fields or empty values."""
    values = parse_method_text(text)
    problems = [f"{METHOD_FILE_NAME}: missing line '{field}:'" for field in METHOD_FIELDS if field not in values]
    problems += [f"{METHOD_FILE_NAME}: '{field}:' is empty" for field in METHOD_FIELDS if values.get(field) == ""]
    return problems


def method_placeholder_problems(text: str) -> list[str]:
    """Fields of a method.txt still holding the template's placeholder (a ``TODO``).

    Only placeholders count: the template's other values describe what this project trains and may be kept.
    """
    values = parse_method_text(text)
    return [
        f"{METHOD_FILE_NAME}: '{field}:' still reads the template's placeholder ({values[field]!r}): fill it in"
        for field in METHOD_FIELDS
        if re.search(rf"\b{PLACEHOLDER}\b", values.get(field, ""))
    ]


def make_submission(
    predictions_dir: str | os.PathLike,
    zip_path: str | os.PathLike,
    method_file: str | os.PathLike | None = None,
) -> Path:
    """Zip `<wnid>/<name>.png` predictions (as written by `predict_folder`) with a method.txt at the root.

    Without `method_file` a template is written and a warning says to fill it in; a given file missing a field
    raises, and one still holding a template placeholder warns (the zip is written; `check_submission` fails it).
    """
    predictions_root = Path(predictions_dir)
    masks = sorted(p for p in predictions_root.rglob("*.png") if p.is_file())
    if not masks:
        raise FileNotFoundError(f"{predictions_root}: no .png predictions found")
    if method_file is None:
        warnings.warn(
            f"no method file given: {zip_path} gets a template {METHOD_FILE_NAME}; edit it (or pass --method-file) "
            "before submitting",
            stacklevel=2,
        )
        method_text = default_method_text()
    else:
        method_text = Path(method_file).read_text(encoding="utf-8")
        problems = method_problems(method_text)
        if problems:
            raise ValueError(f"{method_file}: " + "; ".join(problems))
        placeholders = method_placeholder_problems(method_text)
        if placeholders:
            warnings.warn(f"{method_file}: " + "; ".join(placeholders), stacklevel=2)
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for mask in masks:
            # PNGs are already compressed: store them.
            archive.write(mask, mask.relative_to(predictions_root).as_posix(), compress_type=zipfile.ZIP_STORED)
        archive.writestr(METHOD_FILE_NAME, method_text)
    return zip_path


def check_submission(
    zip_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    num_classes: int | None = None,
) -> list[str]:
    """Problems of a submission zip against the images of `split` in `data_dir` (empty list: it passes).

    Checks: one `<wnid>/<name>.png` per image (nothing missing, nothing extra), each an RGB PNG at its image's size
    with B = 0 and ids in 0..N (N = number of classes), and method.txt with every field filled in (none empty,
    none still reading the template's TODO placeholder). A missing zip raises FileNotFoundError, a file that is not a
    zip ValueError.
    """
    from imagenets_hf.data.imagenets import SPLIT_FOLDERS, list_classes, split_name

    split = split_name(split)
    zip_path, images_root = Path(zip_path), Path(data_dir) / SPLIT_FOLDERS[split][0]
    if not zip_path.is_file():  # nothing to check: an error, not a problem of the submission
        raise FileNotFoundError(f"no such submission zip: {zip_path}")
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{zip_path}: not a zip file ({err}); give the zip predict.py --submission wrote") from err
    problems: list[str] = []
    with archive:
        num_classes = len(list_classes(data_dir)) if num_classes is None else num_classes
        names = {name for name in archive.namelist() if not name.endswith("/")}
        if METHOD_FILE_NAME not in names:
            problems.append(f"{METHOD_FILE_NAME}: missing at the zip's root")
        else:
            method_text = archive.read(METHOD_FILE_NAME).decode("utf-8", errors="replace")
            problems += method_problems(method_text) + method_placeholder_problems(method_text)
        expected = {prediction_path(relative): relative for relative in list_images(images_root)}
        problems += [
            f"{name}: missing prediction for {split}/{expected[name]}" for name in sorted(set(expected) - names)
        ]
        extra = sorted(names - set(expected) - {METHOD_FILE_NAME})
        problems += [f"{name}: unexpected file (no such {split} image)" for name in extra]
        for name in sorted(set(expected) & names):
            problems += _mask_problems(archive, name, images_root / expected[name], num_classes)
    return problems


def _mask_problems(archive: zipfile.ZipFile, name: str, image_path: Path, num_classes: int) -> list[str]:
    try:
        with Image.open(io.BytesIO(archive.read(name))) as mask:
            mask.load()
            mode, size = mask.mode, mask.size
            array = np.asarray(mask)
    except Exception as err:  # PIL raises several types for broken files
        return [f"{name}: cannot decode PNG ({err})"]
    problems = []
    if mode != "RGB":
        problems.append(f"{name}: mode {mode}, expected an RGB PNG (id = R + 256 * G)")
    with Image.open(image_path) as image:
        image_size = image.size
    if size != image_size:
        problems.append(f"{name}: size {size[0]}x{size[1]}, but the image is {image_size[0]}x{image_size[1]}")
    if mode == "RGB":
        if array[..., 2].any():
            problems.append(f"{name}: blue channel is not 0")
        ids = decode_mask(array)
        if ids.max(initial=0) > num_classes:
            bad = np.unique(ids[ids > num_classes])
            problems.append(f"{name}: ids out of range 0..{num_classes}: {bad[:10].tolist()}")
    return problems
