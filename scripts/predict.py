#!/usr/bin/env python
"""Predict a folder of images and write masks in the official encoding (optionally a test-server zip).

python scripts/predict.py --model DIR --images DATA/test --out PRED [--submission submission.zip
    --method-file method.txt] [--overlay] [--skip-bad] [--mode slide] [--scales mmseg] [--flip]
"""

import sys

from imagenets_hf import cli
from imagenets_hf.evaluation.run import run_prediction


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="saved model folder or Hub id")
    parser.add_argument("--images", required=True, help="folder of <wnid>/<name>.JPEG images")
    parser.add_argument("--out", required=True, help="where <wnid>/<name>.png predictions go")
    parser.add_argument("--submission", help="also write the test-server zip here")
    parser.add_argument("--method-file", help="method.txt for the zip (a template is written when absent)")
    parser.add_argument("--overlay", action="store_true", help="write image | ground truth | prediction overlays")
    parser.add_argument("--overlay-dir", help="overlay folder (default: <out>_overlays)")
    parser.add_argument("--masks", help="ground-truth masks for the overlays (default: <images>-segmentation)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip images that cannot be read and list them at the end (and in <out>/skipped_images.txt) instead of "
        "stopping at the first",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="autocast dtype (GPU)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (ours, datasets', transformers')")
    cli.add_inference_mode_arguments(parser)
    args = parser.parse_args(argv)
    mode = cli.inference_mode(args, parser)
    if args.no_progress:
        cli.disable_progress_bars()
    run_prediction(
        args.model,
        args.images,
        args.out,
        submission=args.submission,
        method_file=args.method_file,
        overlay=args.overlay,
        overlay_dir=args.overlay_dir,
        masks_dir=args.masks,
        batch_size=args.batch_size,
        dtype=args.dtype,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        skip_bad=args.skip_bad,
        mode=mode,
    )


if __name__ == "__main__":
    sys.exit(main())
