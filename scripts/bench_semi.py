#!/usr/bin/env python
"""What the unlabelled images add: supervised vs semi-supervised (UniMatch V2) training at the same iterations.

For each label budget (labelled images a class of train-semi; the others join the unlabelled pool) and seed, it
trains the semi-supervised recipe (default `demo-semi`, on the mini dataset with many unlabelled images) and the same
recipe with `semi_supervised: none`, then prints a table (mean +- std over the seeds) and one JSON line with every
run's final mIoU, the mean gains and the seconds per iteration of both. Recipe fields can be overridden as in
finetune.py (`--max-iters 100`, `--set key=value`, `--config file.yaml`). The logic lives in
`imagenets_hf.benchmarks.semi`.

    python scripts/bench_semi.py --labels-per-class 1 --seeds 0 1 2
    python scripts/bench_semi.py --labels-per-class 1 2 10 --seeds 0 1 2 --output-root outputs/bench_semi
"""

import json
import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.benchmarks.semi import PER_RUN_FIELDS, format_semi_table, run_semi_benchmark  # noqa: E402
from imagenets_hf.training.recipes import add_recipe_arguments, overrides_from_args, recipe_from_args  # noqa: E402


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--labels-per-class", type=cli.positive_int, nargs="+", default=[1], help="label budgets k (default: 1)"
    )
    parser.add_argument("--seeds", type=cli.non_negative_int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument(
        "--output-root", default="outputs/bench_semi", help="each run's folder goes here (replaced if present)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no per-run lines while training")
    add_recipe_arguments(parser, exclude=PER_RUN_FIELDS)
    parser.set_defaults(recipe="demo-semi")
    args = parser.parse_args(argv)
    overrides = overrides_from_args(args)
    for name in PER_RUN_FIELDS & overrides.keys():
        parser.error(f"{name} is set per run by the benchmark (--labels-per-class, --seeds, --output-root)")
    recipe_from_args(args)  # a bad override stops here, in one line naming the flag
    summary = run_semi_benchmark(
        args.labels_per_class,
        args.seeds,
        recipe=args.recipe,
        output_root=args.output_root,
        overrides=overrides,
        log=None if args.no_progress else print,
    )
    for line in format_semi_table(summary):
        print(line)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
