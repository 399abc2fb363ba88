#!/usr/bin/env python
"""Training-data throughput per CPU thread: the published augmentation, our worker and device paths against a PIL
peer and mmsegmentation's steps in OpenCV, on the same realistic images (500x375 / 375x500 JPEGs with masks).

Prints a table, then one JSON line. On a machine with a GPU it also measures the device path on CUDA. The logic
lives in `imagenets_hf.benchmarks.data`.

    python scripts/bench_data.py --images 64
"""

import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import json  # noqa: E402

from imagenets_hf import cli  # noqa: E402


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=cli.positive_int, default=64, help="realistic images generated (default 64)")
    parser.add_argument("--crop-size", type=cli.positive_int, default=224)
    parser.add_argument(
        "--batch-size", type=cli.positive_int, default=32, help="worker and CPU device batches (default 32)"
    )
    parser.add_argument("--device-batch-size", type=cli.positive_int, default=256, help="batch on CUDA (default 256)")
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=3, help="timed passes per contender; the best counts"
    )
    args = parser.parse_args(argv)
    from imagenets_hf.benchmarks.data import format_data_table, run_data_benchmark

    result = run_data_benchmark(args.images, args.crop_size, args.batch_size, args.repeats, args.device_batch_size)
    for line in format_data_table(result):
        print(line)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
