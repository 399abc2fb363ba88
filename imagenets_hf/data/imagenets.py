"""The ImageNet-S `datasets` builder over a prepared folder, and `load_imagenets`, the one call to get a split.

A prepared folder has the official layout (see the preparation script and IMAGENETS.md)::

    <root>/train/<wnid>/<name>.JPEG                     unlabelled (split "train", streamed by default)
    <root>/train-semi/<wnid>/<name>.JPEG                split "train_semi"
    <root>/train-semi-segmentation/<wnid>/<name>.png
    <root>/validation/<wnid>/<name>.JPEG                split "validation"
    <root>/validation-segmentation/<wnid>/<name>.png
    <root>/test/<wnid>/<name>.JPEG                      split "test" (no masks)

Rows: ``image`` (the original file bytes), ``annotation`` (class ids as a 16-bit single-channel PNG, None without a
mask), ``image_id`` ("wnid/stem") and ``label`` (the image's class from its folder; 0 is "other").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from imagenets_hf.data.checks import ImageNetSDataError, annotation_png_bytes, check_image_bytes, read_mask_ids
from imagenets_hf.data.masks import OTHER_NAME, SUBSET_NUM_CLASSES, SUBSETS
from imagenets_hf.data.mini import MINI_NUM_CLASSES, SYNSET_FILE_NAME

logger = logging.getLogger(__name__)

# split name -> (image folder, mask folder or None)
SPLIT_FOLDERS: dict[str, tuple[str, str | None]] = {
    "train_semi": ("train-semi", "train-semi-segmentation"),
    "validation": ("validation", "validation-segmentation"),
    "test": ("test", None),
    "train": ("train", None),
}
SPLITS = tuple(SPLIT_FOLDERS)
# Materialised together in one Arrow cache by default; "train" (1.2M images on 919) only when asked for.
DEFAULT_SPLITS = ("train_semi", "validation", "test")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
MASK_EXTENSION = ".png"
WNID_PATTERN = re.compile(r"n\d{8}")
SUBSET_FOLDER_PATTERN = re.compile(r"ImageNetS(\d+)")
# Config names of folders that are not one of the official subsets: "mini" for the embedded mini dataset's class
# count, "custom" for any other count.
MINI_CONFIG_NAME = "mini"
CUSTOM_CONFIG_NAME = "custom"
CONFIG_NAMES = (*SUBSETS, MINI_CONFIG_NAME, CUSTOM_CONFIG_NAME)
MAX_PROBLEMS_SHOWN = 20
EXAMPLES_PER_SHARD = 1000
ROWS_PER_THREAD = 16  # rows each thread reads ahead while the Arrow cache is built

_VERSION = datasets.Version("1.0.0")


def split_name(name: str) -> str:
    """The split called `name`: "train_semi", "validation", "test" or "train"; the folder's spelling ("train-semi")
    is taken too (the scripts document the underscore one)."""
    split = name.replace("-", "_")
    if split not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
    return split


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_folder_names(folder: Path) -> list[str]:
    """Class folder names of one split folder; anything else in it means this is not an ImageNet-S folder."""
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        if not entry.is_dir() or not WNID_PATTERN.fullmatch(entry.name):
            raise ImageNetSDataError(
                f"{entry.path}: not an ImageNet-S folder: expected only class folders named like WordNet ids "
                f"(n########) in {folder}"
            )
        names.append(entry.name)
    return names


def list_classes(data_dir: str | os.PathLike) -> list[str]:
    """Sorted wnids of the class folders of a prepared ImageNet-S folder (train-semi, validation, test and masks).

    The train folder is only used where no other split is present.
    """
    root = Path(data_dir)
    if not root.exists():
        raise ImageNetSDataError(
            f"no such data folder: {root} (a prepared ImageNet-S folder; `python scripts/make_mini_dataset.py --out "
            f"{root}` writes the synthetic mini one)"
        )
    if not root.is_dir():
        raise ImageNetSDataError(f"{root}: a file, not a data folder")
    folders = [root / name for split in DEFAULT_SPLITS for name in SPLIT_FOLDERS[split] if name is not None]
    folders = [folder for folder in folders if folder.is_dir()]
    if not folders and (root / SPLIT_FOLDERS["train"][0]).is_dir():
        folders = [root / SPLIT_FOLDERS["train"][0]]
    if not folders:
        expected = ", ".join(f"{image}/" for image, _ in SPLIT_FOLDERS.values())
        raise ImageNetSDataError(f"{root}: not an ImageNet-S folder: none of {expected} is there")
    wnids: set[str] = set()
    for folder in folders:
        wnids.update(_class_folder_names(folder))
    if not wnids:
        raise ImageNetSDataError(
            f"{root}: not an ImageNet-S folder: no class folders in {', '.join(map(str, folders))}"
        )
    return sorted(wnids)


def detect_subset(data_dir: str | os.PathLike) -> str:
    """Config name of a prepared folder.

    The rule: a folder named ``ImageNetS{N}`` (N in 50/300/919) is subset N; otherwise a folder with 50, 300 or 919
    class folders is that subset; otherwise "mini" with 10 classes (the embedded mini dataset) and "custom" with any
    other count. An official subset whose class count is wrong raises.
    """
    root = Path(data_dir).resolve()
    num_classes = len(list_classes(root))
    match = SUBSET_FOLDER_PATTERN.fullmatch(root.name)
    if match and match.group(1) in SUBSETS:
        subset = match.group(1)
    elif str(num_classes) in SUBSETS:
        subset = str(num_classes)
    else:
        return MINI_CONFIG_NAME if num_classes == MINI_NUM_CLASSES else CUSTOM_CONFIG_NAME
    _check_class_count(root, subset, num_classes)
    return subset


def _check_class_count(root: Path, subset: str, num_classes: int) -> None:
    if subset in SUBSET_NUM_CLASSES and num_classes != SUBSET_NUM_CLASSES[subset]:
        raise ImageNetSDataError(
            f"{root}: subset {subset} has {SUBSET_NUM_CLASSES[subset]} classes but the folder has {num_classes} "
            f"class folders"
        )


def read_synset_words(path: str | os.PathLike) -> dict[str, str]:
    """Read an ImageNet synset-words file (``LOC_synset_mapping.txt``: "wnid name, other name" a line)."""
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not WNID_PATTERN.fullmatch(parts[0]):
                raise ImageNetSDataError(
                    f"{os.fspath(path)}:{line_number}: expected 'wnid name, other name', got {line!r}"
                )
            names[parts[0]] = parts[1].strip()
    return names


def default_synset_words(data_dir: str | os.PathLike) -> Path | None:
    """``<data_dir>/LOC_synset_mapping.txt`` when that file is there, else None: the synset-words file that training,
    evaluation and the export use to name the classes when none is given (the mini dataset writes one)."""
    path = Path(data_dir) / SYNSET_FILE_NAME
    return path if path.is_file() else None


def class_names(data_dir: str | os.PathLike, synset_words: str | os.PathLike | None = None) -> list[str]:
    """Label names: "other" then the classes in sorted-wnid order (official class ids 0..N).

    With ``synset_words`` each class takes the first name of its line in that file ("tench" from "n01440764 tench,
    Tinca tinca"); a name shared by two classes (ImageNet has two "crane" synsets) gets its wnid appended, as in
    "crane (n02012849)". Without it, the wnids.
    """
    wnids = list_classes(data_dir)
    if synset_words is None:
        return [OTHER_NAME, *wnids]
    words = read_synset_words(synset_words)
    missing = [wnid for wnid in wnids if wnid not in words]
    if missing:
        raise ImageNetSDataError(
            f"{os.fspath(synset_words)}: no name for {len(missing)} class(es) of {os.fspath(data_dir)}: "
            f"{', '.join(missing[:10])}"
        )
    names = [words[wnid].split(",")[0].strip() for wnid in wnids]
    counts = {name: names.count(name) for name in names}
    names = [f"{name} ({wnid})" if counts[name] > 1 else name for name, wnid in zip(names, wnids)]
    return [OTHER_NAME, *names]


def present_splits(data_dir: str | os.PathLike) -> list[str]:
    """Splits whose image folder exists."""
    root = Path(data_dir)
    return [split for split in SPLITS if (root / SPLIT_FOLDERS[split][0]).is_dir()]


def folder_fingerprint(
    data_dir: str | os.PathLike, splits: Sequence[str], synset_words: str | os.PathLike | None = None
) -> str:
    """Hash of the folder path and of every file's relative path, size and modification time in ``splits``.

    Keys the Arrow cache so that two folders, or a folder whose files changed, never share it.
    """
    root = Path(data_dir).resolve()
    digest = hashlib.sha256(os.fspath(root).encode())
    for split in splits:
        for folder_name in SPLIT_FOLDERS[split]:
            if folder_name is None or not (root / folder_name).is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root / folder_name, followlinks=True):
                dirnames.sort()
                for name in sorted(filenames):
                    stat = os.stat(os.path.join(dirpath, name))
                    relative = os.path.relpath(os.path.join(dirpath, name), root)
                    digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if synset_words is not None:
        digest.update(Path(synset_words).read_bytes())
    return digest.hexdigest()[:16]


def _split_folder_files(folder: Path, wnids: set[str], extensions: tuple[str, ...], problems: dict[str, str]):
    """(wnid, stem) -> path of the files in one split folder; unexpected entries go to ``problems`` (path -> what)."""
    files: dict[tuple[str, str], Path] = {}
    for wnid in _class_folder_names(folder):
        if wnid not in wnids:
            problems[str(folder / wnid)] = f"class folder {wnid} is not one of this subset's classes"
            continue
        for entry in sorted(os.scandir(folder / wnid), key=lambda e: e.name):
            if _is_hidden(entry.name):
                continue
            path = Path(entry.path)
            if not entry.is_file() or path.suffix.lower() not in extensions:
                problems[str(path)] = f"unexpected entry (expected {'/'.join(extensions)} files)"
                continue
            key = (wnid, path.stem)
            if key in files:
                problems[str(path)] = f"same name as {files[key]}"
                continue
            files[key] = path
    return files


def list_split(
    data_dir: str | os.PathLike, split: str, wnids: Sequence[str], skip_bad: bool = False
) -> list[tuple[str, int, str, str | None]]:
    """The examples of one split as (image_id, label, image path, mask path or None), checking the file pairing.

    Images without their mask, masks without their image and stray files raise, all of them listed in one error
    (or, with ``skip_bad``, are skipped with a warning listing them). A missing or empty split always raises.
    """
    examples, problems = _split_examples(data_dir, split, wnids)
    _report_problems(split, problems, skip_bad)
    _check_not_empty(data_dir, split, examples)
    return examples


def _split_examples(
    data_dir: str | os.PathLike, split: str, wnids: Sequence[str]
) -> tuple[list[tuple[str, int, str, str | None]], list[str]]:
    """`list_split`'s examples, and its problems ("path: what") instead of raising them."""
    root = Path(data_dir)
    image_folder_name, mask_folder_name = SPLIT_FOLDERS[split]
    image_folder = root / image_folder_name
    if not image_folder.is_dir():
        raise ImageNetSDataError(f"{image_folder}: split {split!r} not found (no such folder)")
    known = set(wnids)
    label_of = {wnid: index + 1 for index, wnid in enumerate(wnids)}
    problems: dict[str, str] = {}
    images = _split_folder_files(image_folder, known, IMAGE_EXTENSIONS, problems)
    masks: dict[tuple[str, str], Path] = {}
    if mask_folder_name is not None:
        mask_folder = root / mask_folder_name
        if not mask_folder.is_dir():
            raise ImageNetSDataError(f"{mask_folder}: mask folder of split {split!r} is missing")
        masks = _split_folder_files(mask_folder, known, (MASK_EXTENSION,), problems)
        for key, image_path in images.items():
            if key not in masks:
                problems[str(image_path)] = f"image has no mask (expected {mask_folder / key[0] / key[1]}.png)"
        for key, mask_path in masks.items():
            if key not in images:
                problems[str(mask_path)] = f"mask has no image in {image_folder / key[0]}"
    examples = []
    for (wnid, stem), image_path in sorted(images.items()):
        mask_path = masks.get((wnid, stem)) if mask_folder_name is not None else None
        if mask_folder_name is not None and mask_path is None:
            continue
        if str(image_path) in problems or (mask_path is not None and str(mask_path) in problems):
            continue
        examples.append(
            (f"{wnid}/{stem}", label_of[wnid], str(image_path), None if mask_path is None else str(mask_path))
        )
    return examples, [f"{path}: {what}" for path, what in problems.items()]


def _check_not_empty(data_dir: str | os.PathLike, split: str, examples: list) -> None:
    if not examples:
        image_folder = Path(data_dir) / SPLIT_FOLDERS[split][0]
        raise ImageNetSDataError(f"{image_folder}: split {split!r} is empty (no usable images)")


def _report_problems(split: str, problems: list[str], skip_bad: bool) -> None:
    """Raise one error listing the problems (the first MAX_PROBLEMS_SHOWN), or with ``skip_bad`` log one warning."""
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    if not skip_bad:
        raise ImageNetSDataError(f"{len(problems)} bad file(s) in split {split!r}:\n  {shown}{more}")
    # One notice: a log line (a `warnings.warn` as well printed it twice, the second time with a source line)
    logger.warning(f"skipped {len(problems)} bad file(s) in split {split!r}:\n  {shown}{more}")


@dataclass
class ImageNetSConfig(datasets.BuilderConfig):
    """One config per subset ("50", "300", "919", "mini", "custom").

    Args:
        synset_words: ImageNet synset-words file giving human-readable class names (wnids otherwise).
        splits: splits to generate (default: those of train_semi, validation, test present in the folder).
        skip_bad: skip bad labelled files (reported with a warning) instead of raising.
        fingerprint: folder fingerprint keying the cache (computed by the builder when not given).
        copy_images: store each image's bytes in the Arrow cache (True, the default: the cache stands alone, as a
            Hub dataset would); False stores the image's absolute path only and reads the file when a row is
            decoded, so the cache holds no second copy of the images but needs the folder to stay where it is.
    """

    synset_words: str | None = None
    splits: tuple[str, ...] | None = None
    skip_bad: bool = False
    fingerprint: str | None = None
    copy_images: bool = True


class ImageNetS(datasets.GeneratorBasedBuilder):
    """ImageNet-S semantic segmentation (train_semi, validation, test, train) from a prepared folder.

    Example::

        builder = ImageNetS(data_dir="/data/ImageNetS919")   # config "919" detected from the folder
        builder.download_and_prepare()
        validation = builder.as_dataset("validation")
        train = builder.as_streaming_dataset("train")
    """

    VERSION = _VERSION
    BUILDER_CONFIG_CLASS = ImageNetSConfig
    BUILDER_CONFIGS = [
        ImageNetSConfig(name=name, version=_VERSION, description=f"ImageNet-S subset {name}") for name in CONFIG_NAMES
    ]
    DEFAULT_WRITER_BATCH_SIZE = 100  # rows hold whole images

    def __init__(self, *args, data_dir=None, config_name=None, **kwargs):
        if data_dir is None:
            raise ValueError("ImageNetS needs data_dir, the prepared ImageNet-S folder")
        data_dir = os.fspath(Path(data_dir).resolve())
        if config_name is None:
            config_name = detect_subset(data_dir)
        if kwargs.get("cache_dir") is not None:
            kwargs["cache_dir"] = os.fspath(kwargs["cache_dir"])
        if kwargs.get("synset_words") is not None:
            kwargs["synset_words"] = os.fspath(Path(kwargs["synset_words"]).resolve())
        splits = kwargs.get("splits")
        if splits is not None:
            splits = kwargs["splits"] = tuple(split_name(split) for split in splits)
        if kwargs.get("fingerprint") is None:
            kwargs["fingerprint"] = folder_fingerprint(
                data_dir, splits or _default_splits(data_dir), kwargs.get("synset_words")
            )
        super().__init__(*args, data_dir=data_dir, config_name=config_name, **kwargs)

    # While the Arrow cache is built every file of a split is checked and the bad ones are listed together at the
    # end; a streamed split raises at its first bad file (a stream's end may be an epoch away).
    _check_whole_split = False
    _num_proc: int | None = None

    def download_and_prepare(self, *args, num_proc: int | None = None, **kwargs):
        """As datasets', but a bad file raises our error naming it (datasets wraps generation errors in a message
        without the file), and `num_proc` is the number of threads reading and checking the files (default 1): one
        process writes each split in order, the file reading, decoding and mask re-encoding run on `num_proc`
        cores (datasets' own `num_proc`, a process per shard, would split the bad-file report among processes and
        lose our error on the way back)."""
        self._check_whole_split, self._num_proc = True, num_proc
        try:
            return super().download_and_prepare(*args, **kwargs)
        except DatasetGenerationError as err:
            if isinstance(err.__cause__, ImageNetSDataError):
                raise err.__cause__ from None
            raise
        finally:
            self._check_whole_split, self._num_proc = False, None

    def _info(self) -> datasets.DatasetInfo:
        wnids = list_classes(self.config.data_dir)
        _check_class_count(Path(self.config.data_dir), self.config.name, len(wnids))
        names = class_names(self.config.data_dir, self.config.synset_words)
        return datasets.DatasetInfo(
            description=f"ImageNet-S ({self.config.name}) semantic segmentation from {self.config.data_dir}",
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "annotation": datasets.Image(),
                    "image_id": datasets.Value("string"),
                    "label": datasets.ClassLabel(names=names),
                }
            ),
            homepage="https://github.com/LUSSeg/ImageNet-S",
        )

    def _split_generators(self, dl_manager):
        data_dir, skip_bad = self.config.data_dir, self.config.skip_bad
        splits = self.config.splits or _default_splits(data_dir)
        wnids = list_classes(data_dir)
        generators = []
        for split in splits:
            examples, problems = _split_examples(data_dir, split, wnids)
            if not examples:
                _report_problems(split, problems, skip_bad)
                _check_not_empty(data_dir, split, examples)
            generators.append(
                datasets.SplitGenerator(
                    name=split, gen_kwargs={"split": split, "shards": _shards(examples), "problems": tuple(problems)}
                )
            )
        return generators

    def _generate_examples(
        self, split: str, shards: list[list], problems: tuple[str, ...]
    ) -> Iterator[tuple[str, dict]]:
        """The rows of the split's good files; the problems found when listing it (`problems`) and those found when
        decoding are reported together (see `_check_whole_split`)."""
        num_classes = len(self.info.features["label"].names) - 1
        problems = list(problems)
        stop_at_first = not self.config.skip_bad and not self._check_whole_split
        if stop_at_first:
            _report_problems(split, problems, skip_bad=False)
        examples = [example for shard in shards for example in shard]
        copy_images = self.config.copy_images
        threads = max(1, self._num_proc or 1)
        with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
            read = pool.map if pool is not None else map
            # A window of rows at a time, in order: decoding and checking release the GIL, so threads use the cores
            # while one thread writes the Arrow file; the window bounds the rows held at once.
            for start in range(0, len(examples), threads * ROWS_PER_THREAD):
                window = examples[start : start + threads * ROWS_PER_THREAD]
                rows = read(_read_example, window, repeat(num_classes))
                for (image_id, label, image_path, _), (image_bytes, annotation, error) in zip(window, rows):
                    if error is not None:
                        if stop_at_first:
                            raise error
                        problems.append(str(error))
                        continue
                    # Original bytes: the JPEG is stored as it is, never re-encoded (or only its path).
                    image = {"bytes": image_bytes, "path": f"{image_id.split('/')[0]}/{Path(image_path).name}"}
                    if not copy_images:
                        image = {"bytes": None, "path": image_path}
                    yield image_id, {"image": image, "annotation": annotation, "image_id": image_id, "label": label}
        _report_problems(split, problems, self.config.skip_bad)


def _read_example(
    example: tuple[str, int, str, str | None], num_classes: int
) -> tuple[bytes | None, dict | None, ImageNetSDataError | None]:
    """(image bytes, annotation value, None) of one example after checking its files, or (None, None, the error)."""
    image_id, _, image_path, mask_path = example
    try:
        image_bytes = Path(image_path).read_bytes()
        image_size = check_image_bytes(image_bytes, image_path)
        annotation = None
        if mask_path is not None:
            ids = read_mask_ids(mask_path, num_classes, image_size, image_path)
            annotation = {"bytes": annotation_png_bytes(ids), "path": f"{image_id}.png"}
    except ImageNetSDataError as err:
        return None, None, err
    return image_bytes, annotation, None


def _shards(examples: list) -> list[list]:
    """Fixed-size chunks of a split's examples: a streamed split is divided among DataLoader workers by shard."""
    return [examples[start : start + EXAMPLES_PER_SHARD] for start in range(0, len(examples), EXAMPLES_PER_SHARD)]


def _default_splits(data_dir: str | os.PathLike) -> tuple[str, ...]:
    present = present_splits(data_dir)
    return tuple(split for split in DEFAULT_SPLITS if split in present)


def load_imagenets(
    data_dir: str | os.PathLike,
    split: str = "validation",
    subset: str | None = None,
    streaming: bool | None = None,
    synset_words: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    num_proc: int | None = None,
    copy_images: bool = True,
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a prepared ImageNet-S folder as a `datasets.Dataset` (an `IterableDataset` when streaming).

    Args:
        data_dir: the prepared folder (ImageNetS50/300/919 or any folder with that layout, e.g. the mini dataset).
        split: "train_semi", "validation", "test" or "train".
        subset: config name; detected from the folder when None (see `detect_subset`).
        streaming: stream instead of building an Arrow cache; default True for "train" only.
        synset_words: ImageNet synset-words file (e.g. LOC_synset_mapping.txt) for human-readable class names.
        cache_dir: where the Arrow cache goes (default: the datasets cache). The cache is keyed by the folder's path
            and the path, size and modification time of its files, so a changed folder is rebuilt.
        skip_bad: skip bad files (corrupt images or masks, unpaired files, wrong mask size or ids) with a warning
            that counts and lists them, instead of raising.
        num_proc: threads reading and checking the files while the Arrow cache is built (default: every core this
            process may use); the cache is the same whatever the number.
        copy_images: False stores the images' paths instead of their bytes in the cache (no second copy of the
            images; the folder must then stay where it is). A separate cache from the default one.
    """
    split = split_name(split)
    if streaming is None:
        streaming = split == "train"
    kwargs = {}
    if streaming:
        kwargs["fingerprint"] = "streaming"  # nothing is cached when streaming
    if streaming or split not in DEFAULT_SPLITS:
        kwargs["splits"] = (split,)
    if not copy_images:
        kwargs["copy_images"] = False  # only when set: the default cache's config id stays as it was
    builder = ImageNetS(
        data_dir=data_dir,
        config_name=subset,
        cache_dir=cache_dir,
        synset_words=synset_words,
        skip_bad=skip_bad,
        **kwargs,
    )
    if split not in present_splits(data_dir):
        list_split(data_dir, split, [])  # raises: the split's folder is missing
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare(num_proc=num_proc or available_cores())
    return builder.as_dataset(split=split)


def available_cores() -> int:
    """CPU cores this process may run on (the default number of threads building a cache or decoding a split)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
