"""Write the synthetic mini ImageNet-S (10 classes, official layout) used by the demo and the tests, or with
--scale a full-size synthetic one with a real subset's counts and image sizes (for scripts/bench_scale.py).

python scripts/make_mini_dataset.py --out data/mini [--seed 0] [--overwrite] [--unlabelled-per-class N]
python scripts/make_mini_dataset.py --out data/ImageNetS919 --scale 919 [--workers N] [--unlabelled-per-class 1]
"""

from __future__ import annotations

import sys
import time

from imagenets_hf import cli
from imagenets_hf.data.mini import count_mini_files, make_mini_dataset
from imagenets_hf.data.scale import make_scale_dataset


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument(
        "--scale",
        type=cli.positive_int,
        help="write a full-size synthetic subset instead: 50, 300 or 919 (real counts), or another class count",
    )
    parser.add_argument(
        "--workers", type=cli.positive_int, help="with --scale: drawing processes (default: every core)"
    )
    parser.add_argument(
        "--unlabelled-per-class",
        type=cli.non_negative_int,
        default=None,
        metavar="N",
        help="unlabelled images a class in train/ (default: 6 for the mini dataset, whose other splits stay the "
        "default files; 1 with --scale)",
    )
    parser.add_argument("--no-progress", action="store_true", help="with --scale: no progress bar")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.scale is None:
        root = make_mini_dataset(
            args.out, seed=args.seed, overwrite=args.overwrite, unlabelled_per_class=args.unlabelled_per_class
        )
        what = "the mini dataset"
    else:
        root = make_scale_dataset(
            args.out,
            scale=args.scale,
            seed=args.seed,
            train_per_class=1 if args.unlabelled_per_class is None else args.unlabelled_per_class,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        what = f"a full-size synthetic ImageNet-S ({args.scale} classes)"
    elapsed = time.perf_counter() - start
    for folder, count in count_mini_files(root).items():
        print(f"{folder:26s} {count:5d} files")
    print(f"wrote {what} (seed {args.seed}) to {root} in {elapsed:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
