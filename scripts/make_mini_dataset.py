"""Write the synthetic mini ImageNet-S (10 classes, official layout) used by the demo and the tests.

python scripts/make_mini_dataset.py --out data/mini [--seed 0] [--overwrite] [--unlabelled-per-class N]
"""

from __future__ import annotations

import sys
import time

from imagenets_hf import cli
from imagenets_hf.data.mini import count_mini_files, make_mini_dataset


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--overwrite", action="store_true", help="replace a mini dataset already in --out")
    parser.add_argument(
        "--unlabelled-per-class",
        type=cli.positive_int,
        default=None,
        metavar="N",
        help="unlabelled images a class in train/ (default 6; the other splits stay the default dataset's files)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    root = make_mini_dataset(
        args.out, seed=args.seed, overwrite=args.overwrite, unlabelled_per_class=args.unlabelled_per_class
    )
    elapsed = time.perf_counter() - start
    for folder, count in count_mini_files(root).items():
        print(f"{folder:26s} {count:4d} files")
    print(f"wrote the mini dataset (seed {args.seed}) to {root} in {elapsed:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
