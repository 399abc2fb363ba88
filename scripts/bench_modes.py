#!/usr/bin/env python
"""Benchmark the inference modes of a saved model: mIoU and images/s of each on a split.

    python scripts/bench_modes.py --model outputs/demo --data-dir data/mini [--modes whole slide ms+flip]
        [--images 50] [--batch-size 8] [--device cuda]

Modes by name: whole (the official protocol), slide (windows of the recipe's crop_size, stride 2/3 of it), flip, ms
(mmsegmentation's scales 0.5 ... 1.75), ms+flip, slide+ms+flip. Images are decoded beforehand; the time is the
prediction's. Prints a Markdown table, then one JSON line. The logic lives in `imagenets_hf.benchmarks.modes`.
"""

import json
import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.benchmarks.modes import NAMED_MODES, format_modes_table, run_modes_benchmark  # noqa: E402


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="saved model folder, training checkpoint or Hub id")
    parser.add_argument("--data-dir", required=True, help="prepared ImageNet-S folder (official layout)")
    parser.add_argument("--split", default="validation", type=cli.split_choice("validation", "train_semi"))
    parser.add_argument("--modes", nargs="+", default=list(NAMED_MODES), choices=list(NAMED_MODES), metavar="MODE")
    parser.add_argument("--images", type=cli.positive_int, help="the first N images of the split (default: all)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    args = parser.parse_args(argv)
    result = run_modes_benchmark(
        args.model, args.data_dir, args.modes, args.split, args.images, args.batch_size, args.device
    )
    print(format_modes_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
