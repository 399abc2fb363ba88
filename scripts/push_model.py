#!/usr/bin/env python
"""Push a trained model folder (finetune.py's output) to a Hugging Face Hub model repository: the model, image
processor, model card (results, picture of predictions, recipe), recipe.yaml and results.json; checkpoints and logs
stay local. What `finetune.py --push-to-hub REPO` does at the end of a run; needs a Hub login (`hf auth login`).

python scripts/push_model.py --model outputs/demo --repo me/imagenets-demo [--public]
"""

from __future__ import annotations

import sys

from imagenets_hf import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the saved model folder (finetune.py's --output-dir)")
    parser.add_argument("--repo", required=True, help="Hub model repository, e.g. me/imagenets-demo")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    args = parser.parse_args(argv)
    from imagenets_hf.deploy.hub import check_push_target, files_to_push, push_model_folder

    files_to_push(args.model)  # a folder without a model is refused before the login check
    check_push_target(args.repo)
    url = push_model_folder(args.model, args.repo, private=not args.public)
    print(f"pushed {args.model} to {url} ({'public' if args.public else 'private'} if new)")


if __name__ == "__main__":
    sys.exit(main())
