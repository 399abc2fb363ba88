#!/usr/bin/env python
"""Evaluate a saved ImageNet-S segmentation model on a split by the official protocol (or another inference mode).

python scripts/evaluate.py --model DIR_OR_HUB_ID --data-dir DIR [--split validation] [--output metrics.json]
    [--plot chart.png] [--batch-size 8] [--dtype bf16]
    [--mode slide [--crop-size 224] [--stride 149]] [--scales mmseg | --scales 0.5 1.0 1.5] [--flip]
accelerate launch --num_processes 2 scripts/evaluate.py ...   # same numbers, split across processes
"""

import os
import sys

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.evaluation.run import run_evaluation  # noqa: E402


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="saved model folder or Hub id")
    parser.add_argument("--data-dir", required=True, help="prepared ImageNet-S folder (official layout)")
    parser.add_argument(
        "--split",
        default="validation",
        type=cli.split_choice("validation", "train_semi"),
        help="validation (default) or train_semi",
    )
    parser.add_argument("--output", help="write every number as JSON here")
    parser.add_argument("--plot", help="write a per-class IoU bar chart (PNG) here")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="autocast dtype (GPU)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--no-extended", action="store_true", help="mIoU family only (skip boundary/size/F/Acc)")
    parser.add_argument("--synset-words", help="LOC_synset_mapping.txt for class names")
    parser.add_argument("--cache-dir", help="datasets cache folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (ours, datasets', transformers')")
    cli.add_inference_mode_arguments(parser)
    args = parser.parse_args(argv)
    mode = cli.inference_mode(args, parser)
    if args.no_progress:
        cli.disable_progress_bars()
    run_evaluation(
        args.model,
        args.data_dir,
        split=args.split,
        output=args.output,
        plot=args.plot,
        batch_size=args.batch_size,
        dtype=args.dtype,
        extended=not args.no_extended,
        num_workers=args.num_workers,
        synset_words=args.synset_words,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        mode=mode,
    )


if __name__ == "__main__":
    sys.exit(main())
