#!/usr/bin/env python
"""Draw a saved model's predictions on a few images of a split as one PNG: a column per image, rows image | ground
truth | prediction (class colours over the image), and a legend naming the classes shown (the model's id2label).

python scripts/make_overlays.py --model outputs/demo --data-dir data/mini --out predictions.png [--num-images 6]
    [--split validation|train_semi|test] [--cell-height 112]
"""

from __future__ import annotations

import sys

from imagenets_hf import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="saved model folder (finetune.py's output) or Hub id")
    parser.add_argument("--data-dir", required=True, help="prepared ImageNet-S folder (official layout)")
    parser.add_argument("--out", required=True, help="the PNG to write (folders created)")
    parser.add_argument(
        "--num-images", type=int, default=6, help="images, spread evenly over the split's sorted files (default 6)"
    )
    parser.add_argument(
        "--split",
        default="validation",
        type=cli.split_choice("validation", "train_semi", "test"),
        help="validation (default), train_semi or test (no ground truth: its row stays white)",
    )
    parser.add_argument("--cell-height", type=int, default=112, help="height of each panel in pixels (default 112)")
    parser.add_argument("--title", help='line above the grid (default: "<model> on <data>/<split>")')
    parser.add_argument("--device", help="cpu, cuda, ... (default: the first GPU when there is one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (transformers')")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    if args.cell_height < 16:
        parser.error(f"--cell-height must be at least 16 pixels, got {args.cell_height}")
    if args.no_progress:
        cli.disable_progress_bars()
    from imagenets_hf.evaluation.overlays import write_prediction_grid  # here: --help answers without torch

    out = write_prediction_grid(
        args.model,
        args.data_dir,
        args.out,
        num_images=args.num_images,
        split=args.split,
        cell_height=args.cell_height,
        device=args.device,
        title=args.title,
    )
    print(f"wrote {out} ({args.num_images} images of {args.data_dir}/{args.split})")


if __name__ == "__main__":
    sys.exit(main())
