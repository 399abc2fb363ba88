"""Shared test settings, and the ImageNet-S lists the list and preparation tests run on."""

import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagenets_hf.data.lists import EXPECTED_COUNTS, MERGED_CLASSES, TRAIN_SEMI_PER_CLASS, list_relpath


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4 (the suite is a few long files; more workers only cost memory)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_configure(config):
    """In a pytest-xdist worker (one per core), one thread for torch and for the processes it starts: OpenMP threads
    that spin on cores the other workers use slow everything down many times over."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The files with the most end-to-end (`slow`) tests first, each file's tests in their own order: with
    pytest-xdist handing out whole files in this order, the longest ones start at once and the short ones fill the
    workers around them."""
    slow_tests = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow_tests[item.path])


# The official ImageNet-S lists: ../shared/imagenets/lists beside the checkout (as in CI), or IMAGENETS_LISTS_DIR
# (e.g. the data/ folder of a clone of https://github.com/LUSSeg/ImageNet-S).
OFFICIAL_LISTS_DIR = Path(
    os.environ.get("IMAGENETS_LISTS_DIR", Path(__file__).resolve().parents[2] / "shared" / "imagenets" / "lists")
)
OFFICIAL_LISTS_FOUND = (OFFICIAL_LISTS_DIR / list_relpath("categories", "50")).is_file()

# Facts of the official lists the tests rely on, which the synthetic lists reproduce: a class of all three subsets
# that is the first of the 50, a train-semi image of a merged 919 class, and how many 919 validation images ImageNet
# labels differently from ImageNet-S (IMAGENETS.md: 1,652 of 12,419).
SHARED_WNID = "n01443537"
MERGED_TRAIN_SEMI_EXAMPLE = "n15075141/n03887697_174"
REMAPPED_919_VALIDATION = 1652


@dataclass(frozen=True)
class ListsSource:
    """Where the lists of a test run come from; `load_kwargs` go to `load_lists` and `prepare_imagenets`."""

    kind: str  # "official" or "synthetic"
    path: Path

    @property
    def verify_checksums(self) -> bool:
        return self.kind == "official"  # the sha256 table holds the official files only

    @property
    def load_kwargs(self) -> dict:
        return {"lists_dir": self.path, "verify_checksums": self.verify_checksums}


def _spread(total: int, count: int) -> list[int]:
    """`count` near-equal positive integers summing to `total`."""
    quotient, remainder = divmod(total, count)
    return [quotient + 1] * remainder + [quotient] * (count - remainder)


def _made_up_wnids(rng: random.Random, taken: set[str]):
    """Distinct wnid-shaped names not in `taken`, all sorting after SHARED_WNID."""
    while True:
        wnid = f"n{rng.randrange(2_000_000, 100_000_000):08d}"
        if wnid not in taken:
            taken.add(wnid)
            yield wnid


def write_synthetic_lists(root: Path, seed: int = 0) -> Path:
    """Write made-up ImageNet-S lists in the official format under `root` (categories/, names/, mapping/).

    Same file names, line formats and line counts as the official table (EXPECTED_COUNTS), no newline after the last
    line; the 50 classes are among the 300, the 300 among the 919, and a file has the same ImageNet and ImageNet-S
    wnid in every subset (so one fake ImageNet serves all three), as in the official lists. 919 has the five merged
    classes (some train-semi images named after the merged-away ImageNet class) and REMAPPED_919_VALIDATION
    validation images whose ImageNet label differs from their ImageNet-S class. The wnids are made up (except the
    merge table's and SHARED_WNID); nothing is copied from the official files.
    """
    rng = random.Random(seed)
    made_up = _made_up_wnids(rng, taken={SHARED_WNID, *MERGED_CLASSES, *MERGED_CLASSES.values()})
    merge_targets = sorted(set(MERGED_CLASSES.values()))
    only50 = [SHARED_WNID, *(next(made_up) for _ in range(49))]
    only300 = [next(made_up) for _ in range(250)]
    only919 = merge_targets + [next(made_up) for _ in range(919 - 300 - len(merge_targets))]
    outside = [next(made_up) for _ in range(76)]  # ImageNet classes in no ImageNet-S subset
    groups = [only50, only300, only919]  # 50 = group 0, 300 = groups 0-1, 919 = all
    subset_groups = {"50": 1, "300": 2, "919": 3}
    all919 = sorted(only50 + only300 + only919)
    merged_sources = {target: source for source, target in MERGED_CLASSES.items()}

    # Per-class image counts such that each subset's totals are the official ones.
    counts = {"validation": {}, "test": {}}
    for split in counts:
        previous = 0
        for group, subset in zip(groups, subset_groups):
            total = EXPECTED_COUNTS[subset][split] - previous
            counts[split].update(zip(group, _spread(total, len(group))))
            previous = EXPECTED_COUNTS[subset][split]

    val_numbers = iter(rng.sample(range(1, 50_001), sum(counts["validation"].values()) + sum(counts["test"].values())))
    train_semi, mapping = {}, {"validation": {}, "test": {}}
    for wnid in all919:
        sources = [wnid] * TRAIN_SEMI_PER_CLASS
        if wnid in merged_sources:  # merged 919 classes: some train-semi images come from the merged-away class
            sources[-3:] = [merged_sources[wnid]] * 3
        numbers = rng.sample(range(1, 100_000), TRAIN_SEMI_PER_CLASS)
        names = [f"{source}_{number}" for source, number in zip(sources, numbers)]
        if wnid == MERGED_TRAIN_SEMI_EXAMPLE.split("/")[0]:
            names[-1] = MERGED_TRAIN_SEMI_EXAMPLE.split("/")[1]
        train_semi[wnid] = [f"{wnid}/{name}.JPEG {wnid}/{name}.png" for name in names]
        for split in mapping:
            mapping[split][wnid] = [f"ILSVRC2012_val_{next(val_numbers):08d}.JPEG" for _ in range(counts[split][wnid])]

    # ImageNet labels: the ImageNet-S class, except for chosen images labelled as another ImageNet class
    # (another category, a merged-away class, or a class in no subset).
    validation_files = [(wnid, name) for wnid in all919 for name in mapping["validation"][wnid]]
    test_files = [(wnid, name) for wnid in all919 for name in mapping["test"][wnid]]
    label_pool = all919 + list(MERGED_CLASSES) + outside
    relabelled = {}
    for wnid, name in rng.sample(validation_files, REMAPPED_919_VALIDATION) + rng.sample(
        test_files, len(test_files) // 8
    ):
        while relabelled.get(name, wnid) == wnid:
            relabelled[name] = rng.choice(label_pool)

    for subset, group_count in subset_groups.items():
        classes = sorted(wnid for group in groups[:group_count] for wnid in group)
        mapping_lines = {
            split: [
                f"{relabelled.get(name, wnid)}/{name} {wnid}/{name}"
                for wnid in classes
                for name in mapping[split][wnid]
            ]
            for split in mapping
        }
        validation_names = [
            f"{wnid}/{name[:-5]}.JPEG {wnid}/{name[:-5]}.png"
            for wnid in classes
            for name in mapping["validation"][wnid]
        ]
        texts = {
            "categories": classes,
            "train_semi": [line for wnid in classes for line in train_semi[wnid]],
            "validation": validation_names,
            "validation_mapping": mapping_lines["validation"],
            "test_mapping": mapping_lines["test"],
        }
        for kind, lines in texts.items():
            path = root / list_relpath(kind, subset)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes("\n".join(lines).encode("ascii"))  # the official files end without a newline
    return root


@pytest.fixture(scope="session", params=["official", "synthetic"])
def imagenets_lists(request, tmp_path_factory) -> ListsSource:
    """The official lists where they are found (skipped otherwise), and synthetic ones everywhere."""
    if request.param == "official":
        if not OFFICIAL_LISTS_FOUND:
            pytest.skip(
                f"official ImageNet-S lists not found under {OFFICIAL_LISTS_DIR} (clone "
                "https://github.com/LUSSeg/ImageNet-S and set IMAGENETS_LISTS_DIR to its data/ folder)"
            )
        return ListsSource("official", OFFICIAL_LISTS_DIR)
    return ListsSource("synthetic", write_synthetic_lists(tmp_path_factory.mktemp("synthetic_lists")))


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory) -> Path:
    """The mini dataset (seed 0), made once per test session (a few seconds each time it is made); tests only read
    it. Tests of the maker itself (test_data_mini.py) make their own."""
    from imagenets_hf.data.mini import ensure_mini_dataset

    return ensure_mini_dataset(tmp_path_factory.getbasetemp() / "imagenets_mini", seed=0)
