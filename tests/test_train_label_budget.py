"""Label budgets (imagenets_hf/training/label_budget.py): k labelled train-semi images a class chosen by seed,
listed in the run folder, the others left for the unlabelled pool."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_runs import TINY_RECIPE

from imagenets_hf.training.label_budget import LABELLED_LIST_NAME, apply_label_budget, select_labelled
from imagenets_hf.training.recipes import RecipeError, load_recipe


def _rows(classes: int = 20, per_class: int = 10, seed: int = 0) -> tuple[list[int], list[str]]:
    labels = [c + 1 for c in range(classes) for _ in range(per_class)]
    ids = [f"n{c + 1:08d}/n{c + 1:08d}_{i}" for c in range(classes) for i in range(per_class)]
    order = np.random.default_rng(seed).permutation(len(ids))  # rows in no particular order
    return [labels[i] for i in order], [ids[i] for i in order]


def _kept_ids(labels, ids, k, seed) -> list[str]:
    return [ids[i] for i in select_labelled(labels, ids, k, seed)]


def test_k_images_a_class_chosen_by_seed_nested_and_order_free():
    labels, ids = _rows()
    for k in (1, 2, 5, 10):
        kept = select_labelled(labels, ids, k, seed=3)
        assert list(kept) == sorted(kept)
        assert np.bincount(np.asarray(labels)[kept]).tolist()[1:] == [k] * 20
    # the same seed: the same images, whatever the order of the rows; the budgets are nested
    shuffled_labels, shuffled_ids = _rows(seed=1)
    assert sorted(_kept_ids(labels, ids, 2, 3)) == sorted(_kept_ids(shuffled_labels, shuffled_ids, 2, 3))
    for small, large in ((1, 2), (2, 5), (5, 10)):
        assert set(_kept_ids(labels, ids, small, 3)) <= set(_kept_ids(labels, ids, large, 3))
    # another seed: other images (20 classes of 10: all equal by chance with probability 10^-20)
    assert set(_kept_ids(labels, ids, 1, 3)) != set(_kept_ids(labels, ids, 1, 4))
    # a class with fewer images than the budget keeps them all; the choice within a class depends on it alone
    few_labels, few_ids = labels + [99, 99], ids + ["n00000099/a", "n00000099/b"]
    kept = _kept_ids(few_labels, few_ids, 5, 3)
    assert {"n00000099/a", "n00000099/b"} <= set(kept) and set(_kept_ids(labels, ids, 5, 3)) <= set(kept)
    with pytest.raises(ValueError, match="at least 1"):
        select_labelled(labels, ids, 0, 3)


def test_budget_on_train_semi_lists_the_kept_images_and_frees_the_others(mini_dir, tmp_path):
    from imagenets_hf.data.imagenets import load_imagenets

    rows = load_imagenets(mini_dir, "train_semi")
    recipe = load_recipe("demo", {"data_dir": str(mini_dir), "labels_per_class": 2, "seed": 5})
    budget = apply_label_budget(recipe, rows)
    assert len(budget.labelled) == 20 and len(budget.unlabelled) == 80 and budget.seed == 5
    assert sorted(budget.labelled["label"]) == sorted(list(range(1, 11)) * 2)
    assert set(budget.labelled["image_id"]).isdisjoint(budget.unlabelled["image_id"])
    assert budget.kept_ids == budget.labelled["image_id"]
    assert budget.kept_ids == [rows["image_id"][i] for i in select_labelled(rows["label"], rows["image_id"], 2, 5)]
    path = budget.write(tmp_path)
    assert path == tmp_path / LABELLED_LIST_NAME and path.read_text().splitlines() == budget.kept_ids
    # labels_seed chooses apart from the recipe's seed
    other = apply_label_budget(load_recipe("demo", {"labels_per_class": 2, "seed": 5, "labels_seed": 6}), rows)
    assert other.seed == 6 and other.kept_ids != budget.kept_ids
    # no budget: every image labelled, nothing listed
    everything = apply_label_budget(load_recipe("demo"), rows)
    assert everything.labelled is rows and everything.unlabelled is None
    assert everything.write(tmp_path / "none") is None and not (tmp_path / "none").exists()
    with pytest.raises(RecipeError, match=r"labels_per_class \(0\) must be at least 1"):
        load_recipe("demo", {"labels_per_class": 0})


def test_a_run_with_a_budget_trains_on_the_kept_images_and_lists_them(mini_dir, tmp_path, capsys):
    from imagenets_hf.training.finetune import finetune

    overrides = {**TINY_RECIPE, "data_dir": str(mini_dir), "num_workers": 0, "labels_per_class": 1}
    recipe = load_recipe("demo", {**overrides, "output_dir": str(tmp_path / "run")})
    finetune(recipe, stop_after=1, progress=False)
    out = capsys.readouterr().out
    listed = (tmp_path / "run" / LABELLED_LIST_NAME).read_text().splitlines()
    assert len(listed) == 10 and len({name.split("/")[0] for name in listed}) == 10
    assert "label budget 1 image(s) a class (labels_seed 0): 10 labelled train-semi images kept, 90 without" in out
    assert "Fine-tuning demo: 10 train-semi images" in out
