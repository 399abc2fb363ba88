#!/usr/bin/env python
"""Benchmark the pipeline at full size: load (first and cached), export, training start, evaluation, prediction,
the submission zip and its check, each timed with its peak memory.

    python scripts/make_mini_dataset.py --out data/ImageNetS919 --scale 919
    python scripts/bench_scale.py --data-dir data/ImageNetS919 --work-dir /tmp/bench-scale

Each stage runs in a fresh process (see imagenets_hf/benchmarks/scale.py); evaluation and prediction run over a
stated number of images and are extrapolated to their whole split. The work folder (cache, parquet, run, model,
predictions) is deleted at the end unless --keep. One line per stage, one JSON line last.
"""

import json
import os
import sys

from imagenets_hf import cli
from imagenets_hf.benchmarks.scale import STAGES, run_scale_benchmark


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True, help="prepared ImageNet-S folder (e.g. from --scale 919)")
    parser.add_argument("--work-dir", required=True, help="scratch folder (emptied first, deleted unless --keep)")
    parser.add_argument("--eval-images", type=cli.positive_int, default=200, help="validation images evaluated")
    parser.add_argument("--predict-images", type=cli.positive_int, default=200, help="test images predicted")
    parser.add_argument("--batch-size", type=cli.positive_int, default=8, help="evaluation and prediction batch")
    parser.add_argument(
        "--num-workers", type=cli.non_negative_int, default=2, help="evaluation and prediction DataLoader workers"
    )
    parser.add_argument(
        "--cache-dir", help="datasets cache to use (and keep) instead of WORK_DIR/cache: rerun later stages alone"
    )
    parser.add_argument("--train-iters", type=cli.positive_int, default=2, help="training iterations run")
    parser.add_argument("--num-proc", type=cli.positive_int, help="threads building the cache (default: every core)")
    parser.add_argument("--no-copy-images", action="store_true", help="cache image paths, not bytes (copy_images)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument("--toy", action="store_true", help="the GPU check's toy model instead of the demo's (tests)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir}: no such folder")
    overrides = None
    if args.toy:
        from imagenets_hf.benchmarks.check_gpu import TOY_DEMO

        overrides = TOY_DEMO
    result = run_scale_benchmark(
        args.data_dir,
        args.work_dir,
        eval_images=args.eval_images,
        predict_images=args.predict_images,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        train_iters=args.train_iters,
        num_proc=args.num_proc,
        cache_dir=args.cache_dir,
        copy_images=not args.no_copy_images,
        recipe_overrides=overrides,
        stages=tuple(args.stages),
        keep=args.keep,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
