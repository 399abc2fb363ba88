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

import sys

from imagenets_hf import cli
from imagenets_hf.training.recipes import RecipeError, add_recipe_arguments, recipe_from_args


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    add_recipe_arguments(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="DIR|latest",
        help="continue the run in --output-dir from its newest complete checkpoint (latest, the default) or from a "
        "checkpoint folder; the recipe must be the one the run was started with (up to the iteration budget and the "
        "logging, evaluation and checkpoint intervals, and --compile)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in --output-dir and start again (without it, or --resume, such a folder is "
        "refused)",
    )
    parser.add_argument(
        "--make-mini-dataset",
        action="store_true",
        help="write the synthetic mini dataset at --data-dir when that folder does not exist (the demo does so at its "
        "own default folder, data/mini, without being asked)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop (and checkpoint) after N iterations in total, keeping the full schedule; continue with --resume",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="at the end of a successful run, push the model, image processor, model card and recipe to this Hub "
        "model repository (private unless --hub-public; needs a Hub login); scripts/push_model.py pushes again",
    )
    parser.add_argument("--hub-public", action="store_true", help="with --push-to-hub: create the repository public")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (ours, datasets', transformers')")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    return parser


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        recipe = recipe_from_args(args)
    except RecipeError as err:  # a recipe name, field or value on the command line that cannot be used
        parser.error(str(err))
    if args.hub_public and args.push_to_hub is None:
        parser.error("--hub-public applies to --push-to-hub")
    if args.no_progress:
        cli.disable_progress_bars()
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return
    from imagenets_hf.training.finetune import finetune  # here: --help and usage errors answer without torch

    finetune(
        recipe,
        resume=args.resume,
        stop_after=args.stop_after,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        make_mini_dataset=args.make_mini_dataset,
        push_to_hub=args.push_to_hub,
        hub_private=not args.hub_public,
    )


if __name__ == "__main__":
    sys.exit(main())
