"""Label budgets: keep k labelled train-semi images a class (the standard semi-supervised protocol: k = 1, 2, 5 or
10), chosen by a seed; the others lose their masks and, in a semi-supervised run, join the unlabelled pool.

The choice: the images of each class in `image_id` order, permuted by a generator seeded with (seed, class); the
first k are kept. So the choice depends only on the seed, the class and its images (not on the process, the order
of the rows or the other classes), and the budgets of one seed are nested: the image kept at k = 1 is kept at
k = 2, 5 and 10. A class with k images or fewer keeps them all. The kept images are listed, one `image_id` a line,
in `<output_dir>/labelled_images.txt`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

LABELLED_LIST_NAME = "labelled_images.txt"


def select_labelled(labels: Sequence[int], image_ids: Sequence[str], labels_per_class: int, seed: int) -> np.ndarray:
    """The row indices (sorted) kept by a budget of `labels_per_class` images a class (see the module docstring)."""
    if labels_per_class < 1:
        raise ValueError(f"labels_per_class must be at least 1, got {labels_per_class}")
    classes: dict[int, list[int]] = {}
    for i in sorted(range(len(image_ids)), key=lambda i: image_ids[i]):
        classes.setdefault(int(labels[i]), []).append(i)
    kept = []
    for label, members in classes.items():
        permutation = np.random.default_rng([seed, label]).permutation(len(members))
        kept += [members[j] for j in permutation[:labels_per_class]]
    return np.array(sorted(kept), dtype=np.int64)


@dataclass
class LabelBudget:
    """The labelled rows a run trains on, the rows whose masks it drops (None: none dropped) and the kept ids."""

    labelled: Any
    unlabelled: Any | None
    kept_ids: list[str]
    labels_per_class: int | None
    seed: int | None

    def describe(self) -> str:
        if self.labels_per_class is None:
            return "all train-semi images labelled"
        dropped = 0 if self.unlabelled is None else len(self.unlabelled)
        return (
            f"label budget {self.labels_per_class} image(s) a class (labels_seed {self.seed}): {len(self.kept_ids)} "
            f"labelled train-semi images kept, {dropped} without their masks"
        )

    def write(self, output_dir: str | os.PathLike) -> Path | None:
        """List the kept images in `<output_dir>/labelled_images.txt` (nothing written without a budget)."""
        if self.labels_per_class is None:
            return None
        path = Path(output_dir) / LABELLED_LIST_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{image_id}\n" for image_id in self.kept_ids))
        return path


def _subset(rows: Any, indices: np.ndarray) -> Any:
    if isinstance(rows, datasets.Dataset):
        return rows.select(indices.tolist())
    return [rows[int(i)] for i in indices]


def _column(rows: Any, name: str) -> list:
    if isinstance(rows, datasets.Dataset):
        return rows[name]
    return [row[name] for row in rows]


def budget_seed(recipe: Any) -> int:
    """The seed that chooses a budget's labelled images: `recipe.labels_seed`, or `recipe.seed` when it is null."""
    return recipe.seed if recipe.labels_seed is None else recipe.labels_seed


def apply_label_budget(recipe: Any, train_rows: Any) -> LabelBudget:
    """`recipe.labels_per_class` images a class of `train_rows` (rows with `label` and `image_id`), chosen by
    `recipe.labels_seed` (null: `recipe.seed`); without a budget every row is labelled."""
    if recipe.labels_per_class is None:
        return LabelBudget(train_rows, None, list(_column(train_rows, "image_id")), None, None)
    seed = budget_seed(recipe)
    image_ids = list(_column(train_rows, "image_id"))
    kept = select_labelled(_column(train_rows, "label"), image_ids, recipe.labels_per_class, seed)
    dropped = np.setdiff1d(np.arange(len(image_ids)), kept)
    return LabelBudget(
        labelled=_subset(train_rows, kept),
        unlabelled=_subset(train_rows, dropped) if len(dropped) else None,
        kept_ids=[image_ids[i] for i in kept],
        labels_per_class=recipe.labels_per_class,
        seed=seed,
    )
