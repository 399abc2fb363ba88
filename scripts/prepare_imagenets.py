"""Build ImageNet-S (ImageNetS50/300/919) in the official layout from a raw ImageNet-1k and the annotation archive.

Example:
    python scripts/prepare_imagenets.py --imagenet /data/imagenet --annotations ImageNetS919.zip \
        --subset 919 --out /data/imagenet-s
"""

from __future__ import annotations

import argparse
import sys

from imagenets_hf import cli
from imagenets_hf.data.lists import OFFICIAL_LISTS_URL
from imagenets_hf.data.prepare import prepare_imagenets


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--imagenet", required=True, help="ImageNet-1k root with train/<wnid>/ and val/")
    parser.add_argument(
        "--annotations",
        required=True,
        nargs="+",
        help="ImageNetS{N}.zip archive(s), unpacked ImageNetS{N}/ folders, or a folder holding them",
    )
    parser.add_argument("--subset", required=True, choices=["50", "300", "919", "all"])
    parser.add_argument("--out", required=True, help="output folder; ImageNetS{N}/ is made inside")
    parser.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    parser.add_argument("--lists", default=None, help="folder with the official lists (default: download and cache)")
    parser.add_argument("--lists-cache", default=None, help="cache folder for downloaded lists")
    parser.add_argument("--lists-url", default=OFFICIAL_LISTS_URL, help="base URL of the official data/ folder")
    parser.add_argument("--no-verify-lists", action="store_true", help="accept lists whose sha256 is not official")
    parser.add_argument("--no-train", action="store_true", help="skip the unlabelled train/ split")
    parser.add_argument("--classes", nargs="+", default=None, help="prepare only these ImageNet-S wnids (a trial)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


@cli.entry_point
def main(argv=None) -> None:
    args = parse_args(argv)
    prepare_imagenets(
        args.imagenet,
        args.annotations,
        args.subset,
        args.out,
        copy=args.copy,
        lists_dir=args.lists,
        cache_dir=args.lists_cache,
        base_url=args.lists_url,
        verify_checksums=not args.no_verify_lists,
        include_train=not args.no_train,
        classes=args.classes,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    sys.exit(main())
