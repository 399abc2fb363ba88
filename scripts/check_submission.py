#!/usr/bin/env python
"""Check an ImageNet-S test-server zip: every test image predicted, sizes, ids 0..N, method.txt fields.

    python scripts/check_submission.py submission.zip --data-dir DIR [--split test]

Exits 0 when the zip passes, 1 listing the problems otherwise.
"""

import sys

from imagenets_hf import cli
from imagenets_hf.evaluation.submission import check_submission

MAX_LISTED = 100


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("zip", help="the submission zip")
    parser.add_argument("--data-dir", required=True, help="prepared ImageNet-S folder holding <split>/<wnid>/*.JPEG")
    parser.add_argument(
        "--split",
        default="test",
        type=cli.split_choice("test", "validation", "train_semi"),
        help="the split the zip predicts (default: test)",
    )
    parser.add_argument("--num-classes", type=int, help="N (ids 0..N allowed); default: class folders in data-dir")
    args = parser.parse_args(argv)
    problems = check_submission(args.zip, args.data_dir, split=args.split, num_classes=args.num_classes)
    if problems:
        print(f"{args.zip}: {len(problems)} problem(s)")
        for problem in problems[:MAX_LISTED]:
            print(f"  {problem}")
        if len(problems) > MAX_LISTED:
            print(f"  ... and {len(problems) - MAX_LISTED} more")
        return 1
    print(f"{args.zip}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
