"""Build the official ImageNet-S layout from a raw ImageNet-1k and the official annotation archives.

Follows the official preparation scripts (LUSSeg/ImageNet-S ``datapreparation/``):

- ``train/<wnid>/``: every image of the ImageNet train class folder; for ImageNetS919 the folders of the five merged
  source classes are added under their target wnid (``lists.MERGED_CLASSES``). The official script links whole class
  folders; here every file is linked (or copied) on its own, so that the folder reads the same with or without
  ``os.walk(followlinks=True)``. The official ``train-full`` link (all of ImageNet train) is not made.
- ``train-semi/<wnid>/<file>.JPEG``: from ImageNet ``train/<file's wnid prefix>/`` (the merged classes keep their
  source wnid in the file name, e.g. ``n15075141/n03887697_174.JPEG``).
- ``validation/`` and ``test/``: from ImageNet ``val/``, placed under the ImageNet-S wnid of the mapping lists (which
  wins over the ImageNet label). ``val/`` may be flat or in class folders.
- ``train-semi-segmentation/`` and ``validation-segmentation/``: masks from the annotation archive
  (``ImageNetS{N}.zip``, with or without its ``ImageNetS{N}/`` top folder) or an unpacked folder.

Images are symlinked by default (absolute targets) and copied with ``copy=True``; masks from an archive are always
extracted. Every expected file is checked before anything is written; a rerun keeps correct files and replaces wrong
ones.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from imagenets_hf.data.lists import (
    EXPECTED_COUNTS,
    MERGED_CLASSES,
    MERGED_SUBSET,
    OFFICIAL_LISTS_URL,
    ImageNetSLists,
    load_lists,
)
from imagenets_hf.data.masks import SUBSETS

SPLITS = ("train", "train-semi", "train-semi-segmentation", "validation", "validation-segmentation", "test")
MASK_FOLDERS = ("train-semi-segmentation", "validation-segmentation")
_OFFICIAL_KEY = {
    "train": "train",
    "train-semi": "train_semi",
    "train-semi-segmentation": "train_semi",
    "validation": "validation",
    "validation-segmentation": "validation",
    "test": "test",
}
_SUBSET_NAME = re.compile(r"ImageNetS(50|300|919)(?!\d)")
_MASK_MEMBER = re.compile(r"^(?:(.*)/)?((?:validation|train-semi)-segmentation/n\d{8}/[^/]+\.png)$")


class MissingFilesError(FileNotFoundError):
    """Preparation cannot find some expected source files; ``missing`` lists them all."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


@dataclass
class SubsetReport:
    """What one subset's preparation found and did."""

    subset: str
    root: Path
    mode: str
    counts: dict[str, int] = field(default_factory=dict)  # files now in each split folder
    expected: dict[str, int] = field(default_factory=dict)  # from the lists (train: what ImageNet holds)
    official: dict[str, int] = field(default_factory=dict)  # the official table (complete subset)
    created: int = 0
    replaced: int = 0
    kept: int = 0
    classes: int = 0
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        """The counts against the lists and the official table, one split a line."""
        lines = [f"ImageNetS{self.subset} -> {self.root} ({self.mode}, {self.classes} classes)"]
        lines.append(f"  {'split':<25}{'prepared':>11}{'expected':>11}{'official':>11}")
        for split in SPLITS:
            if split not in self.counts:
                continue
            official = self.official.get(split)
            lines.append(
                f"  {split:<25}{self.counts[split]:>11,}{self.expected.get(split, 0):>11,}"
                f"{(f'{official:,}' if official is not None else '-'):>11}"
            )
        lines.append(f"  files: {self.created:,} created, {self.replaced:,} replaced, {self.kept:,} already correct")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


@dataclass
class PrepareReport:
    """The reports of every prepared subset, keyed by subset ("50", "300", "919")."""

    out_dir: Path
    subsets: dict[str, SubsetReport] = field(default_factory=dict)

    def format(self) -> str:
        return "\n".join(report.format() for report in self.subsets.values())


# ---------------------------------------------------------------------------------------------------------------
# Placing one file: link, copy or extract, keeping what is already correct.


def _replace_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    temporary = dest.with_name(f".{dest.name}.part")
    if temporary.exists() or temporary.is_symlink():
        temporary.unlink()
    write(temporary)
    os.replace(temporary, dest)


def _existing_state(dest: Path) -> os.stat_result | None:
    """``lstat`` of ``dest`` (None when absent); a real folder there is an error."""
    try:
        state = os.lstat(dest)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(state.st_mode):
        raise IsADirectoryError(f"{dest}: a folder stands where a file is expected; remove it and rerun")
    return state


def place_file(source: Path, dest: Path, copy: bool) -> str:
    """Link (absolute target) or copy ``source`` to ``dest``; return "created", "replaced" or "kept"."""
    state = _existing_state(dest)
    if state is not None:
        is_link = stat.S_ISLNK(state.st_mode)
        if copy:
            source_state = os.stat(source)
            correct = (
                not is_link
                and state.st_size == source_state.st_size
                and abs(state.st_mtime - source_state.st_mtime) < 1.0
            )
        else:
            correct = is_link and os.readlink(dest) == str(source)
        if correct:
            return "kept"
    if copy:
        _replace_atomically(dest, lambda tmp: shutil.copy2(source, tmp))
    elif state is None:
        os.symlink(source, dest)  # creating a link is atomic already
    else:
        _replace_atomically(dest, lambda tmp: os.symlink(source, tmp))
    return "created" if state is None else "replaced"


def extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> str:
    """Extract one archive member to ``dest`` unless an identical file (size and CRC-32) is there already."""
    state = _existing_state(dest)
    if state is not None and stat.S_ISREG(state.st_mode) and state.st_size == info.file_size:
        if _crc32(dest) == info.CRC:
            return "kept"

    def write(tmp: Path) -> None:
        with archive.open(info) as member, open(tmp, "wb") as out:
            shutil.copyfileobj(member, out)

    _replace_atomically(dest, write)
    return "created" if state is None else "replaced"


def _crc32(path: Path) -> int:
    import zlib

    value = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            value = zlib.crc32(block, value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Annotation sources: an archive (with or without its top folder) or an unpacked folder.


class AnnotationSource:
    """Masks of one subset: ``masks`` maps ``<split>-segmentation/<wnid>/<file>.png`` to a handle for ``place``."""

    def __init__(self, description: str, subset: str | None, masks: dict[str, object]):
        self.description = description
        self.subset = subset
        self.masks = masks

    def place(self, handle, dest: Path, copy: bool) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _FolderAnnotations(AnnotationSource):
    def __init__(self, root: Path, subset: str | None):
        masks = {}
        for folder in MASK_FOLDERS:
            base = root / folder
            if base.is_dir():
                for wnid_dir in sorted(base.iterdir()):
                    if wnid_dir.is_dir():
                        for mask in wnid_dir.iterdir():
                            if mask.suffix == ".png":
                                masks[f"{folder}/{wnid_dir.name}/{mask.name}"] = mask.absolute()
        super().__init__(str(root), subset, masks)

    def place(self, handle, dest, copy):
        return place_file(handle, dest, copy)


class _ZipAnnotations(AnnotationSource):
    def __init__(self, path: Path, prefix: str, subset: str | None, infos: dict[str, zipfile.ZipInfo]):
        self.path = path
        self._archive: zipfile.ZipFile | None = None
        where = f"{path}:{prefix}/" if prefix else str(path)
        super().__init__(where, subset, infos)

    def place(self, handle, dest, copy):
        if self._archive is None:
            self._archive = zipfile.ZipFile(self.path)
        return extract_member(self._archive, handle, dest)

    def close(self):
        if self._archive is not None:
            self._archive.close()
            self._archive = None


def _subset_from_name(name: str) -> str | None:
    found = _SUBSET_NAME.findall(name)
    return found[-1] if found else None


def _zip_sources(path: Path) -> list[AnnotationSource]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: not a readable zip archive ({err})") from err
    by_prefix: dict[str, dict[str, zipfile.ZipInfo]] = {}
    for info in infos:
        match = _MASK_MEMBER.match(info.filename)
        if match and not info.is_dir():
            by_prefix.setdefault(match.group(1) or "", {})[match.group(2)] = info
    if not by_prefix:
        raise ValueError(f"{path}: no */validation-segmentation/<wnid>/*.png or train-semi-segmentation masks inside")
    sources = []
    for prefix, members in sorted(by_prefix.items()):
        # The top folder names the subset (ImageNetS50/...); an archive without one is named by its file name.
        subset = _subset_from_name(prefix.rsplit("/", 1)[-1]) if prefix else _subset_from_name(path.name)
        sources.append(_ZipAnnotations(path, prefix, subset, members))
    return sources


def find_annotation_sources(annotations: str | os.PathLike | Iterable[str | os.PathLike]) -> list[AnnotationSource]:
    """Every annotation source found in the given paths.

    A path may be an archive (``ImageNetS50.zip``; masks under ``ImageNetS50/`` or at its root), an unpacked subset
    folder (holding ``validation-segmentation/``), or a folder holding such archives or ``ImageNetS{N}/`` folders.
    """
    if isinstance(annotations, (str, os.PathLike)):
        annotations = [annotations]
    sources: list[AnnotationSource] = []
    for entry in annotations:
        path = Path(entry).expanduser()
        if path.is_file():
            sources.extend(_zip_sources(path))
        elif path.is_dir():
            if any((path / folder).is_dir() for folder in MASK_FOLDERS):
                sources.append(_FolderAnnotations(path.absolute(), _subset_from_name(path.name)))
                continue
            found = False
            for child in sorted(path.iterdir()):
                if child.is_dir() and any((child / folder).is_dir() for folder in MASK_FOLDERS):
                    sources.append(_FolderAnnotations(child.absolute(), _subset_from_name(child.name)))
                    found = True
                elif child.is_file() and child.suffix == ".zip":
                    sources.extend(_zip_sources(child))
                    found = True
            if not found:
                raise FileNotFoundError(
                    f"{path}: no annotations (expected validation-segmentation/, ImageNetS{{N}}/ folders or zips)"
                )
        else:
            raise FileNotFoundError(f"no such annotation archive or folder: {path}")
    return sources


def _pick_source(sources: list[AnnotationSource], subset: str, single_subset: bool) -> AnnotationSource:
    named = [source for source in sources if source.subset == subset]
    if named:
        # an unpacked folder first: nothing to extract
        return sorted(named, key=lambda source: isinstance(source, _ZipAnnotations))[0]
    unnamed = [source for source in sources if source.subset is None]
    if single_subset and len(unnamed) == 1:
        return unnamed[0]
    found = ", ".join(f"{source.description} (subset {source.subset or '?'})" for source in sources) or "nothing"
    raise ValueError(
        f"no annotations for ImageNetS{subset}: found {found}. Give the ImageNetS{subset} archive (its top folder or "
        "file name tells the subset)"
    )


# ---------------------------------------------------------------------------------------------------------------
# The raw ImageNet-1k folder.


def _imagenet_folders(imagenet_dir: Path) -> tuple[Path, Path]:
    if not imagenet_dir.is_dir():
        raise FileNotFoundError(f"no such ImageNet folder: {imagenet_dir} (the ImageNet-1k root with train/ and val/)")
    for base in (imagenet_dir, imagenet_dir / "ILSVRC" / "Data" / "CLS-LOC"):  # plain, or the Kaggle layout
        if (base / "train").is_dir() and (base / "val").is_dir():
            return base / "train", base / "val"
    raise FileNotFoundError(f"{imagenet_dir}: not an ImageNet-1k folder (expected train/<wnid>/ and val/ inside)")


def index_val_images(val_dir: Path) -> dict[str, Path]:
    """Map each ImageNet val file name to its path; ``val/`` may be flat or in class folders (or both)."""
    if not val_dir.is_dir():
        raise FileNotFoundError(f"{val_dir}: ImageNet val folder not found")
    index: dict[str, Path] = {}
    for entry in os.scandir(val_dir):
        if entry.is_dir():
            children = [(child.name, Path(child.path)) for child in os.scandir(entry.path) if child.is_file()]
        elif entry.is_file():
            children = [(entry.name, Path(entry.path))]
        else:
            continue
        for name, path in children:
            if not name.endswith(".JPEG"):
                continue
            if name in index:
                raise ValueError(f"{val_dir}: {name} appears twice ({index[name]} and {path})")
            index[name] = path.absolute()
    return index


def _train_sources(subset: str, categories: Sequence[str]) -> dict[str, list[str]]:
    """ImageNet train folders feeding each ImageNet-S train class (the merged classes only in 919)."""
    sources = {wnid: [wnid] for wnid in categories}
    if subset == MERGED_SUBSET:
        for source, target in MERGED_CLASSES.items():
            if target in sources:
                sources[target].append(source)
    return sources


# ---------------------------------------------------------------------------------------------------------------
# Planning and running one subset.


class _FolderPlacements:
    """(source, dest) pairs of whole class folders, made on the fly: 1.2M Path pairs would take ~1 GB."""

    def __init__(self, groups: list[tuple[Path, Path, list[str]]]):
        self.groups = groups

    def __len__(self) -> int:
        return sum(len(names) for _, _, names in self.groups)

    def __iter__(self):
        for source_dir, dest_dir, names in self.groups:
            for name in names:
                yield source_dir / name, dest_dir / name


@dataclass
class _Plan:
    subset: str
    root: Path
    lists: ImageNetSLists
    annotations: AnnotationSource
    images: dict[str, Sequence[tuple[Path, Path]]]  # split -> (source, dest)
    masks: dict[str, list[tuple[object, Path]]]  # split -> (handle, dest)
    missing: list[str]
    extra_masks: int


def _plan_subset(
    lists: ImageNetSLists,
    out_dir: Path,
    train_dir: Path,
    val_index: dict[str, Path],
    annotations: AnnotationSource,
    include_train: bool,
) -> _Plan:
    subset = lists.subset
    root = out_dir / f"ImageNetS{subset}"
    missing: list[str] = []
    images: dict[str, Sequence[tuple[Path, Path]]] = {}
    masks: dict[str, list[tuple[object, Path]]] = {}

    if include_train:
        groups = []
        for target, sources in _train_sources(subset, lists.categories).items():
            for source in sources:
                folder = train_dir / source
                if not folder.is_dir():
                    missing.append(f"train/{target}/: ImageNet class folder {folder} not found")
                    continue
                names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
                groups.append((folder.absolute(), root / "train" / target, names))
        images["train"] = _FolderPlacements(groups)

    placements = []
    for image, _ in lists.train_semi:
        name = image.split("/", 1)[1]
        source = (train_dir / name.split("_", 1)[0] / name).absolute()
        if not source.is_file():
            missing.append(f"train-semi/{image}: ImageNet train image {source} not found")
        placements.append((source, root / "train-semi" / image))
    images["train-semi"] = placements

    for split, mapping in (("validation", lists.validation_mapping), ("test", lists.test_mapping)):
        placements = []
        for imagenet_path, imagenets_path in mapping:
            name = imagenet_path.split("/", 1)[1]
            source = val_index.get(name)
            if source is None:
                missing.append(f"{split}/{imagenets_path}: ImageNet val image {name} ({imagenet_path}) not found")
            placements.append((source, root / split / imagenets_path))
        images[split] = placements

    for split, entries in (
        ("train-semi-segmentation", lists.train_semi),
        ("validation-segmentation", lists.validation),
    ):
        placements = []
        for _, mask in entries:
            key = f"{split}/{mask}"
            handle = annotations.masks.get(key)
            if handle is None:
                missing.append(f"{key}: mask not in {annotations.description}")
            placements.append((handle, root / key))
        masks[split] = placements

    # Masks of other wnids mean another subset's archive: its class ids would be silently wrong.
    subset_categories = set(lists.all_categories)
    foreign = sorted(key for key in annotations.masks if key.split("/")[1] not in subset_categories)
    if foreign:
        raise ValueError(
            f"{annotations.description}: {len(foreign)} masks of classes outside ImageNetS{subset} "
            f"(e.g. {foreign[0]}): is this the ImageNetS{subset} archive?"
        )
    listed = {f"train-semi-segmentation/{m}" for _, m in lists.train_semi}
    listed |= {f"validation-segmentation/{m}" for _, m in lists.validation}
    extra = sum(1 for key in annotations.masks if key not in listed)
    return _Plan(subset, root, lists, annotations, images, masks, missing, extra)


def _count_files(split_dir: Path) -> int:
    if not split_dir.is_dir():
        return 0
    total = 0
    for wnid_dir in os.scandir(split_dir):
        if wnid_dir.is_dir():
            total += sum(1 for entry in os.scandir(wnid_dir.path) if entry.is_file())  # follows links: no broken ones
    return total


def _run_plan(plan: _Plan, copy: bool, progress: bool) -> SubsetReport:
    lists = plan.lists
    complete = not lists.restricted
    report = SubsetReport(
        subset=plan.subset, root=plan.root, mode="copies" if copy else "links", classes=len(lists.categories)
    )
    tally = {"created": 0, "replaced": 0, "kept": 0}
    jobs: list[tuple[str, list, Callable]] = [
        (split, placements, lambda s, d: place_file(s, d, copy)) for split, placements in plan.images.items()
    ]
    jobs += [
        (split, placements, lambda h, d: plan.annotations.place(h, d, copy)) for split, placements in plan.masks.items()
    ]
    try:
        for split, placements, place in jobs:
            # create every class folder, also the empty ones (the builder reads the class list from them)
            for wnid in lists.categories:
                (plan.root / split / wnid).mkdir(parents=True, exist_ok=True)
            bar = tqdm(placements, total=len(placements), desc=f"ImageNetS{plan.subset} {split}", disable=not progress)
            for source, dest in bar:
                tally[place(source, dest)] += 1
    finally:
        plan.annotations.close()
    report.created, report.replaced, report.kept = tally["created"], tally["replaced"], tally["kept"]

    for split, placements in [*plan.images.items(), *plan.masks.items()]:
        broken = [str(dest) for _, dest in placements if not os.path.exists(dest)]
        if broken:
            raise MissingFilesError(_missing_message(f"ImageNetS{plan.subset}: files not readable", broken), broken)
        report.counts[split] = _count_files(plan.root / split)
        report.expected[split] = len(placements)
        if complete:
            report.official[split] = EXPECTED_COUNTS[plan.subset][_OFFICIAL_KEY[split]]
        if report.counts[split] != report.expected[split]:
            report.warnings.append(
                f"{plan.root / split}: {report.counts[split] - report.expected[split]:+,} files besides the expected "
                "ones (left in place)"
            )
    if "train" in report.counts and complete and report.counts["train"] != report.official["train"]:
        report.warnings.append(
            f"train holds {report.counts['train']:,} images, the official ImageNetS{plan.subset} has "
            f"{report.official['train']:,}: is the ImageNet train folder complete?"
        )
    if plan.extra_masks:
        report.warnings.append(
            f"{plan.annotations.description}: {plan.extra_masks:,} masks not in the lists were not used"
        )
    return report


def _missing_message(title: str, missing: list[str], max_listed: int = 20) -> str:
    lines = [f"{title}: {len(missing):,} missing (first {min(max_listed, len(missing))} listed)"]
    lines += [f"  {item}" for item in missing[:max_listed]]
    if len(missing) > max_listed:
        lines.append(f"  ... and {len(missing) - max_listed:,} more")
    return "\n".join(lines)


def prepare_imagenets(
    imagenet_dir: str | os.PathLike,
    annotations: str | os.PathLike | Iterable[str | os.PathLike],
    subset: str,
    out_dir: str | os.PathLike,
    copy: bool = False,
    lists_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = OFFICIAL_LISTS_URL,
    verify_checksums: bool = True,
    include_train: bool = True,
    classes: Sequence[str] | None = None,
    max_listed: int = 20,
    progress: bool = True,
    verbose: bool = True,
) -> PrepareReport:
    """Build ``out_dir/ImageNetS{N}`` in the official layout from a raw ImageNet-1k and the annotation archive(s).

    Args:
        imagenet_dir: ImageNet-1k root with ``train/<wnid>/*.JPEG`` and ``val/`` (flat or in class folders).
        annotations: the official archive(s) ``ImageNetS{N}.zip`` (with or without the top folder), unpacked
            folders, or a folder holding them; for ``subset="all"`` one per subset.
        subset: "50", "300", "919" or "all".
        out_dir: where ``ImageNetS{N}/`` folders are made.
        copy: copy images instead of symlinking them (masks from an archive are always extracted).
        lists_dir: the official lists (sub-folder layout or flat); downloaded and cached when None.
        cache_dir, base_url, verify_checksums: passed to ``lists.load_lists``.
        include_train: also build the unlabelled ``train/`` split (~1.2M links for 919).
        classes: prepare only these ImageNet-S wnids (a quick trial); counts are then checked against the lists only.
        max_listed: how many missing files the error lists.
        progress: show progress bars. verbose: print the count table of each subset.

    Returns a ``PrepareReport``. Raises ``MissingFilesError`` naming missing images or masks (before writing
    anything), ``ListFileError`` for bad lists, ``ValueError`` for a wrong-subset archive.
    """
    subset = str(subset)
    if subset not in (*SUBSETS, "all"):
        raise ValueError(f"unknown subset {subset!r}; expected 50, 300, 919 or all")
    subsets = list(SUBSETS) if subset == "all" else [subset]
    imagenet_dir = Path(imagenet_dir).expanduser()
    out_dir = Path(out_dir).expanduser().absolute()
    train_dir, val_dir = _imagenet_folders(imagenet_dir)
    val_index = index_val_images(val_dir)
    sources = find_annotation_sources(annotations)

    plans = []
    for name in subsets:
        lists = load_lists(
            name, lists_dir=lists_dir, cache_dir=cache_dir, base_url=base_url, verify_checksums=verify_checksums
        )
        if classes is not None:
            lists = lists.restricted_to(c for c in classes if c in set(lists.categories) or len(subsets) == 1)
        source = _pick_source(sources, name, single_subset=len(subsets) == 1)
        plans.append(_plan_subset(lists, out_dir, train_dir, val_index, source, include_train))

    missing = [item for plan in plans for item in plan.missing]
    if missing:
        names = ", ".join(f"ImageNetS{plan.subset}" for plan in plans if plan.missing)
        raise MissingFilesError(_missing_message(f"{names}: expected files not found", missing, max_listed), missing)

    report = PrepareReport(out_dir=out_dir)
    for plan in plans:
        report.subsets[plan.subset] = _run_plan(plan, copy, progress)
        if verbose:
            print(report.subsets[plan.subset].format(), flush=True)
    return report
