"""The semi-supervised benchmark behind `scripts/bench_semi.py`: what the unlabelled images add, measured.

For each label budget k (labelled images a class of train-semi, the others joining the unlabelled pool) and seed, it
trains the semi-supervised recipe (`demo-semi` by default) and the same recipe with `semi_supervised: none`: the same
model, labelled batches, schedule and iterations, so the only difference is the unlabelled stream and the teacher.
Each run is a full `finetune` (its own output folder under `output_root`) and reports the final validation mIoU of
the model it saves (a semi-supervised run saves `semi_final_model`), and for semi-supervised runs both the teacher's
and the student's. It returns per budget the mIoUs, their means and spreads, the mean gains (of the saved model, of
the teacher, of the student), and the seconds per training iteration of both methods; the
script prints a table and that summary as one JSON line.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imagenets_hf.training.recipes import load_recipe

METHODS = ("supervised", "semi")
PER_RUN_FIELDS = frozenset({"labels_per_class", "seed", "output_dir"})  # what the benchmark sets for each run


def _spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run_semi_benchmark(
    labels_per_class: Sequence[int],
    seeds: Sequence[int],
    recipe: str = "demo-semi",
    output_root: str | Path = "outputs/bench_semi",
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train both methods for every (budget, seed); return the summary (see the module docstring)."""
    from imagenets_hf.training.finetune import finetune

    semi_recipe = load_recipe(recipe, overrides)
    if semi_recipe.semi_supervised == "none":
        raise ValueError(f"recipe {recipe!r} is not semi-supervised (semi_supervised: none); pick a semi recipe")
    budgets = []
    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    for k in labels_per_class:
        miou: dict[str, list[float]] = {method: [] for method in METHODS}
        both: dict[str, list[float]] = {"semi_teacher": [], "semi_student": []}  # a semi run evaluates both
        for seed in seeds:
            for method in METHODS:
                run_overrides = {
                    **(overrides or {}),
                    "labels_per_class": k,
                    "seed": seed,
                    "output_dir": str(Path(output_root) / f"k{k}_seed{seed}_{method}"),
                }
                if method == "supervised":
                    run_overrides["semi_supervised"] = "none"
                result = finetune(load_recipe(recipe, run_overrides), overwrite=True, progress=False)
                miou[method].append(float(result["metrics"]["mIoU"]))
                for name in both if method == "semi" else ():
                    both[name].append(float(result[name.replace("semi_", "mIoU_")]))
                seconds[method].append(result["train_seconds"] / result["iterations"])
                if log is not None:
                    log(f"labels_per_class {k} seed {seed} {method}: mIoU {miou[method][-1]:.2f}")
        gains = [semi - sup for semi, sup in zip(miou["semi"], miou["supervised"])]
        budgets.append(
            {
                "labels_per_class": k,
                "seeds": list(seeds),
                "supervised": miou["supervised"],
                "semi": miou["semi"],
                "supervised_mean": statistics.fmean(miou["supervised"]),
                "supervised_std": _spread(miou["supervised"]),
                "semi_mean": statistics.fmean(miou["semi"]),
                "semi_std": _spread(miou["semi"]),
                "gain_mean": statistics.fmean(gains),
                "gain_std": _spread(gains),
                **both,
                **{
                    f"gain_{name.removeprefix('semi_')}_mean": statistics.fmean(
                        [a - b for a, b in zip(values, miou["supervised"])]
                    )
                    for name, values in both.items()
                },
            }
        )
    return {
        "recipe": recipe,
        "iterations": semi_recipe.max_iters,
        "budgets": budgets,
        "seconds_per_iteration": {method: statistics.fmean(values) for method, values in seconds.items()},
    }


def format_semi_table(summary: dict[str, Any]) -> list[str]:
    """The summary as a Markdown table: one row per label budget, mean +- sample std over the seeds."""
    lines = [
        f"recipe {summary['recipe']}, {summary['iterations']} iterations; mIoU (mean +- std over seeds)",
        "",
        "| labels a class | seeds | supervised | semi-supervised (saved model) | gain | gain of the teacher | gain of "
        "the student |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["budgets"]:
        lines.append(
            f"| {row['labels_per_class']} | {len(row['seeds'])} | {row['supervised_mean']:.2f} +- "
            f"{row['supervised_std']:.2f} | {row['semi_mean']:.2f} +- {row['semi_std']:.2f} | "
            f"{row['gain_mean']:+.2f} +- {row['gain_std']:.2f} | {row['gain_teacher_mean']:+.2f} | "
            f"{row['gain_student_mean']:+.2f} |"
        )
    per_iteration = summary["seconds_per_iteration"]
    lines += [
        "",
        f"seconds per iteration: supervised {per_iteration['supervised']:.3f}, semi-supervised "
        f"{per_iteration['semi']:.3f} ({per_iteration['semi'] / per_iteration['supervised']:.2f}x)",
    ]
    return lines
