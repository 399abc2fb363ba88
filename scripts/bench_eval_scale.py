#!/usr/bin/env python
"""Benchmark prediction at 920 classes: the post-processing's exact methods against the former full resize.

    python scripts/bench_eval_scale.py [--images 16] [--large-images 2] [--batch-size 8] [--device cpu]

The demo recipe's tiny model (random weights, 920 labels) predicts N synthetic 375x500 images and a few 1000x1000
ones by the official protocol, with each post-processing method ("bounds", "chunks") and the former one (all classes
resized at once); reported: seconds an image, peak RSS, whether the class maps are equal, and the metric's per-image cost.
One JSON line last.
"""

import json
import sys

from imagenets_hf import cli
from imagenets_hf.benchmarks.eval_scale import run_eval_scale_benchmark


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=cli.positive_int, default=16, help="375x500 images (--height, --width)")
    parser.add_argument("--height", type=cli.positive_int, default=375)
    parser.add_argument("--width", type=cli.positive_int, default=500)
    parser.add_argument("--large-images", type=cli.non_negative_int, default=2, help="images of --large-size")
    parser.add_argument("--large-size", type=cli.positive_int, nargs=2, default=(1000, 1000), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=cli.positive_int, default=8)
    parser.add_argument("--num-labels", type=cli.positive_int, default=920)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--no-reference", action="store_true", help="skip the former path (its memory and time)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_eval_scale_benchmark(
        num_images=args.images,
        height=args.height,
        width=args.width,
        large_images=args.large_images,
        large_size=tuple(args.large_size),
        batch_size=args.batch_size,
        num_labels=args.num_labels,
        device=args.device,
        reference=not args.no_reference,
        seed=args.seed,
    )
    for name in ("bounds", "chunks", "former"):
        if name in result:
            row = result[name]
            print(
                f"{name:>8}: {row['s_per_image']:.3f} s an image ({row['s_per_image_main']:.3f} at "
                f"{args.height}x{args.width})  peak RSS {row['peak_rss_gb']:.2f} GB"
            )
    print(f"class maps equal: {result['maps_equal']} (pixels differing: {result['pixels_differing']})")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
