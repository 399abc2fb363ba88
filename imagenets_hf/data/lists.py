"""The official ImageNet-S file lists: where they live, how to fetch them, and a strict check of their contents.

Each subset (50, 300, 919) has five lists in the official repository (LUSSeg/ImageNet-S, folder ``data/``):

- ``categories/ImageNetS_categories_im{N}.txt``: one wnid a line, sorted; line i (1-based) is class id i.
- ``names/ImageNetSemi_im{N}_train.txt``: train-semi, ``wnid/file.JPEG wnid/file.png`` a line.
- ``names/ImageNetS_im{N}_validation.txt``: validation, same format.
- ``mapping/ImageNetS_im{N}_mapping_validation.txt`` and ``..._test.txt``:
  ``<ImageNet val wnid>/<file>.JPEG <ImageNet-S wnid>/<file>.JPEG`` a line.

The files have no newline after their last line. Only sha256 digests of the official files are embedded here, never
their contents.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imagenets_hf.data.masks import SUBSETS

OFFICIAL_LISTS_URL = "https://raw.githubusercontent.com/LUSSeg/ImageNet-S/main/data"

# ImageNetS919 merges five ImageNet-1k classes into others (source -> target), as the official
# datapreparation_train.py does; train-semi file names keep the source wnid (e.g. n15075141/n03887697_174.JPEG).
MERGED_CLASSES = {
    "n04356056": "n04355933",
    "n04493381": "n02808440",
    "n03642806": "n03832673",
    "n04008634": "n03773504",
    "n03887697": "n15075141",
}
MERGED_SUBSET = "919"

# The official table (IMAGENETS.md / the ImageNet-S README). "train" is the unlabelled set built from a complete
# ImageNet-1k train folder; the other counts are the line counts of the lists.
EXPECTED_COUNTS = {
    "50": {"categories": 50, "train": 64_431, "train_semi": 500, "validation": 752, "test": 1_682},
    "300": {"categories": 300, "train": 384_862, "train_semi": 3_000, "validation": 4_097, "test": 9_088},
    "919": {"categories": 919, "train": 1_183_322, "train_semi": 9_190, "validation": 12_419, "test": 27_423},
}
TRAIN_SEMI_PER_CLASS = 10

# The kinds of list, in the order they are loaded; the relative path of each under the official data/ folder.
LIST_KINDS = ("categories", "train_semi", "validation", "validation_mapping", "test_mapping")
_LIST_COUNT_KEY = {
    "categories": "categories",
    "train_semi": "train_semi",
    "validation": "validation",
    "validation_mapping": "validation",
    "test_mapping": "test",
}

# sha256 of the official files (computed from the released copies; a change upstream shows up here).
LIST_SHA256 = {
    "categories/ImageNetS_categories_im50.txt": "cba1701f5d94bf0dfbb40f2d529daab362dff552b9bfcea4bcdddbb5fcf762ad",
    "categories/ImageNetS_categories_im300.txt": "9327409a512019ff7be95354f33daf2735852c04fecd0ac261790ce23e4115ca",
    "categories/ImageNetS_categories_im919.txt": "b2ee89cf2d5def583dcea806b8cc99def3d9bb7355ae981fc4c986c6d8dec1da",
    "names/ImageNetSemi_im50_train.txt": "830e654142938b28f8856951bc4b264018cc1c13bf577777bb1359cf37a7f969",
    "names/ImageNetSemi_im300_train.txt": "05f032374bd7a9a81213828940809e09e1eeedc5b43d78a4e41c1d64cb7e492a",
    "names/ImageNetSemi_im919_train.txt": "d8a33edfeda5ea6a302fbf5bfc41735dc6b8f3d525a7dfc09bc5cb39d6ec44db",
    "names/ImageNetS_im50_validation.txt": "683614c6dd07d508e26862b24b3bcffccb919e50ee1ad1d14eb0e809ba8ee979",
    "names/ImageNetS_im300_validation.txt": "36f9cbe4b3be25ccf6875e1627347d084ddd5a19971ff167ede5f8eafa4a3a41",
    "names/ImageNetS_im919_validation.txt": "76b5e5ca74b4270568d8197a6aa7bf1c658859da84966d9308d11263fda9a83c",
    "mapping/ImageNetS_im50_mapping_validation.txt": "d51e06461f83d3742527768a86e7cb2543adad64ba273cd22dfb27d57ea02458",
    "mapping/ImageNetS_im300_mapping_validation.txt": "d887652204f140a57775740f000ea7660f7e34a458d7bcfcf9b3898501351482",
    "mapping/ImageNetS_im919_mapping_validation.txt": "52de0512c75cd04289f1b5be7fe2aad932a6f6e47288947d63e724985c5904b3",
    "mapping/ImageNetS_im50_mapping_test.txt": "27b06a0b774f2a47b7660cee64187bf051ed98b734a0402f4b0c00e04f1dcbb4",
    "mapping/ImageNetS_im300_mapping_test.txt": "94f26c4bc8c1acf4b2756138055c621df01b064094d863289cd3d6c81476cb64",
    "mapping/ImageNetS_im919_mapping_test.txt": "b2e60b72dafe47c71ba3d912d912dce5d4b612aae60ee6dfbdd95d780133dd61",
}

_WNID = r"n\d{8}"
_CATEGORY_LINE = re.compile(rf"^({_WNID})$")
_TRAIN_SEMI_LINE = re.compile(rf"^({_WNID})/((?:{_WNID})_\d+)\.JPEG ({_WNID})/((?:{_WNID})_\d+)\.png$")
_VALIDATION_LINE = re.compile(rf"^({_WNID})/(ILSVRC2012_val_\d{{8}})\.JPEG ({_WNID})/(ILSVRC2012_val_\d{{8}})\.png$")
_MAPPING_LINE = re.compile(rf"^({_WNID})/(ILSVRC2012_val_\d{{8}}\.JPEG) ({_WNID})/(ILSVRC2012_val_\d{{8}}\.JPEG)$")


class ListFileError(ValueError):
    """An official list file is missing, malformed or not the official one."""


def list_relpath(kind: str, subset: str) -> str:
    """Path of a list under the official ``data/`` folder, e.g. ``names/ImageNetSemi_im50_train.txt``."""
    subset = _check_subset(subset)
    paths = {
        "categories": f"categories/ImageNetS_categories_im{subset}.txt",
        "train_semi": f"names/ImageNetSemi_im{subset}_train.txt",
        "validation": f"names/ImageNetS_im{subset}_validation.txt",
        "validation_mapping": f"mapping/ImageNetS_im{subset}_mapping_validation.txt",
        "test_mapping": f"mapping/ImageNetS_im{subset}_mapping_test.txt",
    }
    if kind not in paths:
        raise ValueError(f"unknown list kind {kind!r}; expected one of {', '.join(LIST_KINDS)}")
    return paths[kind]


def default_cache_dir() -> Path:
    """Where downloaded lists are kept: ``$IMAGENETS_HF_CACHE/lists``, else ``~/.cache/imagenets_hf/lists``."""
    root = os.environ.get("IMAGENETS_HF_CACHE")
    return Path(root).expanduser() / "lists" if root else Path.home() / ".cache" / "imagenets_hf" / "lists"


@dataclass(frozen=True)
class ImageNetSLists:
    """The checked lists of one subset. Paths are relative, ``wnid/file``; pairs are (image, mask) or (source, target)."""

    subset: str
    categories: tuple[str, ...]
    train_semi: tuple[tuple[str, str], ...]
    validation: tuple[tuple[str, str], ...]
    validation_mapping: tuple[tuple[str, str], ...]
    test_mapping: tuple[tuple[str, str], ...]
    files: dict[str, Path] = field(default_factory=dict, compare=False)
    # every category of the subset, also when the lists are restricted to a few classes
    all_categories: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.all_categories:
            object.__setattr__(self, "all_categories", tuple(self.categories))

    @property
    def restricted(self) -> bool:
        """True when only some classes of the subset are kept (``restricted_to``)."""
        return len(self.categories) != len(self.all_categories)

    def restricted_to(self, classes) -> ImageNetSLists:
        """The same lists keeping only the given ImageNet-S wnids (every one must be a category of the subset)."""
        keep = set(classes)
        unknown = sorted(keep - set(self.categories))
        if unknown:
            raise ValueError(f"not ImageNetS{self.subset} categories: {', '.join(unknown[:10])}")

        def target_wnid(pair):
            return pair[1].split("/", 1)[0]

        return ImageNetSLists(
            subset=self.subset,
            categories=tuple(c for c in self.categories if c in keep),
            train_semi=tuple(p for p in self.train_semi if target_wnid(p) in keep),
            validation=tuple(p for p in self.validation if target_wnid(p) in keep),
            validation_mapping=tuple(p for p in self.validation_mapping if target_wnid(p) in keep),
            test_mapping=tuple(p for p in self.test_mapping if target_wnid(p) in keep),
            files=dict(self.files),
            all_categories=self.all_categories,
        )


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_subset(subset) -> str:
    subset = str(subset)
    if subset not in SUBSETS:
        raise ValueError(f"unknown ImageNet-S subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    return subset


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("ascii")
    except FileNotFoundError:
        raise ListFileError(f"{path}: list file not found") from None
    except UnicodeDecodeError as err:
        raise ListFileError(f"{path}: not an ASCII text list ({err})") from None
    lines = text.split("\n")
    # The official files end without a newline; tolerate one (a re-saved copy) but no other empty line.
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _parse(path: Path, pattern: re.Pattern, lines: list[str]) -> list[tuple[str, ...]]:
    rows = []
    for number, line in enumerate(lines, start=1):
        match = pattern.match(line)
        if match is None:
            raise ListFileError(f"{path}: line {number} is malformed: {line[:120]!r}")
        rows.append(match.groups())
    return rows


def _check_count(path: Path, found: int, expected: int) -> None:
    if found != expected:
        raise ListFileError(f"{path}: {found} lines, expected {expected}")


def _check_unique(path: Path, values, what: str) -> None:
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise ListFileError(f"{path}: {len(repeated)} repeated {what}, e.g. {repeated[0]}")


def check_list_file(path: str | os.PathLike, kind: str, subset: str, categories=None, verify_checksum: bool = True):
    """Parse and check one list file; return its entries.

    Checks the line count against the official table, the format of every line, that wnids are categories of the
    subset (when ``categories`` is given), that entries are unique and, with ``verify_checksum``, the official sha256.
    Returns a tuple of wnids (categories) or of (left, right) relative paths. Raises ``ListFileError`` naming the
    file and the problem.
    """
    path = Path(path)
    subset = _check_subset(subset)
    relpath = list_relpath(kind, subset)
    lines = _read_lines(path)
    expected = EXPECTED_COUNTS[subset][_LIST_COUNT_KEY[kind]]

    if kind == "categories":
        rows = _parse(path, _CATEGORY_LINE, lines)
        _check_count(path, len(rows), expected)
        wnids = [row[0] for row in rows]
        _check_unique(path, wnids, "wnids")
        if wnids != sorted(wnids):
            raise ListFileError(f"{path}: categories are not sorted (class ids follow the sorted order)")
        entries = tuple(wnids)
    else:
        pattern = {"train_semi": _TRAIN_SEMI_LINE, "validation": _VALIDATION_LINE}.get(kind, _MAPPING_LINE)
        rows = _parse(path, pattern, lines)
        _check_count(path, len(rows), expected)
        known = set(categories) if categories is not None else None
        for number, (left_wnid, left_file, right_wnid, right_file) in enumerate(rows, start=1):
            if kind in ("train_semi", "validation"):
                # image and mask share folder and stem
                if left_wnid != right_wnid or left_file != right_file:
                    raise ListFileError(f"{path}: line {number}: image and mask names differ: {lines[number - 1]!r}")
                if kind == "train_semi":
                    # the file keeps its ImageNet class in its name; only the merged 919 classes may differ
                    source_wnid = left_file.split("_", 1)[0]
                    if source_wnid != left_wnid and not (
                        subset == MERGED_SUBSET and MERGED_CLASSES.get(source_wnid) == left_wnid
                    ):
                        raise ListFileError(f"{path}: line {number}: {left_file} is not an image of class {left_wnid}")
            elif left_file != right_file:
                raise ListFileError(f"{path}: line {number}: source and target files differ: {lines[number - 1]!r}")
            if known is not None and right_wnid not in known:
                raise ListFileError(f"{path}: line {number}: {right_wnid} is not an ImageNetS{subset} category")
        _check_unique(path, [row[3] for row in rows], "files")
        entries = tuple((f"{a}/{b}", f"{c}/{d}") for a, b, c, d in rows)
        if kind in ("train_semi", "validation"):
            entries = tuple((image + ".JPEG", mask + ".png") for image, mask in entries)

    if verify_checksum:
        digest = sha256_file(path)
        if digest != LIST_SHA256[relpath]:
            raise ListFileError(
                f"{path}: sha256 {digest} differs from the official {relpath} ({LIST_SHA256[relpath]}); "
                "pass verify_checksums=False (--no-verify-lists) to accept a modified copy"
            )
    return entries


def _check_consistency(lists: ImageNetSLists) -> None:
    files = lists.files
    per_class = Counter(image.split("/", 1)[0] for image, _ in lists.train_semi)
    wrong = [wnid for wnid in lists.categories if per_class.get(wnid, 0) != TRAIN_SEMI_PER_CLASS]
    if wrong:
        raise ListFileError(
            f"{files.get('train_semi')}: class {wrong[0]} has {per_class.get(wrong[0], 0)} train-semi images, "
            f"expected {TRAIN_SEMI_PER_CLASS}"
        )
    named = {image for image, _ in lists.validation}
    mapped = {target for _, target in lists.validation_mapping}
    if named != mapped:
        example = sorted(named ^ mapped)[0]
        raise ListFileError(
            f"{files.get('validation')} and {files.get('validation_mapping')} disagree, e.g. on {example}"
        )
    overlap = {t.split("/")[1] for _, t in lists.validation_mapping} & {t.split("/")[1] for _, t in lists.test_mapping}
    if overlap:
        raise ListFileError(
            f"{files.get('test_mapping')}: {len(overlap)} images also in the validation list, e.g. {min(overlap)}"
        )


def find_list_file(lists_dir: str | os.PathLike, kind: str, subset: str) -> Path:
    """Locate a list in a user directory: the official sub-folder layout (``names/...``) or flat."""
    lists_dir = Path(lists_dir)
    relpath = list_relpath(kind, subset)
    for candidate in (lists_dir / relpath, lists_dir / Path(relpath).name, lists_dir / "data" / relpath):
        if candidate.is_file():
            return candidate
    raise ListFileError(f"{lists_dir}: no {relpath} (looked in the official sub-folder layout and flat)")


def load_lists_from_dir(lists_dir: str | os.PathLike, subset: str, verify_checksums: bool = True) -> ImageNetSLists:
    """Load and check the five lists of a subset from a directory (sub-folder layout or flat)."""
    subset = _check_subset(subset)
    files = {kind: find_list_file(lists_dir, kind, subset) for kind in LIST_KINDS}
    categories = check_list_file(files["categories"], "categories", subset, verify_checksum=verify_checksums)
    loaded = {
        kind: check_list_file(files[kind], kind, subset, categories=categories, verify_checksum=verify_checksums)
        for kind in LIST_KINDS[1:]
    }
    lists = ImageNetSLists(subset=subset, categories=categories, files=files, **loaded)
    _check_consistency(lists)
    return lists


def download_lists(
    subset: str,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = OFFICIAL_LISTS_URL,
    verify_checksums: bool = True,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Fetch the five lists of a subset into ``cache_dir`` (sub-folder layout) and check each; return ``cache_dir``.

    ``base_url`` is the official ``data/`` folder (any ``https://``, ``http://`` or ``file://`` URL with the same
    layout works). A cached file that passes the checks is kept; a download that fails them is discarded and raises
    ``ListFileError`` (nothing corrupt is left in the cache).
    """
    subset = _check_subset(subset)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    categories = None
    for kind in LIST_KINDS:
        relpath = list_relpath(kind, subset)
        target = cache_dir / relpath
        if target.is_file() and not force:
            try:
                entries = check_list_file(target, kind, subset, categories, verify_checksum=verify_checksums)
            except ListFileError:
                entries = None  # a stale or damaged cached copy: fetch it again
            if entries is not None:
                categories = entries if kind == "categories" else categories
                continue
        url = f"{base_url.rstrip('/')}/{relpath}"
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out)
            try:
                entries = check_list_file(temporary, kind, subset, categories, verify_checksum=verify_checksums)
            except ListFileError as err:
                raise ListFileError(f"downloaded {url} is not the official list: {err}") from None
            os.replace(temporary, target)
        except OSError as err:
            raise ListFileError(
                f"cannot download {url}: {err}; without network, give the lists with --lists DIR (lists_dir=): a copy "
                "of the data/ folder of https://github.com/LUSSeg/ImageNet-S (its categories/, names/ and mapping/ "
                "sub-folders)"
            ) from err
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        if kind == "categories":
            categories = entries
    return cache_dir


def load_lists(
    subset: str,
    lists_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = OFFICIAL_LISTS_URL,
    verify_checksums: bool = True,
) -> ImageNetSLists:
    """The checked official lists of a subset: from ``lists_dir`` when given, else downloaded (and cached)."""
    if lists_dir is None:
        lists_dir = download_lists(subset, cache_dir=cache_dir, base_url=base_url, verify_checksums=verify_checksums)
    return load_lists_from_dir(lists_dir, subset, verify_checksums=verify_checksums)
