#!/usr/bin/env python
"""Benchmark the metric core against torchmetrics and the evaluate-module path on the same maps.

    python scripts/bench_metric.py [--images 200] [--height 375] [--width 500] [--num-labels 920]

Each contender accumulates the same maps (random blocks of classes, 5% ignored pixels, predictions 70% right) and
computes per-class IoU; reported: seconds, peak Python-heap growth (tracemalloc) and RSS growth, and the largest
difference from the core's per-class IoU. One JSON line last.
"""

import json
import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.benchmarks.metric import run_metric_benchmark  # noqa: E402


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=cli.positive_int, default=200)
    parser.add_argument("--height", type=cli.positive_int, default=375)
    parser.add_argument("--width", type=cli.positive_int, default=500)
    parser.add_argument("--num-labels", type=cli.positive_int, default=920)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_metric_benchmark(args.images, args.height, args.width, args.num_labels, args.seed)
    for name, row in result["contenders"].items():
        print(
            f"{name:>22}: {row['seconds']:7.2f} s  peak heap +{row['peak_heap_mb']:8.1f} MB  "
            f"RSS +{row['rss_growth_mb']:7.1f} MB  max |diff| {row['max_abs_diff']:.3g}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
