"""Export a prepared ImageNet-S folder as parquet + dataset card (loads with plain `datasets.load_dataset`),
and/or publish it to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import logging
import sys

from imagenets_hf import cli
from imagenets_hf.data.export import DEFAULT_MAX_SHARD_SIZE, export_imagenets, push_imagenets_to_hub
from imagenets_hf.data.imagenets import SPLITS


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data-dir", required=True, help="prepared ImageNet-S folder (e.g. ImageNetS919, the mini set)"
    )
    parser.add_argument("--out", help="output folder for the parquet shards and README.md dataset card")
    parser.add_argument(
        "--splits",
        nargs="+",
        type=cli.split_choice(*SPLITS),
        help="splits to export, of train_semi validation test train (default: train_semi validation test present)",
    )
    parser.add_argument("--subset", help="config name (default: detected from the folder: 50, 300, 919, mini, custom)")
    parser.add_argument(
        "--synset-words",
        help="ImageNet synset-words file for class names (default: <data-dir>/LOC_synset_mapping.txt when present, "
        "else the wnids)",
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip bad files (reported) instead of failing")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="parquet shard size (default 500MB)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also publish to this Hub dataset repo (private)")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: make a new repo public")
    parser.add_argument(
        "--annotations-only",
        action="store_true",
        help="with --push-to-hub: publish masks without the ImageNet images (train_semi and validation only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (generating and writing shards)")
    args = parser.parse_args(argv)
    if args.out is None and args.push_to_hub is None:
        parser.error("give --out, --push-to-hub, or both")
    if (args.public or args.annotations_only) and args.push_to_hub is None:
        parser.error("--public and --annotations-only apply to --push-to-hub")
    return args


@cli.entry_point
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.no_progress:
        cli.disable_progress_bars()
    if args.out is not None:
        counts = export_imagenets(
            args.data_dir,
            args.out,
            splits=args.splits,
            subset=args.subset,
            synset_words=args.synset_words,
            skip_bad=args.skip_bad,
            max_shard_size=args.max_shard_size,
        )
        for split, count in counts.items():
            print(f"{split}: {count} rows")
        print(f"wrote {args.out}")
    if args.push_to_hub is not None:
        config_name = push_imagenets_to_hub(
            args.data_dir,
            args.push_to_hub,
            private=not args.public,
            annotations_only=args.annotations_only,
            splits=args.splits,
            subset=args.subset,
            synset_words=args.synset_words,
            skip_bad=args.skip_bad,
            max_shard_size=args.max_shard_size,
        )
        print(f"pushed config {config_name!r} to {args.push_to_hub} ({'public' if args.public else 'private'})")


if __name__ == "__main__":
    sys.exit(main())
