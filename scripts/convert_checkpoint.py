"""Import pre-trained ViT weights (MAE, DINO / iBOT / SERE, timm, mmsegmentation, transformers) into a ViT + FCN
segmentation model and save it as a Hugging Face folder (safetensors + image processor).

Example:
    python scripts/convert_checkpoint.py --checkpoint mae_pretrain_vit_base.pth --encoder vit_base_patch16_224 \
        --num-labels 920 --out checkpoints/mae-base-fcn
"""

from __future__ import annotations

import argparse
import json
import sys

from imagenets_hf import cli
from imagenets_hf.model.configuration_vit_fcn import PRESETS
from imagenets_hf.model.convert import convert_checkpoint


def json_object(text: str) -> dict:
    """argparse type: a JSON object such as {"depth": 2}."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="file (.pth/.pt/.bin/.safetensors), folder, URL or Hub id")
    parser.add_argument(
        "--encoder", required=True, help="timm encoder name, e.g. vit_base_patch16_224, vit_small_patch14_reg4_dinov2"
    )
    parser.add_argument("--num-labels", type=int, required=True, help="classes including 'other' (920 for 919)")
    parser.add_argument("--out", required=True, help="output folder for save_pretrained")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fcn", help="decoder preset (default: fcn)")
    parser.add_argument("--key", default=None, help="sub-dict holding the weights, e.g. teacher or student")
    parser.add_argument(
        "--allow-partial", action="store_true", help="load what matches even if the encoder is not fully filled"
    )
    parser.add_argument("--labels", default=None, help="text file with one class name a line (id order)")
    parser.add_argument("--encoder-kwargs", type=json_object, default=None, help="JSON dict of timm model overrides")
    parser.add_argument("--drop-path-rate", type=float, default=None, help="encoder stochastic depth rate")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (downloads, writing weights)")
    return parser


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.no_progress:
        cli.disable_progress_bars()
    config_kwargs = {}
    if args.encoder_kwargs is not None:
        config_kwargs["encoder_kwargs"] = args.encoder_kwargs
    if args.drop_path_rate is not None:
        config_kwargs["drop_path_rate"] = args.drop_path_rate
    id2label = None
    if args.labels:
        with open(args.labels, encoding="utf-8") as handle:
            id2label = dict(enumerate(line.strip() for line in handle if line.strip()))
    convert_checkpoint(
        args.checkpoint,
        args.encoder,
        args.num_labels,
        args.out,
        allow_partial=args.allow_partial,
        id2label=id2label,
        key=args.key,
        preset=args.preset,
        **config_kwargs,
    )
    print(f"Saved the model and its image processor to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
