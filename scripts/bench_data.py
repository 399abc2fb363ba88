#!/usr/bin/env python
"""Training-data throughput per DataLoader worker: decode + the published augmentation, torchvision v2 vs plain PIL.

Both sides read the same train-semi rows of the mini dataset (made in data/mini if absent), decode the JPEG and the
mask, and run the same steps (keep-ratio resize to (1024, 256) x U(0.5, 2), 224 crop with cat_max_ratio 0.75, flip,
photometric distortion, normalise, pad) in one process with one thread, as one DataLoader worker does. The PIL peer
is a straightforward PIL + NumPy implementation. Prints a table, then one JSON line. The logic lives in
`imagenets_hf.training.benchmark_data`.

    python scripts/bench_data.py --passes 3
"""

import json
import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.training.benchmark_data import format_data_table, run_data_benchmark  # noqa: E402


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data/mini")
    parser.add_argument("--passes", type=int, default=3, help="passes over the 100 train-semi images")
    parser.add_argument("--crop-size", type=int, default=224)
    args = parser.parse_args(argv)
    result = run_data_benchmark(args.data_dir, args.passes, args.crop_size)
    for line in format_data_table(result):
        print(line)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
