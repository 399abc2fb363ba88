#!/usr/bin/env python
"""The published recipes' training and evaluation figures on this machine: the seed table's Mem and fps columns.

For each recipe (the four published ones by default: the real ViT-B/16 or ViT-S/16 + FCN with 920 labels, random
init) it runs the recipe's training step (batch 32 per device, the recipe's precision: fp16 autocast + GradScaler on
CUDA, float32 on a CPU where accelerate has no fp16) for a few iterations and reports training samples/s, MFU,
peak training memory, evaluation fps by the official protocol (one image at a time, short side 256), the data path's
samples/s per DataLoader worker and the projected wall time of the full recipe. A table, then one JSON line. The logic
lives in `imagenets_hf.benchmarks.recipe`.

    python scripts/bench_recipe.py                                 # on a GPU: the four recipes, batch 32
    python scripts/bench_recipe.py --toy --device cpu --iters 2    # CPU / CI: a tiny encoder, batch 2
"""

import json
import os
import sys

import yaml

# This folder holds a script named evaluate.py: keep it from shadowing the `evaluate` package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from imagenets_hf import cli  # noqa: E402
from imagenets_hf.benchmarks.recipe import (  # noqa: E402
    PUBLISHED_RECIPES,
    format_recipe_table,
    run_recipe_benchmark,
)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", default=",".join(PUBLISHED_RECIPES), help="comma-separated recipe names or files")
    parser.add_argument("--iters", type=cli.positive_int, default=10, help="timed training iterations")
    parser.add_argument(
        "--warmup", type=cli.non_negative_int, default=2, help="untimed iterations first (the first one compiles)"
    )
    parser.add_argument(
        "--batch-size", type=cli.positive_int, default=None, help="per device (default: the recipe's 32; --toy 2)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="default: the recipe's (fp16; float32 on a CPU, as fine-tuning there)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the training model (inductor)")
    parser.add_argument("--toy", action="store_true", help="a 2-block ViT 32 wide at 64 px, batch 2 (CPU, CI)")
    parser.add_argument(
        "--image-size", type=cli.positive_int, default=None, help="training crop and evaluation short side"
    )
    parser.add_argument("--encoder-kwargs", default=None, help='timm overrides as YAML, e.g. "{depth: 2}"')
    parser.add_argument(
        "--eval-iters", type=cli.positive_int, default=10, help="images timed one at a time for eval fps"
    )
    parser.add_argument(
        "--data-images", type=cli.positive_int, default=8, help="generated 500x375 images for the data path"
    )
    parser.add_argument(
        "--data-workers",
        type=cli.positive_int,
        default=None,
        help="workers the data-bound time assumes (default: recipe's)",
    )
    parser.add_argument(
        "--matmul-size",
        type=cli.non_negative_int,
        default=0,
        help="peak matmul side (0: 8192 CUDA, 2048 CPU, 512 --toy)",
    )
    args = parser.parse_args(argv)
    overrides = {}
    if args.image_size:
        overrides.update(crop_size=args.image_size, eval_short_side=args.image_size)
    if args.encoder_kwargs:
        overrides["encoder_kwargs"] = yaml.safe_load(args.encoder_kwargs)
    summary = run_recipe_benchmark(
        args.recipes,
        iters=args.iters,
        warmup=args.warmup,
        batch_size=args.batch_size,
        device=args.device,
        mixed_precision=args.mixed_precision,
        compile=args.compile,
        toy=args.toy,
        overrides=overrides,
        eval_iters=args.eval_iters,
        data_images=args.data_images,
        data_workers=args.data_workers,
        matmul_size=args.matmul_size,
        log=print,
    )
    for line in format_recipe_table(summary):
        print(line)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
