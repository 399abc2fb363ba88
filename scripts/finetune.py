#!/usr/bin/env python
"""Fine-tune ViT + FCN on ImageNet-S train-semi (the main job).

With no arguments it runs the `demo` recipe: makes the mini dataset in data/mini if absent, trains a tiny model from
scratch on CPU in a few minutes, evaluates it, prints the per-class IoU table and saves the model to outputs/demo.

    python scripts/finetune.py
    accelerate launch scripts/finetune.py
    accelerate launch --multi_gpu --num_processes 8 scripts/finetune.py \\
        --recipe mae-base-pretrained --data-dir ImageNetS919 --pretrained mae_pretrain_vit_base.pth
"""

from __future__ import annotations

import argparse

from imagenets_hf.training.finetune import finetune
from imagenets_hf.training.recipes import add_recipe_arguments, load_recipe, overrides_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="DIR|latest",
        help="continue from a checkpoint folder, or the newest one under <output_dir>/checkpoints (default: latest)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop (and checkpoint) after N iterations in total, keeping the full schedule; continue with --resume",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, overrides_from_args(args))
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return
    finetune(recipe, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)


if __name__ == "__main__":
    main()
